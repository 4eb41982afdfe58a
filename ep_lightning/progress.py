"""What a run prints while it trains: a progress display that is safe under DDP and short when the output goes to a
file, a one-line model summary, and where a resumed run continues.

Lightning's progress bar reads ``trainer.progress_bar_metrics`` on rank 0 only; that read computes every epoch
metric logged with ``sync_dist=True`` so far, i.e. runs an all-reduce on rank 0 alone. If another rank meanwhile
enters a different collective (the module's own epoch-end reduction), both wait forever. The bars here read the
metrics at the same hooks on every rank, so every collective such a read triggers runs on all ranks in the same
order; only rank 0 displays them.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelSummary, TQDMProgressBar
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar, get_standard_metrics
from lightning.pytorch.utilities.model_summary import get_human_readable_count, summarize


def _metrics_everywhere(bar: ProgressBar, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
    """``get_metrics`` called on every rank (collectives symmetric); the result matters on rank 0 only."""
    return bar.get_metrics(trainer, pl_module)


def epoch_metrics(trainer: L.Trainer) -> dict[str, float]:
    """The epoch-level metrics logged so far (``train/*`` of the finished epoch, ``val/*``), without computing
    anything: read after ``update_train_epoch_metrics`` they are the synchronised values."""
    logged = dict(trainer.logged_metrics) if trainer.loggers else {}
    values = {**trainer.progress_bar_metrics, **logged}
    return {k: float(v) for k, v in values.items() if not k.endswith("_step") and k not in ("epoch", "step")}


def format_metrics(metrics: dict[str, float]) -> str:
    """``train/acc 91.20 %`` for accuracies in [0, 1], 4 significant digits otherwise, sorted by name."""
    parts = []
    for key in sorted(metrics):
        value = metrics[key]
        parts.append(f"{key} {100 * value:.2f} %" if key.endswith("acc") else f"{key} {value:.4g}")
    return ", ".join(parts)


# Kept until Lightning reads progress-bar metrics on every rank (Lightning issue #21264): its bar can deadlock DDP.
class EPProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, but metric reads happen on every rank, and the finished epoch's training means
    (logged in the module's ``on_train_epoch_end``, after this callback's hook) are shown once they exist."""

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # the condition of the rank-0 refresh in super(), without its rank-dependent `is_enabled`
        n, total = batch_idx + 1, trainer.num_training_batches
        if self.refresh_rate > 0 and (n % self.refresh_rate == 0 or n == total):
            _metrics_everywhere(self, trainer, pl_module)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _metrics_everywhere(self, trainer, pl_module)
        super().on_train_epoch_end(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit":
            _metrics_everywhere(self, trainer, pl_module)
        super().on_validation_end(trainer, pl_module)

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        if trainer.current_epoch > 0 and not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix({**get_standard_metrics(trainer), **epoch_metrics(trainer)})

    def on_train_end(self, trainer: L.Trainer, *args: Any) -> None:
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix({**get_standard_metrics(trainer), **epoch_metrics(trainer)})
        super().on_train_end(trainer, *args)


class EpochLines(ProgressBar):
    """Plain progress for output that is not a terminal: one line per finished epoch (its metrics and duration)
    instead of a bar redrawn at every batch. Reads only metrics that are already computed (no collective)."""

    def __init__(self) -> None:
        super().__init__()
        self._enabled = True
        self._epoch_start = 0.0
        self._pending: int | None = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = time.monotonic()  # a run resumed mid-epoch starts without on_train_epoch_start

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._flush(trainer)
        self._epoch_start = time.monotonic()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pending = trainer.current_epoch  # metrics of this epoch are complete at the next hook
        self._seconds = time.monotonic() - self._epoch_start

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._flush(trainer)

    def _flush(self, trainer: L.Trainer) -> None:
        if self._pending is None:
            return
        epoch, self._pending = self._pending, None
        # read on every rank (no collective is expected here, but if a read ever triggers one, all ranks take part)
        metrics = {k: v for k, v in epoch_metrics(trainer).items() if k.split("/")[0] in ("train", "val")}
        if self._enabled and trainer.is_global_zero:
            line = format_metrics(metrics)  # the monitors' panels are in TensorBoard
            print(f"epoch {epoch}: {line} ({self._seconds:.1f} s)", file=sys.stdout, flush=True)


def progress_for_output() -> ProgressBar:
    """A tqdm bar for a terminal, one line per epoch otherwise (a redirected bar writes megabytes of redraws)."""
    return EPProgressBar() if sys.stdout.isatty() else EpochLines()


class OneLineSummary(ModelSummary):
    """Lightning's model summary as one line on stderr: the module, its sub-modules with parameters and the totals
    (Lightning's table has a FLOPs column for ``forward``, which these systems do not use, and fills the screen)."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._max_depth or not trainer.is_global_zero:
            return
        summary = summarize(pl_module, max_depth=1)
        parts = [
            f"{name} {kind} {get_human_readable_count(count)}"
            for name, kind, count in zip(summary.layer_names, summary.layer_types, summary.param_nums)
            if count
        ]
        trainable = get_human_readable_count(summary.trainable_parameters)
        print(
            f"model: {type(pl_module).__name__} ({', '.join(parts)}): {trainable} trainable parameters, "
            f"{summary.model_size:.1f} MB",
            file=sys.stderr,
            flush=True,
        )


class ResumeLine(L.Callback):
    """One line when ``fit`` continues from a checkpoint: the file and where in the run it continues, read at the
    first batch trained (Lightning settles the epoch and batch of a restored run only once its loops restart)."""

    def __init__(self) -> None:
        self._pending = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pending = bool(trainer.ckpt_path)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._pending:
            return
        self._pending = False
        if trainer.is_global_zero:
            total = trainer.num_training_batches
            of = f" of {total}" if isinstance(total, int) else ""
            where = f"epoch {trainer.current_epoch}, batch {batch_idx}{of}"
            print(f"resuming from {trainer.ckpt_path} at {where}", file=sys.stderr, flush=True)
