"""What every system shares: the harness around one network ``net`` and the ONE phase runner (manual optimization).

``EnergySystem.phases(x, target, start, betas, trace=None)`` relaxes a batch (``relaxation.relax_phases``): T free
steps from ``start`` with this system's drive, then, for a nudging pair, K nudged steps at each β ≠ 0. Training,
evaluation (``free_phase``, ``forward``, ``predict_step``) and the monitors all relax through it. Around it: where a
free phase starts (``initial_state``) and what drives it (``relaxation_drive``), per-group optimizers and per-epoch
schedulers, epoch metrics (kept in checkpoints), the divergence check, checkpoints that describe their networks,
and the declared facts the callbacks read (``has_nudged_phase``, ``nudging_pair``, ``algorithm``,
``divergence_knobs``). The training steps live in ``systems.estimator`` (EP, BPTT) and ``systems.initialized``.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassRecall

from ep_lightning.checkpoints import EPOCH_SUMS_KEY, catch_up_epoch_schedulers
from ep_lightning.config_checks import check_module_fits_datamodule
from ep_lightning.divergence import DivergenceCheck, check_checkpoint_weights
from ep_lightning.models.base import EnergyModel, State
from ep_lightning.models.nudging import NudgingPair
from ep_lightning.relaxation import Phases, PhaseTrace, StoppingRule, relax_phases

log = logging.getLogger(__name__)

Nudging = Literal["one_sided", "symmetric", "random_sign"]
NUDGINGS: tuple[str, ...] = ("one_sided", "symmetric", "random_sign")
#: The class-collapse warning needs this many training samples per class in the epoch (a smoke run of a few batches
#: predicts few classes and says nothing about dead units).
MIN_SAMPLES_PER_CLASS = 50
#: LightningCLI's instantiator: ``load_from_checkpoint`` rebuilds the networks from their {class_path, init_args}.
INSTANTIATOR = "lightning.pytorch.cli.instantiate_module"


def sgd(params: Any) -> torch.optim.Optimizer:
    """Plain SGD, the papers' optimizer, with lr 0: the per-group learning rates (``lrs``) set every lr."""
    return torch.optim.SGD(params, lr=0.0)


