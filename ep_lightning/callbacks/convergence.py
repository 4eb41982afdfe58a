"""ConvergenceMonitor: how the free phase settles, logged to TensorBoard once per epoch."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from ep_lightning.dynamics import RelaxationTrace


class ConvergenceMonitor(L.Callback):
    """At the end of every ``every_n_epochs``-th training epoch, relax a fixed training batch with a trace and log
    the free-phase residual ‖s_{t+1} − s_t‖ per layer against t (a figure) and its final value (scalars).

    The batch is the first training batch seen, kept for the whole run so epochs compare like for like.
    """

    def __init__(self, every_n_epochs: int = 1, max_samples: int = 100) -> None:
        """
        Args:
            every_n_epochs: log every N epochs (0 disables the callback at no cost).
            max_samples: at most this many samples of the fixed batch are relaxed.
        """
        super().__init__()
        if every_n_epochs < 0:
            raise ValueError(f"every_n_epochs={every_n_epochs} is invalid: use 0 (off) or a positive integer")
        self.every_n_epochs = every_n_epochs
        self.max_samples = max_samples
        self._batch: Tensor | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.every_n_epochs and self._batch is None:
            self._batch = batch[0][: self.max_samples].detach().clone()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.every_n_epochs or self._batch is None or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        x = self._batch.to(pl_module.device)
        trace = RelaxationTrace(x=x, model=pl_module.model)
        pl_module.free_phase(x, pl_module.T, trace=trace)
        residuals = trace.residuals.cpu()  # (T, layers)
        names = pl_module.model.state_names()
        for layer, name in enumerate(names):
            pl_module.log(f"convergence/free/residual_final/{name}", float(residuals[-1, layer]), on_epoch=True, sync_dist=True)
        if trainer.is_global_zero:
            self._log_figure(trainer, residuals, names, trace.phi.cpu())

    @staticmethod
    def _log_figure(trainer: L.Trainer, residuals: Tensor, names: list[str], phi: Tensor) -> None:
        """Residual (log scale) and batch-mean Φ against t, as one figure per epoch."""
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax_res, ax_phi) = plt.subplots(1, 2, figsize=(9, 3.5))
        steps = torch.arange(1, residuals.shape[0] + 1)
        for layer, name in enumerate(names):
            ax_res.semilogy(steps, residuals[:, layer].clamp_min(1e-30), label=name)
        ax_res.set(xlabel="step t", ylabel="‖s_{t+1} − s_t‖ (batch mean)", title="free-phase residual")
        ax_res.legend()
        if phi.numel():
            ax_phi.plot(steps, phi)
        ax_phi.set(xlabel="step t", ylabel="Φ (batch mean)", title="free-phase Φ")
        fig.tight_layout()
        for lg in loggers:
            lg.experiment.add_figure("convergence/free/residual_vs_t", fig, global_step=trainer.current_epoch)
        plt.close(fig)
