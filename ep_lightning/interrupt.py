"""Stop a run on SIGTERM / SIGINT within one training step, leaving a checkpoint to continue from.

Preemption (cluster schedulers, ``timeout``) sends SIGTERM; Ctrl-C sends SIGINT. Lightning's own SIGTERM handler
broadcasts from inside the signal handler (a collective on whichever rank got the signal) and otherwise stops only
at the end of a batch; SIGINT is not saved at all. Here the handler only records the signal:

- at every training batch end the ranks agree (one ``reduce_boolean_decision``, the same call on every rank) on
  whether any of them got a signal; if so they save ``last.ckpt`` (the state after that batch, from which
  ``--ckpt_path last`` continues exactly) and stop with :class:`TrainingInterrupted`;
- in a single process, inside a relaxation, :func:`check_interrupt` (called by ``relax`` every ``CHECK_EVERY``
  steps: a Python attribute test, no host synchronisation) raises :class:`RelaxationInterrupted`; the checkpoint
  then holds the state after the last completed batch (the interrupted batch is redone on resume).
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

#: relax() tests the stop request every this many steps.
CHECK_EVERY = 16
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _StopRequest:
    """The signal received, if any (set by the handler, read at batch ends), and whether relaxations should stop
    too: only in a single process, because under DDP a rank leaving mid-step would leave the others waiting in a
    collective (there the ranks agree at the next batch end instead)."""

    signum: int | None = None
    relaxations: bool = False


STOP = _StopRequest()


class Interrupted(RuntimeError):
    """The run stopped on a signal; ``checkpoint`` is the file to continue from (None if none was written)."""

    signum: int = signal.SIGTERM
    checkpoint: str | None = None
    epoch: int | None = None
    step: int | None = None

    def summary(self) -> str:
        """One line: which signal, where, and the checkpoint (or that none was written)."""
        where = f" at epoch {self.epoch}, global step {self.step}" if self.epoch is not None else ""
        saved = f"checkpoint saved to {self.checkpoint}" if self.checkpoint else "no checkpoint written"
        return f"interrupted by {signal.Signals(self.signum).name}{where}: {saved}"


class TrainingInterrupted(Interrupted):
    """Stopped at a training batch end, after saving ``last.ckpt``."""

    def __init__(self, signum: int, checkpoint: str | None, epoch: int, step: int) -> None:
        self.signum, self.checkpoint, self.epoch, self.step = signum, checkpoint, epoch, step
        super().__init__(self.summary())


class RelaxationInterrupted(Interrupted):
    """A stop was requested in the middle of a relaxation (``GracefulInterrupt.on_exception`` fills in the
    checkpoint it wrote)."""

    def __init__(self, signum: int, relaxation_step: int) -> None:
        self.signum = signum
        super().__init__(f"{signal.Signals(signum).name} received at relaxation step {relaxation_step}")


def check_interrupt(step: int) -> None:
    """Raise :class:`RelaxationInterrupted` if a stop signal arrived (called by ``relax`` every CHECK_EVERY steps)."""
    if STOP.relaxations and STOP.signum is not None:
        raise RelaxationInterrupted(STOP.signum, step)


def last_checkpoint_path(trainer: L.Trainer) -> Path:
    """``last.ckpt`` of the ModelCheckpoint that writes one (else of the first; else default_root_dir/last.ckpt),
    the newest file where ``--ckpt_path last`` looks.

    The ModelCheckpoint is told that this file is its last checkpoint (its ``last_model_path`` is saved in the
    checkpoint), so the continued run overwrites it instead of writing ``last-v1.ckpt`` next to it."""
    callbacks = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.dirpath]
    for callback in sorted(callbacks, key=lambda c: not c.save_last):  # the one that writes last.ckpt first
        path = Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
        callback.last_model_path = str(path)
        return path
    return Path(trainer.default_root_dir) / "last.ckpt"


class GracefulInterrupt(L.Callback):
    """SIGTERM / SIGINT: save ``last.ckpt`` and raise :class:`TrainingInterrupted` within one training step."""

    def __init__(self) -> None:
        self._trainer: L.Trainer | None = None
        self._previous: dict[int, Any] = {}

    # --- signal handling -----------------------------------------------------------------------------------------
    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if STOP.signum is not None:  # second signal: stop now, without a checkpoint
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        STOP.signum = signum
        trainer = self._trainer
        STOP.relaxations = trainer is None or trainer.world_size == 1
        launcher = trainer.strategy.launcher if trainer is not None else None
        if isinstance(launcher, _SubprocessScriptLauncher) and trainer.is_global_zero:
            launcher.kill(signum)  # the other ranks' processes stop their relaxations too

    def _install(self, trainer: L.Trainer) -> None:
        """(Re)install the handler: Lightning registers its own SIGTERM handler after ``setup``."""
        self._trainer = trainer
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in SIGNALS:
            current = signal.getsignal(signum)
            if current != self._handler:
                self._previous.setdefault(signum, current)
                signal.signal(signum, self._handler)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        STOP.signum, STOP.relaxations = None, False
        self._install(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install(trainer)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install(trainer)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install(trainer)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum, handler in self._previous.items():
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    # --- stopping ------------------------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        stop = STOP.signum is not None
        if trainer.world_size > 1:  # every rank calls this, every batch: the collectives stay in step
            stop = bool(trainer.strategy.reduce_boolean_decision(stop, all=False))
        if not stop:
            return
        path = last_checkpoint_path(trainer)
        trainer.save_checkpoint(path, weights_only=False)
        raise TrainingInterrupted(STOP.signum or signal.SIGTERM, str(path), trainer.current_epoch, trainer.global_step)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """A relaxation stopped mid-batch: rank 0 saves the state after the last completed batch (no collective:
        another rank may be anywhere) and records the file in the exception."""
        if not isinstance(exception, RelaxationInterrupted) or trainer.state.fn != "fit":
            return
        exception.epoch, exception.step = trainer.current_epoch, trainer.global_step
        if trainer.is_global_zero:
            path = last_checkpoint_path(trainer)
            try:
                checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
                trainer.strategy.checkpoint_io.save_checkpoint(checkpoint, path)
                exception.checkpoint = str(path)
            except Exception:  # noqa: BLE001 - reported as "no checkpoint written"
                exception.checkpoint = None
