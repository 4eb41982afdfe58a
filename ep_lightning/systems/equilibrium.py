"""EquilibriumModule: trains any EnergyModel by Equilibrium Propagation or truncated BPTT (manual optimization)."""

from __future__ import annotations

from typing import Any, Literal, Sequence

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from ep_lightning.algorithms import bptt_loss, ep_surrogate
from ep_lightning.callbacks.divergence import check_training_step, default_callbacks
from ep_lightning.dynamics import RelaxationTrace, relax
from ep_lightning.models.base import EnergyModel, State
from ep_lightning.resume import catch_up_epoch_schedulers
from ep_lightning.validation import check_module_fits_datamodule


def sgd(params: Any) -> torch.optim.Optimizer:
    """Plain SGD, the papers' optimizer; the per-layer learning rates come in the parameter groups."""
    return torch.optim.SGD(params, lr=0.0)


class EquilibriumModule(L.LightningModule):
    """Runs free phase, nudged phase and the EP (or BPTT) update inside ``training_step``.

    EP:   s* = relax(T, β=0) from zeros;  s^β = relax(K, β) from s*;  loss = (Φ(s*) − Φ(s^β))/β → manual_backward.
    BPTT: relax(T − K) without graph, then K steps with graph;  loss = ½‖s_out − y‖² at step T → manual_backward.
    Evaluation runs the free phase (``eval_steps`` steps, default T) and scores the output layer.
    """

    def __init__(
        self,
        model: EnergyModel,
        algorithm: Literal["ep", "bptt"] = "ep",
        T: int = 30,
        K: int = 10,
        beta: float = 0.1,
        lrs: Sequence[float] | None = None,
        optimizer: OptimizerCallable = sgd,
        lr_scheduler: LRSchedulerCallable | None = None,
        eval_steps: int | None = None,
    ) -> None:
        """
        Args:
            model: the convergent network (an ``EnergyModel``), e.g. ``ep_lightning.models.PrototypicalNet``.
            algorithm: ``ep`` (Equilibrium Propagation) or ``bptt`` (truncated back-propagation through time).
            T: free-phase steps (for BPTT: total steps, the last K with graph).
            K: nudged-phase steps (for BPTT: steps back-propagated through).
            beta: nudging strength β (> 0); used by EP only.
            lrs: one learning rate per layer group, input → output (``model.parameter_groups()``).
            optimizer: optimizer factory taking the parameter groups (default plain SGD).
            lr_scheduler: optional scheduler factory, stepped once per epoch.
            eval_steps: free-phase steps for validation/test/predict (default: T).
        """
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        self.automatic_optimization = False
        self.model = model
        self.algorithm = algorithm
        self.T, self.K, self.beta = int(T), int(K), float(beta)
        self.lrs = [float(lr) for lr in lrs] if lrs is not None else None
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.eval_steps = int(eval_steps) if eval_steps is not None else self.T
        self._validate()
        metric = lambda: MulticlassAccuracy(num_classes=model.num_classes, average="micro", validate_args=False)  # noqa: E731
        self.train_acc, self.val_acc, self.test_acc = metric(), metric(), metric()
        self.train_loss = MeanMetric()
        #: Show the running training loss in the progress bar every N steps (logging per step is costly).
        self.progress_every_n_steps = 50

    def _validate(self) -> None:
        """Reject inconsistent settings before any training step, naming the field and what is allowed."""
        if self.algorithm not in ("ep", "bptt"):
            raise ValueError(f"model.algorithm={self.algorithm!r} is not known; allowed: 'ep', 'bptt'")
        if self.T < 1:
            raise ValueError(f"model.T={self.T} is invalid: the free phase needs at least 1 step")
        if self.K < 1:
            raise ValueError(f"model.K={self.K} is invalid: the nudged phase / BPTT truncation needs at least 1 step")
        if self.K > self.T:
            raise ValueError(f"model.K={self.K} > model.T={self.T}: K must not exceed T (BPTT truncates the last K of T steps)")
        if self.algorithm == "ep" and not 0 < self.beta < float("inf"):
            raise ValueError(f"model.beta={self.beta} is invalid for EP: β must be finite and > 0 (e.g. 0.1 to 0.5)")
        if self.eval_steps < 1:
            raise ValueError(f"model.eval_steps={self.eval_steps} is invalid: use at least 1 step (or null for T)")
        groups = self.model.parameter_groups()
        if self.lrs is not None:
            if len(self.lrs) != len(groups):
                raise ValueError(
                    f"model.lrs={self.lrs} has {len(self.lrs)} entries but the model has {len(groups)} layer groups "
                    f"(input → output); give one learning rate per group"
                )
            if any(not 0 <= lr < float("inf") for lr in self.lrs):
                raise ValueError(f"model.lrs={self.lrs} is invalid: learning rates must be finite and ≥ 0")

    # --- reliability: model/data mismatch at start-up, NaN/Inf guard (ep_lightning/callbacks/divergence.py) -----
    def setup(self, stage: str) -> None:
        check_module_fits_datamodule(self)

    def configure_callbacks(self) -> list[L.Callback]:
        return default_callbacks(self)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        catch_up_epoch_schedulers(self)  # exact resume from a checkpoint taken at an epoch's last batch

    # --- optimization ----------------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        groups = self.model.parameter_groups()
        if self.lrs is not None:
            param_groups = [{"params": g, "lr": lr} for g, lr in zip(groups, self.lrs)]
        else:
            param_groups = [{"params": g} for g in groups]
        optimizer = self.optimizer_factory(param_groups)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer)}

    def free_phase(self, x: Tensor, steps: int | None = None, trace: RelaxationTrace | None = None) -> State:
        """s* = relax(steps) from the initial state, without graph."""
        with torch.no_grad():
            drive = self.model.drive(x)
            return relax(self.model, drive, self.model.init_state(x), steps or self.T, trace=trace)

    def ep_phases(self, x: Tensor, target: Tensor) -> tuple[State, State]:
        """Free phase (T steps, β = 0) then nudged phase (K steps, β) from s*; returns (s*, s^β)."""
        with torch.no_grad():
            drive = self.model.drive(x)
            free = relax(self.model, drive, self.model.init_state(x), self.T)
            nudged = relax(self.model, drive, free, self.K, self.beta, target)
        return free, nudged

    def bptt_forward(self, x: Tensor) -> tuple[State, State]:
        """T − K steps without graph, then K steps with graph; returns (state at T − K, state at T)."""
        with torch.no_grad():
            start = relax(self.model, self.model.drive(x), self.model.init_state(x), self.T - self.K)
        return start, relax(self.model, self.model.drive(x), start, self.K)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, labels = batch
        target = self.model.encode_target(labels, x)
        optimizer = self.optimizers()
        optimizer.zero_grad()
        if self.algorithm == "ep":
            free, nudged = self.ep_phases(x, target)
            update_loss = ep_surrogate(self.model, x, free, nudged, self.beta)
            output = self.model.output(free)
            loss = self.model.cost(free, target).mean()
            phases = {"free": free, "nudged": nudged}
        else:
            _, final = self.bptt_forward(x)
            update_loss = bptt_loss(self.model, final, target)
            output = self.model.output(final).detach()
            loss = update_loss.detach()
            phases = {"free": final}
        self.manual_backward(update_loss)
        if not check_training_step(self, batch_idx, phases):  # NaN/Inf: raises, or skips the batch (DivergenceGuard)
            return loss
        optimizer.step()
        # Metrics accumulate on the device and are logged (and synced across ranks) once per epoch: a `self.log`
        # per step costs more than the whole P-1h relaxation.
        self.train_loss.update(loss, weight=x.shape[0])
        self.train_acc.update(output.argmax(dim=1), labels)
        if batch_idx % self.progress_every_n_steps == 0:
            self.log("train/loss_step", loss, prog_bar=True, logger=False)
        return loss

    def on_train_epoch_end(self) -> None:
        self.log("train/loss", self.train_loss, prog_bar=True)
        self.log("train/acc", self.train_acc, prog_bar=True)
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()

    # --- evaluation ------------------------------------------------------------------------------------------
    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str, accuracy: MulticlassAccuracy) -> Tensor:
        x, labels = batch
        state = self.free_phase(x, self.eval_steps)
        loss = self.model.cost(state, self.model.encode_target(labels, x)).mean()
        accuracy(self.model.predict(state), labels)
        self.log(f"{stage}/loss", loss, on_epoch=True, prog_bar=True, batch_size=x.shape[0], sync_dist=True)
        self.log(f"{stage}/acc", accuracy, on_epoch=True, prog_bar=True, batch_size=x.shape[0])
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._evaluate(batch, "test", self.test_acc)

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Predicted class per sample after the free phase."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.model.predict(self.free_phase(x, self.eval_steps))
