"""TensorBoard's HPARAMS tab: one row per run with its settings (system, network, data) and its metrics.

Lightning's ``log_hyperparams`` fills the tab only when given metric values, which it then also logs as scalars at
step 0 (the ``hp_metric`` placeholder that ``default_hp_metric: false`` turns off). The tab itself needs only the
metric *names*: it reads their values from the run's own scalars (``val/acc``, ``test/acc``, …) as they are logged.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.tensorboard.summary import hparams as hparams_summaries

#: Scalars shown as the HPARAMS tab's metric columns.
METRICS = ("val/acc", "val/loss", "test/acc", "test/loss", "train/acc", "train/loss")

Scalar = int | float | str | bool


def flatten(config: dict[str, Any] | None, prefix: str) -> dict[str, Scalar]:
    """``{"model/T": 30, "model/net/class": "PrototypicalNet", "model/net/layers": "[784, 512, 10]", …}`` from a
    ``class_path``/``init_args`` config: a class is shown by its name, lists and None as text."""
    if config is None:
        return {}
    result: dict[str, Scalar] = {}
    if isinstance(config, dict) and "class_path" in config:
        result[f"{prefix}/class"] = str(config["class_path"]).rsplit(".", 1)[-1]
        config = config.get("init_args") or {}
    for key, value in (config or {}).items():
        if str(key).startswith("_"):
            continue
        name = f"{prefix}/{key}"
        if isinstance(value, dict):
            result.update(flatten(value, name))
        elif isinstance(value, bool | int | float | str):
            result[name] = value
        else:
            result[name] = str(value)
    return result


class HyperparameterSummary(L.Callback):
    """Writes the HPARAMS entry of the run (``settings``) into its TensorBoard logger once, on rank 0, when the first
    stage starts; the metric columns are :data:`METRICS`."""

    def __init__(self, settings: dict[str, Scalar]) -> None:
        self.settings = settings
        self._written = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._written or not trainer.is_global_zero:
            return
        self._written = True
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                experiment, start, end = hparams_summaries(self.settings, dict.fromkeys(METRICS, 0.0))
                writer = logger.experiment.file_writer  # the run's own event file: the tab reads its scalars
                for summary in (experiment, start, end):
                    writer.add_summary(summary)


__all__ = ["METRICS", "HyperparameterSummary", "flatten"]
