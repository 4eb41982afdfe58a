"""GDU property (Ernoult et al. 2019, Thm 1): EP updates against BPTT gradients, step by step.

Exact case: toy models whose transition is ∂Φ/∂s, float64, converged free phase → error O(β).
Practical case: P-1h with tanh. Plumbing: BPTT per-step gradients against independent autograd computations, the
summed EP update against the update training applies, the `gdu` subcommand and the GDUMonitor callback.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from ep_lightning.callbacks import GDUMonitor
from ep_lightning.cli import cli_main
from ep_lightning.data import MNISTDataModule
from ep_lightning.gdu import (
    GDUResult,
    bptt_gradients,
    cosine_similarity,
    gdu_check,
    gdu_metrics,
    named_parameter_list,
    normalized_rmse,
    sign_agreement,
)
from ep_lightning.models import ConvPrototypicalNet, PrototypicalNet
from ep_lightning.models.toy import toy_batch, toy_model
from ep_lightning.relaxation import relax
from ep_lightning.systems import EquilibriumModule

TOY_T = {"linear": 200, "energy_tanh": 600}


def max_step_error(result: GDUResult) -> float:
    """max over layers and steps t of ‖Δ^EP(t) − (−∇^BPTT(t))‖ / max_t' ‖∇^BPTT(t')‖ (the layer's scale, so steps
    where BPTT is structurally zero, e.g. every other step of the bipartite linear chain, are covered too)."""
    worst = 0.0
    for _, _, ep, bp in result.pairs():
        scale = max(float(bp[t].norm()) for t in range(result.K))
        worst = max(worst, max(float((ep[t] - bp[t]).norm()) / scale for t in range(result.K)))
    return worst


@pytest.mark.parametrize("kind", ["linear", "energy_tanh"])
def test_exact_gdu_error_is_linear_in_beta(kind: str) -> None:
    """Transition = ∂Φ/∂s and converged free phase: Δ^EP(β, t) = −∇^BPTT(t) + O(β) at every step and layer.

    Measured: max step error 1.04e-3 → 1.04e-4 (linear), 8.3e-4 → 8.3e-5 (EB tanh) at β = 1e-3 → 1e-4, a ratio
    of 10.0 to three digits. The bounds [8, 12] allow for the O(β²) term; 1e-3 is the issue's bound. A wrong time
    index, sign or ε scaling gives O(1) errors that do not shrink with β.
    """
    model = toy_model(kind)
    x, labels = toy_batch(model)
    errors = []
    for beta in (1e-3, 1e-4):
        result = gdu_check(model, x, labels, T=TOY_T[kind], K=12, beta=beta)
        # float64 converged: the last free step moves the state by less than 1e-12.
        assert max(result.free_residual) < 1e-12
        errors.append(max_step_error(result))
    assert 8.0 < errors[0] / errors[1] < 12.0, errors
    assert errors[1] < 1e-3, errors


def test_exact_gdu_on_the_conv_model_with_identity_sigma() -> None:
    """The check is written against the EnergyModel contract only: on P-conv with σ = identity (transition = ∂Φ/∂s
    through max-pool indices and transposed convolutions) and weights ×0.03 (contracting, converged in float64), the
    error is O(β) on 4-d conv states too. Measured 1.69e-3 → 1.69e-4 at β = 1e-3 → 1e-4; bounds as above."""
    torch.manual_seed(0)
    model = ConvPrototypicalNet(
        input_size=14, channels=[4, 6], kernel_size=3, pool_size=2, num_classes=3, activation="identity"
    ).double()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.03)
    x = torch.rand(2, 1, 14, 14, dtype=torch.float64)
    labels = torch.tensor([0, 2])
    errors = []
    for beta in (1e-3, 1e-4):
        result = gdu_check(model, x, labels, T=300, K=8, beta=beta)
        assert max(result.free_residual) < 1e-12
        assert result.ep_neurons[0].shape == (8, 4, 6, 6)
        errors.append(max_step_error(result))
    assert 8.0 < errors[0] / errors[1] < 12.0, errors
    assert errors[1] < 1e-3, errors


def test_energy_toy_needs_the_nudge_scale() -> None:
    """Without dividing by ε the EB neural updates are off by the factor ε (1 − ε relative error): the correction
    is what makes the exact case exact."""
    model = toy_model("energy_tanh")
    x, labels = toy_batch(model)
    result = gdu_check(model, x, labels, T=TOY_T["energy_tanh"], K=6, beta=1e-4)
    out_ep, out_bp = result.ep_neurons[-1], result.bptt_neurons[-1]
    unscaled = out_ep * model.nudge_scale
    assert float((unscaled[0] - out_bp[0]).norm() / out_bp[0].norm()) == pytest.approx(1 - model.eps, abs=1e-3)


def test_bptt_per_step_gradients_match_independent_autograd() -> None:
    """∂L/∂z_{K−t} and ∂L/∂θ_{K−t} from the one-backward-pass computation against separate autograd runs.

    Independent: for ∇_s(t) relax t steps from a leaf z_{K−t}; for ∇_θ(t) take one step with θ from z_{K−t−1},
    then t steps with a frozen copy of the network. Float64, identical up to rounding (1e-12).
    """
    torch.manual_seed(1)
    model = PrototypicalNet([6, 7, 5, 3], activation="tanh").double()
    x = torch.randn(4, 6, dtype=torch.float64)
    target = model.encode_target(torch.tensor([0, 2, 1, 2]), x)
    K = 5
    with torch.no_grad():
        free = relax(model, model.drive(x), model.init_state(x), 8)  # deliberately not converged
    neurons, weights = bptt_gradients(model, x, target, free, K)
    with torch.no_grad():
        z = [free]
        for _ in range(K):
            z.append(model.step(z[-1], model.drive(x)))
    frozen = copy.deepcopy(model).requires_grad_(False)
    names, params = named_parameter_list(model)
    for t in range(K):
        start = tuple(s.clone().requires_grad_(True) for s in z[K - t])
        loss = model.cost(relax(frozen, frozen.drive(x), start, t), target).mean()
        grads = torch.autograd.grad(loss, start, allow_unused=True, materialize_grads=True)
        for n, g in enumerate(grads):
            torch.testing.assert_close(-neurons[n][t], g.sum(0), rtol=1e-12, atol=1e-14)
        # ∇_θ(t): θ acts in step K − t only.
        after = model.step(z[K - t - 1], model.drive(x))
        loss = model.cost(relax(frozen, frozen.drive(x), after, t), target).mean()
        grads = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
        for i, g in enumerate(grads):
            torch.testing.assert_close(-weights[i][t], g, rtol=1e-12, atol=1e-14, msg=f"{names[i]} at t={t}")


def test_summed_updates_equal_the_training_updates() -> None:
    """Σ_t Δ^EP_θ(t) is the EP update training applies (−∇ of the loss of ``ep_update``, and the parameter change of
    one SGD step divided by the learning rate); with a converged free phase Σ_t −∇^BPTT_θ(t) is minus the
    truncated-BPTT gradient of ``bptt_update``. Float64: equal up to rounding."""
    model = toy_model("energy_tanh", layers=(5, 9, 4))
    x, labels = toy_batch(model, batch_size=3)
    module = EquilibriumModule(model, T=600, K=7, beta=0.05)
    target = model.encode_target(labels, x)
    result = gdu_check(model, x, labels, T=module.T, K=module.K, beta=module.beta)
    names, params = named_parameter_list(model)

    start = model.init_state(x)
    grads = torch.autograd.grad(module.ep_update(x, target, start)[0], params)
    for name, g, ep in zip(names, grads, result.ep_params):
        torch.testing.assert_close(ep.sum(0), -g, rtol=1e-10, atol=1e-12, msg=name)

    lr = 0.1
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(params, lr=lr)
    optimizer.zero_grad()
    module.ep_update(x, target, start)[0].backward()
    optimizer.step()
    for name, p, p0, ep in zip(names, params, before, result.ep_params):
        torch.testing.assert_close((p.detach() - p0) / lr, ep.sum(0), rtol=1e-8, atol=1e-12, msg=name)
    with torch.no_grad():
        for p, p0 in zip(params, before):
            p.copy_(p0)

    bptt = EquilibriumModule(model, algorithm="bptt", T=module.T, K=module.K)
    grads = torch.autograd.grad(bptt.bptt_update(x, target, start)[0], params)
    for name, g, bp in zip(names, grads, result.bptt_params):
        torch.testing.assert_close(bp.sum(0), -g, rtol=1e-9, atol=1e-12, msg=name)


def _mnist_batch(size: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    data = MNISTDataModule(data_dir="data", batch_size=size, val_size=0, train_subset=size)
    data.prepare_data()
    data.setup("fit")
    return next(iter(data.train_dataloader()))


def test_practical_gdu_p1h_tanh(repo_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """P-1h (784-512-10, tanh, random init), 20 MNIST images, T = 150 (converged), K = 10, β = 0.01.

    Sign agreement and cosine of the summed weight updates: measured 99.1–99.7 % and 0.998–0.9997 over three
    seeds, equal to the authors' code on the same weights and batch (run by hand; their reference ≈ 99.6 %,
    0.9995). The issue's bounds 95 % and 0.99 leave room for batches and seeds, and fail for BPTT with a wrong
    sign (≈ 0 %) or shifted time index.
    """
    monkeypatch.chdir(repo_root)
    x, labels = _mnist_batch()
    model = PrototypicalNet([784, 512, 10], activation="tanh")
    result = gdu_check(model, x, labels, T=150, K=10, beta=0.01)
    assert max(result.free_residual) < 1e-5
    metrics = gdu_metrics(result)
    for name in result.param_names:
        assert metrics[f"gdu/sign/weights/{name}"] > 0.95, name
        assert metrics[f"gdu/cosine/weights/{name}"] > 0.99, name


def test_metrics_on_hand_made_series() -> None:
    """Normalised RMSE, sign agreement and cosine on series computed by hand."""
    ep = torch.tensor([[1.0, 0.0, 2.0], [1.0, 0.0, -1.0]])  # (K=2, 3 units)
    bp = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    # unit 0: ‖(0, 1)‖ / max(√2, 1) = 1/√2; unit 1: both zero, left out; unit 2: ‖(2, −2)‖ / max(√5, 1) = √8/√5.
    assert normalized_rmse(ep, bp) == pytest.approx((2**-0.5 + (8 / 5) ** 0.5) / 2)
    # sums: ep (2, 0, 1), bp (1, 0, 1): all three signs agree (0 = 0 counts).
    assert sign_agreement(ep, bp) == 1.0
    assert sign_agreement(ep, -bp) == pytest.approx(1 / 3)
    assert cosine_similarity(ep, bp) == pytest.approx(3 / (5**0.5 * 2**0.5))


def test_bad_settings_name_the_field() -> None:
    model = toy_model("linear")
    x, labels = toy_batch(model)
    with pytest.raises(ValueError, match="K=0"):
        gdu_check(model, x, labels, T=10, K=0, beta=0.1)
    with pytest.raises(ValueError, match="beta=0"):
        gdu_check(model, x, labels, T=10, K=2, beta=0.0)
    with pytest.raises(ValueError, match="every_n_epochs=-1"):
        GDUMonitor(every_n_epochs=-1)


def test_gdu_subcommand_writes_json_figures_and_scalars(repo_root: Path, tmp_path: Path, monkeypatch) -> None:
    """`train.py gdu` on a briefly trained checkpoint: gdu.json, PNGs and TensorBoard scalars/images in the run
    folder; the scores are those of `gdu_check` on the checkpoint's weights (computed here directly)."""
    monkeypatch.chdir(repo_root)
    common = [
        "--config",
        "configs/mnist/p1h_ep.yaml",
        "--trainer.enable_progress_bar",
        "false",
        "--model.init_args.net.init_args.activation",
        "tanh",
        "--data.train_subset",
        "100",
    ]
    fit = cli_main(
        [
            "fit",
            *common,
            "--trainer.max_epochs",
            "1",
            "--test_after_fit",
            "false",
            "--trainer.logger.init_args.save_dir",
            str(tmp_path / "fit"),
        ]
    )
    ckpt = Path(fit.trainer.log_dir) / "checkpoints" / "last.ckpt"
    cli = cli_main(
        [
            "gdu",
            *common,
            "--ckpt_path",
            str(ckpt),
            "--batches",
            "2",
            "--beta",
            "0.01",
            "--T",
            "80",
            "--trainer.logger.init_args.save_dir",
            str(tmp_path / "gdu"),
        ]
    )
    run_dir = Path(cli.trainer.log_dir)
    report = json.loads((run_dir / "gdu.json").read_text())
    assert report["settings"]["batches"] == 2 and report["settings"]["K"] == 10 and report["settings"]["T"] == 80
    assert (run_dir / "gdu_curves.png").stat().st_size > 0 and (run_dir / "gdu_rmse.png").stat().st_size > 0

    # Independent: same weights, same two batches, direct calls.
    module = EquilibriumModule.load_from_checkpoint(ckpt, net=PrototypicalNet([784, 512, 10], activation="tanh"))
    data = MNISTDataModule(data_dir="data", batch_size=20, val_size=0, train_subset=100)
    data.prepare_data()
    data.setup("fit")
    # Same batches: the training sampler is seeded by the run seed (seed_everything 0), not by the global RNG.
    batches = iter(data.train_dataloader())
    direct = [gdu_metrics(gdu_check(module.net, *next(batches), T=80, K=10, beta=0.01)) for _ in range(2)]
    key = "gdu/cosine/weights/synapses.0.weight"
    assert report["metrics"][key] == pytest.approx((direct[0][key] + direct[1][key]) / 2, rel=1e-6)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir)).Reload()
    assert key in events.Tags()["scalars"]
    assert {"gdu/curves", "gdu/rmse"} <= set(events.Tags()["images"])


