"""Reliability: bad configs rejected at start-up with one clear message; NaN/Inf caught with the last good checkpoint
kept (or the batch skipped); checkpoints load for validate/test/predict, also when saved on a GPU.

Bad configs go through the real entry point (``cli_main``, what ``python train.py`` runs) and the test reads what
the user sees on stderr. Training runs use MNIST subsets and tiny networks (T ≤ 5) to stay fast.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lightning.pytorch.callbacks import ModelCheckpoint

from ep_lightning.callbacks.divergence import DivergenceError, DivergenceGuard
from ep_lightning.cli import cli_main
from ep_lightning.config_checks import ConfigError, _raised_in_package, check_model_fits_data, user_error
from ep_lightning.data import MNISTDataModule
from ep_lightning.models import ConvPrototypicalNet, EnergyBasedNet, PrototypicalNet
from ep_lightning.models.activations import ACTIVATIONS
from ep_lightning.systems import EquilibriumModule

ROOT = Path(__file__).resolve().parents[1]
DATA = str(ROOT / "data")
P1H, EB1H, PCONV = (str(ROOT / "configs" / "mnist" / f"{n}.yaml") for n in ("p1h_ep", "eb1h_ep", "pconv_ep"))
#: Small, fast settings appended after every config (the table's bad value comes after these and wins).
FAST = [
    "--trainer.max_epochs",
    "1",
    "--trainer.limit_train_batches",
    "2",
    "--trainer.logger",
    "false",
    "--trainer.enable_progress_bar",
    "false",
    "--test_after_fit",
    "false",
    "--data.data_dir",
    DATA,
    "--data.train_subset",
    "40",
    "--data.test_subset",
    "40",
]


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run the CLI in-process as ``train.py`` would; return (exit status, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        cli_main(args)
    return int(exit_info.value.code or 0), capsys.readouterr().err


# --- 1. bad configs: one message naming the field, the value and what is allowed ------------------------------
BAD_CONFIGS = [
    # (id, config, override args, fragments the message must contain)
    (
        "bptt_steps>T",
        P1H,
        ["--model.init_args.algorithm", "bptt", "--model.init_args.bptt_steps", "50"],
        ["model.bptt_steps=50", "model.T=30"],
    ),
    ("T=0", P1H, ["--model.init_args.T", "0", "--model.init_args.K", "1"], ["model.T=0", "at least 1"]),
    ("beta=0", P1H, ["--model.init_args.beta", "0"], ["model.beta=0.0", "> 0"]),
    ("beta<0", P1H, ["--model.init_args.beta", "-0.1"], ["model.beta=-0.1", "> 0"]),
    ("lrs-length", P1H, ["--model.init_args.lrs", "[0.1]"], ["model.lrs=[0.1]", "2 layer groups", "one learning rate"]),
    ("lrs-negative", P1H, ["--model.init_args.lrs", "[0.1,-0.5]"], ["model.lrs=[0.1, -0.5]", "≥ 0"]),
    ("eval_steps=0", P1H, ["--model.init_args.eval_steps", "0"], ["model.eval_steps=0", "at least 1"]),
    ("eps=0", EB1H, ["--model.init_args.net.init_args.eps", "0"], ["eps=0.0", "> 0"]),
    ("eps<0", EB1H, ["--model.init_args.net.init_args.eps", "-0.2"], ["eps=-0.2", "> 0"]),
    ("dt>1", P1H, ["--model.init_args.net.init_args.dt", "1.5"], ["dt=1.5", "(0, 1]"]),
    (
        "layers-short",
        P1H,
        ["--model.init_args.net.init_args.layers", "[784]"],
        ["layers=[784]", "at least [n_in, n_out]"],
    ),
    ("layers-zero", P1H, ["--model.init_args.net.init_args.layers", "[784,0,10]"], ["layers=[784, 0, 10]", "positive"]),
    # jsonargparse rejects values outside a Literal itself, naming the key, the value and the allowed names
    (
        "activation",
        P1H,
        ["--model.init_args.net.init_args.activation", "relu"],
        ["activation", "relu", "'sigmoid', 'hard_sigmoid', 'tanh', 'identity'"],
    ),
    ("algorithm", P1H, ["--model.init_args.algorithm", "hebbian"], ["algorithm", "hebbian", "'ep', 'bptt'"]),
    (
        "conv-geometry",
        PCONV,
        ["--model.init_args.net.init_args.kernel_size", "7"],
        ["conv geometry does not fit", "kernel_size=7", "input_size=28", "multiple of pool_size=2"],
    ),
    ("conv-padding", PCONV, ["--model.init_args.net.init_args.padding", "5"], ["padding=5", "padding < kernel_size=5"]),
    # checked against the data at fit start (EquilibriumModule.setup), before any training step
    (
        "layers-vs-data-input",
        P1H,
        ["--model.init_args.net.init_args.layers", "[700,16,10]"],
        ["layers[0]=700", "1×28×28 = 784", "784 units"],
    ),
    (
        "layers-vs-data-classes",
        P1H,
        ["--model.init_args.net.init_args.layers", "[784,16,5]"],
        ["layers[-1]=5", "10 classes", "10 units"],
    ),
    (
        "conv-vs-data",
        PCONV,
        ["--model.init_args.net.init_args.input_size", "32", "--model.init_args.T", "2", "--model.init_args.K", "1"],
        ["1×32×32", "1×28×28", "input_size=28"],
    ),
    (
        "eb-vs-data-classes",
        EB1H,
        ["--model.init_args.net.init_args.layers", "[784,16,12]"],
        ["layers[-1]=12", "10 classes"],
    ),
    ("val_size", P1H, ["--data.val_size", "60000"], ["data.val_size=60000", "holds 60000 images", "val_size < 60000"]),
    ("train_subset", P1H, ["--data.train_subset", "0"], ["data.train_subset=0", "positive size"]),
    (
        "train_subset-too-big",
        P1H,
        ["--data.val_size", "59000", "--data.train_subset", "2000"],
        ["data.train_subset=2000", "only 1000 images"],
    ),
    ("batch_size", P1H, ["--data.batch_size", "0"], ["data.batch_size=0", "positive integer"]),
]


@pytest.mark.parametrize("config, override, fragments", [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_is_rejected_at_start_with_one_clear_message(
    config: str, override: list[str], fragments: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """What ``python train.py fit --config … <bad value>`` shows: exit status 2, an ``error:`` line naming the field,
    the value and what is allowed, no traceback, and no training step taken."""
    status, err = run_cli(
        ["fit", "--config", config, *FAST, "--trainer.default_root_dir", str(tmp_path), *override], capsys
    )
    assert status == 2, err
    assert "Traceback" not in err, err
    assert err.count("error:") == 1, err
    flat = " ".join(err.split())  # jsonargparse indents its nested messages
    for fragment in fragments:
        assert fragment in flat, f"{fragment!r} missing from:\n{err}"
    assert not list(tmp_path.rglob("*.ckpt")), "nothing may be trained or saved for a rejected config"


def test_torch_errors_are_not_disguised_as_config_errors() -> None:
    """Only messages written for the user are shortened; a ValueError from inside torch keeps its traceback."""
    try:
        torch.zeros(2).view(3)
    except RuntimeError as err:
        assert user_error(err) is None
    try:
        torch.nn.functional.one_hot(torch.tensor([5]), 3)
    except (RuntimeError, ValueError) as err:
        assert user_error(err) is None
    try:
        PrototypicalNet([784, -1])
    except ValueError as err:
        assert user_error(err) is err


# --- 1b. property test: random valid configs build and run, random invalid ones fail clearly -------------------
def input_side(top: int, n_conv: int, kernel: int, padding: int, pool: int) -> int | None:
    """Input side that gives pooled side ``top`` after ``n_conv`` conv+pool layers (conv side = pooled·pool =
    below + 2·padding − kernel + 1), or None if some side would be < 1."""
    side = top
    for _ in range(n_conv):
        side = side * pool - 2 * padding + kernel - 1
        if side < 1:
            return None
    return side


@st.composite
def valid_config(draw: st.DrawFn) -> dict[str, Any]:
    """A random valid (network, system) configuration; conv geometry is built backwards from the pooled sides,
    independently of the model's own check."""
    kind = draw(st.sampled_from(["P", "EB", "conv"]))
    net: dict[str, Any] = {"activation": draw(st.sampled_from(sorted(ACTIVATIONS)))}
    if kind == "conv":
        kernel = draw(st.integers(1, 4))
        pool = draw(st.integers(1, 3))
        padding = draw(st.integers(0, kernel - 1))
        n_conv = draw(st.integers(1, 2))
        top = draw(st.integers(1, 3))  # the last pooled side
        side = input_side(top, n_conv, kernel, padding, pool)
        if side is None:  # that padding makes a layer vanish: without padding sides only grow going down
            padding = 0
            side = input_side(top, n_conv, kernel, padding, pool)
        net.update(
            input_size=side,
            input_channels=draw(st.integers(1, 2)),
            kernel_size=kernel,
            padding=padding,
            pool_size=pool,
            channels=draw(st.lists(st.integers(1, 3), min_size=n_conv, max_size=n_conv)),
            num_classes=draw(st.integers(1, 4)),
        )
        groups = n_conv + 1
    else:
        net["layers"] = draw(st.lists(st.integers(1, 8), min_size=2, max_size=4))
        if kind == "P":
            net["dt"] = draw(st.floats(0.05, 1.0))
        else:
            net["eps"] = draw(st.floats(0.01, 1.0))
        groups = len(net["layers"]) - 1
    T = draw(st.integers(1, 5))
    system = {
        "algorithm": draw(st.sampled_from(["ep", "bptt"])),
        "T": T,
        "K": draw(st.integers(1, T)),
        "beta": draw(st.floats(0.01, 1.0)),
        "lrs": draw(st.lists(st.floats(0.0, 0.5), min_size=groups, max_size=groups)),
    }
    return {"kind": kind, "net": net, "system": system}


