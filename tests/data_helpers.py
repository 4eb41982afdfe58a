"""Callbacks for the data user-path tests (tests/test_data_user_paths.py), loaded by ``train.py`` subprocesses with
tests/ on PYTHONPATH."""

from __future__ import annotations

import os
import signal
from typing import Any

import lightning as L


class SignalAt(L.Callback):
    """Rank 0 sends ``signum`` to its own process at the end of training batch ``at_step`` (global step): what a
    cluster's preemption does to the launching process, at a step the test chooses instead of a moment."""

    def __init__(self, at_step: int, signum: int = int(signal.SIGTERM)) -> None:
        self.at_step, self.signum = at_step, signum

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.is_global_zero and trainer.global_step == self.at_step:
            os.kill(os.getpid(), self.signum)
