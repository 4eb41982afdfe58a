"""EPTrainer: Lightning's Trainer plus the ``gdu`` entry point (``python train.py gdu --config …``)."""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.utils.data import DataLoader

from ep_lightning.checkpoints import read_checkpoint
from ep_lightning.figures import gdu_curves_figure, gdu_rmse_figure
from ep_lightning.gdu import average_metrics, gdu_check, gdu_metrics, gdu_settings


class EPTrainer(L.Trainer):
    """``lightning.Trainer`` with one more entry point, :meth:`gdu`, exposed by the CLI as a subcommand."""

    def gdu(
        self,
        model: L.LightningModule,
        dataloaders: DataLoader | None = None,
        datamodule: L.LightningDataModule | None = None,
        ckpt_path: str | None = None,
        batches: int = 1,
        beta: float | None = None,
        T: int | None = None,
        K: int | None = None,
        split: Literal["train", "val", "test"] = "train",
        units: int = 5,
        float64: bool = False,
        seed: int = 0,
        out_dir: str | None = None,
    ) -> dict[str, float]:
        """Check the GDU property: compare EP updates with BPTT gradients step by step and log figures and scores.

        For each of ``batches`` batches: free phase (T steps), then for t = 0 … K−1 the EP updates Δ^EP(β, t) and
        the BPTT gradients −∇^BPTT(t) of every neuron layer and parameter (one backward pass). Writes TensorBoard
        figures (curves for ``units`` random units per layer, per-layer RMSE bars) and scalars, plus ``gdu.json``
        and PNGs in the run folder (the logger's log_dir, or ``out_dir``).

        Args:
            model: the system holding the network as ``net`` (e.g. EquilibriumModule).
            dataloaders: batches (x, labels) to check on; alternatively ``datamodule``.
            datamodule: data module; its ``split`` dataloader is used.
            ckpt_path: checkpoint whose weights are loaded first (default: the freshly initialised model).
            batches: number of batches to check; scores are averaged over them.
            beta: nudging strength β (default: the module's beta; small values, e.g. 0.01, test the theorem).
            T: free-phase steps (default: the module's T; the theorem needs a converged free phase).
            K: steps compared (default: the module's K).
            split: which dataloader of the datamodule to draw batches from.
            units: neurons / synapses drawn per layer for the curves figure.
            float64: run the check in double precision (on a copy of the network).
            seed: seed for the choice of plotted units.
            out_dir: folder for gdu.json and PNGs (default: the logger's log_dir, else default_root_dir/gdu).

        Returns:
            The scores averaged over batches (keys ``gdu/{rmse|sign|cosine}/{neurons|weights}/{name}``).
        """
        if batches < 1:
            raise ValueError(f"gdu: batches={batches} is invalid: check at least 1 batch")
        if units < 1:
            raise ValueError(f"gdu: units={units} is invalid: plot at least 1 unit per layer")
        if ckpt_path is not None:  # missing or unreadable: a ConfigError naming the path
            model.load_state_dict(read_checkpoint(ckpt_path)["state_dict"])
        T_, K_, beta_ = gdu_settings(model, T, K, beta)
        network = model.net
        device = self.strategy.root_device
        network = copy.deepcopy(network).to(device=device, dtype=torch.float64 if float64 else None)
        loader = self._gdu_loader(dataloaders, datamodule, split)

        per_batch, first = [], None
        for index, batch in enumerate(loader):
            if index >= batches:
                break
            x, labels = batch[0].to(device), batch[1].to(device)
            if float64:
                x = x.double()
            result = gdu_check(network, x, labels, T_, K_, beta_)
            per_batch.append(gdu_metrics(result))
            if first is None:
                first = result
        if first is None:
            raise ValueError(f"gdu: the {split!r} dataloader yielded no batch")
        metrics = average_metrics(per_batch)
        settings = {
            "T": T_,
            "K": K_,
            "beta": beta_,
            "batches": len(per_batch),
            "batch_size": int(x.shape[0]),
            "split": split,
            "float64": float64,
            "ckpt_path": ckpt_path,
            "model": type(network).__name__,
            "nudge_scale": float(network.nudge_scale),
        }
        if self.is_global_zero:
            self._write_gdu(first, metrics, per_batch, settings, units, seed, out_dir)
        return metrics

    def _gdu_loader(self, dataloaders: DataLoader | None, datamodule: L.LightningDataModule | None, split: str) -> Any:
        """The loader to draw batches from: ``dataloaders`` if given, else the datamodule's ``split`` loader."""
        if dataloaders is not None:
            return dataloaders
        if datamodule is None:
            raise ValueError("gdu: give `dataloaders` or `datamodule` to draw batches from")
        datamodule.prepare_data()
        datamodule.setup("test" if split == "test" else "fit")
        return {
            "train": datamodule.train_dataloader,
            "val": datamodule.val_dataloader,
            "test": datamodule.test_dataloader,
        }[split]()

    def _write_gdu(
        self,
        result: Any,
        metrics: dict[str, float],
        per_batch: list[dict[str, float]],
        settings: dict[str, Any],
        units: int,
        seed: int,
        out_dir: str | None,
    ) -> None:
        """Scalars and figures (``ep_lightning.figures``) to every TensorBoard logger; gdu.json and PNGs to the run
        folder."""
        folder = Path(
            out_dir
            or (
                self.loggers[0].log_dir
                if self.loggers and self.loggers[0].log_dir
                else os.path.join(self.default_root_dir, "gdu")
            )
        )
        folder.mkdir(parents=True, exist_ok=True)
        figures = {
            "gdu/curves": gdu_curves_figure(result, units=units, seed=seed),
            "gdu/rmse": gdu_rmse_figure(metrics),
        }
        for logger in self.loggers:
            logger.log_metrics({k: v for k, v in metrics.items() if not math.isnan(v)}, step=0)
            if isinstance(logger, TensorBoardLogger):
                for tag, fig in figures.items():
                    logger.experiment.add_figure(tag, fig, global_step=0, close=False)
            logger.save()
        for tag, fig in figures.items():
            fig.savefig(folder / f"gdu_{tag.split('/')[1]}.png", dpi=120)
        payload = {
            "settings": settings,
            "metrics": metrics,
            "per_batch": per_batch,
            "free_residual": result.free_residual,
        }
        (folder / "gdu.json").write_text(json.dumps(payload, indent=2, allow_nan=True))
        rank_zero_info(
            f"GDU check written to {folder}: "
            + ", ".join(
                f"{k.split('/', 1)[1]}={v:.4g}"
                for k, v in metrics.items()
                if "/sign/weights/" in k or "/cosine/weights/" in k
            )
        )
