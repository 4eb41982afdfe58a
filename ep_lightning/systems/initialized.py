"""Initialized Equilibrium Propagation (O'Connor, Gavves & Welling, ICLR 2019) and initializer distillation.

``InitializedEP`` trains an energy model by EP while a feedforward initializer f_φ learns to predict the energy
model's negative-phase state; the negative phase starts from f_φ(x) instead of zero. ``InitializerDistillation``
trains only f_φ against the fixed points of a frozen, already trained model (P or EB, fully connected), which
gives any trained EP network a fast feedforward predictor.

Per training batch of ``InitializedEP`` (as in the authors' release):

    s^f = f_φ(x)
    s⁻  = relax(E^λ, from s^f, T⁻ steps),          E^λ = E + (λ/2)Σ_l‖s_l − s^f_l‖²  (s^f fixed)
    β   = ±β_base, sign drawn from a seeded generator (one draw per step, identical on every DDP rank)
    s⁺  = relax(E^λ + βC, from s⁻, T⁺ steps),       C = ‖s_L − y‖²
    θ   ← θ − (η_l/β) ∇_θ mean[E(s⁺) − E(s⁻)]      (``ep_surrogate``; the formula holds for either sign of β)
    φ_l ← φ_l − η_l ∇_{φ_l} mean ½‖s^f_l − s⁻_l‖²   (layer-local: s^f_{l−1} detached)

Both updates come from ONE ``manual_backward`` of (EP surrogate + contrast loss): their parameter sets are disjoint
and every input of each term is detached from the other, so the gradients are exactly those of two separate
backwards, while DDP sees the single backward per forward that its reducer expects and all-reduces both. Two
optimizers (energy model, initializer) step after it; only the first step is counted, so ``global_step`` counts
batches as for every other module.

Logged: ``train/loss`` (C at s⁻), ``train/err`` / ``train/err_init`` (error of s⁻ / of s^f), ``train/init_loss``,
``train/dist_init/<layer>`` (‖s^f_l − s⁻_l‖, per-sample norm; training values are epoch means); at validation and test ``*/err`` and
``*/acc`` (s^f refined by ``eval_steps`` steps) and ``*/err_init``, ``*/acc_init`` (the initializer alone). The
residual curves from s^f against from zero come from ``ep_lightning.callbacks.initialization.InitializationMonitor``.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from ep_lightning.algorithms import ep_surrogate
from ep_lightning.callbacks.divergence import check_training_step, default_callbacks
from ep_lightning.config_checks import check_module_fits_datamodule
from ep_lightning.dynamics import RelaxationTrace, relax
from ep_lightning.metrics import EpochMeans
from ep_lightning.models.base import EnergyModel, State
from ep_lightning.models.initializer import FeedforwardInitializer, layer_contrast_losses
from ep_lightning.random_sign import SignGenerator, run_seed
from ep_lightning.systems.equilibrium import sgd

#: Checkpoint key of the β-sign generator state (restored on resume so the sign sequence continues exactly).
SIGN_GENERATOR_KEY = "iep_beta_sign_generator"
#: Checkpoint key of the initializer's constructor arguments (used by ``FeedforwardInitializer.from_checkpoint``).
INITIALIZER_CONFIG_KEY = "initializer_config"


def check_fully_connected(model: EnergyModel) -> list[int]:
    """The model's layer sizes ``[n_in, n_1, …, n_out]``, or a ValueError if it is not a layered MLP."""
    layers = getattr(model, "layers", None)
    shapes = model.init_state_shapes()
    if layers is None or any(len(s) != 1 for s in shapes) or len(layers) != len(shapes) + 1:
        raise ValueError(
            f"model={type(model).__name__} is not a fully-connected layered network: the MLP initializer needs "
            f"1-D layer states and a `layers` list (PrototypicalNet or EnergyBasedNet); convolutional models are "
            f"not supported"
        )
    return [int(n) for n in layers]


