"""What every system shares: the harness around ``relax`` and the EP estimator (manual optimization).

``EnergySystem`` holds a network ``net`` and relaxes it from a start state: evaluation and predict, per-group
optimizers and per-epoch schedulers, epoch metrics, start-up checks and the divergence guard. ``EPSystem`` adds the
EP training step:

    β_a, β_b       = the nudging pair: one_sided (0, β), random_sign (0, ±β), symmetric (−β, +β)
    s*             = relax(T steps from ``start_state``, β = 0)
    s_{β_a}, s_{β_b} = relax(K steps from s*, β_a resp. β_b)      (β = 0: s* itself)
    loss           = mean[Φ(s_{β_a}) − Φ(s_{β_b})]/(β_b − β_a)  (+ the read-out's loss, + ``extra_loss``)
    manual_backward(loss); optimizer steps

or, for ``algorithm='bptt'``, back-propagation through the last ``bptt_steps`` of the T free steps. Subclasses say
where a relaxation starts and what drives it (``initial_state``, ``start_state``, ``relaxation_drive``) and add a
loss of their own (``extra_loss``): see ``systems.equilibrium`` and ``systems.initialized``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from ep_lightning.callbacks.divergence import check_training_step, default_callbacks
from ep_lightning.compile import CompiledPhases
from ep_lightning.config_checks import check_module_fits_datamodule
from ep_lightning.estimators import NudgingPair, bptt_loss, ep_surrogate
from ep_lightning.metrics import EpochMeans
from ep_lightning.models.base import EnergyModel, State
from ep_lightning.models.nudging import repeat_batch
from ep_lightning.random_sign import SignGenerator, run_seed
from ep_lightning.relaxation import RelaxationTrace, StoppingRule, relax
from ep_lightning.resume import catch_up_epoch_schedulers

Nudging = Literal["one_sided", "symmetric", "random_sign"]
NUDGINGS: tuple[str, ...] = ("one_sided", "symmetric", "random_sign")
#: Checkpoint key of the β-sign generator state (exact resume of ``random_sign``).
SIGN_GENERATOR_KEY = "beta_sign_generator"


def sgd(params: Any) -> torch.optim.Optimizer:
    """Plain SGD, the papers' optimizer; the per-group learning rates (``lrs``, required with it) set every lr."""
    return torch.optim.SGD(params, lr=0.0)


