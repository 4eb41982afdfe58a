"""DivergenceGuard: choose what a training step does on NaN/Inf (``ep_lightning.divergence`` holds the check).

Every system checks its training steps with a raising ``DivergenceCheck`` and refuses non-finite checkpoints by
itself; add this callback to drop bad batches instead (``action: skip``), counted in ``train/skipped_batches``.
"""

from __future__ import annotations

from typing import Any

import lightning as L

from ep_lightning.divergence import DivergenceAction, DivergenceCheck
from ep_lightning.errors import DivergenceError

__all__ = ["DivergenceError", "DivergenceGuard"]


class DivergenceGuard(L.Callback):
    """Installs its ``DivergenceCheck`` in the system (``pl_module.divergence_check``) at setup: the system's
    training step then raises or skips as configured here."""

    def __init__(self, action: DivergenceAction = "raise", max_consecutive_skips: int = 20) -> None:
        """
        Args:
            action: ``raise`` stops the run with a DivergenceError naming the layer, step and likely settings;
                ``skip`` drops the bad batch (no update), counts it in ``train/skipped_batches`` and goes on.
            max_consecutive_skips: in ``skip`` mode, raise anyway after this many bad batches in a row (a run that
                skips everything is not training).
        """
        super().__init__()
        self.check = DivergenceCheck(action, max_consecutive_skips)

    @property
    def action(self) -> DivergenceAction:
        return self.check.action

    @property
    def skipped_batches(self) -> int:
        return self.check.skipped_batches

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        pl_module.divergence_check = self.check

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.check.action == "skip":
            pl_module.log("train/skipped_batches", float(self.check.skipped_batches), on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, Any]:
        return self.check.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.check.load_state_dict(state_dict)
