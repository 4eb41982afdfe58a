"""A network that collapses without a single NaN is named: per-class recall at test (the worst class in the results),
a one-line warning for classes never predicted and for saturated hidden layers; and the divergence error for weights
that overflow without being NaN/Inf does not contradict itself.

User paths run ``train.py`` with the shipped P-1h config (monitors, logger, checkpointing on) on a few batches.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger
from test_user_paths import CONFIGS, common, train
from torch.utils.data import DataLoader, TensorDataset

from ep_lightning.models import EnergyBasedNet, PrototypicalNet
from ep_lightning.systems import EquilibriumModule


def _fit(lrs: str, tmp: Path, batches: int) -> Any:
    args = ["fit", "--config", str(CONFIGS / "mnist/p1h_ep.yaml"), *common(tmp, batches), "--model.init_args.lrs", lrs]
    return train(args, tmp)


@pytest.mark.user_paths
def test_a_collapse_without_nan_is_named_at_epoch_end_and_at_test(tmp_path: Path) -> None:
    """lrs 1e6 (the weights reach ≈ 1e7, every hidden unit sits at a bound of σ, accuracy near chance) used to
    train and test with exit 0 and no word. Now the epoch end says which layer is saturated and why, and the test
    results name the worst class (recall 0) and the classes never predicted correctly."""
    run = _fit("[1e6,1e6]", tmp_path, batches=20)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [line for line in run.stderr.splitlines() if "ConvergenceMonitor, epoch 0" in line]
    assert len(lines) == 1, run.stderr[-3000:]
    assert re.search(r"layer1 saturated \((99|100) % of its units at a bound of σ", lines[0]), lines[0]
    assert "learning rates too large" in lines[0] and "output saturated" not in lines[0], lines[0]
    assert re.search(r"test: class(es)? [\d, ]+ never predicted correctly \(recall 0\)", run.stderr), run.stderr[-2000:]
    assert re.search(r"test/worst_class_recall\s+0\.0\b", run.stdout), run.stdout[-2000:]


@pytest.mark.user_paths
def test_weights_that_overflow_without_nan_get_a_consistent_divergence_error(tmp_path: Path) -> None:
    """lrs 1e38: after one step the weights are finite but so large that their float32 sum overflows. The error
    used to say 'overflowing values (0 of 401408 entries)' and 'already non-finite'; now it says what they are."""
    run = _fit("[1e38,1e38]", tmp_path, batches=5)
    assert run.returncode == 1, run.stderr[-3000:]
    (line,) = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert "phase 'weights'" in line and "no NaN/Inf but values up to" in line, line
    assert "the weights have blown up before this step" in line, line
    assert "already non-finite" not in line and "(0 of" not in line, line


class Metrics(Logger):
    """Keeps every ``log_metrics`` call in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.logged: dict[str, float] = {}

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.logged.update(metrics)


def _trainer(logger: Logger | bool = False, **kwargs: Any) -> L.Trainer:
    return L.Trainer(
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        **kwargs,
    )


def test_per_class_recall_at_test_equals_a_count_of_the_predictions() -> None:
    """``test/recall/class_k`` = (samples of class k predicted k) / (samples of class k), counted here from
    ``predict_step``; the worst class and its recall go into the test results."""
    torch.manual_seed(0)
    module = EquilibriumModule(PrototypicalNet([12, 10, 4]), T=6, K=2, lrs=[0.1, 0.1])
    x = torch.rand(40, 12)
    labels = torch.arange(40) % 4
    loader = DataLoader(TensorDataset(x, labels), batch_size=16)
    logger = Metrics()
    (results,) = _trainer(logger).test(module, loader, verbose=False)
    predicted = torch.cat([module.predict_step(batch, 0)["prediction"] for batch in loader])
    recall = [float(((predicted == k) & (labels == k)).sum() / (labels == k).sum()) for k in range(4)]
    for k in range(4):
        assert logger.logged[f"test/recall/class_{k}"] == pytest.approx(recall[k], abs=1e-7)
    assert results["test/worst_class"] == min(range(4), key=lambda k: recall[k])
    assert results["test/worst_class_recall"] == pytest.approx(min(recall), abs=1e-7)
    assert len(set(recall)) > 1, "control: the classes differ, so the worst one is a real choice"


def test_a_dead_output_unit_is_named_at_epoch_end(caplog: pytest.LogCaptureFixture) -> None:
    """An EB net with the authors' linear output dynamics and the clamp to [0, 1]: an output unit whose
    pre-activation is below 0 on every sample stays at 0 and gets no BPTT gradient through the clamp, so its class
    is never predicted (EB-1h BPTT, seed 0, loses class 6 this way). The epoch end says so in one line."""
    net = EnergyBasedNet([12, 10, 4], eps=0.5, output_dynamics="linear")
    with torch.no_grad():  # hidden unit k and output unit k answer input pattern k; output unit 2 is dead
        for p in net.parameters():
            p.zero_()
        for k in range(4):
            net.synapses[0].weight[k, k], net.synapses[1].weight[k, k] = 3.0, 1.0
        net.synapses[1].bias[2] = -50.0
    module = EquilibriumModule(net, algorithm="bptt", T=30, K=3, lrs=[0.05, 0.05])
    labels = torch.arange(200) % 4  # 50 samples per class: enough for the check (a smoke run says nothing)
    x = 0.9 * torch.nn.functional.one_hot(labels, 12).float()
    predicted = module.predict_step((x,), 0)["prediction"]
    assert set(predicted.tolist()) == {0, 1, 3}, "the setting: every class but 2 is predicted"
    with caplog.at_level(logging.WARNING, logger="ep_lightning.systems.base"):
        _trainer(max_epochs=1).fit(module, DataLoader(TensorDataset(x, labels), batch_size=50))
    warnings = [r.getMessage() for r in caplog.records if "never predicted" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("epoch 0: class 2 never predicted"), warnings
    assert "dead output unit" in warnings[0] and "clamp" in warnings[0], warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ep_lightning.systems.base"):  # control: every class predicted
        module._warn_if_classes_are_never_predicted(torch.tensor([0.3, 0.2, 0.1, 0.4]))
    assert caplog.records == []
