"""Callbacks used by tests/test_resume.py inside `train.py` subprocesses (importable with tests/ on PYTHONPATH)."""

from __future__ import annotations

import os
import signal
from typing import Any

import lightning as L
import torch


class HardKill(L.Callback):
    """SIGKILL this process at the end of training batch ``at_step`` (global step): no clean-up, no final save."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.at_step:
            os.kill(os.getpid(), signal.SIGKILL)


class SaveFinalWeights(L.Callback):
    """Write the final ``state_dict`` and the optimizer states to ``path`` when training ends."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        optimizers = [opt.state_dict() for opt in trainer.optimizers]
        schedulers = [cfg.scheduler.state_dict() for cfg in trainer.lr_scheduler_configs]
        torch.save(
            {"state_dict": pl_module.state_dict(), "optimizers": optimizers, "schedulers": schedulers}, self.path
        )


class RecordBatches(L.Callback):
    """Append (global step, epoch, batch index, labels) of every training batch to ``path``: the data order."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        with open(self.path, "a") as f:
            f.write(f"{trainer.global_step} {trainer.current_epoch} {batch_idx} {batch[1].tolist()}\n")
