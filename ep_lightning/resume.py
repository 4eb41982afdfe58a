"""Former home of :func:`catch_up_epoch_schedulers`, now in ``ep_lightning.checkpoints`` (import it from there)."""

from ep_lightning.checkpoints import catch_up_epoch_schedulers

__all__ = ["catch_up_epoch_schedulers"]