def build(config: dict[str, Any]) -> EquilibriumModule:
    cls = {"P": PrototypicalNet, "EB": EnergyBasedNet, "conv": ConvPrototypicalNet}[config["kind"]]
    return EquilibriumModule(cls(**config["net"]), **config["system"])


WORDS = st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8)
#: (applies to, field, strategy of a bad value, message fragment); each mutation breaks exactly one field.
MUTATIONS = [
    ("all", "T", st.integers(-3, 0), "model.T="),
    ("all", "K", st.integers(-3, 0), "model.K="),
    ("all", "beta", st.floats(max_value=0.0) | st.just(math.nan), "model.beta="),
    ("all", "lrs", st.just("wrong_length"), "model.lrs="),
    ("all", "lrs", st.just("negative"), "model.lrs="),
    ("all", "eval_steps", st.integers(-3, 0), "model.eval_steps="),
    ("all", "algorithm", WORDS.filter(lambda s: s not in ("ep", "bptt")), "model.algorithm="),
    ("all", "activation", WORDS.filter(lambda s: s not in ACTIVATIONS), "activation="),
    ("P", "dt", st.floats(max_value=0.0) | st.floats(min_value=1.001, max_value=1e6), "dt="),
    ("EB", "eps", st.floats(max_value=0.0) | st.just(math.inf), "eps="),
    ("fc", "layers", st.lists(st.integers(-3, 0), min_size=1, max_size=3).map(lambda bad: [4, *bad, 3]), "layers="),
    ("fc", "layers", st.lists(st.integers(1, 8), max_size=1), "layers="),
    ("conv", "kernel_size", st.integers(40, 60), "kernel_size="),
    ("conv", "padding", st.integers(5, 9), "padding="),
    ("conv", "channels", st.just([]), "channels="),
]


