"""InitializationMonitor: how much the Initialized-EP initializer shortens the free phase, in TensorBoard."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor

from ep_lightning.callbacks.tensorboard import add_figures
from ep_lightning.figures import residual_comparison_figure
from ep_lightning.protocols import InitializedSystem
from ep_lightning.relaxation import PhaseTrace


class InitializationMonitor(L.Callback):
    """At the end of every ``every_n_epochs``-th epoch, relax a fixed training batch twice with the same dynamics
    (E^λ of the module, anchored at s^f when λ > 0), once from s^f = f_φ(x) and once from zero, and log

    - the residual ‖s_{t+1} − s_t‖ per layer against t for both starts (one figure, log scale),
    - scalars ``iep/residual_final/from_init/<layer>`` and ``iep/residual_final/from_zero/<layer>`` (last step),
    - ``iep/dist_init_to_fixed_point/<layer>``: ‖s^f − s_T‖ with s_T the end of the relaxation from s^f.

    Works with any ``InitializedSystem`` (``InitializedEP``, ``InitializerDistillation``); a system without an
    initializer is skipped.
    """

    def __init__(self, every_n_epochs: int = 1, max_samples: int = 100, steps: int | None = None) -> None:
        """
        Args:
            every_n_epochs: log every N epochs (0 disables the callback).
            max_samples: at most this many samples of the first training batch are relaxed.
            steps: relaxation steps of both curves (default: the module's training free-phase steps ``T``).
        """
        super().__init__()
        if every_n_epochs < 0:
            raise ValueError(f"every_n_epochs={every_n_epochs} is invalid: use 0 (off) or a positive integer")
        if steps is not None and steps < 1:
            raise ValueError(f"steps={steps} is invalid: use a positive number of steps (or null for the module's T)")
        self.every_n_epochs = every_n_epochs
        self.max_samples = max_samples
        self.steps = steps
        self._batch: Tensor | None = None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.every_n_epochs and self._batch is None:
            self._batch = batch[0][: self.max_samples].detach().clone()

    @staticmethod
    def residual_curves(system: InitializedSystem, x: Tensor, steps: int) -> tuple[Tensor, Tensor, Tensor]:
        """(residuals from s^f, residuals from zero) as (steps, layers) tensors, and ‖s^f − s_T‖ per layer: the
        system's free phase (``system.phases``) from s^f and, with the same drive (E^λ anchored at s^f), from zero."""
        with torch.no_grad():
            s_f = system.initial_state(x)
            drive = system.relaxation_drive(x, s_f)
            from_init, from_zero = PhaseTrace(phi=False), PhaseTrace(phi=False)
            final = system.phases(x, None, s_f, None, trace=from_init, steps=steps, drive=drive).free
            system.phases(x, None, system.net.init_state(x), None, trace=from_zero, steps=steps, drive=drive)
            dist = torch.stack([(a - b).flatten(1).norm(dim=1).mean() for a, b in zip(s_f, final)])
        return from_init.free.residuals, from_zero.free.residuals, dist

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.every_n_epochs or self._batch is None or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        if not isinstance(pl_module, InitializedSystem) or pl_module.initializer is None:
            return
        x = self._batch.to(pl_module.device)
        res_init, res_zero, dist = self.residual_curves(pl_module, x, self.steps or pl_module.T)
        names = pl_module.net.state_names()
        for layer, name in enumerate(names):
            pl_module.log(
                f"iep/residual_final/from_init/{name}", float(res_init[-1, layer]), on_epoch=True, sync_dist=True
            )
            pl_module.log(
                f"iep/residual_final/from_zero/{name}", float(res_zero[-1, layer]), on_epoch=True, sync_dist=True
            )
            pl_module.log(f"iep/dist_init_to_fixed_point/{name}", float(dist[layer]), on_epoch=True, sync_dist=True)
        if trainer.is_global_zero:
            figure = residual_comparison_figure(res_init.cpu(), res_zero.cpu(), names)
            add_figures(trainer, {"iep/residual_vs_t": figure}, trainer.current_epoch)
