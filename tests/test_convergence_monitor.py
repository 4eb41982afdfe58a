"""ConvergenceMonitor: tags in a real TensorBoard event file, exact steps-to-convergence, zero cost when disabled."""

from __future__ import annotations

import glob
import itertools
import logging
import math
import os
import re
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.util import tensor_util
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from ep_lightning.callbacks import ConvergenceMonitor
from ep_lightning.callbacks.measurements import saturation_fraction, steps_to_tolerance, unconverged_fraction
from ep_lightning.models import EnergyBasedNet, FeedforwardInitializer
from ep_lightning.models.base import EnergyModel, State
from ep_lightning.models.prototypical import PrototypicalNet
from ep_lightning.protocols import expects_converged_free_phase
from ep_lightning.relaxation import RelaxationTrace, relax
from ep_lightning.systems import EquilibriumModule, InitializedEP

CONFIGS = sorted(Path(__file__).resolve().parents[1].glob("configs/mnist/*.yaml"))


# --- helpers ----------------------------------------------------------------------------------------------------
class CountingNet(PrototypicalNet):
    """PrototypicalNet counting its relaxation steps (to prove that a disabled monitor relaxes nothing)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls = 0

    def step(self, state, drive, beta=0.0, target=None):
        self.calls += 1
        return super().step(state, drive, beta, target)


class TinyConvNet(EnergyModel):
    """A prototypical net with one conv layer (C×H×W state) and a dense output, Φ = h·conv(x) + o·(W h + b).

    s ← σ(∂Φ/∂s): h ← σ(conv(x) + unflatten(Wᵀ o)), o ← σ(W flatten(h) + b). Only here to give the monitor 4-D states.
    """

    activation_name = "sigmoid"

    def __init__(self, channels: int = 3, side: int = 4, n_out: int = 3) -> None:
        super().__init__()
        self.num_classes = n_out
        self.conv = nn.Conv2d(1, channels, 3, padding=1)
        self.fc = nn.Linear(channels * side * side, n_out)
        self.shape = (channels, side, side)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (1, self.shape[1], self.shape[2])

    @property
    def init_args(self) -> dict:
        return {"channels": self.shape[0], "side": self.shape[1], "n_out": self.num_classes}

    def init_state_shapes(self) -> list[tuple[int, ...]]:
        return [self.shape, (self.num_classes,)]

    def init_state(self, x: Tensor) -> State:
        w = self.fc.weight
        batch = x.shape[0]
        return (x.new_zeros(batch, *self.shape, dtype=w.dtype), x.new_zeros(batch, self.num_classes, dtype=w.dtype))

    def drive(self, x: Tensor) -> Tensor:
        return self.conv(x)

    def step(self, state: State, drive: Tensor, beta: float = 0.0, target: Tensor | None = None) -> State:
        h, o = state
        sigma = lambda v: torch.sigmoid(4 * (v - 0.5))
        new_h = sigma(drive + (o @ self.fc.weight).view_as(h))
        new_o = sigma(self.fc(h.flatten(1)))
        if target is not None:
            new_o = new_o + beta * (target - o)
        return new_h, new_o

    def phi(self, x: Tensor, state: State) -> Tensor:
        h, o = state
        return (h * self.conv(x)).flatten(1).sum(1) + (o * self.fc(h.flatten(1))).sum(1)

    def parameter_groups(self) -> list[list[nn.Parameter]]:
        return [list(self.conv.parameters()), list(self.fc.parameters())]


def loaders(n: int = 24, shape: tuple[int, ...] = (1, 4, 4), n_cls: int = 3, batch: int = 4, val: bool = False):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, *shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, n_cls, (n,), generator=g)
    train = DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True)
    if not val:
        return train, None
    xv = torch.rand(n, *shape, generator=g, dtype=torch.float64)
    yv = torch.randint(0, n_cls, (n,), generator=g)
    return train, DataLoader(TensorDataset(xv, yv), batch_size=8)


def fit(model: EnergyModel, callbacks: list, tmp_path: Path | None, epochs: int = 1, val: bool = False, **module_kw):
    torch.manual_seed(0)
    steps = {"T": module_kw.pop("T", 8), "K": module_kw.pop("K", 3)}
    module = EquilibriumModule(model.double(), **steps, beta=0.5, lrs=[0.05, 0.05])
    logger = TensorBoardLogger(str(tmp_path), name="run") if tmp_path is not None else False
    trainer = L.Trainer(
        max_epochs=epochs,
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
    )
    train, valid = loaders(shape=module_kw.pop("shape", (1, 4, 4)), val=val)
    trainer.fit(module, train_dataloaders=train, val_dataloaders=valid)
    return trainer, module


def read_runs(log_dir: str) -> dict[str, EventAccumulator]:
    """Every TensorBoard run under ``log_dir``, keyed by its path relative to it ('.' is the main run)."""
    runs = {}
    for d in sorted({os.path.dirname(p) for p in glob.glob(f"{log_dir}/**/events.out.tfevents*", recursive=True)}):
        acc = EventAccumulator(d, size_guidance={"scalars": 0, "images": 0, "histograms": 0, "tensors": 0})
        acc.Reload()
        runs[os.path.relpath(d, log_dir)] = acc
    return runs


def linear_net(rho: float, n_in: int = 4, n: int = 6) -> PrototypicalNet:
    """Linear P-net [n_in, n, n], b_1 = 0, W_1 = ρ Q (Q orthogonal): s_{t+1} = M s_t + c with M = [[0, W_1ᵀ], [W_1, 0]],
    whose singular values all equal ρ, so the residual contracts by exactly ρ per step: ‖d_t‖ = ρ^{t−1} ‖d_1‖."""
    torch.manual_seed(1)
    net = PrototypicalNet([n_in, n, n], activation="identity").double()
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    with torch.no_grad():
        net.synapses[1].weight.copy_(rho * q)
        net.synapses[1].bias.zero_()
    return net


# --- measurements -----------------------------------------------------------------------------------------------
def test_trace_per_sample_residuals_match_a_direct_loop() -> None:
    torch.manual_seed(0)
    net = PrototypicalNet([5, 7, 3], activation="sigmoid").double()
    x = torch.rand(6, 5, dtype=torch.float64)
    trace = RelaxationTrace(x=x, model=net, keep_outputs=2)
    with torch.no_grad():
        relax(net, net.drive(x), net.init_state(x), 5, trace=trace)
        states = [net.init_state(x)]
        for _ in range(5):
            states.append(net.step(states[-1], net.drive(x)))
    expected = torch.stack(
        [torch.stack([(a - b).norm(dim=1) for a, b in zip(s1, s0)]) for s0, s1 in itertools.pairwise(states)]
    )
    # Same float64 operations in the same order: agreement to rounding.
    torch.testing.assert_close(trace.sample_residuals, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(trace.residuals, expected.mean(2), rtol=1e-12, atol=0)
    torch.testing.assert_close(trace.total_residuals, expected.pow(2).sum(1).sqrt(), rtol=1e-12, atol=0)
    assert trace.outputs.shape == (6, 2, 3)
    torch.testing.assert_close(trace.outputs[-1], states[-1][-1][:2], rtol=0, atol=0)
    torch.testing.assert_close(trace.phi, torch.stack([net.phi(x, s).mean() for s in states[1:]]), rtol=1e-12, atol=0)


def test_steps_to_tolerance_on_a_known_contraction_rate(caplog: pytest.LogCaptureFixture) -> None:
    rho, T = 0.5, 12
    net = linear_net(rho)
    module = EquilibriumModule(net, T=T, K=2, beta=0.5)
    scales = torch.logspace(0, 3, 10, dtype=torch.float64)  # samples whose first residual spans three decades
    x = torch.rand(10, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * scales[:, None]
    c = (net.synapses[0](x)).norm(dim=1).detach()  # ‖d_1(i)‖ = ‖W_0 x_i + b_0‖ (the output layer starts at b_1 = 0)
    final = rho ** (T - 1) * c
    sorted_final = final.sort().values
    tol = float((sorted_final[6] * sorted_final[7]).sqrt())  # between two samples: 3 of 10 end unconverged
    expected_frac = float((final >= tol).double().mean())
    # A second tolerance, crossed by the batch-mean residual ρ^{t−1}·mean(c) between t = 7 and t = 8.
    tol_steps = rho**6.5 * float(c.mean())
    mean_curve = [rho ** (t - 1) * float(c.mean()) for t in range(1, T + 1)]
    expected_steps = next(t for t, r in enumerate(mean_curve, start=1) if r < tol_steps)
    assert expected_steps == 8 and all(r >= tol for r in mean_curve)  # the mean never reaches the first tolerance

    snap = ConvergenceMonitor(tolerance=tol_steps).snapshot(module, x, torch.zeros(10, dtype=torch.long))
    assert snap.free.steps_to_tol == expected_steps
    monitor = ConvergenceMonitor(tolerance=tol, warn_unconverged=0.2)
    snap = monitor.snapshot(module, x, torch.zeros(10, dtype=torch.long))
    assert snap.free.steps_to_tol == T + 1  # not reached within T
    assert unconverged_fraction(snap.free.final, tol) == pytest.approx(expected_frac) == 0.3
    # float64, ≤ 12 steps of 6×6 products: the per-sample residual follows ρ^{T−1}·c_i to 1e-10 relative.
    torch.testing.assert_close(snap.free.final, final, rtol=1e-10, atol=0)
    # Per layer the residual alternates between the layers: layer1 moves at odd t, the output layer at even t.
    for t in range(1, T + 1):
        moving = 0 if t % 2 else 1
        assert snap.free.residuals[t - 1, moving] == pytest.approx(rho ** (t - 1) * float(c.mean()), rel=1e-10)
        assert snap.free.residuals[t - 1, 1 - moving] == pytest.approx(0.0, abs=1e-12 * float(c.max()))
    metrics = monitor.summary_metrics(snap, module)
    assert metrics["convergence/free/steps_to_tol"] == T + 1
    assert metrics["convergence/free/unconverged_frac"] == pytest.approx(0.3)
    assert "saturation/free/layer1" not in metrics  # identity: σ has no bounds
    warnings = lambda monitor, system, snap=snap, epoch=None: _warning(caplog, monitor, snap, system, epoch)
    # 3 of 10 samples unconverged (more than warn_unconverged = 0.2): one line saying so.
    text = warnings(monitor, module)
    assert "test batch: the free phase ended unconverged after T = 12 steps (30 % of the samples" in text, text
    assert text.count("\n") == 1, text
    # 30 % is under warn_unconverged = 0.5: silent for a training-batch snapshot; but on the fixed batch (an epoch's
    # end) the batch mean that never got under the tolerance within T is warned about.
    lenient = ConvergenceMonitor(tolerance=tol, warn_unconverged=0.5)
    assert warnings(lenient, module) == ""
    assert "ended unconverged" in warnings(lenient, module, epoch=0)
    # A tolerance that the batch mean reaches at t = 8 and every sample by t = T: silent, even at warn_unconverged 0.
    quiet = ConvergenceMonitor(tolerance=tol_steps, warn_unconverged=0.0)
    converged = quiet.snapshot(module, x, torch.zeros(10, dtype=torch.long))
    assert unconverged_fraction(converged.free.final, tol_steps) == 0.0
    assert warnings(quiet, module, converged, epoch=0) == ""
    # The same unconverged batch from a system whose free phase is truncated on purpose (Initialized EP): no warning.
    iep = InitializedEP(EnergyBasedNet([4, 6, 3]), FeedforwardInitializer([4, 6, 3]), T=T, K=2, lrs=[0.1, 0.1])
    assert expects_converged_free_phase(module) and not expects_converged_free_phase(iep)
    assert warnings(monitor, iep) == ""


def _warning(caplog: pytest.LogCaptureFixture, monitor, snap, system, epoch=None, metrics=None) -> str:
    """What ``warn_if_in_trouble`` logs for a snapshot (empty when all is well)."""
    caplog.clear()
    metrics = monitor.summary_metrics(snap, system) if metrics is None else metrics
    with caplog.at_level(logging.WARNING, logger="ep_lightning.callbacks.convergence"):
        monitor.warn_if_in_trouble(snap, system, metrics, "test batch", epoch)
    return caplog.text


def test_measurement_helpers() -> None:
    assert steps_to_tolerance(torch.tensor([1.0, 0.1, 0.01, 0.001]), 0.05) == 3
    assert steps_to_tolerance(torch.tensor([1.0, 0.1]), 0.05) == 3  # never: steps + 1
    assert unconverged_fraction(torch.tensor([0.1, 0.0, 0.2, 0.0]), 0.1) == 0.5
    s = torch.tensor([0.0, 0.005, 0.5, 0.995, 1.0, 0.02])
    assert saturation_fraction(s, (0.0, 1.0), 0.01) == pytest.approx(4 / 6)
    assert saturation_fraction(torch.tensor([-1.0, 0.0, 0.99]), (-1.0, 1.0), 0.01) == pytest.approx(2 / 3)


def test_snapshot_uses_the_modules_start_state_and_drive() -> None:
    """Systems that start elsewhere (Initialized EP: s^f, anchored drive) are relaxed the way they train."""

    class Shifted(EquilibriumModule):
        def initial_state(self, x: Tensor, index: Tensor | None = None) -> State:
            return tuple(s + 0.3 for s in self.net.init_state(x))

        def relaxation_drive(self, x: Tensor, start: State) -> Tensor:
            return self.net.drive(x * 0.5)

    torch.manual_seed(0)
    net = PrototypicalNet([5, 4, 3]).double()
    module = Shifted(net, T=3, K=2, beta=0.5)
    x = torch.rand(4, 5, dtype=torch.float64)
    snap = ConvergenceMonitor().snapshot(module, x, torch.zeros(4, dtype=torch.long))
    with torch.no_grad():
        start = tuple(s + 0.3 for s in net.init_state(x))
        first = net.step(start, net.drive(x * 0.5))
    expected = torch.stack([(a - b).norm(dim=1) for a, b in zip(first, start)]).mean(1)
    torch.testing.assert_close(snap.free.residuals[0], expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(snap.free.outputs[0], start[-1][:3], rtol=0, atol=0)


# --- TensorBoard output -----------------------------------------------------------------------------------------
def test_logs_expected_tags_to_a_tensorboard_event_file(tmp_path: Path) -> None:
    monitor = ConvergenceMonitor(every_n_steps=4, every_n_epochs=1, max_samples=10, trajectory_samples=2)
    trainer, module = fit(PrototypicalNet([16, 8, 3]), [monitor], tmp_path, epochs=2)
    assert monitor.batch_source == "train"  # no validation data: first training samples
    runs = read_runs(trainer.logger.log_dir)
    # Curves of all snapshots in two runs (not one per snapshot), at x = index × stride + t with stride 100 > T + K.
    assert set(runs) == {".", "relaxation/fixed_batch", "relaxation/training_batch"}
    main = runs["."].Tags()
    names = ["layer1", "output"]
    scalars = {"convergence/free/steps_to_tol", "convergence/nudged/steps_to_tol", "convergence/free/unconverged_frac"}
    for phase in ("free", "nudged"):
        scalars |= {f"convergence/{phase}/final_residual/{n}" for n in names}
        scalars |= {f"saturation/{phase}/{n}" for n in names}
    train_scalars = {re.sub(r"^(convergence|saturation)/", r"\1/train/", tag) for tag in scalars}
    assert scalars | train_scalars <= set(main["scalars"])
    # Epoch-level scalars once per epoch; training-batch scalars at steps 0, 4, 8 (6 steps per epoch).
    assert [e.step for e in runs["."].Scalars("convergence/free/steps_to_tol")] == [5, 11]
    assert [e.step for e in runs["."].Scalars("convergence/train/free/steps_to_tol")] == [0, 4, 8]
    assert set(main["images"]) == {
        "convergence/relaxation",
        "convergence/output_trajectory",
        "convergence/train/relaxation",
    }
    assert set(main["histograms"]) == (
        {f"states/{p}/{n}" for p in ("free", "nudged") for n in names}
        | {f"{kind}/synapses.{i}.{w}" for kind in ("weights", "ep_update") for i in (0, 1) for w in ("weight", "bias")}
    )
    T, K = module.T, module.K
    curve_tags = {
        f"convergence/{p}/{kind}/{n}"
        for p in ("free", "nudged")
        for kind in ("residual", "log10_residual")
        for n in [*names, "whole_state"]
    }
    curve_tags |= {"convergence/free/phi", "convergence/nudged/phi"}
    fixed = runs["relaxation/fixed_batch"]
    assert set(fixed.Tags()["scalars"]) == curve_tags
    epochs = (0, 1)
    assert [e.step for e in fixed.Scalars("convergence/free/residual/layer1")] == [
        100 * epoch + t for epoch in epochs for t in range(1, T + 1)
    ]
    assert [e.step for e in fixed.Scalars("convergence/nudged/phi")] == [
        100 * epoch + t for epoch in epochs for t in range(T + 1, T + K + 1)
    ]
    train_curve_tags = {t.replace("convergence/", "convergence/train/") for t in curve_tags}
    training = runs["relaxation/training_batch"]
    assert set(training.Tags()["scalars"]) == train_curve_tags
    assert [e.step for e in training.Scalars("convergence/train/free/residual/output")] == [
        100 * step + t for step in (0, 4, 8) for t in range(1, T + 1)
    ]

    # The logged per-t residual is the one of the fixed batch relaxed with the final weights (last epoch).
    x, labels = monitor._batch
    tr = RelaxationTrace()
    with torch.no_grad():
        relax(module.net, module.net.drive(x), module.net.init_state(x), T, trace=tr)
    logged = [e.value for e in fixed.Scalars("convergence/free/residual/output") if e.step > 100]
    # Event files hold float32 values: relative agreement to 1e-6.
    torch.testing.assert_close(torch.tensor(logged, dtype=torch.float64), tr.residuals[:, 1], rtol=1e-6, atol=1e-12)
    events = fixed.Scalars("convergence/free/log10_residual/whole_state")
    logged = {e.step - 100: e.value for e in events if e.step > 100}
    whole = tr.total_residuals.mean(1)
    assert set(logged) == {t + 1 for t in range(T) if whole[t] > 0}
    for t, value in logged.items():
        assert value == pytest.approx(math.log10(whole[t - 1]), abs=1e-5)

    # EP-update histogram = (1/β) mean_i (o^β h^βᵀ − o* h*ᵀ) for W_1, computed independently from the states.
    net = module.net
    with torch.no_grad():
        free = relax(net, net.drive(x), net.init_state(x), T)
        nudged = relax(net, net.drive(x), free, K, module.beta, net.encode_target(labels, x))
    update = (nudged[1].T @ nudged[0] - free[1].T @ free[0]) / x.shape[0] / module.beta
    hist = runs["."].Histograms("ep_update/synapses.1.weight")[-1].histogram_value
    assert hist.num == update.numel()
    assert hist.sum == pytest.approx(float(update.sum()), rel=1e-4, abs=1e-6)  # histogram built in float32

    # The custom-scalars layout exists and each of its regexes matches a logged tag in some run.
    event = runs["."].Tensors("custom_scalars__config__")[0]
    layout = layout_pb2.Layout.FromString(tensor_util.make_ndarray(event.tensor_proto).item())
    all_tags = {t for acc in runs.values() for t in acc.Tags()["scalars"]}
    regexes = [r for cat in layout.category for chart in cat.chart for r in chart.multiline.tag]
    assert len(layout.category) == 3 and len(regexes) == 2 * (len(names) + 2) + 4
    for regex in regexes:
        assert any(re.search(regex, t) for t in all_tags), regex


def test_fixed_batch_prefers_validation_data(tmp_path: Path) -> None:
    monitor = ConvergenceMonitor(every_n_steps=0, max_samples=5, histograms=False)
    trainer, _ = fit(PrototypicalNet([16, 8, 3]), [monitor], tmp_path, val=True)
    assert monitor.batch_source == "val"
    expected = trainer.val_dataloaders.dataset.tensors[0][:5]
    torch.testing.assert_close(monitor._batch[0], expected, rtol=0, atol=0)
    runs = read_runs(trainer.logger.log_dir)
    assert set(runs) == {".", "relaxation/fixed_batch"}
    assert not any(tag.startswith("convergence/train/") for tag in runs["."].Tags()["scalars"])


def test_conv_model_logs_feature_maps(tmp_path: Path) -> None:
    monitor = ConvergenceMonitor(every_n_steps=0, feature_map_samples=2, max_samples=6)
    trainer, _ = fit(TinyConvNet(), [monitor], tmp_path)
    runs = read_runs(trainer.logger.log_dir)
    images = runs["."].Tags()["images"]
    assert "feature_maps/free/layer1" in images and "feature_maps/free/output" not in images
    image = runs["."].Images("feature_maps/free/layer1")[-1]
    assert image.height > 100 and image.width > 100
    assert "saturation/free/layer1" in runs["."].Tags()["scalars"]


# --- cost -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs", [{"enabled": False}, {"every_n_steps": 0, "every_n_epochs": 0}], ids=["disabled", "zero-frequencies"]
)
def test_disabled_monitor_adds_no_relaxation(tmp_path: Path, kwargs: dict) -> None:
    _, baseline = fit(CountingNet([16, 8, 3]), [], None)
    trainer, module = fit(CountingNet([16, 8, 3]), [ConvergenceMonitor(**kwargs)], tmp_path)
    assert module.net.calls == baseline.net.calls  # no relaxation beyond training's
    assert not os.path.exists(os.path.join(trainer.logger.log_dir, "relaxation"))
    tags = read_runs(trainer.logger.log_dir)["."].Tags()["scalars"]
    assert not any(t.startswith(("convergence", "saturation")) for t in tags)
    _, enabled = fit(CountingNet([16, 8, 3]), [ConvergenceMonitor(every_n_steps=0)], None)
    assert enabled.net.calls > baseline.net.calls  # control: an enabled monitor does relax (the count can fail)


def test_monitor_does_not_change_training(tmp_path: Path) -> None:
    """Same seed, with and without the monitor: identical weights (no RNG use, no gradient side effects)."""
    torch.manual_seed(3)
    _, plain = fit(PrototypicalNet([16, 8, 3]), [], None, epochs=2)
    torch.manual_seed(3)
    _, watched = fit(PrototypicalNet([16, 8, 3]), [ConvergenceMonitor(every_n_steps=5)], tmp_path, epochs=2)
    untrained = PrototypicalNet([16, 8, 3]).double()
    assert not any(torch.equal(p, q) for p, q in zip(plain.parameters(), untrained.parameters()))  # it did train
    for p, q in zip(plain.parameters(), watched.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


# --- configuration ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field, value",
    [
        ("every_n_steps", -1),
        ("every_n_epochs", 1.5),
        ("max_samples", 0),
        ("tolerance", 0.0),
        ("tolerance", float("nan")),
        ("warn_unconverged", 1.5),
        ("saturation_margin", 0.5),
        ("source", "test"),
        ("feature_map_channels", 0),
    ],
)
def test_bad_arguments_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        ConvergenceMonitor(**{field: value})


def test_module_without_energy_model_is_rejected() -> None:
    class Plain(L.LightningModule):
        pass

    with pytest.raises(TypeError, match="RelaxingSystem"):
        ConvergenceMonitor().setup(L.Trainer(logger=False), Plain(), "fit")
    ConvergenceMonitor(enabled=False).setup(L.Trainer(logger=False), Plain(), "fit")  # off: no requirement


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_has_the_monitor_on(path: Path) -> None:
    config = yaml.safe_load(path.read_text())
    defaults = yaml.safe_load((path.parents[1] / "defaults.yaml").read_text())  # loaded before every config
    callbacks = config.get("trainer", {}).get("callbacks", defaults["trainer"]["callbacks"])
    monitors = [c for c in callbacks if c["class_path"].endswith("ConvergenceMonitor")]
    assert len(monitors) == 1, f"{path.name}: expected one ConvergenceMonitor in trainer.callbacks"
    monitor = ConvergenceMonitor(**monitors[0].get("init_args", {}))
    assert monitor.active


def test_every_system_declares_what_the_monitors_read() -> None:
    """The callbacks read systems through ``ep_lightning.protocols``; every system satisfies it."""
    from ep_lightning.protocols import InitializedSystem, RelaxingSystem
    from ep_lightning.systems import InitializerDistillation

    net = lambda: EnergyBasedNet([784, 20, 10], activation="hard_sigmoid", eps=0.5, cost_scale=1.0)
    ep = EquilibriumModule(PrototypicalNet([16, 8, 3]), T=4, K=2)
    iep = InitializedEP(net(), FeedforwardInitializer([784, 20, 10]), lrs=[0.1, 0.05])
    distill = InitializerDistillation(net(), lrs=[0.1, 0.05])
    assert isinstance(ep, RelaxingSystem) and not isinstance(ep, InitializedSystem)
    assert isinstance(iep, InitializedSystem) and isinstance(distill, InitializedSystem)
    assert ep.has_nudged_phase and ep.nudging_pair() == (0.0, 0.1)
    assert not distill.has_nudged_phase and distill.nudging_pair() is None, "no nudged phase: the monitor skips it"
    bptt = EquilibriumModule(PrototypicalNet([16, 8, 3]), algorithm="bptt", T=4, K=2)
    assert not bptt.has_nudged_phase and bptt.nudging_pair() is None, "BPTT has no nudged phase"


# --- the monitors show what training applied ---------------------------------------------------------------------
class AppliedUpdate(L.Callback):
    """At the optimizer step of the first batch: the applied update −∇ (the parameters' .grad after manual_backward)
    and what the monitor computes for that batch and those weights, with the pair the step used."""

    def __init__(self, monitor: ConvergenceMonitor, x: Tensor, labels: Tensor) -> None:
        self.monitor, self.x, self.labels = monitor, x, labels
        self.applied: dict[str, Tensor] = {}
        self.logged: dict[str, Tensor] = {}
        self.pair = None

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if self.applied:
            return
        self.applied = {f"ep_update/{n}": -p.grad.clone() for n, p in pl_module.net.named_parameters()}
        self.pair = pl_module.nudging_pair()
        snap = self.monitor.snapshot(pl_module, self.x, self.labels)
        self.logged = {k: v for k, v in self.monitor.histograms_of(snap, pl_module).items() if "ep_update" in k}


@pytest.mark.parametrize(
    "nudging, readout", [("one_sided", "mse"), ("symmetric", "mse"), ("random_sign", "mse"), ("symmetric", "ce")]
)
def test_the_logged_update_is_the_applied_update_for_every_nudging(nudging: str, readout: str) -> None:
    """One batch that is also the monitor's fixed batch: the monitor's ``ep_update/*`` equals −(the gradient training
    applied) for one-sided, symmetric and random-sign nudging (and a softmax read-out, whose cross-entropy gradient
    joins the update), with the pair the step drew; the monitor never draws from the sign stream. Float64, the
    same phases and the same loss: equal to rounding."""
    torch.manual_seed(0)
    net = PrototypicalNet([16, 8, 8, 3], readout=readout).double()
    module = EquilibriumModule(net, T=8, K=3, beta=0.5, lrs=[0.05] * 3, nudging=nudging, sign_seed=4)
    x = torch.rand(6, 16, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    monitor = ConvergenceMonitor(every_n_steps=0, every_n_epochs=0)
    probe = AppliedUpdate(monitor, x, labels)
    trainer = L.Trainer(
        max_steps=1,
        logger=False,
        callbacks=[probe],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module, DataLoader(TensorDataset(x, labels), batch_size=6))
    assert probe.pair == module.nudging_pair()
    expected_pair = {"one_sided": (0.0, 0.5), "symmetric": (-0.5, 0.5)}.get(nudging)
    if expected_pair is not None:
        assert probe.pair == expected_pair
    assert probe.logged.keys() == probe.applied.keys() and probe.applied
    for tag, applied in probe.applied.items():
        torch.testing.assert_close(probe.logged[tag], applied, rtol=1e-10, atol=1e-13, msg=tag)
    if nudging == "random_sign":  # one draw for the one step: the monitor's reads left the stream alone
        fresh = EquilibriumModule(net, beta=0.5, nudging="random_sign", sign_seed=4)
        assert fresh.draw_nudging_pair() == probe.pair
        assert torch.equal(fresh.sign_generator.get_state(), module.sign_generator.get_state())


def test_bptt_runs_show_no_nudged_phase(tmp_path: Path) -> None:
    """BPTT has no nudged phase: the monitors relax none and log no nudged tags and no EP update; the training-batch
    snapshot is the training step's own free phase (T steps), recorded as it ran."""
    monitor = ConvergenceMonitor(every_n_steps=2, every_n_epochs=1, max_samples=4)
    torch.manual_seed(0)
    module = EquilibriumModule(PrototypicalNet([16, 8, 3]).double(), algorithm="bptt", T=8, K=3, lrs=[0.05, 0.05])
    logger = TensorBoardLogger(str(tmp_path), name="run")
    trainer = L.Trainer(
        max_epochs=1,
        logger=logger,
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        log_every_n_steps=1,
    )
    train, _ = loaders()
    trainer.fit(module, train_dataloaders=train)
    runs = read_runs(trainer.logger.log_dir)
    tags = {t for acc in runs.values() for t in acc.Tags()["scalars"]} | set(runs["."].Tags()["histograms"])
    assert any("/free/" in t for t in tags) and not any("nudged" in t or "ep_update" in t for t in tags), tags
    training = runs["relaxation/training_batch"]
    assert [e.step for e in training.Scalars("convergence/train/free/residual/layer1")] == [
        100 * step + t for step in (0, 2, 4) for t in range(1, 9)
    ]


def test_warnings_name_a_saturated_or_saturating_layer(caplog: pytest.LogCaptureFixture) -> None:
    """The one-line summary of trouble: a hidden layer saturated on (almost) every unit, or one whose saturation grew
    by ``warn_saturation_growth`` since the first monitored epoch; the output layer of an mse net (saturated by its
    one-hot targets) is never named."""
    net = linear_net(0.5)
    module = EquilibriumModule(net, T=12, K=2, beta=0.5)
    x = torch.rand(4, 4, dtype=torch.float64)
    monitor = ConvergenceMonitor(tolerance=1.0, warn_saturation_growth=0.2)  # converged: only saturation speaks
    snap = monitor.snapshot(module, x, torch.zeros(4, dtype=torch.long))
    metrics = lambda hidden, output: {"saturation/free/layer1": hidden, "saturation/free/output": output}
    first = _warning(caplog, monitor, snap, module, epoch=0, metrics=metrics(0.17, 0.7))
    assert first == ""  # the first epoch sets the reference
    assert _warning(caplog, monitor, snap, module, epoch=1, metrics=metrics(0.3, 0.99)) == ""  # +13 points; output
    grew = _warning(caplog, monitor, snap, module, epoch=4, metrics=metrics(0.52, 0.995))
    assert "layer1 saturation grew 17 % → 52 % since epoch 0" in grew and "output" not in grew, grew
    full = _warning(caplog, monitor, snap, module, epoch=5, metrics=metrics(0.999, 1.0))
    assert "layer1 saturated (100 % of its units" in full and "learning rates too large" in full, full
