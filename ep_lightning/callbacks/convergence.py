"""ConvergenceMonitor: how the free phase settles and how the nudged phase moves, in TensorBoard.

What is logged (tags; ``{layer}`` is ``net.state_names()``: ``layer1`` … ``output``; t is the relaxation step):

* **Fixed monitoring batch, at the end of every ``every_n_epochs``-th epoch** (the same samples every epoch, so
  epochs compare like for like: the first ``max_samples`` samples of the validation set, or of the training set
  when there is no validation set — the paper protocol ``val_size: 0`` — see ``source``):

  - scalars against the training step (``self.log``, epoch level, usable by other callbacks):
    ``convergence/{free,nudged}/steps_to_tol``, ``convergence/free/unconverged_frac``,
    ``convergence/{free,nudged}/final_residual/{layer}``, ``saturation/{free,nudged}/{layer}``;
  - curves against t, one TensorBoard run per epoch (``<version>/relaxation/epoch_NNN``):
    ``convergence/{free,nudged}/residual/{layer}``, the same as ``log10_residual`` (log scale in any chart), both
    also for ``{layer} = whole_state``, and ``convergence/{free,nudged}/phi``; the nudged phase is numbered
    t = T+1 … T+K so that one chart shows the whole trajectory;
  - figures: ``convergence/relaxation`` (residual per layer, log scale, and Φ against t),
    ``convergence/output_trajectory`` (the output units of a few samples against t: the nudge),
    ``feature_maps/free/{layer}`` (fixed-point feature maps, conv models only);
  - histograms: ``states/{free,nudged}/{layer}`` (s* and s^β), ``weights/{param}``, ``ep_update/{param}`` (the EP
    update Δθ = (1/β)(∂Φ/∂θ(s^β) − ∂Φ/∂θ(s*)) on the monitoring batch).

* **Training batch, every ``every_n_steps`` optimizer steps** (rank 0's batch, before the step's update):
  the same with a ``convergence/train/`` prefix: scalars ``convergence/train/{free,nudged}/steps_to_tol``,
  ``convergence/train/free/unconverged_frac``, ``convergence/train/{free,nudged}/final_residual/{layer}``,
  ``saturation/train/{free,nudged}/{layer}``; curves in runs ``<version>/relaxation/step_NNNNNNN``
  (``convergence/train/{free,nudged}/residual/{layer}``, ``…/log10_residual/{layer}``, ``…/phi``); the figure
  ``convergence/train/relaxation`` (output trajectories only for the fixed batch).

* A **custom-scalars layout** (TensorBoard's "Custom Scalars" tab) groups these charts, written once at fit start.

Definitions: the residual of sample i at step t is r_t(i) = (Σ_l ‖s^l_t(i) − s^l_{t−1}(i)‖²)^½;
``steps_to_tol`` is the first t at which the batch mean of r_t falls under ``tolerance`` (T + 1, resp. K + 1,
when it never does); ``unconverged_frac`` is the share of samples with r_T(i) ≥ ``tolerance`` at the end of the free
phase (a warning is logged when it exceeds ``warn_unconverged``: the GDU property needs a converged free phase;
never for a system that declares its free phase truncated on purpose, e.g. Initialized EP, see
``ep_lightning.protocols.expects_converged_free_phase``);
saturation is the share of units within ``saturation_margin`` × (range width) of a bound of σ's range.

Cost: nothing runs when ``enabled`` is false (or both frequencies are 0). Otherwise one extra relaxation of at most
``max_samples`` samples per snapshot, plus rendering; figures, histograms and extra runs are written on rank 0 only.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from ep_lightning.estimators import ep_surrogate
from ep_lightning.models.activations import ACTIVATION_BOUNDS
from ep_lightning.models.base import EnergyModel, State
from ep_lightning.protocols import RelaxingSystem, expects_converged_free_phase
from ep_lightning.relaxation import RelaxationTrace, relax

log = logging.getLogger(__name__)

#: Name used in tags for the residual of the whole state, r_t(i) = (Σ_l ‖s^l_t(i) − s^l_{t−1}(i)‖²)^½ (batch mean).
WHOLE_STATE = "whole_state"


# --- measurements (pure functions, tested on their own) ---------------------------------------------------------
def steps_to_tolerance(residual: Tensor, tolerance: float) -> int:
    """First t ∈ {1 … n} with residual[t − 1] < tolerance, or n + 1 when there is none (``residual``: shape (n,))."""
    below = (residual < tolerance).nonzero()
    return int(below[0, 0]) + 1 if below.numel() else int(residual.shape[0]) + 1


def unconverged_fraction(final_residual: Tensor, tolerance: float) -> float:
    """Share of samples whose last-step residual r_T(i) is still ≥ tolerance (``final_residual``: shape (batch,))."""
    return float((final_residual >= tolerance).to(torch.float64).mean()) if final_residual.numel() else 0.0


def saturation_fraction(state: Tensor, bounds: tuple[float, float], margin: float) -> float:
    """Share of units with s ≤ lo + m(hi − lo) or s ≥ hi − m(hi − lo), for σ's range (lo, hi) and margin m."""
    lo, hi = bounds
    width = margin * (hi - lo)
    return float(((state <= lo + width) | (state >= hi - width)).to(torch.float64).mean())


