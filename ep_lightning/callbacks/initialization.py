"""InitializationMonitor: how much the Initialized-EP initializer shortens the free phase, in TensorBoard."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from ep_lightning.protocols import InitializedSystem
from ep_lightning.relaxation import RelaxationTrace, relax


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
        """(residuals from s^f, residuals from zero) as (steps, layers) tensors, and ‖s^f − s_T‖ per layer."""
        model = system.net
        with torch.no_grad():
            s_f = system.initial_state(x)
            drive = system.relaxation_drive(x, s_f)
            from_init, from_zero = RelaxationTrace(), RelaxationTrace()
            final = relax(model, drive, s_f, steps, trace=from_init)
            relax(model, drive, model.init_state(x), steps, trace=from_zero)
            dist = torch.stack([(a - b).flatten(1).norm(dim=1).mean() for a, b in zip(s_f, final)])
        return from_init.residuals, from_zero.residuals, dist

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
            self._log_figure(trainer, res_init.cpu(), res_zero.cpu(), names)

    @staticmethod
    def _log_figure(trainer: L.Trainer, res_init: Tensor, res_zero: Tensor, names: list[str]) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        steps = torch.arange(1, res_init.shape[0] + 1)
        for layer, name in enumerate(names):
            line = ax.semilogy(steps, res_init[:, layer].clamp_min(1e-30), label=f"{name}, from s^f")[0]
            ax.semilogy(
                steps, res_zero[:, layer].clamp_min(1e-30), "--", color=line.get_color(), label=f"{name}, from 0"
            )
        ax.set(xlabel="step t", ylabel="‖s_{t+1} − s_t‖ (batch mean)", title="free-phase residual: from s^f vs from 0")
        ax.legend(fontsize=7)
        fig.tight_layout()
        for lg in loggers:
            lg.experiment.add_figure("iep/residual_vs_t", fig, global_step=trainer.current_epoch)
        plt.close(fig)