def test_gdu_monitor_logs_the_current_weights_without_side_effects(tmp_path: Path) -> None:
    """The callback's scores equal a direct check on the final weights, and training with or without it ends at
    the same weights (it never touches .grad or the optimizer)."""
    torch.manual_seed(0)
    x = torch.rand(40, 1, 4, 4)
    labels = torch.randint(0, 3, (40,))
    loader = DataLoader(TensorDataset(x, labels), batch_size=10)

    def train(callbacks: list) -> tuple[EquilibriumModule, L.Trainer]:
        torch.manual_seed(0)
        module = EquilibriumModule(
            PrototypicalNet([16, 12, 3], activation="tanh"), T=40, K=5, beta=0.1, lrs=[0.1, 0.05]
        )
        trainer = L.Trainer(
            max_epochs=2,
            logger=TensorBoardLogger(tmp_path),
            callbacks=callbacks,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(module, loader)
        return module, trainer

    monitor = GDUMonitor(every_n_epochs=1, beta=0.01)
    with_cb, trainer = train([monitor])
    without_cb, _ = train([])
    for p, q in zip(with_cb.parameters(), without_cb.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    direct = gdu_metrics(gdu_check(with_cb.net, x[:10], labels[:10], T=40, K=5, beta=0.01))
    for key in ("gdu/rmse/weights/synapses.0.weight", "gdu/cosine/weights/synapses.1.weight"):
        assert trainer.callback_metrics[key].item() == pytest.approx(direct[key], rel=1e-5)
