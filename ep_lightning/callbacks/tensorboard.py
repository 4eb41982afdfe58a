"""How the monitors write to TensorBoard: figures, histograms, and the relaxation curves grouped in few runs.

Relaxation curves (per-t residuals and Φ of one snapshot) go into ONE extra run per kind of snapshot,
``<version>/relaxation/fixed_batch`` (the monitoring batch at the end of epochs) and
``<version>/relaxation/training_batch`` (training-batch snapshots), instead of one run per snapshot: a 30-epoch run
keeps three entries in TensorBoard's runs list. Within a run the x axis is ``index × stride + t``: the epoch
(fixed batch) or the global step (training batch) times a power of ten above T + K, plus the relaxation step t
(t = 1 … T free, T+1 … T+K nudged); epoch 3's step 7 of a T + K = 40 relaxation is x = 307. Each chart then shows
the whole history as consecutive relaxations (docs/tensorboard.md).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from ep_lightning.callbacks.measurements import WHOLE_STATE, Snapshot

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from torch.utils.tensorboard import SummaryWriter


def tb_loggers(trainer: L.Trainer) -> list[TensorBoardLogger]:
    return [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


def relaxation_stride(steps: int) -> int:
    """The smallest power of ten above ``steps`` (the most relaxation steps of one snapshot, T + K)."""
    return 10 ** len(str(max(int(steps), 1)))


class RelaxationCurves:
    """The per-t curves of one kind of snapshot, in one run ``<log_dir>/relaxation/<kind>`` of every TensorBoard
    logger (writers kept open for the whole fit; ``close`` at teardown)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._writers: dict[str, SummaryWriter] = {}

    def write(self, trainer: L.Trainer, snap: Snapshot, index: int, stride: int, prefix: str) -> None:
        """Tags ``{prefix}{phase}/residual/{layer}``, ``…/log10_residual/{layer}`` (both also for the whole state)
        and ``{prefix}{phase}/phi`` at x = index × stride + t."""
        loggers = tb_loggers(trainer)
        if not loggers:
            return
        from torch.utils.tensorboard import SummaryWriter

        base, T = index * stride, snap.free.residuals.shape[0]
        for logger in loggers:
            folder = os.path.join(logger.log_dir, "relaxation", self.kind)
            writer = self._writers.get(folder)
            if writer is None:
                writer = self._writers[folder] = SummaryWriter(log_dir=folder)
            for rec in snap.records():
                offset = base + (0 if rec.phase == "free" else T)
                curves = {name: rec.residuals[:, layer] for layer, name in enumerate(snap.names)}
                curves[WHOLE_STATE] = rec.total
                for t in range(rec.residuals.shape[0]):
                    for name, values in curves.items():
                        value = float(values[t])
                        writer.add_scalar(f"{prefix}{rec.phase}/residual/{name}", value, offset + t + 1)
                        if value > 0:  # an exact fixed point (residual 0) leaves a gap on the log axis
                            writer.add_scalar(
                                f"{prefix}{rec.phase}/log10_residual/{name}", math.log10(value), offset + t + 1
                            )
                    if rec.phi.numel():
                        writer.add_scalar(f"{prefix}{rec.phase}/phi", float(rec.phi[t]), offset + t + 1)
            writer.flush()

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers = {}


def custom_scalars_layout(names: list[str]) -> dict[str, dict[str, list[Any]]]:
    """TensorBoard custom-scalars layout: per-layer curves against x = index × stride + t, and the summaries against
    the training step."""

    def curves(prefix: str) -> dict[str, list[Any]]:
        charts = {
            f"log10 residual {name} (free, then nudged)": [
                "Multiline",
                [rf"^{prefix}(free|nudged|nudged_a)/log10_residual/{name}$"],
            ]
            for name in [*names, WHOLE_STATE]
        }
        charts["Φ (free, then nudged)"] = ["Multiline", [rf"^{prefix}(free|nudged|nudged_a)/phi$"]]
        return charts

    return {
        "convergence: fixed batch, x = epoch × stride + relaxation step t (run relaxation/fixed_batch)": curves(
            "convergence/"
        ),
        "convergence: training batch, x = step × stride + relaxation step t (run relaxation/training_batch)": curves(
            "convergence/train/"
        ),
        "convergence: summaries against training step": {
            "steps to tolerance": ["Multiline", [r"^convergence/(train/)?(free|nudged|nudged_a)/steps_to_tol$"]],
            "unconverged share (free phase)": ["Multiline", [r"^convergence/(train/)?free/unconverged_frac$"]],
            "final residual per layer": [
                "Multiline",
                [r"^convergence/(train/)?(free|nudged|nudged_a)/final_residual/"],
            ],
            "saturation per layer": ["Multiline", [r"^saturation/"]],
        },
    }


def add_figures(trainer: L.Trainer, figures: Mapping[str, Figure], step: int) -> None:
    """Each figure under its tag in every TensorBoard logger (``SummaryWriter.add_figure``); closed afterwards."""
    loggers = tb_loggers(trainer)
    for tag, figure in figures.items():
        for logger in loggers:
            logger.experiment.add_figure(tag, figure, step, close=False)
        figure.clear()


def add_histograms(trainer: L.Trainer, histograms: Mapping[str, Tensor], step: int) -> None:
    """Each tensor as a histogram under its tag in every TensorBoard logger."""
    for logger in tb_loggers(trainer):
        for tag, values in histograms.items():
            logger.experiment.add_histogram(tag, values.detach().float().cpu(), step)