@st.composite
def invalid_config(draw: st.DrawFn) -> tuple[dict[str, Any], str]:
    config = draw(valid_config())
    kind = config["kind"]
    usable = [m for m in MUTATIONS if m[0] in ("all", kind) or (m[0] == "fc" and kind != "conv")]
    _, field, values, fragment = draw(st.sampled_from(usable))
    value = draw(values)
    system, net = config["system"], config["net"]
    if field in ("T", "eval_steps"):
        system[field] = value
        system["K"] = 1
    elif field == "K":
        system["K"] = value
    elif field == "beta":
        system.update(beta=value, algorithm="ep")
    elif field == "lrs":
        system["lrs"] = system["lrs"] + [0.1] if value == "wrong_length" else [*system["lrs"][:-1], -0.1]
    elif field == "algorithm":
        system["algorithm"] = value
    elif field == "padding":
        net.update(padding=value, kernel_size=min(net["kernel_size"], 4))
    else:
        net[field] = value
    return config, fragment


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_config())
def test_random_valid_configs_build_and_relax(config: dict[str, Any]) -> None:
    module = build(config)
    net = module.net
    shape = (net.input_channels, net.input_size, net.input_size) if config["kind"] == "conv" else (net.layers[0],)
    out = net(torch.rand(3, *shape), steps=module.T)
    assert out.shape == (3, net.num_classes) and torch.isfinite(out).all()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(invalid_config())
