"""GDUMonitor: how closely EP updates track BPTT gradients as the weights change, logged every N epochs."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor

from ep_lightning.callbacks.tensorboard import add_figures
from ep_lightning.figures import gdu_curves_figure, gdu_rmse_figure
from ep_lightning.gdu import gdu_check, gdu_metrics, gdu_settings


class GDUMonitor(L.Callback):
    """At the end of every ``every_n_epochs``-th training epoch, run the GDU check (``ep_lightning.gdu``) on a fixed
    training batch with the current weights and log per-layer normalised RMSE, sign agreement and cosine of the
    summed updates (``gdu/…`` scalars) and, on TensorBoard, the curves and RMSE figures.

    The batch is the first training batch seen (at most ``max_samples`` samples), kept for the whole run so epochs
    compare like for like. The check uses ``torch.autograd.grad`` only: it leaves ``.grad`` and the optimizer alone.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        beta: float | None = None,
        T: int | None = None,
        K: int | None = None,
        max_samples: int = 20,
        units: int = 5,
        log_figures: bool = True,
    ) -> None:
        """
        Args:
            every_n_epochs: check every N epochs (0 disables the callback at no cost).
            beta: nudging strength of the check (default: the module's β; smaller values test the theorem).
            T: free-phase steps of the check (default: the module's T).
            K: steps compared (default: the module's K).
            max_samples: at most this many samples of the fixed batch are used.
            units: neurons / synapses per layer drawn in the curves figure.
            log_figures: also log the figures to TensorBoard loggers.
        """
        super().__init__()
        if every_n_epochs < 0:
            raise ValueError(f"every_n_epochs={every_n_epochs} is invalid: use 0 (off) or a positive integer")
        if max_samples < 1:
            raise ValueError(f"max_samples={max_samples} is invalid: use at least 1 sample")
        if beta is not None and not beta > 0:
            raise ValueError(f"beta={beta} is invalid: the nudging strength must be > 0 (or null for the module's)")
        self.every_n_epochs = every_n_epochs
        self.beta, self.T, self.K = beta, T, K
        self.max_samples = max_samples
        self.units = units
        self.log_figures = log_figures
        self._batch: tuple[Tensor, Tensor] | None = None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.every_n_epochs and self._batch is None:
            x, labels = batch[0], batch[1]
            self._batch = (x[: self.max_samples].detach().clone(), labels[: self.max_samples].detach().clone())

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.every_n_epochs or self._batch is None or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        T, K, beta = gdu_settings(pl_module, self.T, self.K, self.beta)
        x, labels = (t.to(pl_module.device) for t in self._batch)
        with torch.enable_grad():
            result = gdu_check(pl_module.net, x, labels, T, K, beta)
        metrics = gdu_metrics(result)
        for key, value in metrics.items():
            pl_module.log(key, value, on_epoch=True, sync_dist=True)
        if self.log_figures and trainer.is_global_zero:
            self._log_figures(trainer, result, metrics)

    def _log_figures(self, trainer: L.Trainer, result: Any, metrics: dict[str, float]) -> None:
        """Curves and RMSE bars, one of each per checked epoch."""
        figures = {"gdu/curves": gdu_curves_figure(result, units=self.units), "gdu/rmse": gdu_rmse_figure(metrics)}
        add_figures(trainer, figures, trainer.current_epoch)
