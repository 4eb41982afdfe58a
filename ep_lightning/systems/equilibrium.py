"""EquilibriumModule: trains any EnergyModel by Equilibrium Propagation or truncated BPTT (manual optimization)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from ep_lightning.algorithms import bptt_loss, ep_surrogate
from ep_lightning.callbacks.divergence import check_training_step, default_callbacks
from ep_lightning.config_checks import ConfigError, check_module_fits_datamodule
from ep_lightning.dynamics import RelaxationTrace, StoppingRule, relax
from ep_lightning.metrics import EpochMeans
from ep_lightning.models.base import EnergyModel, State
from ep_lightning.models.nudging import repeat_batch
from ep_lightning.random_sign import SignGenerator, run_seed
from ep_lightning.relaxation import CompiledPhases
from ep_lightning.resume import catch_up_epoch_schedulers
from ep_lightning.warm_start import PersistentStates

Nudging = Literal["one_sided", "symmetric", "random_sign"]
NUDGINGS: tuple[str, ...] = ("one_sided", "symmetric", "random_sign")
#: Checkpoint keys of the β-sign generator state and of the warm-start table (exact resume).
SIGN_GENERATOR_KEY = "ep_beta_sign_generator"
WARM_START_KEY = "ep_warm_start_states"


def sgd(params: Any) -> torch.optim.Optimizer:
    """Plain SGD, the papers' optimizer; the per-layer learning rates come in the parameter groups."""
    return torch.optim.SGD(params, lr=0.0)