def test_random_invalid_configs_fail_with_a_clear_message(case: tuple[dict[str, Any], str]) -> None:
    """The error is a ValueError raised by ep_lightning's own checks (not from deep inside torch), naming the field
    and saying what is allowed."""
    config, fragment = case
    with pytest.raises(ValueError) as info:
        build(config)
    message = str(info.value)
    assert fragment in message, message
    assert any(word in message for word in ("must", "allowed", "use ", "give", "need")), message
    assert _raised_in_package(info.value), f"raised outside ep_lightning: {info.traceback[-1]}"


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(case=invalid_config())
def test_random_invalid_configs_through_the_cli(
    case: tuple[dict[str, Any], str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Same, as the user sees it: exit status 2 and one ``error:`` line, no traceback."""
    config, fragment = case
    cls = {"P": "PrototypicalNet", "EB": "EnergyBasedNet", "conv": "ConvPrototypicalNet"}[config["kind"]]
    import json

    model = {
        "class_path": "ep_lightning.systems.EquilibriumModule",
        "init_args": {
            **config["system"],
            "net": {"class_path": f"ep_lightning.models.{cls}", "init_args": config["net"]},
        },
    }
    capsys.readouterr()
    status, err = run_cli(
        ["fit", "--model", json.dumps(model), "--trainer.logger", "false", "--data.data_dir", DATA], capsys
    )
    assert status == 2, err
    assert "Traceback" not in err and err.count("error:") == 1, err
    flat = " ".join(err.split())
    key = fragment.split(".")[-1].rstrip("=")
    # our own message ("model.T=0 …", "eps=0.0 …") or jsonargparse's type error, which names the key
    assert fragment in flat or f'Parser key "{key}"' in flat, err


def test_model_data_check_directly() -> None:
    """check_model_fits_data against hand-made shapes (the CLI table covers the integration)."""
    check_model_fits_data(PrototypicalNet([784, 8, 10]), (1, 28, 28), 10)
    check_model_fits_data(ConvPrototypicalNet(channels=[2, 3]), (1, 28, 28), 10)
    with pytest.raises(ConfigError, match=r"layers\[0\]=785"):
        check_model_fits_data(PrototypicalNet([785, 8, 10]), (1, 28, 28), 10)
    with pytest.raises(ConfigError, match="input_channels=3"):
        check_model_fits_data(ConvPrototypicalNet(channels=[2, 3]), (3, 28, 28), 10)


# --- 2. divergence ----------------------------------------------------------------------------------------------
class SetWeight(L.Callback):
    """Write ``value`` into ``net.synapses[1].weight[0, 0]`` at global step ``step``, at batch start (before the
    step's check) or at batch end (after the optimizer step, before ModelCheckpoint saves)."""

    def __init__(self, step: int, value: float, when: str = "start") -> None:
        self.step, self.value, self.when = step, value, when

    def _set(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        with torch.no_grad():
            module.net.synapses[1].weight[0, 0] = self.value

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        if self.when == "start" and trainer.global_step == self.step:
            self._set(trainer, module)

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        if self.when == "end" and trainer.global_step == self.step:
            self._set(trainer, module)


class NaNPixel(L.Callback):
    """Put a NaN into one pixel of the batches with the given indices (the dataset itself is not touched)."""

    def __init__(self, batches: set[int]) -> None:
        self.batches = batches
        self.weights_before: dict[int, dict[str, torch.Tensor]] = {}
        self.weights_after: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx in self.batches:
            batch[0][0, 0, 14, 14] = float("nan")
            self.weights_before[batch_idx] = {k: v.clone() for k, v in module.net.state_dict().items()}

    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, out: Any, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx in self.batches:
            self.weights_after[batch_idx] = {k: v.clone() for k, v in module.net.state_dict().items()}


def small_run(
    tmp_path: Path,
    callbacks: list[L.Callback],
    algorithm: str = "ep",
    batches: int = 10,
    model: torch.nn.Module | None = None,
    **system: Any,
) -> tuple[EquilibriumModule, L.Trainer, MNISTDataModule]:
    L.seed_everything(0, verbose=False)
    module = EquilibriumModule(
        model or PrototypicalNet([784, 16, 10]),
        algorithm=algorithm,
        T=4,
        K=2,
        **{"beta": 0.5, "lrs": [0.05, 0.02], **system},
    )
    data = MNISTDataModule(data_dir=DATA, train_subset=20 * batches, test_subset=20, batch_size=20)
    trainer = L.Trainer(
        max_epochs=1,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        num_sanity_val_steps=0,
    )
    return module, trainer, data


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _finite_checkpoint(path: Path) -> bool:
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


@pytest.mark.parametrize("when", ["start", "end"])
def test_inf_weight_stops_the_run_and_keeps_the_last_good_checkpoint(when: str, tmp_path: Path) -> None:
    """An Inf written into a weight at global step 5 — before the step (caught by the per-step check) or after the
    optimizer step, just before ModelCheckpoint saves (caught by the guard's on_save_checkpoint) — stops the run
    with a message naming the parameter, the step and the knobs; last.ckpt stays the step-4 file, finite."""
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_last=True, save_top_k=-1)
    saved: dict[int, str] = {}

    class Snapshot(L.Callback):  # digest of last.ckpt at the start of every step, to compare after the failure
        def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
            last = tmp_path / "ckpt" / "last.ckpt"
            if last.exists():
                saved[trainer.global_step] = _digest(last)

    inject_at = 5 if when == "start" else 6
    module, trainer, data = small_run(tmp_path, [SetWeight(inject_at, math.inf, when), checkpoint, Snapshot()])
    with pytest.raises(DivergenceError) as info:
        trainer.fit(module, data)
    message = str(info.value)
    assert "net.synapses.1.weight" in message and "Inf" in message, message
    assert f"global step {inject_at}" in message, message
    for knob in ("model.beta=0.5", "model.lrs=[0.05, 0.02]", "model.T=4", "model.K=2"):
        assert knob in message, message
    if when == "start":
        assert "phase 'weights'" in message and "batch 5" in message, message
    else:
        assert "refusing to save a checkpoint" in message, message
    last = tmp_path / "ckpt" / "last.ckpt"
    assert _digest(last) == saved[5], "last.ckpt must be the one written at step 4, before the Inf"
    assert _finite_checkpoint(last)
    names = sorted(p.name for p in (tmp_path / "ckpt").glob("*.ckpt"))
    assert names == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "last.ckpt"], names


@pytest.mark.parametrize("algorithm", ["ep", "bptt"])
def test_nan_in_states_is_named_by_phase_and_layer(algorithm: str, tmp_path: Path) -> None:
    module, trainer, data = small_run(tmp_path, [NaNPixel({3})], algorithm=algorithm)
    before = None

    class Keep(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
            nonlocal before
            before = {k: v.clone() for k, v in module.net.state_dict().items()}

    trainer.callbacks.append(Keep())
    with pytest.raises(DivergenceError) as info:
        trainer.fit(module, data)
    message = str(info.value)
    assert "phase 'free'" in message and "free layer1: NaN" in message and "batch 3" in message, message
    assert "global step 3" in message, message
    after = module.net.state_dict()
    assert before is not None and all(torch.equal(before[k], after[k]) for k in after), "no update may be applied"


def test_real_divergence_from_a_too_large_learning_rate(tmp_path: Path) -> None:
    """Not injected: a linear (identity) P net with learning rate 50 overflows within a few steps."""
    module, trainer, data = small_run(
        tmp_path, [], model=PrototypicalNet([784, 16, 10], activation="identity"), lrs=[50.0, 50.0]
    )
    with pytest.raises(DivergenceError, match=r"training diverged at epoch 0, batch \d+ .*model\.lrs=\[50\.0, 50\.0\]"):
        trainer.fit(module, data)
    assert 0 < trainer.global_step < 10


def test_skip_mode_drops_bad_batches_and_counts_them(tmp_path: Path) -> None:
    nan = NaNPixel({3, 6})
    guard = DivergenceGuard(action="skip")
    module, trainer, data = small_run(tmp_path, [nan, guard])
    trainer.fit(module, data)
    assert guard.skipped_batches == 2
    assert trainer.global_step == 8, "10 batches, 2 skipped: 8 optimizer steps"
    assert trainer.callback_metrics["train/skipped_batches"].item() == 2.0
    for b in (3, 6):
        assert all(torch.equal(nan.weights_before[b][k], nan.weights_after[b][k]) for k in nan.weights_before[b])
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert math.isfinite(trainer.callback_metrics["train/loss"].item()), "skipped batches must not poison the loss"


def test_skip_mode_gives_up_after_consecutive_bad_batches(tmp_path: Path) -> None:
    module, trainer, data = small_run(
        tmp_path, [NaNPixel(set(range(10))), DivergenceGuard("skip", max_consecutive_skips=3)]
    )
    with pytest.raises(DivergenceError, match="gave up after 3 bad batches in a row"):
        trainer.fit(module, data)


def test_skip_mode_still_raises_on_non_finite_weights(tmp_path: Path) -> None:
    module, trainer, data = small_run(tmp_path, [SetWeight(2, math.nan), DivergenceGuard("skip")])
    with pytest.raises(DivergenceError, match="phase 'weights'"):
        trainer.fit(module, data)


def test_divergence_through_the_cli_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    status, err = run_cli(
        [
            "fit",
            "--config",
            P1H,
            *FAST,
            "--trainer.default_root_dir",
            str(tmp_path),
            "--model.init_args.net.init_args.activation",
            "identity",
            "--model.init_args.lrs",
            "[50.0,50.0]",
            "--trainer.limit_train_batches",
            "2",
        ],
        capsys,
    )
    assert status == 1 and err.count("error:") == 1 and "Traceback" not in err, err
    assert "training diverged" in err and "model.lrs=[50.0, 50.0]" in err, err


def test_guard_rejects_unknown_action() -> None:
    with pytest.raises(ValueError, match="action='ignore'.*'raise', 'skip'"):
        DivergenceGuard(action="ignore")  # type: ignore[arg-type]


# --- 3. checkpoints load for validate/test/predict, also when saved on a GPU ------------------------------------
def _save_as_if_on_cuda(src: Path, dst: Path) -> None:
    """Re-save a checkpoint with every tensor storage tagged 'cuda:0', byte-for-byte what ``torch.save`` writes for
    tensors that live on a GPU, so that CPU-only loading is exercised without a GPU."""
    data = torch.load(src, map_location="cpu", weights_only=False)
    original = torch.serialization.location_tag
    torch.serialization.location_tag = lambda storage: "cuda:0"  # type: ignore[assignment]
    try:
        torch.save(data, dst)
    finally:
        torch.serialization.location_tag = original  # type: ignore[assignment]


SMALL_SYSTEMS = {
    "P": (P1H, ["--model.init_args.T", "4", "--model.init_args.K", "2"]),
    "EB": (EB1H, ["--model.init_args.T", "4", "--model.init_args.K", "2"]),
    "IEP": (
        str(ROOT / "configs" / "mnist" / "iep_1h.yaml"),
        [
            "--model.init_args.T",
            "4",
            "--model.init_args.K",
            "2",
            "--model.init_args.initializer.init_args.layers",
            "[784,16,10]",
        ],
    ),
}


@pytest.mark.parametrize("net", sorted(SMALL_SYSTEMS))
def test_checkpoint_loads_for_validate_test_predict_on_cpu_even_if_saved_on_gpu(
    net: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, system_args = SMALL_SYSTEMS[net]
    common = [
        "--config",
        config,
        "--trainer.logger",
        "false",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.callbacks",
        "[]",
        "--trainer.callbacks+=ModelCheckpoint",
        "--trainer.callbacks.save_last",
        "true",
        "--data.data_dir",
        DATA,
        "--data.val_size",
        "100",
        "--data.train_subset",
        "100",
        "--data.test_subset",
        "60",
        "--model.init_args.net.init_args.layers",
        "[784,16,10]",
        *system_args,
    ]
    fit = cli_main(
        [
            "fit",
            *common,
            "--trainer.max_epochs",
            "1",
            "--test_after_fit",
            "false",
            "--trainer.default_root_dir",
            str(tmp_path / "fit"),
        ]
    )
    trained = {k: v.clone() for k, v in fit.model.state_dict().items()}
    fit.trainer.test(fit.model, datamodule=fit.datamodule, verbose=False)
    acc = fit.trainer.callback_metrics["test/acc"].item()
    expected = fit.trainer.predict(fit.model, datamodule=fit.datamodule)
    expected_predictions = torch.cat([batch["prediction"] for batch in expected])
    expected_outputs = torch.cat([batch["output"] for batch in expected])
    (validated,) = fit.trainer.validate(fit.model, datamodule=fit.datamodule, verbose=False)
    val_acc = validated["val/acc"]
    cpu_ckpt = next((tmp_path / "fit").rglob("last.ckpt"))
    gpu_ckpt = tmp_path / "gpu.ckpt"
    _save_as_if_on_cuda(cpu_ckpt, gpu_ckpt)
    if not torch.cuda.is_available():  # the file really does name CUDA storages: a plain load fails here
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(gpu_ckpt, weights_only=False)

    for ckpt in (cpu_ckpt, gpu_ckpt):
        args = [*common, "--ckpt_path", str(ckpt), "--trainer.default_root_dir", str(tmp_path / "eval")]
        test = cli_main(["test", *args])
        assert test.trainer.callback_metrics["test/acc"].item() == pytest.approx(acc, abs=1e-7)
        loaded = test.model.state_dict()
        assert all(torch.equal(loaded[k], trained[k]) and loaded[k].device.type == "cpu" for k in trained)
        validate = cli_main(["validate", *args])
        assert validate.trainer.callback_metrics["val/acc"].item() == pytest.approx(val_acc, abs=1e-7)
        cli_main(["predict", *args])
        written = torch.load(tmp_path / "eval" / "predictions.pt", weights_only=True)  # the PredictionWriter's file
        assert torch.equal(written["prediction"], expected_predictions)
        assert torch.equal(written["output"], expected_outputs)
        assert torch.equal(written["index"], torch.arange(60)) and written["label"].shape == (60,)
    if net != "IEP":
        network = PrototypicalNet([784, 16, 10]) if net == "P" else EnergyBasedNet([784, 16, 10])
        module = EquilibriumModule.load_from_checkpoint(gpu_ckpt, net=network)  # Lightning's default: to CPU
        assert all(torch.equal(module.state_dict()[k], trained[k]) for k in trained)
