"""ConvergenceMonitor: how the free phase settles and how the nudged phase moves, in TensorBoard and in one line.

It relaxes nothing itself: the fixed batch goes through the system's phase runner (``system.phases``, the start,
drive and nudging pair training uses), and training-batch snapshots are the training step's own phases, recorded as
they were applied (``system.record_next_step``). What is logged (tags; ``{layer}`` is ``net.state_names()``:
``layer1`` … ``output``; ``{phase}`` is ``free``, ``nudged`` (at β_b) and, for symmetric nudging, ``nudged_a``; t is
the relaxation step):

* **Fixed monitoring batch, at the end of every ``every_n_epochs``-th epoch** (the same samples every epoch, so
  epochs compare like for like: the first ``max_samples`` samples of the validation set, or of the training set
  when there is no validation set — the paper protocol ``val_size: 0`` — see ``source``):

  - scalars against the training step (``self.log``, epoch level, usable by other callbacks):
    ``convergence/{phase}/steps_to_tol``, ``convergence/free/unconverged_frac``,
    ``convergence/{phase}/final_residual/{layer}``, ``saturation/{phase}/{layer}``;
  - curves against t in the run ``<version>/relaxation/fixed_batch`` at x = epoch × stride + t
    (``callbacks.tensorboard``): ``convergence/{phase}/residual/{layer}``, the same as ``log10_residual``, both also
    for ``{layer} = whole_state``, and ``convergence/{phase}/phi``; the nudged phase follows at t = T+1 … T+K;
  - figures (``ep_lightning.figures``): ``convergence/relaxation``, ``convergence/output_trajectory``,
    ``feature_maps/free/{layer}`` (conv models only);
  - histograms: ``states/{phase}/{layer}``, ``weights/{param}``, ``ep_update/{param}`` (the update training applies
    for these phases and this pair: −∇_θ of the system's ``ep_loss``, e.g. (1/β)(∂Φ/∂θ(s^β) − ∂Φ/∂θ(s*))).

* **Training batch, every ``every_n_steps`` optimizer steps** (rank 0's batch, before the step's update): the same
  scalars with a ``convergence/train/`` (``saturation/train/``) prefix, curves in the run
  ``<version>/relaxation/training_batch`` at x = step × stride + t, and the figure ``convergence/train/relaxation``.

* A **custom-scalars layout** (TensorBoard's "Custom Scalars" tab) groups these charts, written once at fit start.

* **Signs of trouble in one line** (a warning after a snapshot): the free phase not converging within T (more than
  ``warn_unconverged`` of the samples unconverged, or, on the fixed batch, the batch-mean residual never under
  ``tolerance``; never for a system whose free phase is truncated on purpose, e.g. Initialized EP), a hidden layer
  saturated on (almost) every unit (``warn_saturated``), and, on the fixed batch, a hidden layer whose saturation grew
  by ``warn_saturation_growth`` or more since the first monitored epoch.

Cost: nothing runs when ``enabled`` is false (or both frequencies are 0). Otherwise one extra relaxation of at most
``max_samples`` samples per epoch, the recording of one training step every ``every_n_steps``, plus rendering;
figures, histograms and curves are written on rank 0 only.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor

from ep_lightning.callbacks.batches import first_loader, first_samples
from ep_lightning.callbacks.measurements import (
    Snapshot,
    saturation_fraction,
    snapshot_of,
    unconverged_fraction,
)
from ep_lightning.callbacks.tensorboard import (
    RelaxationCurves,
    add_figures,
    add_histograms,
    custom_scalars_layout,
    relaxation_stride,
    tb_loggers,
)
from ep_lightning.figures import feature_map_figure, relaxation_figure, trajectory_figure
from ep_lightning.protocols import NudgingSystem, RelaxingSystem, expects_converged_free_phase
from ep_lightning.relaxation import PhaseTrace

log = logging.getLogger(__name__)


class ConvergenceMonitor(L.Callback):
    """Logs the convergence of the free phase and the motion of the nudged phase to TensorBoard (see module doc).

    Works with any ``RelaxingSystem`` (``ep_lightning.protocols``: every system of ``ep_lightning.systems``).
    Relaxations run under ``no_grad`` and do not touch parameters, gradients, optimizer state, the β-sign stream or
    random number generators.
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
        warn_saturated: float = 0.99,
        warn_saturation_growth: float = 0.2,
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
            max_samples: at most this many samples are relaxed (and shown) per snapshot (bounds the cost).
            tolerance: residual threshold defining convergence (whole-state norm ‖s_t − s_{t−1}‖ per sample).
            warn_unconverged: warn when the free phase ends unconverged for more than this share of the monitored
                batch (1 disables this part; systems whose free phase is truncated on purpose, such as Initialized
                EP, never get it); a batch-mean residual above ``tolerance`` at t = T warns as well.
            saturation_margin: a unit counts as saturated within this fraction of σ's range width from a bound.
            warn_saturated: warn when this share (or more) of a layer's units is saturated (1.01: never).
            warn_saturation_growth: warn when a layer's saturated share grew by this much (absolute) or more since
                the first monitored epoch (1.01: never).
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
        for field, value in (("warn_saturated", warn_saturated), ("warn_saturation_growth", warn_saturation_growth)):
            if not 0.0 < value:
                raise ValueError(f"ConvergenceMonitor {field}={value!r} is invalid: use a share > 0 (above 1: never)")
        if source not in ("auto", "val", "train"):
            raise ValueError(f"ConvergenceMonitor source={source!r} is invalid; allowed: 'auto', 'val', 'train'")
        self.enabled = bool(enabled)
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs
        self.max_samples = max_samples
        self.tolerance = float(tolerance)
        self.warn_unconverged = float(warn_unconverged)
        self.saturation_margin = float(saturation_margin)
        self.warn_saturated = float(warn_saturated)
        self.warn_saturation_growth = float(warn_saturation_growth)
        self.trajectory_samples = trajectory_samples
        self.feature_map_samples = feature_map_samples
        self.feature_map_channels = feature_map_channels
        self.histograms = bool(histograms)
        self.source = source
        self._batch: tuple[Tensor, Tensor] | None = None
        self.batch_source: str | None = None  # "val" or "train" once the fixed batch is chosen
        self._pending: tuple[PhaseTrace, Tensor, Tensor, int] | None = None
        self._first_saturation: dict[str, tuple[int, float]] = {}  # layer → (epoch, saturated share) first seen
        self._curves = {"fixed": RelaxationCurves("fixed_batch"), "train": RelaxationCurves("training_batch")}

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
                f"ConvergenceMonitor needs a system of ep_lightning.systems (a RelaxingSystem: `net`, `T`, `phases`, "
                f"`initial_state`, `relaxation_drive`, …); {type(pl_module).__name__} is not one. Remove the "
                f"callback or set `enabled: false`."
            )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.active or not trainer.is_global_zero:
            return
        layout = custom_scalars_layout(pl_module.net.state_names())
        for logger in tb_loggers(trainer):
            logger.experiment.add_custom_scalars(layout)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for curves in self._curves.values():
            curves.close()

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self.enabled or not self.every_n_steps or trainer.global_step % self.every_n_steps:
            return
        if not trainer.is_global_zero:  # rank 0's batch only: recording adds no collective
            return
        trace = PhaseTrace(phi=True)
        pl_module.record_next_step(trace)
        n = self.max_samples
        self._pending = (trace, batch[0][:n], batch[1][:n], trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self._pending is None:
            return
        trace, x, labels, step = self._pending
        self._pending = None
        if trace.phases is None:  # the step did not relax (nothing to show)
            return
        snap = snapshot_of(trace, x, labels, pl_module.net.state_names(), self.tolerance)
        metrics = self.summary_metrics(snap, pl_module, prefix="train/")
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        self.warn_if_in_trouble(snap, pl_module, metrics, f"training batch at step {step}")
        self._curves["train"].write(trainer, snap, step, self._stride(pl_module), "convergence/train/")
        add_figures(trainer, {"convergence/train/relaxation": self._relaxation_figure(snap)}, step)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled or not self.every_n_epochs or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        x, labels = self.monitoring_batch(trainer, pl_module)
        snap = self.snapshot(pl_module, x, labels)  # same samples on every rank: identical values
        metrics = self.summary_metrics(snap, pl_module)
        for key, value in metrics.items():
            pl_module.log(key, value, on_step=False, on_epoch=True, sync_dist=True, batch_size=x.shape[0])
        if not trainer.is_global_zero:
            return
        epoch, step = trainer.current_epoch, trainer.global_step
        self.warn_if_in_trouble(snap, pl_module, metrics, f"epoch {epoch}, {self.batch_source} monitoring batch", epoch)
        self._curves["fixed"].write(trainer, snap, epoch, self._stride(pl_module), "convergence/")
        figures = {"convergence/relaxation": self._relaxation_figure(snap)}
        if self.trajectory_samples and snap.free.outputs.numel():
            nudged = snap.nudged.outputs if snap.nudged is not None else None
            figures["convergence/output_trajectory"] = trajectory_figure(snap.free.outputs, nudged, snap.labels)
        figures.update(self._feature_maps(snap))
        add_figures(trainer, figures, step)
        if self.histograms:
            add_histograms(trainer, self.histograms_of(snap, pl_module), step)

    # --- data ---------------------------------------------------------------------------------------------------
    def monitoring_batch(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[Tensor, Tensor]:
        """The fixed batch (x, labels), chosen once per run and moved to the module's device."""
        if self._batch is None:
            loader = None
            if self.source in ("auto", "val"):
                loader = first_loader(trainer.val_dataloaders)
                if loader is None and trainer.datamodule is not None:
                    loader = first_loader(trainer.datamodule.val_dataloader())
                self.batch_source = "val"
                if loader is None and self.source == "val":
                    raise ValueError(
                        "ConvergenceMonitor source='val' but the run has no validation data; "
                        "use source='auto' or 'train', or set data.val_size > 0"
                    )
            if loader is None:
                loader = first_loader(trainer.train_dataloader)
                self.batch_source = "train"
            if loader is None:
                raise ValueError("ConvergenceMonitor found no training or validation DataLoader to take a batch from")
            batch = first_samples(loader, self.max_samples)
            self._batch = (batch[0].detach(), batch[1].detach())
        x, labels = self._batch
        return x.to(pl_module.device), labels.to(pl_module.device)

    # --- measurement --------------------------------------------------------------------------------------------
    def snapshot(self, system: RelaxingSystem, x: Tensor, labels: Tensor, trajectories: bool = True) -> Snapshot:
        """The system's phases of the batch, recorded: ``system.phases`` from ``system.initial_state(x)`` with its
        drive (Initialized EP: s^f and the anchored E^λ) and, when it has a nudged phase, the pair its last training
        step used (``system.nudging_pair()``, read without drawing)."""
        trace = PhaseTrace(phi=True, keep_outputs=self.trajectory_samples if trajectories else 0)
        with torch.no_grad():
            target = system.net.encode_target(labels, x)
            system.phases(x, target, system.initial_state(x), system.nudging_pair(), trace=trace)
        return snapshot_of(trace, x, labels, system.net.state_names(), self.tolerance)

    def summary_metrics(self, snap: Snapshot, system: RelaxingSystem, prefix: str = "") -> dict[str, float]:
        """Scalars of one snapshot: steps to tolerance, unconverged share, final residuals, saturation."""
        metrics: dict[str, float] = {
            f"convergence/{prefix}free/unconverged_frac": unconverged_fraction(snap.free.final, self.tolerance),
        }
        bounds = system.net.activation_bounds
        for rec in snap.records():
            metrics[f"convergence/{prefix}{rec.phase}/steps_to_tol"] = float(rec.steps_to_tol)
            for layer, name in enumerate(snap.names):
                metrics[f"convergence/{prefix}{rec.phase}/final_residual/{name}"] = float(rec.residuals[-1, layer])
                if bounds is not None:
                    metrics[f"saturation/{prefix}{rec.phase}/{name}"] = saturation_fraction(
                        rec.state[layer], bounds, self.saturation_margin
                    )
        return metrics

    def histograms_of(self, snap: Snapshot, system: RelaxingSystem) -> dict[str, Tensor]:
        """s* and the nudged states per layer, the weights, and the update training applies for these phases and
        this pair (−∇_θ ``system.ep_loss``; the parameters' ``.grad`` stay untouched)."""
        hists: dict[str, Tensor] = {}
        for rec in snap.records():
            hists.update({f"states/{rec.phase}/{n}": s for n, s in zip(snap.names, rec.state)})
        named = [(n, p) for n, p in system.net.named_parameters() if p.requires_grad]
        hists.update({f"weights/{n}": p.detach() for n, p in named})
        if snap.betas is not None and snap.states is not None and named and isinstance(system, NudgingSystem):
            with torch.enable_grad():
                target = system.net.encode_target(snap.labels, snap.x)
                loss = system.ep_loss(snap.x, target, snap.states, snap.betas)
                grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
            hists.update({f"ep_update/{n}": -g for (n, _), g in zip(named, grads) if g is not None})
        return hists

    def warn_if_in_trouble(
        self, snap: Snapshot, system: RelaxingSystem, metrics: dict[str, float], where: str, epoch: int | None = None
    ) -> None:
        """One warning line naming what looks wrong on a snapshot (see the module docstring): the free phase not
        converged within T, a saturated layer and (for the fixed batch of ``epoch``) a layer whose saturation grew."""
        problems = []
        converged = self._convergence_problem(snap, system, fixed_batch=epoch is not None)
        if converged:
            problems.append(converged)
        prefix = "saturation/" if epoch is not None else "saturation/train/"
        # an output layer in the dynamics saturates by design (one-hot targets): the hidden layers tell the story
        hidden = snap.names[:-1] if system.net.readout == "mse" else snap.names
        for name in hidden:
            share = metrics.get(f"{prefix}free/{name}")
            if share is None:
                continue
            if share >= self.warn_saturated:
                problems.append(
                    f"{name} saturated ({100 * share:.0f} % of its units at a bound of σ: weights blown up, learning "
                    f"rates too large?)"
                )
            elif epoch is not None:
                first_epoch, first = self._first_saturation.setdefault(name, (epoch, share))
                if share - first >= self.warn_saturation_growth:
                    problems.append(
                        f"{name} saturation grew {100 * first:.0f} % → {100 * share:.0f} % since epoch {first_epoch}"
                    )
        if problems:
            log.warning("ConvergenceMonitor, %s: %s", where, "; ".join(problems))

    def _convergence_problem(self, snap: Snapshot, system: RelaxingSystem, fixed_batch: bool) -> str | None:
        """What is wrong with the free phase's convergence, or None (also for a free phase truncated on purpose):
        more than ``warn_unconverged`` of the samples unconverged, or (on the fixed batch, once per epoch) a batch-mean
        residual never under the tolerance within T."""
        if not expects_converged_free_phase(system):
            return None
        T = snap.free.residuals.shape[0]
        frac = unconverged_fraction(snap.free.final, self.tolerance)
        mean_converged = snap.free.steps_to_tol <= T or not fixed_batch
        if mean_converged and frac <= self.warn_unconverged:
            return None
        return (
            f"the free phase ended unconverged after T = {T} steps ({100 * frac:.0f} % of the samples with residual ≥ "
            f"{self.tolerance:g}, batch mean {float(snap.free.total[-1]):.2g}); EP's gradient estimate (the GDU "
            f"property) assumes a converged free phase: raise T or check the dynamics"
        )

    # --- figures ------------------------------------------------------------------------------------------------
    def _relaxation_figure(self, snap: Snapshot) -> Any:
        return relaxation_figure([rec.curves() for rec in snap.records()], snap.names, self.tolerance)

    def _feature_maps(self, snap: Snapshot) -> dict[str, Any]:
        if not self.feature_map_samples:
            return {}
        figures = {}
        for layer, name in enumerate(snap.names):
            maps = snap.free.state[layer]
            if maps.ndim == 4:
                figures[f"feature_maps/free/{name}"] = feature_map_figure(
                    snap.x, maps, self.feature_map_samples, self.feature_map_channels, name
                )
        return figures

    @staticmethod
    def _stride(system: RelaxingSystem) -> int:
        return relaxation_stride(system.T + system.K)
