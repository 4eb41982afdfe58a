"""Exact resume helpers for Lightning 2.6 quirks (the data-order part lives in ``data.ResumableDataLoader``)."""

from __future__ import annotations

from typing import Any

from torch.optim.lr_scheduler import LRScheduler


def catch_up_epoch_schedulers(module: Any) -> None:
    """Step every per-epoch scheduler until ``scheduler.last_epoch == current_epoch``.

    A module that steps its schedulers once in ``on_train_epoch_end`` keeps that invariant at the start of every
    epoch. Lightning breaks it in one case: a run resumed from a checkpoint written at the *last* batch of an epoch
    (e.g. ``every_n_train_steps`` dividing the epoch length) goes straight to the next epoch without calling that
    epoch's ``on_train_epoch_end``, so the step would be lost and the resumed run would differ from an
    uninterrupted one. Called at every batch start, it costs an integer comparison.
    """
    schedulers = module.lr_schedulers()
    if schedulers is None:
        return
    for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
        if isinstance(scheduler, LRScheduler):
            while scheduler.last_epoch < module.current_epoch:
                scheduler.step()
