"""A stop request that long loops test cheaply: set by a signal handler (``ep_lightning.interrupt``), read by ``relax``.

This module knows nothing about signals, trainers or checkpoints, so the relaxation loop can depend on it without
depending on the process-level machinery that sets it.
"""

from __future__ import annotations

import signal

#: ``relax`` tests the stop request every this many steps (a Python attribute test, no host synchronisation).
CHECK_EVERY = 16


class StopRequest:
    """The signal received, if any, and whether relaxations should stop for it.

    ``relaxations`` is set only in a single process: under DDP a rank leaving mid-step would leave the others waiting
    in a collective, so there the ranks agree at the next batch end instead.
    """

    signum: int | None = None
    relaxations: bool = False

    def clear(self) -> None:
        self.signum, self.relaxations = None, False


STOP = StopRequest()


class Interrupted(RuntimeError):
    """The run stopped on a signal; ``checkpoint`` is the file to continue from (None if none was written)."""

    signum: int = signal.SIGTERM
    checkpoint: str | None = None
    epoch: int | None = None
    step: int | None = None
    requeued: bool = False
    requeue_checkpoint: str | None = None

    def summary(self) -> str:
        """One line: which signal, where, and the checkpoint (or that none was written)."""
        where = f" at epoch {self.epoch}, global step {self.step}" if self.epoch is not None else ""
        saved = f"checkpoint saved to {self.checkpoint}" if self.checkpoint else "no checkpoint written"
        return f"interrupted by {signal.Signals(self.signum).name}{where}: {saved}"


class RelaxationInterrupted(Interrupted):
    """A stop was requested in the middle of a relaxation (the interrupt callback fills in the checkpoint)."""

    def __init__(self, signum: int, relaxation_step: int) -> None:
        self.signum = signum
        super().__init__(f"{signal.Signals(signum).name} received at relaxation step {relaxation_step}")


def check_interrupt(step: int) -> None:
    """Raise :class:`RelaxationInterrupted` if a stop was requested (called by ``relax`` every CHECK_EVERY steps)."""
    if STOP.relaxations and STOP.signum is not None:
        raise RelaxationInterrupted(STOP.signum, step)
