"""Stop a run on SIGTERM / SIGINT / SIGUSR1 within one training step, leaving a checkpoint to continue from.

Preemption (cluster schedulers, ``timeout``) sends SIGTERM; Ctrl-C sends SIGINT; SLURM sends SIGUSR1 ahead of a time
limit (``#SBATCH --signal=USR1@90``). Lightning's own SIGTERM handler broadcasts from inside the signal handler (a
collective on whichever rank got the signal) and otherwise stops only at the end of a batch; SIGINT is not saved at
all, and SIGUSR1 only under SLURM, from inside the handler, at whatever point of a step the signal arrived. Here the
handler only records the signal:

- at every training batch end the ranks agree (one ``reduce_boolean_decision``, the same call on every rank) on
  whether any of them got a signal; if so they save ``last.ckpt`` (the state after that batch, from which
  ``--ckpt_path last`` continues exactly) and stop with :class:`TrainingInterrupted`;
- for SIGUSR1 under SLURM with auto-requeue (Lightning's ``SLURMEnvironment``), Lightning's requeue handler runs at
  that batch end too: it writes its ``hpc_ckpt_<N>.ckpt`` and calls ``scontrol requeue``; the requeued job resumes
  from that file (``ep_lightning.cli``);
- in a single process, inside a relaxation, ``relax`` raises ``RelaxationInterrupted`` (see
  ``ep_lightning.stop_request``); the checkpoint then holds the state after the last completed batch (the
  interrupted batch is redone on resume).
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment

from ep_lightning.checkpoints import hpc_checkpoint, last_checkpoint_path, next_hpc_checkpoint
from ep_lightning.stop_request import CHECK_EVERY, STOP, Interrupted, RelaxationInterrupted, check_interrupt

#: The signals that stop a run with a checkpoint.
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
#: SIGUSR1's handler is installed once Lightning has registered its own (its SLURM requeue handler, which runs at the
#: batch end); Lightning registers one only where none exists.
_LATE_SIGNALS = (signal.SIGUSR1,)
#: Under SLURM auto-requeue these also leave the checkpoint a requeued job resumes from (SIGUSR1: before a time
#: limit, the job is requeued; SIGTERM: a preemption, which SLURM requeues itself).
_REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class TrainingInterrupted(Interrupted):
    """Stopped at a training batch end, after saving ``last.ckpt`` (and, when requeued, Lightning's hpc file)."""

    def __init__(
        self, signum: int, checkpoint: str | None, epoch: int, step: int, requeue_checkpoint: str | None = None
    ) -> None:
        self.signum, self.checkpoint, self.epoch, self.step = signum, checkpoint, epoch, step
        self.requeue_checkpoint = requeue_checkpoint
        self.requeued = signum == signal.SIGUSR1 and requeue_checkpoint is not None
        super().__init__(self.summary())


class GracefulInterrupt(L.Callback):
    """SIGTERM / SIGINT / SIGUSR1: save ``last.ckpt`` and raise :class:`TrainingInterrupted` within one step."""

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
        if launcher is not None and trainer.is_global_zero:
            launcher.kill(signum)  # processes this one started (strategy 'ddp') stop their relaxations too

    def _install(self, trainer: L.Trainer, late: bool = True) -> None:
        """(Re)install the handler: Lightning registers its own handlers after ``setup``."""
        self._trainer = trainer
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in SIGNALS:
            if signum in _LATE_SIGNALS and not late:
                continue
            current = signal.getsignal(signum)
            if current != self._handler:
                self._previous.setdefault(signum, current)
                signal.signal(signum, self._handler)

    def _requeue_handler(self) -> Any:
        """Lightning's SIGUSR1 handler found when ours was installed (SLURM auto-requeue), else None."""
        previous = self._previous.get(signal.SIGUSR1)
        return previous if callable(previous) else None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        STOP.clear()
        self._install(trainer, late=False)

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
        signum = STOP.signum or signal.SIGTERM
        requeue = self._requeue_handler() is not None and signum in _REQUEUE_SIGNALS
        if trainer.world_size > 1:  # only reached once every rank decided to stop: still in step
            requeue = bool(trainer.strategy.reduce_boolean_decision(requeue, all=False))
        requeue_checkpoint = self._requeue(trainer, signum) if requeue else None
        path = last_checkpoint_path(trainer)
        trainer.save_checkpoint(path, weights_only=False)
        raise TrainingInterrupted(signum, str(path), trainer.current_epoch, trainer.global_step, requeue_checkpoint)

    def _requeue(self, trainer: L.Trainer, signum: int) -> str | None:
        """Under SLURM auto-requeue, at a step boundary: the checkpoint a requeued job resumes from. For SIGUSR1
        Lightning's own handler writes it (``hpc_ckpt_<N>.ckpt`` in default_root_dir) and calls ``scontrol
        requeue``; for SIGTERM (a preemption, which SLURM requeues itself) it is written here under the same name."""
        handler = self._requeue_handler()
        if handler is None:
            return None
        folder = Path(trainer.default_root_dir)
        if signum == signal.SIGUSR1:
            handler(signal.SIGUSR1, None)
        else:
            trainer.save_checkpoint(next_hpc_checkpoint(folder), weights_only=False)
        found = hpc_checkpoint(folder)
        return str(found) if found is not None else None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """A relaxation stopped mid-batch (single process only, see ``StopRequest``): save the state after the last
        completed batch and record the file in the exception."""
        if not isinstance(exception, RelaxationInterrupted) or trainer.state.fn != "fit":
            return
        exception.epoch, exception.step = trainer.current_epoch, trainer.global_step
        path = last_checkpoint_path(trainer)
        try:
            trainer.save_checkpoint(path, weights_only=False)
            exception.checkpoint = str(path)
        except Exception:  # noqa: BLE001 - reported as "no checkpoint written"
            exception.checkpoint = None
            return
        if exception.signum in _REQUEUE_SIGNALS:
            exception.requeue_checkpoint = self._requeue(trainer, exception.signum)
            exception.requeued = exception.signum == signal.SIGUSR1 and exception.requeue_checkpoint is not None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A finished run under SLURM: remove Lightning's requeue checkpoints, or the test after ``fit`` (and every
        later run in this folder) would load them instead of the final weights."""
        if trainer.is_global_zero and SLURMEnvironment.detect():
            while (path := hpc_checkpoint(Path(trainer.default_root_dir))) is not None:
                path.unlink()


__all__ = [
    "CHECK_EVERY",
    "SIGNALS",
    "STOP",
    "GracefulInterrupt",
    "Interrupted",
    "RelaxationInterrupted",
    "TrainingInterrupted",
    "check_interrupt",
]