def unpack_batch(batch: Any) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(x, labels or None, index or None) from a batch x, (x,), (x, y) or (x, y, index)."""
    if not isinstance(batch, (tuple, list)):
        return batch, None, None
    return batch[0], batch[1] if len(batch) > 1 else None, batch[2] if len(batch) > 2 else None


def _no_closure() -> None:
    """Manual optimization: gradients are already in place when the optimizer steps."""


def float_list(values: Sequence[float] | None) -> list[float] | None:
    return [float(v) for v in values] if values is not None else None


def describe_network(module: nn.Module) -> dict[str, Any]:
    """``{"class_path": …, "init_args": module.init_args}``: the network as a config entry, from which LightningCLI's
    instantiator (and so ``load_from_checkpoint``) builds the same architecture."""
    cls = type(module)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": module.init_args}


def _as_config_value(value: Any) -> Any:
    """A function or class (an optimizer factory given in Python) as its import path, as a config names it."""
    return f"{value.__module__}.{value.__qualname__}" if inspect.isfunction(value) or inspect.isclass(value) else value


@dataclass
class OptimizerSpec:
    """The parameter groups of one optimizer (input → output) and the fields giving their lr / weight decay."""

    groups: list[list[nn.Parameter]]
    lrs: list[float] | None
    weight_decays: list[float] | None = None
    lrs_field: str = "lrs"
    readout: bool = False  # the last group is a softmax read-out (named in errors)


class EpochMeans:
    """Sample-weighted epoch means of named quantities: mean_k = Σ_batches sum_k / Σ_batches count.

    ``update(count, loss=Σ_i ℓ_i, acc=Σ_i [ŷ_i = y_i], predicted=bincount(ŷ), …)`` adds one batch's sums (scalars or
    vectors) with one concatenation and one in-place add, and no host synchronisation (cheaper than a ``self.log``
    or a torchmetrics update per step). ``compute`` sums the totals over DDP ranks (``strategy.reduce``) and divides
    by the total count: exact means over every sample of every rank, not a mean of rank means. The names must be the
    same at every update of an epoch. ``state_dict`` holds the running sums (checkpointed mid-epoch).
    """

    def __init__(self) -> None:
        self.names: tuple[str, ...] = ()
        self.shapes: tuple[torch.Size, ...] = ()
        self.sums: Tensor | None = None
        self.count = 0

    def update(self, count: int, **sums: Tensor) -> None:
        """Add one batch of ``count`` samples and its per-quantity sums (tensors of any dtype and shape)."""
        names = tuple(sums)
        if self.sums is not None and names != self.names:
            raise ValueError(f"EpochMeans.update got {names}, but this epoch accumulates {self.names}")
        first = next(iter(sums.values()))
        dtype = first.dtype if first.is_floating_point() else torch.get_default_dtype()
        step = torch.cat([s.detach().to(dtype).reshape(-1) for s in sums.values()])
        if self.sums is None:
            self.names, self.shapes, self.sums = names, tuple(s.shape for s in sums.values()), step
        else:
            if self.sums.device != step.device:  # restored from a checkpoint (on the CPU)
                self.sums = self.sums.to(step.device)
            self.sums.add_(step)
        self.count += int(count)

    def totals(self, strategy: Any | None = None) -> Tensor | None:
        """The sums followed by the count, summed over ranks through ``strategy.reduce``; None before any update."""
        if self.sums is None:
            return None
        totals = torch.cat((self.sums, self.sums.new_tensor([float(self.count)])))
        return strategy.reduce(totals, reduce_op="sum") if strategy is not None else totals

    def compute(self, strategy: Any | None = None) -> dict[str, Tensor]:
        """{name: Σ sums / Σ count} (each in its shape), summed over ranks through ``strategy.reduce``; {} before any
        update."""
        return self.means(self.totals(strategy))

    def means(self, totals: Tensor | None) -> dict[str, Tensor]:
        """{name: sums / count} of ``totals`` (as ``totals`` returns them)."""
        if totals is None:
            return {}
        values, start = {}, 0
        for name, shape in zip(self.names, self.shapes):
            size = shape.numel()
            values[name] = (totals[start : start + size] / totals[-1]).reshape(shape)
            start += size
        return values

    def reset(self) -> None:
        """Start a new epoch."""
        self.names, self.shapes, self.sums, self.count = (), (), None, 0

    def state_dict(self, totals: Tensor | None = None) -> dict[str, Any]:
        """The running sums (``totals``, e.g. already summed over ranks, replaces this process's own)."""
        totals = self.totals() if totals is None else totals
        if totals is None:
            return {}
        return {"names": list(self.names), "shapes": [list(s) for s in self.shapes], "totals": totals.cpu()}

    def load_state_dict(self, state: dict[str, Any], device: torch.device | None = None) -> None:
        """Restore sums saved by ``state_dict``; {} (or nothing saved) starts empty."""
        self.reset()
        if not state:
            return
        totals = state["totals"].to(device) if device is not None else state["totals"]
        self.names, self.shapes = tuple(state["names"]), tuple(torch.Size(s) for s in state["shapes"])
        self.sums, self.count = totals[:-1].clone(), round(float(totals[-1]))


class EnergySystem(L.LightningModule):
    """The harness around one network ``net``: the phase runner, evaluation, optimizers, epoch metrics, checks.

    Hooks: ``initial_state(x, index)`` (where a free phase starts), ``drive_options(start)`` (what the constant input
    term ``relaxation_drive(x, start)`` is built with), ``optimizer_specs()`` (one entry per optimizer; the first
    one's step is counted), ``evaluate_extra``. Declared facts: ``algorithm``, ``has_nudged_phase``,
    ``nudging_pair()``, ``K``.
    """

    #: The learning rule (``ep``, ``bptt``, ``distillation``), for the monitors and error messages.
    algorithm: str = "ep"
    #: One learning rate per parameter group of the first optimizer (None: the optimizer's own lr).
    lrs: list[float] | None = None

    def __init__(
        self,
        net: EnergyModel,
        T: int,
        eval_steps: int | None,
        optimizer: OptimizerCallable,
        lr_scheduler: LRSchedulerCallable | None,
        K: int = 0,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net = net
        self.T = int(T)
        #: Nudged-phase steps (training with a nudging pair; 0 for a system that has no nudged phase).
        self.K = int(K)
        self.eval_steps = int(eval_steps) if eval_steps is not None else self.T
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        metric = lambda: MulticlassAccuracy(num_classes=net.num_classes, average="micro", validate_args=False)
        self.val_acc, self.test_acc = metric(), metric()
        self.test_recall = MulticlassRecall(num_classes=net.num_classes, average=None, validate_args=False)
        self.train_means = EpochMeans()
        #: The per-step NaN/Inf check (raising); the ``DivergenceGuard`` callback installs one of its own.
        self.divergence_check = DivergenceCheck()
        #: Set by a monitor before a training batch (``record_next_step``): that step records its phases into it.
        self.trace_request: PhaseTrace | None = None

    # --- checkpoints that describe their networks -------------------------------------------------------------
    def save_system_hyperparameters(self, **networks: nn.Module | None) -> None:
        """``save_hyperparameters`` of the caller's ``__init__`` arguments, with every network in ``networks`` as a
        config entry {class_path, init_args} (under LightningCLI: as configured; otherwise ``describe_network``)
        and LightningCLI's instantiator, so that ``load_from_checkpoint(path)`` rebuilds everything from the
        checkpoint alone and hparams.yaml shows the networks."""
        frame = inspect.currentframe()
        with warnings.catch_warnings():  # the modules are replaced by their description right below
            warnings.filterwarnings("ignore", message=r"Attribute '\w+' is an instance of `nn.Module`")
            self.save_hyperparameters(frame=frame.f_back if frame is not None else None)
        updates: dict[str, Any] = {"_instantiator": INSTANTIATOR}
        for name, module in networks.items():
            if isinstance(self.hparams.get(name), nn.Module):  # built in Python, not from a config
                updates[name] = describe_network(module) if module is not None else None
        for name, value in self.hparams.items():
            if inspect.isfunction(value) or inspect.isclass(value):
                updates[name] = _as_config_value(value)
        self.save_hyperparameters(updates)  # merges, and refreshes what the loggers write

    @property
    def example_input_array(self) -> Tensor:
        """One zero input of the network's shape and dtype: the model summary shows real sizes."""
        weight = next(self.net.parameters())
        return torch.zeros(1, *self.net.input_shape, dtype=weight.dtype, device=weight.device)

    # --- declared facts ---------------------------------------------------------------------------------------
    @property
    def has_nudged_phase(self) -> bool:
        """Whether training relaxes nudged phases (EP); the monitors show nudged phases only then."""
        return False

    def nudging_pair(self) -> NudgingPair | None:
        """The nudging pair the monitors show: the one the last training step used (reading never draws a sign);
        None without a nudged phase."""
        return None

    def divergence_knobs(self) -> dict[str, Any]:
        """The settings that usually cause divergence, by config field (named in the divergence error)."""
        knobs: dict[str, Any] = {"lrs": self.lrs, "T": self.T}
        knobs.update({f"net.{name}": value for name, value in self.net.step_sizes.items()})
        return knobs

    def all_ranks_agree(self, flag: bool) -> bool:
        """``flag`` and-ed over the DDP ranks (the same call on every rank); ``flag`` itself in one process."""
        trainer = self.trainer
        return bool(trainer.strategy.reduce_boolean_decision(flag, all=True)) if trainer.world_size > 1 else flag

    # --- hooks ----------------------------------------------------------------------------------------------
    def initial_state(self, x: Tensor, index: Tensor | None = None) -> State:
        """Where a free phase starts (training, evaluation, monitors): the network's own ``init_state`` here.
        Subclasses start elsewhere (a warm start per example ``index`` in training, an initializer's prediction);
        the start may carry a graph in training, the phases detach it."""
        return self.net.init_state(x)

    def drive_options(self, start: State) -> dict[str, Any]:
        """Keyword arguments of ``net.drive`` for a relaxation from ``start`` (none; Initialized EP: the anchor)."""
        return {}

    def relaxation_drive(self, x: Tensor, start: State) -> Any:
        """The constant input term of the dynamics for a relaxation from ``start``: ``net.drive(x, **options)``."""
        return self.net.drive(x, **self.drive_options(start))

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

    # --- the phase runner -------------------------------------------------------------------------------------
    def phases(
        self,
        x: Tensor,
        target: Tensor | None,
        start: State,
        betas: NudgingPair | tuple[float, float] | None,
        trace: PhaseTrace | None = None,
        steps: int | None = None,
        stop: StoppingRule | None = None,
        graph_steps: int = 0,
        drive: Any = None,
    ) -> Phases:
        """``Phases(s*, s_{β_a}, s_{β_b})`` of one batch (``relaxation.relax_phases``): ``steps`` (default T) free steps
        from ``start`` (detached) with ``drive`` (default ``relaxation_drive(x, start)``, built once), then K nudged
        steps toward ``target`` at each β ≠ 0 of ``betas`` (None: no nudged phase). ``graph_steps``: the last free
        steps run with autograd (truncated BPTT; the drive then carries the graph too); ``stop``: adaptive free phase;
        ``trace``: per-step records for the monitors."""
        start = tuple(s.detach() for s in start)
        if drive is None:
            with torch.set_grad_enabled(graph_steps > 0 and torch.is_grad_enabled()):
                drive = self.relaxation_drive(x, start)
        steps = self.T if steps is None else steps
        pair = NudgingPair(*betas) if betas is not None else None
        return relax_phases(
            self.net,
            x,
            drive,
            start,
            steps,
            nudged_steps=self.K,
            betas=pair,
            target=target,
            trace=trace,
            stop=stop,
            graph_steps=graph_steps,
        )

    def record_next_step(self, trace: PhaseTrace) -> None:
        """Have the next training step record its phases (as applied: its start, pair and steps) into ``trace``."""
        self.trace_request = trace

    def take_trace_request(self) -> PhaseTrace | None:
        """The trace a monitor asked this training step to fill (once), or None."""
        trace, self.trace_request = self.trace_request, None
        return trace

    def free_phase(self, x: Tensor, steps: int | None = None) -> State:
        """The evaluation relaxation: ``steps`` (default ``eval_steps``) free steps from ``initial_state(x)``, without
        graph."""
        with torch.no_grad():
            steps = self.eval_steps if steps is None else steps
            return self.phases(x, None, self.initial_state(x), None, steps=steps).free

    def forward(self, x: Tensor) -> Tensor:
        """Predicted class per sample after the evaluation relaxation (the one ``free_phase`` runs), through the
        network's own ``forward`` (so the model summary shows its input and output sizes)."""
        with torch.no_grad():
            start = self.initial_state(x)
            output = self.net(x, self.eval_steps, start, **self.drive_options(start))
        return output.argmax(dim=1)

    # --- optimization ---------------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        optimizers = []
        for spec in self.optimizer_specs():
            groups: list[dict[str, Any]] = [{"params": g} for g in spec.groups]
            for values, key in ((spec.lrs, "lr"), (spec.weight_decays, "weight_decay")):
                if values is not None:
                    for group, value in zip(groups, values):
                        group[key] = value
            optimizer = self.optimizer_factory(groups)
            if spec.lrs is None and any(group["lr"] == 0 for group in optimizer.param_groups):
                raise ValueError(
                    f"model.{spec.lrs_field}=None is invalid with the default optimizer (plain SGD without a learning "
                    f"rate of its own would train nothing): give one learning rate per layer group, input → output "
                    f"({len(spec.groups)} groups), or an optimizer with its own lr"
                )
            optimizers.append(optimizer)
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

    def check_training_step(self, batch_idx: int, phases: dict[str, State]) -> bool:
        """Between ``manual_backward`` and ``optimizer.step()``: True to step, False to skip this batch (gradients
        zeroed), DivergenceError to stop (``divergence.DivergenceCheck``)."""
        ok = self.divergence_check.check(self, batch_idx, phases)
        if not ok:
            self.zero_grad(set_to_none=True)
        return ok

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        catch_up_epoch_schedulers(self)  # exact resume from a checkpoint taken at an epoch's last batch
        if batch_idx == 0:  # an epoch starts empty (also after a resume from an epoch's last batch); mid-epoch
            self.train_means.reset()  # resumes keep the sums restored from the checkpoint

    # --- epoch metrics ----------------------------------------------------------------------------------------
    def update_epoch_sums(self, labels: Tensor, state: State, loss: Tensor, **extra: Tensor) -> None:
        """Add one training batch to the epoch sums: loss and accuracy of ``state`` (the relaxed state), predictions
        per class (for the collapse warning) and ``extra`` sums. Sums stay on the device (no host sync per step)."""
        n = labels.shape[0]
        predicted = self.net.predict(state)
        correct = (predicted == labels).sum()
        counts = torch.zeros(self.net.num_classes, dtype=loss.dtype, device=loss.device)
        counts.scatter_add_(0, predicted, torch.ones_like(predicted, dtype=loss.dtype))  # no host sync (bincount has)
        self.train_means.update(n, loss=loss.detach() * n, acc=correct, **extra, predicted=counts)

    def on_train_epoch_end(self) -> None:
        totals = self.train_means.totals(self.trainer.strategy)  # one reduction over the ranks per epoch
        means = self.train_means.means(totals)
        predicted = means.pop("predicted", None)
        for name, value in means.items():
            self.log(f"train/{name}", value, prog_bar=name in ("loss", "acc", "init_acc"))
        if predicted is not None and totals is not None and totals[-1] >= MIN_SAMPLES_PER_CLASS * len(predicted):
            self._warn_if_classes_are_never_predicted(predicted)
        self.train_means.reset()
        schedulers = self.lr_schedulers()
        if schedulers is not None:
            for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
                scheduler.step()

    def _warn_if_classes_are_never_predicted(self, predicted_share: Tensor) -> None:
        """One line at epoch end when some class was never predicted on the epoch's training batches (a collapse
        that no NaN reveals; only for epochs of ``MIN_SAMPLES_PER_CLASS`` samples per class or more), naming the
        likely causes."""
        never = [int(c) for c in torch.nonzero(predicted_share == 0).flatten()]
        if not never or not self.trainer.is_global_zero:
            return
        log.warning(
            "epoch %d: class%s %s never predicted on the training batches: a dead output unit (it sits at a bound of "
            "its range on every sample, so no gradient reaches it; EB nets with output_dynamics 'linear' and clamp: "
            "a pre-activation below 0 on every image, try EP, clamp: false or output_dynamics: energy_gradient) or "
            "too large learning rates (%s)",
            self.current_epoch,
            "es" if len(never) > 1 else "",
            ", ".join(map(str, never)),
            f"model.lrs={self.lrs}",
        )

    # --- evaluation -----------------------------------------------------------------------------------------
    def _evaluate(self, batch: Any, stage: str) -> Tensor:
        x, labels, _ = unpack_batch(batch)
        accuracy = self.val_acc if stage == "val" else self.test_acc
        state = self.free_phase(x)
        loss = self.net.cost(state, self.net.encode_target(labels, x)).mean()
        predicted = self.net.predict(state)
        accuracy(predicted, labels)
        if stage == "test":
            self.test_recall.update(predicted, labels)
        self.log(f"{stage}/loss", loss, on_epoch=True, prog_bar=True, batch_size=x.shape[0], sync_dist=True)
        self.log(f"{stage}/acc", accuracy, on_epoch=True, prog_bar=True, batch_size=x.shape[0])
        self.evaluate_extra(x, labels, stage)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        """Per-class recall: ``test/recall/class_<k>`` to the loggers, the worst class in the results table
        (``test/worst_class``, ``test/worst_class_recall``), and a warning naming classes never predicted."""
        recall = self.test_recall.compute()  # summed over ranks by torchmetrics, on every rank
        self.test_recall.reset()
        worst = int(recall.argmin())
        self.log("test/worst_class_recall", recall[worst], sync_dist=False)
        self.log("test/worst_class", float(worst), sync_dist=False)
        if self.trainer.is_global_zero:
            per_class = {f"test/recall/class_{k}": float(r) for k, r in enumerate(recall)}
            for logger in self.loggers:  # not through self.log: the results table would list every class
                logger.log_metrics(per_class, step=self.global_step)
            never = [k for k, r in enumerate(recall.tolist()) if r == 0.0]
            if never:
                log.warning(
                    "test: class%s %s never predicted correctly (recall 0): a dead output unit (no gradient reaches "
                    "a unit that sits at a bound of its range on every sample) or a collapsed network (too large "
                    "learning rates: %s)",
                    "es" if len(never) > 1 else "",
                    ", ".join(map(str, never)),
                    f"model.lrs={self.lrs}",
                )

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        """``{"prediction": int64 (B,), "output": (B, n_out), "label": int64 (B,) when the batch has labels}``:
        ``net.output`` and its argmax after the evaluation relaxation (``free_phase``)."""
        x, labels, _ = unpack_batch(batch)
        output = self.net.output(self.free_phase(x))
        result = {"prediction": output.argmax(dim=1), "output": output}
        if labels is not None:
            result["label"] = labels.to(torch.int64)
        return result

    # --- checkpoints ------------------------------------------------------------------------------------------
    def checkpoint_entries(self) -> dict[str, tuple[Callable[[], Any], Callable[[Any], None] | None]]:
        """What a subclass keeps in checkpoints beside the weights, for exact resume: key → (save, load), ``load``
        None for an entry only written (read elsewhere). None here; see ``on_save_checkpoint``."""
        return {}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse non-finite weights (the last good checkpoint stays); keep the training epoch's running sums and
        the subclass's ``checkpoint_entries``."""
        check_checkpoint_weights(checkpoint.get("state_dict", {}), self.global_step, self.divergence_knobs())
        trainer = self._trainer
        distributed = trainer is not None and trainer.world_size > 1  # every rank saves: the reduction is symmetric
        totals = self.train_means.totals(trainer.strategy if distributed else None)
        checkpoint[EPOCH_SUMS_KEY] = self.train_means.state_dict(totals)
        for key, (save, _) in self.checkpoint_entries().items():
            checkpoint[key] = save()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the running sums (the totals of all ranks go to rank 0: the epoch means sum over ranks) and the
        subclass's ``checkpoint_entries`` that the checkpoint holds."""
        state = checkpoint.get(EPOCH_SUMS_KEY, {})
        self.train_means.load_state_dict(state if self.global_rank == 0 else {})
        for key, (_, load) in self.checkpoint_entries().items():
            if load is not None and key in checkpoint:
                load(checkpoint[key])
