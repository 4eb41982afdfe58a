"""``predict`` writes its results to one file: ``PredictionWriter``, Lightning's ``BasePredictionWriter`` for the
dicts that ``EnergySystem.predict_step`` returns.

The file is a dict of tensors with one row per sample, loaded in one line::

    p = torch.load("runs/p1h_ep/version_0/predict/version_0/predictions.pt")
    p["index"], p["prediction"], p["output"], p["label"]   # label: when the data has labels
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor

from ep_lightning.checkpoints import atomic_save


def collate_predictions(batches: Sequence[dict[str, Tensor]], indices: Sequence[Sequence[int]]) -> dict[str, Tensor]:
    """One dict of tensors from per-batch dicts: the values concatenated along the batch dimension (on the CPU), plus
    ``index``, each row's position in the predict dataset (Lightning's batch indices; 0 … N−1 where the sampler does
    not record them)."""
    if not batches:
        return {"index": torch.empty(0, dtype=torch.int64)}
    table = {key: torch.cat([batch[key].detach().cpu() for batch in batches]) for key in batches[0]}
    rows = next(iter(table.values())).shape[0]
    flat = [int(i) for batch in indices for i in batch]
    index = torch.tensor(flat, dtype=torch.int64) if len(flat) == rows else torch.arange(rows, dtype=torch.int64)
    return {"index": index, **table}


class PredictionWriter(BasePredictionWriter):
    """Writes what ``predict`` returns to ``<log_dir>/predictions.pt`` (``collate_predictions``) and prints the path;
    under DDP every process writes its own rows to ``predictions_rank<R>.pt``."""

    def __init__(self, filename: str = "predictions.pt") -> None:
        super().__init__(write_interval="epoch")
        self.filename = filename
        self.path: Path | None = None

    def write_on_epoch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        predictions: Sequence[Any],
        batch_indices: Sequence[Any],
    ) -> None:
        # one dataloader: a list of batch dicts and [[indices of each batch]]; several: one such list per dataloader
        batches = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        indices = batch_indices[0] if batch_indices else []
        table = collate_predictions(batches, indices)
        folder = Path(trainer.log_dir or trainer.default_root_dir)  # log_dir: the same call on every rank
        name = Path(self.filename)
        if trainer.world_size > 1:
            name = name.with_name(f"{name.stem}_rank{trainer.global_rank}{name.suffix}")
        self.path = folder / name
        atomic_save(table, self.path)
        if trainer.is_global_zero:
            files = self.path if trainer.world_size == 1 else folder / f"{Path(self.filename).stem}_rank*.pt"
            rows = table["index"].shape[0]
            print(f"predictions of {rows} samples written to {files} ({', '.join(table)})", file=sys.stderr, flush=True)


__all__ = ["PredictionWriter", "collate_predictions"]