@dataclass
class PhaseRecord:
    """What one relaxation phase looked like on the monitored batch (all tensors on the CPU)."""

    residuals: Tensor  # (steps, layers): batch-mean per-layer residual
    total: Tensor  # (steps,): batch mean of the whole-state residual r_t(i)
    final: Tensor  # (batch,): r_steps(i), per sample
    phi: Tensor  # (steps,): batch-mean Φ after each step
    outputs: Tensor  # (steps + 1, samples, n_out): output trajectory of the first samples
    state: State  # the state reached (on the model's device)
    steps_to_tol: int


@dataclass
class Snapshot:
    """Free phase (and nudged phase when β ≠ 0) of one monitored batch."""

    x: Tensor
    labels: Tensor
    names: list[str]
    free: PhaseRecord
    nudged: PhaseRecord | None


def _record(trace: RelaxationTrace, state: State, tolerance: float) -> PhaseRecord:
    total = trace.total_residuals.detach().cpu()  # (steps, batch)
    mean_total = total.mean(dim=1)
    return PhaseRecord(
        residuals=trace.residuals.detach().cpu(),
        total=mean_total,
        final=total[-1],
        phi=trace.phi.detach().cpu(),
        outputs=trace.outputs.detach().cpu(),
        state=state,
        steps_to_tol=steps_to_tolerance(mean_total, tolerance),
    )