class EquilibriumModule(L.LightningModule):
    """Runs free phase, nudged phase and the EP (or BPTT) update inside ``training_step``.

    EP:   s* = relax(T, β=0) from zeros;  s^β = relax(K, β) from s*;  loss = (Φ(s*) − Φ(s^β))/β → manual_backward.
    BPTT: relax(T − K) without graph, then K steps with graph;  loss = ½‖s_out − y‖² at step T → manual_backward.
    Evaluation runs the free phase (``eval_steps`` steps, default T, always from the model's initial state) and
    scores the model's output.

    Variants (Laborieux et al. 2021; Scellier & Bengio 2017), all options of this module:

    - ``nudging``: ``one_sided`` Δθ = (1/β)(∂Φ/∂θ(s^β) − ∂Φ/∂θ(s*)) (bias O(β)); ``random_sign`` the same with β = ±β
      drawn per batch; ``symmetric`` Δθ = (1/2β)(∂Φ/∂θ(s^{+β}) − ∂Φ/∂θ(s^{−β})) (bias O(β²)), the two nudged
      phases run from s* as ONE relaxation of the doubled batch with per-sample β = (+β, …, −β, …).
    - read-out: a model with ``readout: ce`` adds the cross-entropy gradient of its read-out at s* to the update
      (``model.readout_loss``), in the same backward.
    - ``warm_start``: the free phase of each training example starts from its last free-phase state.
    - ``free_tolerance``: adaptive free phase, stopped when the residual falls under the tolerance (max T steps).
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
        nudging: Nudging = "one_sided",
        warm_start: bool = False,
        free_tolerance: float | None = None,
        check_every: int = 5,
        weight_decays: Sequence[float] | None = None,
        sign_seed: int | None = None,
        compile_relaxation: bool = False,
    ) -> None:
        """
        Args:
            model: the convergent network (an ``EnergyModel``), e.g. ``ep_lightning.models.PrototypicalNet``.
            algorithm: ``ep`` (Equilibrium Propagation) or ``bptt`` (truncated back-propagation through time).
            T: free-phase steps (for BPTT: total steps, the last K with graph).
            K: nudged-phase steps (for BPTT: steps back-propagated through).
            beta: nudging strength β (> 0); used by EP only.
            lrs: one learning rate per layer group, input → output (``model.parameter_groups()``; with a
                ``readout: ce`` model the last group is the softmax read-out). null: the optimizer's own lr.
            optimizer: optimizer factory taking the parameter groups (default plain SGD), e.g. ``torch.optim.SGD``
                with ``momentum`` or ``torch.optim.Adam``; per-group ``lrs``/``weight_decays`` override its values.
            lr_scheduler: optional scheduler factory, stepped once per epoch (e.g. ``CosineAnnealingLR`` with
                ``T_max`` = epochs for cosine decay).
            eval_steps: free-phase steps for validation/test/predict (default: T).
            nudging: EP only. ``one_sided`` (+β, the 2019 paper), ``symmetric`` (±β, two nudged phases from s* run as
                one doubled batch; gradient bias O(β²)), ``random_sign`` (β = ±β, sign drawn per batch from a
                seeded generator that is identical on every DDP rank and saved in checkpoints).
            warm_start: start each training example's free phase from its last free-phase state (persistent fixed
                points); needs batches ``(x, y, index)`` (``data.return_index: true``). The per-example table lives on
                the training device and in checkpoints (N × state size values: 125 MB for P-1h, 1.35 GB for P-conv
                on 60k images, float32). Evaluation always starts from the initial state. Under DDP each rank keeps
                its own table (a sample starts from the state its rank last computed for it, else from zero).
            free_tolerance: adaptive relaxation of the training free phase (EP; BPTT: its T − K steps without
                graph): stop when max over layers and samples of ‖s_{t+1} − s_t‖ < free_tolerance, at most T steps
                (null: always T steps, the default). Logs ``train/free_steps`` (epoch mean over samples).
            check_every: with ``free_tolerance``, test the residual every this many steps (one host sync per test).
            weight_decays: one weight decay per layer group, input → output (same groups as ``lrs``); null: the
                optimizer's own value.
            sign_seed: seed of the β-sign generator for ``random_sign`` (default: the run seed, else 0).
            compile_relaxation: EP only. Compile the training step's relaxation (input drive, free phase, nudged
                phase; ``relaxation.compiled_phases``) into one graph with ``torch.compile``: on CPU with inductor's
                C++ wrapper, on CUDA with CUDA graphs (``reduce-overhead``). Same arithmetic, possibly reordered by
                the compiler (float round-off). Costs a compilation at the first step of each batch shape (5–35 s on
                a CPU) and needs a C++ compiler; measured in the README ("Performance"). Not with
                ``free_tolerance`` (its residual tests are host synchronisations).
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
        self.nudging = nudging
        self.warm_start = bool(warm_start)
        self.free_tolerance = float(free_tolerance) if free_tolerance is not None else None
        self.check_every = int(check_every)
        self.weight_decays = [float(w) for w in weight_decays] if weight_decays is not None else None
        self.compile_relaxation = bool(compile_relaxation)
        self._compiled_phases: CompiledPhases | None = None
        self._validate()
        self.sign_generator = (
            SignGenerator(run_seed() if sign_seed is None else int(sign_seed)) if nudging == "random_sign" else None
        )
        self.warm_states = PersistentStates() if self.warm_start else None
        metric = lambda: MulticlassAccuracy(num_classes=model.num_classes, average="micro", validate_args=False)
        self.val_acc, self.test_acc = metric(), metric()
        self.train_means = EpochMeans()
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
        if self.nudging not in NUDGINGS:
            raise ValueError(f"model.nudging={self.nudging!r} is not known; allowed: {', '.join(map(repr, NUDGINGS))}")
        if self.algorithm == "bptt" and self.nudging != "one_sided":
            raise ValueError(
                f"model.nudging={self.nudging!r} applies to EP only; with model.algorithm='bptt' use 'one_sided' "
                f"(the default)"
            )
        if self.free_tolerance is not None and not 0 < self.free_tolerance < float("inf"):
            raise ValueError(
                f"model.free_tolerance={self.free_tolerance} is invalid: use a finite residual > 0 (e.g. 1e-4) or "
                f"null (always T steps)"
            )
        if self.compile_relaxation and self.algorithm != "ep":
            raise ValueError(
                "model.compile_relaxation=true applies to EP's relaxation phases only; with model.algorithm='bptt' "
                "set it to false"
            )
        if self.compile_relaxation and self.free_tolerance is not None:
            raise ValueError(
                f"model.compile_relaxation=true cannot be combined with model.free_tolerance={self.free_tolerance} "
                "(the residual tests stop the compiled graph); set one of them to false / null"
            )
        if self.check_every < 1:
            raise ValueError(f"model.check_every={self.check_every} is invalid: use an integer ≥ 1 (steps between tests)")
        groups = self.model.parameter_groups()
        readout = " (the last one is the softmax read-out)" if getattr(self.model, "readout", "mse") == "ce" else ""
        for field, values, what in (("lrs", self.lrs, "learning rate"), ("weight_decays", self.weight_decays, "weight decay")):
            if values is None:
                continue
            if len(values) != len(groups):
                raise ValueError(
                    f"model.{field}={values} has {len(values)} entries but the model has {len(groups)} layer groups "
                    f"(input → output){readout}; give one {what} per group"
                )
            if any(not 0 <= v < float("inf") for v in values):
                raise ValueError(f"model.{field}={values} is invalid: {what}s must be finite and ≥ 0")

    # --- reliability: model/data mismatch at start-up, NaN/Inf guard (ep_lightning/callbacks/divergence.py) -----
    def setup(self, stage: str) -> None:
        check_module_fits_datamodule(self)
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        hparams = getattr(datamodule, "hparams", None)
        if self.warm_start and stage == "fit" and hparams is not None and not hparams.get("return_index", True):
            raise ConfigError(
                "model.warm_start=true needs the dataset index of every training sample: set data.return_index=true "
                "(training batches become (x, y, index))"
            )

    def configure_callbacks(self) -> list[L.Callback]:
        return default_callbacks(self)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        catch_up_epoch_schedulers(self)  # exact resume from a checkpoint taken at an epoch's last batch

    # --- optimization ----------------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        param_groups: list[dict[str, Any]] = [{"params": g} for g in self.model.parameter_groups()]
        for field, key in (("lrs", "lr"), ("weight_decays", "weight_decay")):
            values = getattr(self, field)
            if values is not None:
                for group, value in zip(param_groups, values):
                    group[key] = value
        optimizer = self.optimizer_factory(param_groups)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer)}

    def free_phase(self, x: Tensor, steps: int | None = None, trace: RelaxationTrace | None = None) -> State:
        """s* = relax(steps) from the initial state, without graph."""
        with torch.no_grad():
            drive = self.model.drive(x)
            return relax(self.model, drive, self.model.init_state(x), steps or self.T, trace=trace)

    def _stopping_rule(self) -> StoppingRule | None:
        return StoppingRule(self.free_tolerance, self.check_every) if self.free_tolerance is not None else None

    def _start_state(self, x: Tensor, index: Tensor | None) -> State:
        """The training free phase's initial state: the example's last free-phase state (warm start) or init_state."""
        init = self.model.init_state(x)
        if self.warm_states is None:
            return init
        if index is None:
            raise ValueError(
                "model.warm_start=true needs training batches (x, y, index): set data.return_index=true (or yield the "
                "dataset index of every sample as the third batch element)"
            )
        return self.warm_states.start(index, init, size_hint=self._train_size())

    def _train_size(self) -> int | None:
        train_set = getattr(getattr(self._trainer, "datamodule", None), "train_set", None) if self._trainer else None
        return len(train_set) if train_set is not None else None

    def ep_phases(
        self, x: Tensor, target: Tensor, beta: float | None = None, start: State | None = None
    ) -> tuple[State, State]:
        """Free phase (T steps, β = 0, from ``start`` or init_state) then nudged phase (K steps, β) from s*;
        returns (s*, s^β). ``beta`` defaults to the module's β (one-sided; see ``relaxation_phases``)."""
        start = start if start is not None else self.model.init_state(x)
        return self.relaxation_phases(x, target, start, self.beta if beta is None else beta)

    def symmetric_phases(self, x: Tensor, target: Tensor, free: State, drive: Any = None) -> State:
        """Both nudged phases from s* as one relaxation of the doubled batch: states (s*; s*), input (x; x), target
        (y; y), per-sample β = (+β, …, +β, −β, …, −β). Returns the doubled state: rows [:B] are s^{+β}, [B:] s^{−β}.
        ``drive`` (the free phase's ``model.drive(x)``) is repeated, not recomputed, for the doubled batch."""
        batch = x.shape[0]
        with torch.no_grad():
            beta = torch.full((2 * batch, 1), self.beta, dtype=free[0].dtype, device=free[0].device)
            beta[batch:] = -self.beta
            start = tuple(torch.cat([s, s]) for s in free)
            drive = repeat_batch(self.model.drive(x) if drive is None else drive, batch)  # = drive of (x; x)
            return relax(self.model, drive, start, self.K, beta, torch.cat([target, target]))

    def draw_beta(self) -> float:
        """β for this batch: ±β from the dedicated generator (``random_sign``, one draw per step), else +β."""
        return self.sign_generator.signed(self.beta) if self.sign_generator is not None else self.beta

    def relaxation_phases(
        self, x: Tensor, target: Tensor, start: State, beta: float | None, stop: StoppingRule | None = None
    ) -> tuple[State, State]:
        """(s*, nudged) for one training batch, without graph: drive once, T free steps from ``start``, then the
        nudged phase from s*: K steps at ``beta`` (one-sided / random sign), or for ``beta=None`` (symmetric) both
        nudged phases as one doubled batch (rows [:B] s^{+β}, [B:] s^{−β}; see ``symmetric_phases``)."""
        with torch.no_grad():
            drive = self.model.drive(x)
            free = relax(self.model, drive, start, self.T, stop=stop)
            if beta is None:
                return free, self.symmetric_phases(x, target, free, drive)
            return free, relax(self.model, drive, free, self.K, beta, target)

    def ep_update(self, x: Tensor, target: Tensor, start: State) -> tuple[Tensor, State, dict[str, State], int]:
        """(update loss, s*, phases, free steps run) for one batch: the gradient of the loss is −Δθ (EP contrast for
        the chosen nudging, plus the read-out's CE gradient at s* for ``readout: ce`` models)."""
        stop = self._stopping_rule()
        beta = None if self.nudging == "symmetric" else self.draw_beta()
        if self.compile_relaxation:
            if self._compiled_phases is None:
                self._compiled_phases = CompiledPhases(self.relaxation_phases, x.device)
            free, nudged = self._compiled_phases(x, target, start, beta)
        else:
            free, nudged = self.relaxation_phases(x, target, start, beta, stop)
        if beta is None:
            batch = x.shape[0]
            plus, minus = tuple(s[:batch] for s in nudged), tuple(s[batch:] for s in nudged)
            # (1/2β)(∂Φ/∂θ(s^{+β}) − ∂Φ/∂θ(s^{−β})) = −∇ of mean[Φ(s^{−β}) − Φ(s^{+β})]/(2β): ep_surrogate with
            # (s^{−β}, s^{+β}) in the places of (s*, s^β) and 2β in the place of β.
            update_loss = ep_surrogate(self.model, x, minus, plus, 2.0 * self.beta)
        else:
            update_loss = ep_surrogate(self.model, x, free, nudged, beta)  # valid for either sign of β
        phases = {"free": free, "nudged": nudged}
        readout_loss = getattr(self.model, "readout_loss", None)
        readout = readout_loss(free, target) if callable(readout_loss) else None
        if readout is not None:
            update_loss = update_loss + readout
        return update_loss, free, phases, stop.steps_run if stop is not None else self.T

    def bptt_forward(
        self, x: Tensor, start: State | None = None, stop: StoppingRule | None = None
    ) -> tuple[State, State]:
        """T − K steps without graph (adaptive with ``stop``), then K steps with graph, both from the batch's one
        input drive (built with graph: the K back-propagated steps need it); returns (state at T − K, state at T)."""
        drive = self.model.drive(x)
        start = start if start is not None else self.model.init_state(x)
        with torch.no_grad():
            prefix = relax(self.model, drive, start, self.T - self.K, stop=stop)
        return prefix, relax(self.model, drive, prefix, self.K)

    @staticmethod
    def _unpack(batch: Any) -> tuple[Tensor, Tensor, Tensor | None]:
        """(x, labels, index or None) from a batch (x, y) or (x, y, index)."""
        if len(batch) == 3:
            return batch[0], batch[1], batch[2]
        x, labels = batch
        return x, labels, None

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        x, labels, index = self._unpack(batch)
        target = self.model.encode_target(labels, x)
        optimizer = self.optimizers()
        optimizer.zero_grad()
        start = self._start_state(x, index)
        if self.algorithm == "ep":
            update_loss, free, phases, steps = self.ep_update(x, target, start)
            output = self.model.output(free)
            loss = self.model.cost(free, target).mean()
        else:
            stop = self._stopping_rule()
            _, free = self.bptt_forward(x, start, stop)
            steps = (stop.steps_run if stop is not None else self.T - self.K) + self.K
            update_loss = bptt_loss(self.model, free, target)
            output = self.model.output(free).detach()
            loss = update_loss.detach()
            phases = {"free": free}
        self.manual_backward(update_loss)
        if not check_training_step(self, batch_idx, phases):  # NaN/Inf: raises, or skips the batch (DivergenceGuard)
            return loss
        optimizer.step()
        if self.warm_states is not None:
            self.warm_states.store(index, free)  # after the guard: a diverged state is never reused
        # Metrics accumulate on the device and are logged (and summed across ranks) once per epoch: a `self.log` per
        # step costs more than the whole P-1h relaxation, a torchmetrics update ~0.1 ms (EpochMeans: ~10 µs).
        n = x.shape[0]
        sums = {"loss": loss.detach() * n, "acc": (output.argmax(dim=1) == labels).sum()}
        if self.free_tolerance is not None:
            sums["free_steps"] = loss.new_tensor(float(steps * n))
        self.train_means.update(n, **sums)
        if batch_idx % self.progress_every_n_steps == 0:
            self.log("train/loss_step", loss, prog_bar=True, logger=False)
        return loss

    def on_train_epoch_end(self) -> None:
        for name, value in self.train_means.compute(self.trainer.strategy).items():
            self.log(f"train/{name}", value, prog_bar=True)
        self.train_means.reset()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()

    # --- evaluation ------------------------------------------------------------------------------------------
    def _evaluate(self, batch: tuple[Tensor, ...], stage: str, accuracy: MulticlassAccuracy) -> Tensor:
        x, labels, _ = self._unpack(batch)
        state = self.free_phase(x, self.eval_steps)
        loss = self.model.cost(state, self.model.encode_target(labels, x)).mean()
        accuracy(self.model.predict(state), labels)
        self.log(f"{stage}/loss", loss, on_epoch=True, prog_bar=True, batch_size=x.shape[0], sync_dist=True)
        self.log(f"{stage}/acc", accuracy, on_epoch=True, prog_bar=True, batch_size=x.shape[0])
        return loss

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        return self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        return self._evaluate(batch, "test", self.test_acc)

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Predicted class per sample after the free phase."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.model.predict(self.free_phase(x, self.eval_steps))

    # --- exact resume: the β-sign stream and the warm-start table --------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.sign_generator is not None:
            checkpoint[SIGN_GENERATOR_KEY] = self.sign_generator.get_state()
        if self.warm_states is not None:
            checkpoint[WARM_START_KEY] = self.warm_states.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.sign_generator is not None and SIGN_GENERATOR_KEY in checkpoint:
            self.sign_generator.set_state(checkpoint[SIGN_GENERATOR_KEY])
        if self.warm_states is not None and WARM_START_KEY in checkpoint:
            self.warm_states.load_state_dict(checkpoint[WARM_START_KEY])