def unpack_batch(batch: Any) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(x, labels or None, index or None) from a batch x, (x,), (x, y) or (x, y, index)."""
    if not isinstance(batch, (tuple, list)):
        return batch, None, None
    return batch[0], batch[1] if len(batch) > 1 else None, batch[2] if len(batch) > 2 else None


def _no_closure() -> None:
    """Manual optimization: gradients are already in place when the optimizer steps."""


@dataclass
class OptimizerSpec:
    """The parameter groups of one optimizer (input → output) and the fields giving their lr / weight decay."""

    groups: list[list[nn.Parameter]]
    lrs: list[float] | None
    weight_decays: list[float] | None = None
    lrs_field: str = "lrs"
    readout: bool = False  # the last group is a softmax read-out (named in errors)


def float_list(values: Sequence[float] | None) -> list[float] | None:
    return [float(v) for v in values] if values is not None else None


class EnergySystem(L.LightningModule):
    """The harness around one network ``net``: free phase, evaluation, optimizers, epoch metrics, checks.

    Hooks: ``initial_state(x)`` (where evaluation relaxes from), ``relaxation_drive(x, start)`` (the constant input
    term), ``optimizer_specs()`` (one entry per optimizer; the first one's step is counted), ``evaluate_extra``.
    """

    #: Nudged-phase steps and β: 0 for a system without a nudged phase (the monitors then skip it).
    K: int = 0
    beta: float = 0.0
    #: One learning rate per parameter group of the first optimizer (None: the optimizer's own lr).
    lrs: list[float] | None = None

    def __init__(
        self,
        net: EnergyModel,
        T: int,
        eval_steps: int | None,
        optimizer: OptimizerCallable,
        lr_scheduler: LRSchedulerCallable | None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net = net
        self.T = int(T)
        self.eval_steps = int(eval_steps) if eval_steps is not None else self.T
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        metric = lambda: MulticlassAccuracy(num_classes=net.num_classes, average="micro", validate_args=False)
        self.val_acc, self.test_acc = metric(), metric()
        self.train_means = EpochMeans()

    # --- hooks ----------------------------------------------------------------------------------------------
    def initial_state(self, x: Tensor) -> State:
        """Where a free phase starts (evaluation, monitors): the network's ``init_state``."""
        return self.net.init_state(x)

    def relaxation_drive(self, x: Tensor, start: State) -> Any:
        """The constant input term of the dynamics for a relaxation from ``start``: ``net.drive(x)``."""
        return self.net.drive(x)

    def optimizer_specs(self) -> list[OptimizerSpec]:
        raise NotImplementedError

    def evaluate_extra(self, x: Tensor, labels: Tensor, stage: str) -> None:
        """Log what a subclass adds to validation / test (nothing here)."""

    # --- checks ---------------------------------------------------------------------------------------------
    def check_optimizer_settings(self) -> None:
        """One lr / weight decay per group, finite and ≥ 0 (lrs themselves are required when training starts)."""
        for spec in self.optimizer_specs():
            readout = " (the last one is the softmax read-out)" if spec.readout else ""
            for field, values, what in (
                (spec.lrs_field, spec.lrs, "learning rate"),
                ("weight_decays", spec.weight_decays, "weight decay"),
            ):
                if values is None:
                    continue
                if len(values) != len(spec.groups):
                    raise ValueError(
                        f"model.{field}={values} has {len(values)} entries but the model has {len(spec.groups)} layer "
                        f"groups (input → output){readout}; give one {what} per group"
                    )
                if any(not 0 <= v < float("inf") for v in values):
                    raise ValueError(f"model.{field}={values} is invalid: {what}s must be finite and ≥ 0")

    def setup(self, stage: str) -> None:
        check_module_fits_datamodule(self)

    def configure_callbacks(self) -> list[L.Callback]:
        return default_callbacks(self)

    # --- relaxation -----------------------------------------------------------------------------------------
    def free_phase(self, x: Tensor, steps: int | None = None, trace: RelaxationTrace | None = None) -> State:
        """s* = relax(``steps`` (default T) steps from ``initial_state(x)``, β = 0), without graph."""
        with torch.no_grad():
            start = self.initial_state(x)
            steps = self.T if steps is None else steps
            return relax(self.net, self.relaxation_drive(x, start), start, steps, trace=trace)

    # --- optimization ---------------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        optimizers = []
        for spec in self.optimizer_specs():
            if spec.lrs is None and self.optimizer_factory is sgd:
                raise ValueError(
                    f"model.{spec.lrs_field}=None is invalid with the default optimizer (plain SGD without a learning "
                    f"rate of its own would train nothing): give one learning rate per layer group, input → output "
                    f"({len(spec.groups)} groups), or an optimizer with its own lr"
                )
            groups: list[dict[str, Any]] = [{"params": g} for g in spec.groups]
            for values, key in ((spec.lrs, "lr"), (spec.weight_decays, "weight_decay")):
                if values is not None:
                    for group, value in zip(groups, values):
                        group[key] = value
            optimizers.append(self.optimizer_factory(groups))
        if self.scheduler_factory is None:
            return optimizers[0] if len(optimizers) == 1 else optimizers
        if len(optimizers) == 1:
            return {"optimizer": optimizers[0], "lr_scheduler": self.scheduler_factory(optimizers[0])}
        return optimizers, [self.scheduler_factory(opt) for opt in optimizers]

    def optimizer_list(self) -> list[Any]:
        optimizers = self.optimizers()
        return optimizers if isinstance(optimizers, list) else [optimizers]

    def step_optimizers(self, optimizers: list[Any]) -> None:
        """Step every optimizer; only the first step is counted, so ``global_step`` counts batches."""
        optimizers[0].step()
        for opt in optimizers[1:]:
            # Same strategy/precision path as LightningOptimizer.step, but not counted: two counted steps per batch
            # would advance global_step (and max_steps, every_n_steps, the loggers' x axis) twice per batch.
            self.trainer.strategy.optimizer_step(opt.optimizer, closure=_no_closure)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        catch_up_epoch_schedulers(self)  # exact resume from a checkpoint taken at an epoch's last batch

    def on_train_epoch_end(self) -> None:
        for name, value in self.train_means.compute(self.trainer.strategy).items():
            self.log(f"train/{name}", value, prog_bar=name in ("loss", "acc", "init_acc"))
        self.train_means.reset()
        schedulers = self.lr_schedulers()
        if schedulers is not None:
            for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
                scheduler.step()

    # --- evaluation -----------------------------------------------------------------------------------------
    def _evaluate(self, batch: Any, stage: str) -> Tensor:
        x, labels, _ = unpack_batch(batch)
        accuracy = self.val_acc if stage == "val" else self.test_acc
        state = self.free_phase(x, self.eval_steps)
        loss = self.net.cost(state, self.net.encode_target(labels, x)).mean()
        accuracy(self.net.predict(state), labels)
        self.log(f"{stage}/loss", loss, on_epoch=True, prog_bar=True, batch_size=x.shape[0], sync_dist=True)
        self.log(f"{stage}/acc", accuracy, on_epoch=True, prog_bar=True, batch_size=x.shape[0])
        self.evaluate_extra(x, labels, stage)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._evaluate(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        """After ``eval_steps`` free steps from ``initial_state``: ``prediction`` (int64 class per sample), ``output``
        (``net.output``, one row per sample) and, when the batch has labels, ``label``."""
        x, labels, _ = unpack_batch(batch)
        state = self.free_phase(x, self.eval_steps)
        result = {"prediction": self.net.predict(state), "output": self.net.output(state)}
        if labels is not None:
            result["label"] = labels
        return result


class EPSystem(EnergySystem):
    """``EnergySystem`` trained by EP (or truncated BPTT) in ``training_step``; see the module docstring.

    Hooks beyond ``EnergySystem``'s: ``start_state(x, index)`` (the training free phase's start; may carry a graph,
    the phases detach it), ``extra_loss(labels, start, free)`` (a loss added to the update, and its epoch sums),
    ``after_update(index, free)``.
    """

    def __init__(
        self,
        net: EnergyModel,
        T: int,
        K: int,
        beta: float,
        nudging: Nudging,
        sign_seed: int | None,
        eval_steps: int | None,
        optimizer: OptimizerCallable,
        lr_scheduler: LRSchedulerCallable | None,
        algorithm: Literal["ep", "bptt"] = "ep",
        bptt_steps: int | None = None,
        free_tolerance: float | None = None,
        check_every: int = 5,
        compile_relaxation: bool = False,
    ) -> None:
        super().__init__(net, T, eval_steps, optimizer, lr_scheduler)
        self.K, self.beta = int(K), float(beta)
        self.nudging = nudging
        self.algorithm = algorithm
        self.bptt_steps = int(bptt_steps) if bptt_steps is not None else self.K
        self.free_tolerance = float(free_tolerance) if free_tolerance is not None else None
        self.check_every = int(check_every)
        self.compile_relaxation = bool(compile_relaxation)
        self._compiled_phases: CompiledPhases | None = None
        self._check_ep_settings()
        self.sign_generator = (
            SignGenerator(run_seed() if sign_seed is None else int(sign_seed)) if nudging == "random_sign" else None
        )

    def _check_ep_settings(self) -> None:
        if self.algorithm not in ("ep", "bptt"):
            raise ValueError(f"model.algorithm={self.algorithm!r} is not known; allowed: 'ep', 'bptt'")
        if self.K < 1:
            raise ValueError(f"model.K={self.K} is invalid: the nudged phase needs at least 1 step")
        if self.algorithm == "ep" and not 0 < self.beta < float("inf"):
            raise ValueError(f"model.beta={self.beta} is invalid for EP: β must be finite and > 0 (e.g. 0.1 to 0.5)")
        if self.nudging not in NUDGINGS:
            raise ValueError(f"model.nudging={self.nudging!r} is not known; allowed: {', '.join(map(repr, NUDGINGS))}")
        if self.algorithm == "bptt":
            if self.nudging != "one_sided":
                raise ValueError(
                    f"model.nudging={self.nudging!r} applies to EP only; with model.algorithm='bptt' use 'one_sided' "
                    f"(the default)"
                )
            if not 1 <= self.bptt_steps <= self.T:
                raise ValueError(
                    f"model.bptt_steps={self.bptt_steps} is invalid with model.T={self.T}: BPTT back-propagates "
                    f"through the last bptt_steps of the T steps, so use 1 ≤ bptt_steps ≤ T (null: K)"
                )
            if self.compile_relaxation:
                raise ValueError(
                    "model.compile_relaxation=true applies to EP's relaxation phases only; with model.algorithm='bptt' "
                    "set it to false"
                )
        if self.free_tolerance is not None and not 0 < self.free_tolerance < float("inf"):
            raise ValueError(
                f"model.free_tolerance={self.free_tolerance} is invalid: use a finite residual > 0 (e.g. 1e-4) or "
                f"null (always T steps)"
            )
        if self.compile_relaxation and self.free_tolerance is not None:
            raise ValueError(
                f"model.compile_relaxation=true cannot be combined with model.free_tolerance={self.free_tolerance} "
                "(the residual tests stop the compiled graph); set one of them to false / null"
            )
        if self.check_every < 1:
            raise ValueError(
                f"model.check_every={self.check_every} is invalid: use an integer ≥ 1 (steps between tests)"
            )

    # --- hooks ----------------------------------------------------------------------------------------------
    def start_state(self, x: Tensor, index: Tensor | None) -> State:
        """Where the training free phase starts: ``initial_state(x)``."""
        return self.initial_state(x)

    def extra_loss(self, labels: Tensor, start: State, free: State) -> tuple[Tensor | None, dict[str, Tensor]]:
        """A loss added to the update in the same backward, and per-batch sums for the epoch means (none here)."""
        return None, {}

    def after_update(self, index: Tensor | None, free: State) -> None:
        """Called after the optimizers stepped (not for a skipped batch)."""

    # --- the EP update ----------------------------------------------------------------------------------------
    def nudging_pair(self) -> NudgingPair:
        """(β_a, β_b) for this batch: one_sided (0, β), random_sign (0, ±β; one draw), symmetric (−β, +β)."""
        if self.nudging == "symmetric":
            return (-self.beta, self.beta)
        if self.sign_generator is not None:
            return (0.0, self.sign_generator.signed(self.beta))
        return (0.0, self.beta)

    def phases(
        self, x: Tensor, target: Tensor, start: State, betas: NudgingPair, stop: StoppingRule | None = None
    ) -> tuple[State, State, State]:
        """(s*, s_{β_a}, s_{β_b}) without graph: the drive once, T free steps from ``start`` (detached), then K
        nudged steps from s* for each non-zero β; a β of 0 is s* itself. Two non-zero βs relax as ONE doubled batch:
        states (s*; s*), target (y; y), the drive repeated, per-sample β = (β_b, …, β_a, …)."""
        with torch.no_grad():
            start = tuple(s.detach() for s in start)
            drive = self.relaxation_drive(x, start)
            free = relax(self.net, drive, start, self.T, stop=stop)
            beta_a, beta_b = betas
            if beta_a == 0.0:
                return free, free, relax(self.net, drive, free, self.K, beta_b, target)
            if beta_b == 0.0:
                return free, relax(self.net, drive, free, self.K, beta_a, target), free
            batch = x.shape[0]
            beta = torch.full((2 * batch, 1), beta_b, dtype=free[0].dtype, device=free[0].device)
            beta[batch:] = beta_a
            doubled = relax(
                self.net,
                repeat_batch(drive, batch),
                tuple(torch.cat([s, s]) for s in free),
                self.K,
                beta,
                torch.cat([target, target]),
            )
            return free, tuple(s[batch:] for s in doubled), tuple(s[:batch] for s in doubled)

    def ep_update(self, x: Tensor, target: Tensor, start: State) -> tuple[Tensor, State, dict[str, State], int]:
        """(loss, s*, phases, free steps run): −∇loss is the EP update for this batch's nudging pair, plus the
        read-out's cross-entropy gradient at s* for models with a read-out outside the dynamics."""
        betas = self.nudging_pair()
        stop = StoppingRule(self.free_tolerance, self.check_every) if self.free_tolerance is not None else None
        if self.compile_relaxation:
            if self._compiled_phases is None:
                self._compiled_phases = CompiledPhases(self.phases, x.device)
            free, s_a, s_b = self._compiled_phases(x, target, start, betas)
        else:
            free, s_a, s_b = self.phases(x, target, start, betas, stop)
        loss = ep_surrogate(self.net, x, s_a, s_b, betas)
        readout = self.net.readout_loss(free, target)
        if readout is not None:
            loss = loss + readout
        phases = {"free": free, "nudged": s_b} | ({"nudged_a": s_a} if betas[0] != 0.0 else {})
        return loss, free, phases, stop.steps_run if stop is not None else self.T

    def bptt_update(self, x: Tensor, target: Tensor, start: State) -> tuple[Tensor, State, dict[str, State], int]:
        """(loss, s^T, phases, steps run): T − bptt_steps steps without graph (adaptive with ``free_tolerance``),
        then bptt_steps with graph from the batch's one drive (built with graph); loss = mean ℓ(s^T, y)."""
        stop = StoppingRule(self.free_tolerance, self.check_every) if self.free_tolerance is not None else None
        start = tuple(s.detach() for s in start)
        drive = self.relaxation_drive(x, start)
        with torch.no_grad():
            prefix = relax(self.net, drive, start, self.T - self.bptt_steps, stop=stop)
        final = relax(self.net, drive, prefix, self.bptt_steps)
        steps = (stop.steps_run if stop is not None else self.T - self.bptt_steps) + self.bptt_steps
        return bptt_loss(self.net, final, target), final, {"free": final}, steps

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, labels, index = unpack_batch(batch)
        target = self.net.encode_target(labels, x)
        optimizers = self.optimizer_list()
        for opt in optimizers:
            opt.zero_grad()
        start = self.start_state(x, index)
        if self.algorithm == "bptt":
            update, free, phases, steps = self.bptt_update(x, target, start)
        else:
            update, free, phases, steps = self.ep_update(x, target, start)
        extra, extra_sums = self.extra_loss(labels, start, free)
        self.manual_backward(update if extra is None else update + extra)  # DDP all-reduces exactly this gradient
        free = tuple(s.detach() for s in free)
        loss = self.net.cost(free, target).mean()
        if not check_training_step(self, batch_idx, phases):  # NaN/Inf: raises, or skips the batch (DivergenceGuard)
            return loss
        self.step_optimizers(optimizers)
        self.after_update(index, free)
        # Sums stay on the device and are reduced once per epoch (EpochMeans): no host synchronisation per step.
        n = x.shape[0]
        sums = {"loss": loss * n, "acc": (self.net.output(free).argmax(dim=1) == labels).sum()}
        if self.free_tolerance is not None:
            sums["free_steps"] = torch.full((), float(steps * n), dtype=loss.dtype, device=loss.device)
        self.train_means.update(n, **sums, **extra_sums)
        return loss

    # --- exact resume: the β-sign stream --------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.sign_generator is not None:
            checkpoint[SIGN_GENERATOR_KEY] = self.sign_generator.get_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.sign_generator is not None and SIGN_GENERATOR_KEY in checkpoint:
            self.sign_generator.set_state(checkpoint[SIGN_GENERATOR_KEY])