# --- the callback -----------------------------------------------------------------------------------------------
class ConvergenceMonitor(L.Callback):
    """Logs the convergence of the free phase and the motion of the nudged phase to TensorBoard (see module doc).

    Works with any ``RelaxingSystem`` (``ep_lightning.protocols``: every system of ``ep_lightning.systems``); see
    ``snapshot`` for the start state and drive. Relaxations run under ``no_grad`` and do not touch parameters,
    gradients, optimizer state or random number generators.
    """

    def __init__(
        self,
        enabled: bool = True,
        every_n_steps: int = 1000,
        every_n_epochs: int = 1,
        max_samples: int = 100,
        tolerance: float = 1e-4,
        warn_unconverged: float = 0.5,
        saturation_margin: float = 0.01,
        trajectory_samples: int = 3,
        feature_map_samples: int = 4,
        feature_map_channels: int = 8,
        histograms: bool = True,
        source: Literal["auto", "val", "train"] = "auto",
    ) -> None:
        """
        Args:
            enabled: master switch; when false no hook does any work (no relaxation, no logging).
            every_n_steps: snapshot the current training batch every N optimizer steps (0: never).
            every_n_epochs: log the fixed monitoring batch at the end of every N-th epoch (0: never).
            max_samples: at most this many samples are relaxed per snapshot (bounds the cost).
            tolerance: residual threshold defining convergence (whole-state norm ‖s_t − s_{t−1}‖ per sample).
            warn_unconverged: log a warning when the free phase ends unconverged for more than this share of the
                monitored batch (1 disables the warning; systems whose free phase is truncated on purpose, such as
                Initialized EP, never get it).
            saturation_margin: a unit counts as saturated within this fraction of σ's range width from a bound.
            trajectory_samples: samples shown in the output-trajectory figure (0: no figure).
            feature_map_samples: samples shown in the feature-map figures of conv layers (0: no figure).
            feature_map_channels: at most this many channels shown per conv layer.
            histograms: log histograms of s*, s^β, weights and EP updates at the end of epochs.
            source: where the fixed monitoring batch comes from: ``val`` (validation set), ``train`` (first samples
                of the training set, by index, without shuffling), ``auto`` (``val`` if there is a validation set,
                else ``train``).
        """
        super().__init__()
        for field, value in (
            ("every_n_steps", every_n_steps),
            ("every_n_epochs", every_n_epochs),
            ("trajectory_samples", trajectory_samples),
            ("feature_map_samples", feature_map_samples),
        ):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"ConvergenceMonitor {field}={value!r} is invalid: use 0 (off) or a positive integer")
        if not isinstance(max_samples, int) or max_samples < 1:
            raise ValueError(f"ConvergenceMonitor max_samples={max_samples!r} is invalid: use a positive integer")
        if not isinstance(feature_map_channels, int) or feature_map_channels < 1:
            raise ValueError(
                f"ConvergenceMonitor feature_map_channels={feature_map_channels!r} is invalid: use a positive integer"
            )
        if not (tolerance > 0 and math.isfinite(tolerance)):
            raise ValueError(
                f"ConvergenceMonitor tolerance={tolerance!r} is invalid: use a finite number > 0 (e.g. 1e-4)"
            )
        if not 0.0 <= warn_unconverged <= 1.0:
            raise ValueError(
                f"ConvergenceMonitor warn_unconverged={warn_unconverged!r} is invalid: use a share in [0, 1]"
            )
        if not 0.0 <= saturation_margin < 0.5:
            raise ValueError(
                f"ConvergenceMonitor saturation_margin={saturation_margin!r} is invalid: use a fraction in [0, 0.5)"
            )
        if source not in ("auto", "val", "train"):
            raise ValueError(f"ConvergenceMonitor source={source!r} is invalid; allowed: 'auto', 'val', 'train'")
        self.enabled = bool(enabled)
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs
        self.max_samples = max_samples
        self.tolerance = float(tolerance)
        self.warn_unconverged = float(warn_unconverged)
        self.saturation_margin = float(saturation_margin)
        self.trajectory_samples = trajectory_samples
        self.feature_map_samples = feature_map_samples
        self.feature_map_channels = feature_map_channels
        self.histograms = bool(histograms)
        self.source = source
        self._batch: tuple[Tensor, Tensor] | None = None
        self.batch_source: str | None = None  # "val" or "train" once the fixed batch is chosen

    @property
    def active(self) -> bool:
        """Whether any hook can do work."""
        return self.enabled and bool(self.every_n_steps or self.every_n_epochs)

    # --- Lightning hooks ----------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.active or stage != "fit":
            return
        if not isinstance(pl_module, RelaxingSystem):
            raise TypeError(
                f"ConvergenceMonitor needs a system of ep_lightning.systems (a RelaxingSystem: `net`, `T`, `K`, "
                f"`beta`, `initial_state`, `relaxation_drive`); {type(pl_module).__name__} is not one. Remove the "
                f"callback or set `enabled: false`."
            )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.active or not trainer.is_global_zero:
            return
        layout = self.custom_scalars_layout(pl_module.net.state_names())
        for logger in self._tb_loggers(trainer):
            logger.experiment.add_custom_scalars(layout)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self.enabled or not self.every_n_steps or trainer.global_step % self.every_n_steps:
            return
        if not trainer.is_global_zero:  # rank 0's batch only: no collective below
            return
        step = trainer.global_step
        x, labels = batch[0][: self.max_samples], batch[1][: self.max_samples]
        snap = self.snapshot(pl_module, x.to(pl_module.device), labels.to(pl_module.device), trajectories=False)
        metrics = self.summary_metrics(snap, pl_module, prefix="train/")
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        self._warn_if_unconverged(snap, f"training batch at step {step}", pl_module)
        self._write_curves(trainer, snap, pl_module, f"step_{step:07d}", "convergence/train/")
        self._write_figures(trainer, snap, pl_module, step, "convergence/train/", trajectories=False)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled or not self.every_n_epochs or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        x, labels = self.monitoring_batch(trainer, pl_module)
        snap = self.snapshot(pl_module, x, labels)  # same samples on every rank: identical values
        for key, value in self.summary_metrics(snap, pl_module).items():
            pl_module.log(key, value, on_step=False, on_epoch=True, sync_dist=True, batch_size=x.shape[0])
        if trainer.is_global_zero:
            step = trainer.global_step
            where = f"{self.batch_source} monitoring batch after epoch {trainer.current_epoch}"
            self._warn_if_unconverged(snap, where, pl_module)
            self._write_curves(trainer, snap, pl_module, f"epoch_{trainer.current_epoch:03d}", "convergence/")
            self._write_figures(trainer, snap, pl_module, step, "convergence/")
            self._write_feature_maps(trainer, snap, step)
            if self.histograms:
                self._write_histograms(trainer, snap, pl_module, step)

    # --- data ---------------------------------------------------------------------------------------------------
    def monitoring_batch(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[Tensor, Tensor]:
        """The fixed batch (x, labels), chosen once per run and moved to the module's device."""
        if self._batch is None:
            loader = None
            if self.source in ("auto", "val"):
                loader = _first_loader(trainer.val_dataloaders)
                if loader is None and trainer.datamodule is not None:
                    loader = _first_loader(trainer.datamodule.val_dataloader())
                self.batch_source = "val"
                if loader is None and self.source == "val":
                    raise ValueError(
                        "ConvergenceMonitor source='val' but the run has no validation data; "
                        "use source='auto' or 'train', or set data.val_size > 0"
                    )
            if loader is None:
                loader = _first_loader(trainer.train_dataloader)
                self.batch_source = "train"
            if loader is None:
                raise ValueError("ConvergenceMonitor found no training or validation DataLoader to take a batch from")
            batch = _first_samples(loader, self.max_samples)
            self._batch = (batch[0].detach(), batch[1].detach())
        x, labels = self._batch
        return x.to(pl_module.device), labels.to(pl_module.device)

    # --- measurement --------------------------------------------------------------------------------------------
    def snapshot(self, system: RelaxingSystem, x: Tensor, labels: Tensor, trajectories: bool = True) -> Snapshot:
        """Relax the free phase (T steps) and the nudged phase (K steps at β, from s*) with traces.

        The phases are the system's: start ``system.initial_state(x)``, drive ``system.relaxation_drive(x, start)``
        (Initialized EP: s^f and the anchored E^λ); no nudged phase when K or β is 0.
        """
        model: EnergyModel = system.net
        beta, K = float(system.beta), int(system.K)
        keep = self.trajectory_samples if trajectories else 0
        with torch.no_grad():
            start = system.initial_state(x)
            drive = system.relaxation_drive(x, start)
            free_trace = RelaxationTrace(x=x, model=model, keep_outputs=keep)
            free = relax(model, drive, start, system.T, trace=free_trace)
            nudged_record = None
            if beta != 0.0 and K > 0:
                target = model.encode_target(labels, x)
                nudged_trace = RelaxationTrace(x=x, model=model, keep_outputs=keep)
                nudged = relax(model, drive, free, K, beta, target, trace=nudged_trace)
                nudged_record = _record(nudged_trace, nudged, self.tolerance)
        return Snapshot(x, labels, model.state_names(), _record(free_trace, free, self.tolerance), nudged_record)

    def summary_metrics(self, snap: Snapshot, pl_module: L.LightningModule, prefix: str = "") -> dict[str, float]:
        """Scalars of one snapshot: steps to tolerance, unconverged share, final residuals, saturation."""
        metrics: dict[str, float] = {
            f"convergence/{prefix}free/steps_to_tol": float(snap.free.steps_to_tol),
            f"convergence/{prefix}free/unconverged_frac": unconverged_fraction(snap.free.final, self.tolerance),
        }
        phases = [("free", snap.free)] + ([("nudged", snap.nudged)] if snap.nudged is not None else [])
        if snap.nudged is not None:
            metrics[f"convergence/{prefix}nudged/steps_to_tol"] = float(snap.nudged.steps_to_tol)
        bounds = ACTIVATION_BOUNDS.get(getattr(pl_module.net, "activation_name", None) or "", None)
        for phase, rec in phases:
            for layer, name in enumerate(snap.names):
                metrics[f"convergence/{prefix}{phase}/final_residual/{name}"] = float(rec.residuals[-1, layer])
                if bounds is not None:
                    metrics[f"saturation/{prefix}{phase}/{name}"] = saturation_fraction(
                        rec.state[layer], bounds, self.saturation_margin
                    )
        return metrics

    def _warn_if_unconverged(self, snap: Snapshot, where: str, system: RelaxingSystem) -> None:
        """Warn when more than ``warn_unconverged`` of the batch ends the free phase unconverged, unless the system
        declares its free phase truncated on purpose (``protocols.expects_converged_free_phase``)."""
        if not expects_converged_free_phase(system):
            return
        frac = unconverged_fraction(snap.free.final, self.tolerance)
        if frac > self.warn_unconverged:
            log.warning(
                "ConvergenceMonitor: the free phase ended unconverged (residual ≥ %g after T = %d steps) for %.0f%% "
                "of the %s; EP's gradient estimate (the GDU property) assumes a converged free phase: raise T or "
                "check the dynamics.",
                self.tolerance,
                snap.free.residuals.shape[0],
                100 * frac,
                where,
            )

    # --- writing ------------------------------------------------------------------------------------------------
    @staticmethod
    def _tb_loggers(trainer: L.Trainer) -> list[TensorBoardLogger]:
        return [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]

    @staticmethod
    def custom_scalars_layout(names: list[str]) -> dict[str, dict[str, list[Any]]]:
        """TensorBoard custom-scalars layout: per-layer curves against t, and the summaries against the step."""

        def curves(prefix: str) -> dict[str, list[Any]]:
            charts = {
                f"log10 residual {name} (free, then nudged)": [
                    "Multiline",
                    [rf"^{prefix}(free|nudged)/log10_residual/{name}$"],
                ]
                for name in [*names, WHOLE_STATE]
            }
            charts["Φ (free, then nudged)"] = ["Multiline", [rf"^{prefix}(free|nudged)/phi$"]]
            return charts

        return {
            "convergence: fixed batch against relaxation step t (one run per epoch)": curves("convergence/"),
            "convergence: training batch against relaxation step t (one run per snapshot)": curves(
                "convergence/train/"
            ),
            "convergence: summaries against training step": {
                "steps to tolerance": ["Multiline", [r"^convergence/(train/)?(free|nudged)/steps_to_tol$"]],
                "unconverged share (free phase)": ["Multiline", [r"^convergence/(train/)?free/unconverged_frac$"]],
                "final residual per layer": ["Multiline", [r"^convergence/(train/)?(free|nudged)/final_residual/"]],
                "saturation per layer": ["Multiline", [r"^saturation/"]],
            },
        }

    def _write_curves(
        self, trainer: L.Trainer, snap: Snapshot, pl_module: L.LightningModule, run: str, prefix: str
    ) -> None:
        """Per-t scalars of one snapshot in their own run ``<log_dir>/relaxation/<run>`` (t = 1 … T, T+1 … T+K)."""
        loggers = self._tb_loggers(trainer)
        if not loggers:
            return
        from torch.utils.tensorboard import SummaryWriter

        T = snap.free.residuals.shape[0]
        for logger in loggers:
            writer = SummaryWriter(log_dir=os.path.join(logger.log_dir, "relaxation", run))
            try:
                for phase, rec, offset in (("free", snap.free, 0), ("nudged", snap.nudged, T)):
                    if rec is None:
                        continue
                    curves = {name: rec.residuals[:, layer] for layer, name in enumerate(snap.names)}
                    curves[WHOLE_STATE] = rec.total
                    for t in range(rec.residuals.shape[0]):
                        for name, values in curves.items():
                            value = float(values[t])
                            writer.add_scalar(f"{prefix}{phase}/residual/{name}", value, offset + t + 1)
                            if value > 0:  # an exact fixed point (residual 0) leaves a gap on the log axis
                                tag = f"{prefix}{phase}/log10_residual/{name}"
                                writer.add_scalar(tag, math.log10(value), offset + t + 1)
                        if rec.phi.numel():
                            writer.add_scalar(f"{prefix}{phase}/phi", float(rec.phi[t]), offset + t + 1)
            finally:
                writer.close()

    def _write_figures(
        self,
        trainer: L.Trainer,
        snap: Snapshot,
        pl_module: L.LightningModule,
        step: int,
        prefix: str,
        trajectories: bool = True,
    ) -> None:
        """Relaxation figure (and, when ``trajectories``, the output-trajectory figure)."""
        loggers = self._tb_loggers(trainer)
        if not loggers:
            return
        images = {f"{prefix}relaxation": relaxation_figure(snap, self.tolerance)}
        if trajectories and self.trajectory_samples and snap.free.outputs.numel():
            images[f"{prefix}output_trajectory"] = trajectory_figure(snap)
        for logger in loggers:
            for tag, image in images.items():
                logger.experiment.add_image(tag, image, step, dataformats="HWC")

    def _write_feature_maps(self, trainer: L.Trainer, snap: Snapshot, step: int) -> None:
        if not self.feature_map_samples:
            return
        loggers = self._tb_loggers(trainer)
        for layer, name in enumerate(snap.names):
            maps = snap.free.state[layer]
            if maps.ndim != 4 or not loggers:
                continue
            image = feature_map_figure(snap.x, maps, self.feature_map_samples, self.feature_map_channels, name)
            for logger in loggers:
                logger.experiment.add_image(f"feature_maps/free/{name}", image, step, dataformats="HWC")

    def _write_histograms(self, trainer: L.Trainer, snap: Snapshot, pl_module: L.LightningModule, step: int) -> None:
        loggers = self._tb_loggers(trainer)
        if not loggers:
            return
        model: EnergyModel = pl_module.net
        hists: dict[str, Tensor] = {}
        for phase, rec in (("free", snap.free), ("nudged", snap.nudged)):
            if rec is not None:
                hists.update({f"states/{phase}/{n}": s for n, s in zip(snap.names, rec.state)})
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        hists.update({f"weights/{n}": p.detach() for n, p in named})
        if snap.nudged is not None and named:
            beta = float(pl_module.beta)
            with torch.enable_grad():
                surrogate = ep_surrogate(model, snap.x, snap.free.state, snap.nudged.state, (0.0, beta))
                grads = torch.autograd.grad(surrogate, [p for _, p in named], allow_unused=True)
            # ∇θ L_EP = −Δθ: the EP update is minus the surrogate's gradient (parameters' .grad untouched).
            hists.update({f"ep_update/{n}": -g for (n, _), g in zip(named, grads) if g is not None})
        for logger in loggers:
            for tag, values in hists.items():
                logger.experiment.add_histogram(tag, values.detach().float().cpu(), step)


# --- data helpers -----------------------------------------------------------------------------------------------
def _first_loader(loaders: Any) -> DataLoader | None:
    """The first non-empty DataLoader in ``loaders`` (a loader, a list/tuple/dict of them, or nothing)."""
    if isinstance(loaders, DataLoader):
        return loaders
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        for loader in loaders:
            found = _first_loader(loader)
            if found is not None:
                return found
    return None


def _first_samples(loader: DataLoader, n: int) -> tuple[Tensor, Tensor]:
    """The first ``n`` samples of the loader's dataset by index (no shuffling, no RNG use) as (x, labels)."""
    dataset = loader.dataset
    if not isinstance(dataset, IterableDataset):
        # A private generator: starting a DataLoader iterator draws a seed, which must not come from the global RNG
        # (that would change the shuffling of the training run being monitored).
        fixed = DataLoader(
            dataset,
            batch_size=n,
            shuffle=False,
            collate_fn=loader.collate_fn,
            num_workers=0,
            generator=torch.Generator(),
        )
        batch = next(iter(fixed))
        return batch[0], batch[1]
    xs, ys, count = [], [], 0
    with torch.random.fork_rng(devices=[]):  # an iterable dataset is read through its loader: restore the CPU RNG
        for batch in loader:
            xs.append(batch[0])
            ys.append(batch[1])
            count += batch[0].shape[0]
            if count >= n:
                break
    return torch.cat(xs)[:n], torch.cat(ys)[:n]


# --- figures (matplotlib, Agg canvas; no pyplot state) ----------------------------------------------------------
def _render(fig: Any) -> np.ndarray:
    """Figure → uint8 RGB array (H, W, 3)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _positive(values: Tensor) -> np.ndarray:
    """float64 array with exact zeros (a fixed point reached to the last bit) as NaN: gaps on a log axis."""
    out = values.double().numpy().copy()
    out[out <= 0] = np.nan
    return out


def relaxation_figure(snap: Snapshot, tolerance: float) -> np.ndarray:
    """Residual per layer (log scale) and Φ against t; the nudged phase follows the free one at t = T+1 … T+K."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 6), dpi=80)
    ax_res, ax_phi = fig.subplots(2, 1, sharex=True)
    T = snap.free.residuals.shape[0]
    colors = [f"C{i}" for i in range(len(snap.names))]
    for phase, rec, offset, style in (("free", snap.free, 0, "-"), ("nudged", snap.nudged, T, "--")):
        if rec is None:
            continue
        t = np.arange(offset + 1, offset + rec.residuals.shape[0] + 1)
        for layer, name in enumerate(snap.names):
            values = _positive(rec.residuals[:, layer])
            ax_res.semilogy(t, values, style, color=colors[layer], label=f"{name} ({phase})")
        ax_res.semilogy(t, _positive(rec.total), style, color="k", lw=0.8, label=f"whole state ({phase})")
        if rec.phi.numel():
            ax_phi.plot(t, rec.phi.double().numpy(), style, color="C0", label=phase)
    ax_res.axhline(tolerance, color="grey", lw=0.8, ls=":", label=f"tolerance {tolerance:g}")
    for ax in (ax_res, ax_phi):
        if snap.nudged is not None:
            ax.axvline(T + 0.5, color="red", lw=0.8, ls=":")
    ax_res.set(
        ylabel="‖s_t − s_{t−1}‖ (batch mean)",
        title=f"free phase: {snap.free.steps_to_tol} steps to tolerance"
        + (f"; nudged phase (after the red line): {snap.nudged.steps_to_tol}" if snap.nudged else ""),
    )
    ax_res.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax_phi.set(xlabel="relaxation step t", ylabel="Φ (or −E), batch mean")
    ax_phi.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.subplots_adjust(left=0.09, right=0.8, top=0.94, bottom=0.08, hspace=0.06)  # tight_layout would draw twice
    return _render(fig)


def trajectory_figure(snap: Snapshot) -> np.ndarray:
    """Output units of the first samples against t = 0 … T (free) and T … T+K (nudged); the target unit is bold."""
    from matplotlib.figure import Figure

    free = snap.free.outputs  # (T+1, n, out)
    traj = free if snap.nudged is None else torch.cat([free, snap.nudged.outputs[1:]])
    n = traj.shape[1]
    fig = Figure(figsize=(4 * n, 3.2), dpi=80)
    axes = np.atleast_1d(fig.subplots(1, n, sharey=True))
    T = free.shape[0] - 1
    t = np.arange(traj.shape[0])
    labels = snap.labels[:n].cpu()
    predicted = free[-1].argmax(dim=1)
    for i, ax in enumerate(axes):
        for unit in range(traj.shape[2]):
            target = unit == int(labels[i])
            ax.plot(
                t,
                traj[:, i, unit].double().numpy(),
                color=f"C{unit % 10}",
                lw=2.5 if target else 0.9,
                label=f"unit {unit}",
            )
        if snap.nudged is not None:
            ax.axvline(T, color="red", lw=0.8, ls=":")
        ax.set(title=f"sample {i}: label {int(labels[i])}, predicted {int(predicted[i])}", xlabel="relaxation step t")
    axes[0].set_ylabel("output unit state")
    fig.suptitle(
        "output units against t (bold: the target unit" + ("; red line: nudge on)" if snap.nudged else ")"), fontsize=9
    )
    axes[-1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.subplots_adjust(left=0.06, right=0.9, top=0.8, bottom=0.15, wspace=0.08)
    return _render(fig)


def feature_map_figure(x: Tensor, maps: Tensor, samples: int, channels: int, name: str) -> np.ndarray:
    """Rows: samples (input image first); columns: the first ``channels`` feature maps of s* at layer ``name``."""
    from matplotlib.figure import Figure

    samples = min(samples, maps.shape[0])
    channels = min(channels, maps.shape[1])
    show_input = x.ndim == 4 and x.shape[1] in (1, 3)
    cols = channels + int(show_input)
    fig = Figure(figsize=(1.3 * cols, 1.3 * samples + 0.4), dpi=80)
    axes = np.array(fig.subplots(samples, cols, squeeze=False))
    maps = maps[:samples, :channels].detach().double().cpu()
    lo, hi = float(maps.min()), float(maps.max())
    for i in range(samples):
        if show_input:
            img = x[i].detach().double().cpu().permute(1, 2, 0).squeeze(-1).numpy()
            axes[i, 0].imshow(img, cmap="gray")
        for c in range(channels):
            axes[i, c + int(show_input)].imshow(maps[i, c].numpy(), cmap="viridis", vmin=lo, vmax=hi)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    if show_input:
        axes[0, 0].set_title("input", fontsize=8)
    for c in range(channels):
        axes[0, c + int(show_input)].set_title(f"ch {c}", fontsize=8)
    fig.suptitle(f"s* at {name} (colour range {lo:.2g} … {hi:.2g})", fontsize=9)
    fig.tight_layout()
    return _render(fig)