def xavier_init_(model: nn.Module) -> None:
    """Xavier-uniform weights and zero biases for every Linear layer (the authors' init of both networks)."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def load_energy_weights(model: EnergyModel, checkpoint: str | Path) -> None:
    """Load the ``model.*`` weights of a checkpoint of any ep_lightning module into ``model`` (strict)."""
    path = Path(checkpoint)
    if not path.is_file():
        raise ValueError(f"model.checkpoint={str(checkpoint)!r} is not a file; give the path of a .ckpt file")
    data = torch.load(path, map_location="cpu", weights_only=False)  # our own checkpoints: hparams hold callables
    prefix = "model."
    state = {k[len(prefix) :]: v for k, v in data.get("state_dict", {}).items() if k.startswith(prefix)}
    if not state:
        raise ValueError(
            f"model.checkpoint={str(checkpoint)!r} holds no 'model.*' weights (not an ep_lightning checkpoint)"
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(
            f"model.checkpoint={str(checkpoint)!r} does not fit model={type(model).__name__}: configure `model` "
            f"exactly as the network that was trained ({err})"
        ) from err


class _InitializedBase(L.LightningModule):
    """What IEP training and distillation share: the initializer, the anchored negative phase, evaluation of
    s^f (the initializer alone) and of the relaxed state, and the checkpoint extras."""

    model: EnergyModel
    initializer: FeedforwardInitializer | None
    lam: float
    local_loss: bool
    eval_steps: int

    def _attach(self, model: EnergyModel, initializer: FeedforwardInitializer | None, lam: float) -> None:
        self.model = model
        self.initializer = initializer
        self.lam = float(lam)
        if not 0.0 <= self.lam:
            raise ValueError(f"model.lam={lam} is invalid: the anchor strength λ must be ≥ 0 (0.1 in the paper)")
        if initializer is not None:
            layers = check_fully_connected(model)
            if list(initializer.layers) != layers:
                raise ValueError(
                    f"model.initializer.layers={initializer.layers} does not match the energy model's layers {layers}; "
                    f"the initializer predicts every layer's state, so the sizes must be equal"
                )
        if self.lam > 0:
            if initializer is None:
                raise ValueError(f"model.lam={lam} needs an initializer (the anchor is s^f); use lam: 0 for plain EP")
            if "anchor" not in inspect.signature(model.drive).parameters:
                raise ValueError(
                    f"model.lam={lam} is not supported by model={type(model).__name__}: its dynamics take no anchor "
                    f"(only EnergyBasedNet does); use lam: 0"
                )
        metric = lambda: MulticlassAccuracy(num_classes=model.num_classes, average="micro")
        self.val_acc, self.test_acc = metric(), metric()
        self.val_acc_init, self.test_acc_init = metric(), metric()
        self.train_means = EpochMeans()

    # --- reliability: model/data mismatch at start-up, NaN/Inf guard (ep_lightning/callbacks/divergence.py) -----
    def setup(self, stage: str) -> None:
        check_module_fits_datamodule(self)

    def configure_callbacks(self) -> list[L.Callback]:
        return default_callbacks(self)

    # --- the negative phase ----------------------------------------------------------------------------------
    def initial_state(self, x: Tensor) -> State:
        """s^f = f_φ(x) without graph, or the model's zero state when there is no initializer."""
        if self.initializer is None:
            return self.model.init_state(x)
        with torch.no_grad():
            return tuple(s.detach() for s in self.initializer(x))

    def negative_drive(self, x: Tensor, anchor: State) -> Any:
        """The model's drive for E^λ: with λ > 0 the anchor s^f enters every step as λ(s − s^f)."""
        if self.lam > 0:
            return self.model.drive(x, anchor=anchor, anchor_strength=self.lam)
        return self.model.drive(x)

    def free_phase(self, x: Tensor, steps: int | None = None, trace: RelaxationTrace | None = None) -> State:
        """s⁻ = relax(E^λ, from s^f (or zero), ``steps`` steps), without graph (also used by ConvergenceMonitor)."""
        with torch.no_grad():
            start = self.initial_state(x)
            return relax(self.model, self.negative_drive(x, start), start, steps or self.T, trace=trace)

    @property
    def T(self) -> int:
        """Free-phase steps used in training."""
        raise NotImplementedError

    # --- logging helpers -------------------------------------------------------------------------------------
    def _accumulate(
        self, labels: Tensor, loss: Tensor, output: Tensor, s_f: State | None = None, s_minus: State | None = None,
        init_loss: Tensor | None = None,
    ) -> None:
        """Add this batch to the epoch means logged at epoch end (``EpochMeans``, no per-step ``self.log``):
        train/loss, train/err (of ``output``) and, with an initializer, train/init_loss, train/err_init (of s^f's
        output layer) and train/dist_init/<layer> = ‖s^f_l − s⁻_l‖ (per-sample norm)."""
        n = labels.shape[0]
        sums = {"loss": loss.detach() * n, "err": (output.argmax(dim=1) != labels).sum()}
        if s_f is not None and s_minus is not None:
            if init_loss is not None:
                sums["init_loss"] = init_loss.detach() * n
            sums["err_init"] = (s_f[-1].detach().argmax(dim=1) != labels).sum()
            for name, a, b in zip(self.model.state_names(), s_f, s_minus):
                sums[f"dist_init/{name}"] = (a.detach() - b).flatten(1).norm(dim=1).sum()
        self.train_means.update(n, **sums)

    def on_train_epoch_end(self) -> None:
        for name, value in self.train_means.compute(self.trainer.strategy).items():
            self.log(f"train/{name}", value, prog_bar=name in ("loss", "err", "err_init"))
        self.train_means.reset()

    def _log_error(self, key: str, output: Tensor, labels: Tensor, prog_bar: bool = False) -> None:
        err = (output.argmax(dim=1) != labels).float().mean()
        self.log(key, err, on_step=False, on_epoch=True, prog_bar=prog_bar, batch_size=labels.shape[0], sync_dist=True)

    # --- evaluation: (a) the initializer alone, (b) s^f refined by eval_steps relaxation steps ---------------
    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        x, labels = batch
        accuracy, accuracy_init = getattr(self, f"{stage}_acc"), getattr(self, f"{stage}_acc_init")
        state = self.free_phase(x, self.eval_steps)
        loss = self.model.cost(state, self.model.encode_target(labels, x)).mean()
        accuracy(self.model.predict(state), labels)
        self._log_error(f"{stage}/err", self.model.output(state), labels, prog_bar=True)
        self.log(f"{stage}/loss", loss, on_epoch=True, batch_size=x.shape[0], sync_dist=True)
        self.log(f"{stage}/acc", accuracy, on_epoch=True, prog_bar=True, batch_size=x.shape[0])
        if self.initializer is not None:
            with torch.no_grad():
                out_init = self.initializer(x)[-1]
            accuracy_init(out_init.argmax(dim=1), labels)
            self._log_error(f"{stage}/err_init", out_init, labels, prog_bar=True)
            self.log(f"{stage}/acc_init", accuracy_init, on_epoch=True, batch_size=x.shape[0])
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._evaluate(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._evaluate(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Predicted class per sample after ``eval_steps`` relaxation steps from s^f."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.model.predict(self.free_phase(x, self.eval_steps))

    # --- export ----------------------------------------------------------------------------------------------
    def export_initializer(self) -> FeedforwardInitializer:
        """A standalone copy of f_φ (plain ``nn.Module``, on CPU, eval mode), usable without Lightning."""
        if self.initializer is None:
            raise ValueError("this module has no initializer to export (plain EP: initializer is null)")
        copy = FeedforwardInitializer(self.initializer.layers, leak=self.initializer.leak)
        copy.load_state_dict({k: v.detach().cpu() for k, v in self.initializer.state_dict().items()})
        return copy.to(dtype=next(self.initializer.parameters()).dtype).eval()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.initializer is not None:
            checkpoint[INITIALIZER_CONFIG_KEY] = {
                "layers": list(self.initializer.layers),
                "leak": self.initializer.leak,
            }

    @staticmethod
    def _per_layer_groups(params: list[list[nn.Parameter]], lrs: Sequence[float]) -> list[dict[str, Any]]:
        return [{"params": g, "lr": lr} for g, lr in zip(params, lrs)]


def _no_closure() -> None:
    """Manual optimization: gradients are already in place when the optimizer steps."""


def _check_lrs(field: str, lrs: Sequence[float] | None, groups: int) -> list[float]:
    if lrs is None or len(lrs) != groups:
        raise ValueError(
            f"model.{field}={lrs} is invalid: give one learning rate per layer group, input → output ({groups} groups)"
        )
    lrs = [float(lr) for lr in lrs]
    if any(not lr >= 0 for lr in lrs):
        raise ValueError(f"model.{field}={lrs} is invalid: learning rates must be ≥ 0")
    return lrs


class InitializedEP(_InitializedBase):
    """Initialized EP: EP on an energy model whose negative phase starts from a trained feedforward prediction.

    With ``initializer: null`` and ``lam: 0`` it is plain EP with the same settings (zero start, random-sign β,
    Xavier init): the paper's baseline. Validation and test report both the initializer alone (``*/err_init``,
    ``*/acc_init``) and the relaxed network after ``eval_steps`` steps from s^f (``*/err``, ``*/acc``).
    """

    def __init__(
        self,
        model: EnergyModel,
        initializer: FeedforwardInitializer | None = None,
        T_minus: int = 20,
        T_plus: int = 4,
        beta: float = 0.5,
        random_sign: bool = True,
        lam: float = 0.1,
        lrs: Sequence[float] | None = None,
        init_lrs: Sequence[float] | None = None,
        local_loss: bool = True,
        energy_init: Literal["xavier", "keep"] = "xavier",
        eval_steps: int | None = None,
        seed: int | None = None,
        optimizer: OptimizerCallable = sgd,
    ) -> None:
        """
        Args:
            model: the equilibrating network, e.g. ``EnergyBasedNet(layers, activation='hard_sigmoid', eps=0.5,
                cost_scale=1.0)`` for the paper's E and C = ‖s_L − y‖².
            initializer: f_φ with the same layer sizes (``null``: plain EP from zero, needs ``lam: 0``).
            T_minus: negative-phase steps T⁻ (≥ 0).
            T_plus: positive-phase steps T⁺ (≥ 1).
            beta: β_base > 0; the positive phase uses ±β_base.
            random_sign: draw the sign of β at random per batch (the paper); otherwise always +β_base.
            lam: anchor strength λ ≥ 0 of E^λ (0.1 in the paper; 10 or more breaks learning).
            lrs: per-layer learning rates η_l of the energy model, input → output.
            init_lrs: per-layer learning rates of the initializer (default: ``lrs``, as the authors).
            local_loss: layer-local contrast loss (the paper); false back-propagates through the initializer.
            energy_init: ``xavier`` re-initialises the energy model's Linear layers as the authors (Xavier-uniform,
                zero bias); ``keep`` leaves the model's own initialisation.
            eval_steps: relaxation steps from s^f at validation/test/predict (default: T⁻).
            seed: seed of the β-sign generator (default: the run seed $PL_GLOBAL_SEED, else 0); the same on every
                DDP rank, so all ranks draw the same sign.
            optimizer: optimizer factory for each of the two parameter sets (default plain SGD).
        """
        super().__init__()
        self.save_hyperparameters(ignore=["model", "initializer"])
        self.automatic_optimization = False
        self._attach(model, initializer, lam)
        self.T_minus, self.T_plus, self.beta = int(T_minus), int(T_plus), float(beta)
        self.random_sign = bool(random_sign)
        self.local_loss = bool(local_loss)
        self.eval_steps = int(eval_steps) if eval_steps is not None else self.T_minus
        self.optimizer_factory = optimizer
        if self.T_minus < 0:
            raise ValueError(f"model.T_minus={T_minus} is invalid: use 0 or more negative-phase steps")
        if self.T_plus < 1:
            raise ValueError(f"model.T_plus={T_plus} is invalid: the positive phase needs at least 1 step")
        if not self.beta > 0:
            raise ValueError(f"model.beta={beta} is invalid: β_base must be > 0 (its sign is drawn per batch)")
        if self.eval_steps < 0:
            raise ValueError(f"model.eval_steps={eval_steps} is invalid: use 0 or more steps (or null for T_minus)")
        if self.T_minus == 0 and initializer is None:
            raise ValueError("model.T_minus=0 needs an initializer: plain EP must relax from zero")
        self.lrs = _check_lrs("lrs", lrs, len(model.parameter_groups()))
        self.init_lrs = (
            _check_lrs("init_lrs", init_lrs if init_lrs is not None else lrs, len(initializer.synapses))
            if initializer is not None
            else None
        )
        if energy_init == "xavier":
            xavier_init_(model)
        elif energy_init != "keep":
            raise ValueError(f"model.energy_init={energy_init!r} is not known; allowed: 'xavier', 'keep'")
        self.sign_generator = SignGenerator(run_seed() if seed is None else int(seed))

    @property
    def T(self) -> int:
        return self.T_minus

    # --- optimization ----------------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        optimizers = [self.optimizer_factory(self._per_layer_groups(self.model.parameter_groups(), self.lrs))]
        if self.initializer is not None:
            groups = [list(s.parameters()) for s in self.initializer.synapses]
            optimizers.append(self.optimizer_factory(self._per_layer_groups(groups, self.init_lrs)))
        return optimizers

    def draw_beta(self) -> float:
        """±β_base: one draw of the dedicated generator per training step (+β_base if ``random_sign`` is off)."""
        if not self.random_sign:
            return self.beta
        return self.beta if self.sign_generator.draw() else -self.beta

    def phases(self, x: Tensor, target: Tensor, beta: float, s_f: State | None = None) -> tuple[State, State, State]:
        """(s^f, s⁻, s⁺), all without graph: T⁻ steps on E^λ from s^f, then T⁺ nudged steps from s⁻.

        ``s_f`` (detached here) saves the forward pass when the caller already has f_φ(x)."""
        with torch.no_grad():
            s_f = self.initial_state(x) if s_f is None else tuple(s.detach() for s in s_f)
            drive = self.negative_drive(x, s_f)
            s_minus = relax(self.model, drive, s_f, self.T_minus)
            s_plus = relax(self.model, drive, s_minus, self.T_plus, beta, target)
        return s_f, s_minus, s_plus

    def losses(self, x: Tensor, target: Tensor, beta: float) -> tuple[Tensor, Tensor, State, State]:
        """(EP surrogate, initializer contrast loss, s^f, s⁻) for one batch; the gradient of their sum is
        (−Δθ, ∇φ). The contrast loss is 0 (no graph) without an initializer."""
        if self.initializer is None:
            s_f, s_minus, s_plus = self.phases(x, target, beta)
            return ep_surrogate(self.model, x, s_minus, s_plus, beta), torch.zeros((), device=x.device), s_f, s_minus
        s_f = self.initializer(x, local=self.local_loss)  # with graph, for the contrast loss
        _, s_minus, s_plus = self.phases(x, target, beta, s_f)
        ep_loss = ep_surrogate(self.model, x, s_minus, s_plus, beta)
        init_loss = torch.stack(layer_contrast_losses(s_f, s_minus)).sum()
        return ep_loss, init_loss, s_f, s_minus

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, labels = batch
        target = self.model.encode_target(labels, x)
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        for opt in optimizers:
            opt.zero_grad()
        beta = self.draw_beta()
        ep_loss, init_loss, s_f, s_minus = self.losses(x, target, beta)
        self.manual_backward(ep_loss + init_loss if self.initializer is not None else ep_loss)
        if not check_training_step(self, batch_idx, {"free": s_minus}):  # NaN/Inf: raises, or skips the batch
            return self.model.cost(s_minus, target).mean()
        optimizers[0].step()  # the energy model's step: counted, so trainer.global_step counts batches
        for opt in optimizers[1:]:
            # The initializer's step goes through the same strategy/precision path as LightningOptimizer.step but
            # is not counted: with two counted steps per batch, global_step (and max_steps, every_n_steps, the
            # loggers' x axis) would advance twice per batch.
            self.trainer.strategy.optimizer_step(opt.optimizer, closure=_no_closure)
        loss = self.model.cost(s_minus, target).mean()
        if self.initializer is not None:
            self._accumulate(labels, loss, self.model.output(s_minus), s_f, s_minus, init_loss)
        else:
            self._accumulate(labels, loss, self.model.output(s_minus))
        return loss

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[SIGN_GENERATOR_KEY] = self.sign_generator.get_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if SIGN_GENERATOR_KEY in checkpoint:
            self.sign_generator.set_state(checkpoint[SIGN_GENERATOR_KEY])


class InitializerDistillation(_InitializedBase):
    """Trains only f_φ to predict the fixed points of a frozen, trained network (P or EB, fully connected).

    Per batch: s* = relax(T steps from zero, or from s^f with ``start: init``) of the frozen model; then
    φ_l ← φ_l − η_l ∇_{φ_l} mean ½‖s^f_l − s*_l‖² (layer-local unless ``local_loss: false``). Evaluation reports
    the initializer alone (``*/err_init``) and s^f refined by ``eval_steps`` steps (``*/err``).
    """

    def __init__(
        self,
        model: EnergyModel,
        checkpoint: str | None = None,
        initializer: FeedforwardInitializer | None = None,
        T: int = 20,
        start: Literal["zero", "init"] = "zero",
        lrs: Sequence[float] | None = None,
        local_loss: bool = True,
        eval_steps: int | None = None,
        optimizer: OptimizerCallable = sgd,
    ) -> None:
        """
        Args:
            model: the trained network, configured exactly as when it was trained (PrototypicalNet or
                EnergyBasedNet); it is frozen.
            checkpoint: a .ckpt of any ep_lightning module (EquilibriumModule, InitializedEP, …) whose ``model.*``
                weights are loaded into ``model``; null keeps ``model`` as given.
            initializer: f_φ (default: a new ``FeedforwardInitializer`` with the model's layer sizes).
            T: relaxation steps that give the target fixed point s*.
            start: relax the target from ``zero`` (the trained network's own free phase) or from ``init`` (s^f,
                fewer steps needed once f_φ is good).
            lrs: per-layer learning rates of the initializer, input → output.
            local_loss: layer-local contrast loss (true) or back-propagation through f_φ (false).
            eval_steps: relaxation steps from s^f at validation/test/predict (default: T).
            optimizer: optimizer factory (default plain SGD).
        """
        super().__init__()
        self.save_hyperparameters(ignore=["model", "initializer"])
        self.automatic_optimization = False
        layers = check_fully_connected(model)
        if checkpoint is not None:
            load_energy_weights(model, checkpoint)
        else:
            rank_zero_warn(
                "InitializerDistillation: model.checkpoint is null, so the initializer learns the fixed points of the "
                "model's initial weights; set model.checkpoint to a trained network's .ckpt to distill it"
            )
        model.requires_grad_(False)
        if initializer is None:
            initializer = FeedforwardInitializer(layers)
            initializer.to(dtype=next(model.parameters()).dtype)
        self._attach(model, initializer, lam=0.0)
        self.T_free = int(T)
        if self.T_free < 1:
            raise ValueError(f"model.T={T} is invalid: the target relaxation needs at least 1 step")
        if start not in ("zero", "init"):
            raise ValueError(f"model.start={start!r} is not known; allowed: 'zero', 'init'")
        self.start = start
        self.local_loss = bool(local_loss)
        self.eval_steps = int(eval_steps) if eval_steps is not None else self.T_free
        if self.eval_steps < 0:
            raise ValueError(f"model.eval_steps={eval_steps} is invalid: use 0 or more steps (or null for T)")
        self.lrs = _check_lrs("lrs", lrs, len(initializer.synapses))
        self.optimizer_factory = optimizer

    @property
    def T(self) -> int:
        return self.T_free

    def configure_optimizers(self) -> Any:
        groups = [list(s.parameters()) for s in self.initializer.synapses]
        return self.optimizer_factory(self._per_layer_groups(groups, self.lrs))

    def target_state(self, x: Tensor) -> State:
        """s*: T steps of the frozen model's free phase from zero (``start: zero``) or from s^f."""
        with torch.no_grad():
            start = self.model.init_state(x) if self.start == "zero" else self.initial_state(x)
            return relax(self.model, self.model.drive(x), start, self.T_free)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, labels = batch
        optimizer = self.optimizers()
        optimizer.zero_grad()
        target = self.target_state(x)
        s_f = self.initializer(x, local=self.local_loss)
        loss = torch.stack(layer_contrast_losses(s_f, target)).sum()
        self.manual_backward(loss)
        if not check_training_step(self, batch_idx, {"free": target}):  # NaN/Inf: raises, or skips the batch
            return loss.detach()
        optimizer.step()
        # train/loss is this module's objective, the contrast loss (InitializedEP logs it as train/init_loss);
        # train/err is the relaxed target's error, train/err_init the initializer's.
        self._accumulate(labels, loss, self.model.output(target), s_f, target)
        return loss.detach()
