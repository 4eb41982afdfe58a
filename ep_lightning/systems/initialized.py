"""Initialized Equilibrium Propagation (O'Connor, Gavves & Welling, ICLR 2019) and initializer distillation.

``InitializedEP`` is EP with an initializer: a feedforward network f_φ learns to predict the energy model's
free-phase state, and the free phase starts from f_φ(x) instead of zero. ``InitializerDistillation`` trains only
f_φ against the fixed points of a frozen, already trained network (P or EB, fully connected).

Per training batch of ``InitializedEP`` (``EstimatorSystem.training_step`` with the hooks below; as in the authors'
release):

    s^f = f_φ(x)                                               (``initial_state``)
    s*  = relax(E^λ, from s^f, T steps),     E^λ = E + (λ/2)Σ_l‖s_l − s^f_l‖²  (s^f fixed; ``drive_options``)
    β   = ±β, sign drawn from a seeded generator (``nudging: random_sign``, the paper)
    s^β = relax(E^λ + βC, from s*, K steps),  C = ‖s_L − y‖²
    θ   ← θ − (η_l/β) ∇_θ mean[E(s^β) − E(s*)]        (``ep_surrogate``; the formula holds for either sign of β)
    φ_l ← φ_l − η_l ∇_{φ_l} mean ½‖s^f_l − s*_l‖²      (``extra_loss``; layer-local: s^f_{l−1} detached)

Both updates come from ONE ``manual_backward``: their parameter sets are disjoint and every input of each term is
detached from the other, so the gradients are those of two separate backwards, while DDP sees the single backward
its reducer expects and all-reduces both. Two optimizers step after it; only the first step is counted.

Logged: ``train/loss`` (C at s*), ``train/acc`` / ``train/init_acc`` (accuracy of s* / of s^f), ``train/init_loss``,
``train/dist_init/<layer>`` (‖s^f_l − s*_l‖, per-sample norm), all epoch means; at validation and test ``*/loss``,
``*/acc`` (s^f refined by ``eval_steps`` steps) and ``*/init_acc`` (the initializer alone). The residual curves from
s^f against from zero come from ``ep_lightning.callbacks.initialization.InitializationMonitor``, which both systems add
through ``configure_callbacks`` when they have an initializer (unless the trainer already has one). ``InitializedEP``
declares its free phase truncated on purpose (``truncated_free_phase``), so the ConvergenceMonitor does not warn
that it ends unconverged.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from ep_lightning.checkpoints import INITIALIZER_CONFIG_KEY
from ep_lightning.models.base import EnergyModel, State
from ep_lightning.models.initializer import FeedforwardInitializer, layer_contrast_losses
from ep_lightning.models.layered import LayeredNet
from ep_lightning.relaxation import PhaseTrace
from ep_lightning.systems.base import EnergySystem, Nudging, OptimizerSpec, float_list, sgd, unpack_batch
from ep_lightning.systems.estimator import EstimatorSystem


def check_fully_connected(net: EnergyModel) -> list[int]:
    """The net's layer sizes ``[n_in, n_1, …, n_out]``, or a ValueError if it is not a layered MLP."""
    shapes = net.init_state_shapes()
    if not isinstance(net, LayeredNet) or any(len(s) != 1 for s in shapes) or len(net.layers) != len(shapes) + 1:
        raise ValueError(
            f"net={type(net).__name__} is not a fully-connected layered network: the MLP initializer needs "
            f"1-D layer states and a `layers` list (PrototypicalNet or EnergyBasedNet); convolutional models are "
            f"not supported"
        )
    return [int(n) for n in net.layers]


def xavier_init_(model: nn.Module) -> None:
    """Xavier-uniform weights and zero biases for every Linear layer (the authors' init of both networks)."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def load_energy_weights(net: EnergyModel, checkpoint: str | Path) -> None:
    """Load the ``net.*`` weights of a checkpoint of any ep_lightning system into ``net`` (strict)."""
    path = Path(checkpoint)
    if not path.is_file():
        raise ValueError(f"model.checkpoint={str(checkpoint)!r} is not a file; give the path of a .ckpt file")
    data = torch.load(path, map_location="cpu", weights_only=False)  # our own checkpoints: hparams hold callables
    prefix = "net."
    state = {k[len(prefix) :]: v for k, v in data.get("state_dict", {}).items() if k.startswith(prefix)}
    if not state:
        raise ValueError(
            f"model.checkpoint={str(checkpoint)!r} holds no 'net.*' weights (not an ep_lightning checkpoint)"
        )
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(
            f"model.checkpoint={str(checkpoint)!r} does not fit net={type(net).__name__}: configure `net` "
            f"exactly as the network that was trained ({err})"
        ) from err


class _InitializerHooks:
    """What IEP training and distillation share: the start s^f = f_φ(x), the anchored drive of E^λ, evaluation of
    f_φ alone (``*/init_acc``), the per-batch initializer sums, export and the checkpoint extra."""

    net: EnergyModel
    initializer: FeedforwardInitializer | None
    lam: float
    local_loss: bool
    #: The free phase is run to convergence unless a system says otherwise (``protocols.InitializedSystem``).
    truncated_free_phase: bool = False

    def _attach_initializer(self, initializer: FeedforwardInitializer | None, lam: float) -> None:
        self.initializer = initializer
        self.lam = float(lam)
        if not 0.0 <= self.lam:
            raise ValueError(f"model.lam={lam} is invalid: the anchor strength λ must be ≥ 0 (0.1 in the paper)")
        if initializer is not None:
            layers = check_fully_connected(self.net)
            if list(initializer.layers) != layers:
                raise ValueError(
                    f"model.initializer.layers={initializer.layers} does not match the net's layers {layers}; "
                    f"the initializer predicts every layer's state, so the sizes must be equal"
                )
        if self.lam > 0:
            if initializer is None:
                raise ValueError(f"model.lam={lam} needs an initializer (the anchor is s^f); use lam: 0 for plain EP")
            if not self.net.supports_anchor:
                raise ValueError(
                    f"model.lam={lam} is not supported by net={type(self.net).__name__}: its dynamics take no anchor "
                    f"(only EnergyBasedNet does); use lam: 0"
                )
        metric = lambda: MulticlassAccuracy(num_classes=self.net.num_classes, average="micro", validate_args=False)
        self.val_init_acc, self.test_init_acc = metric(), metric()

    def configure_callbacks(self) -> list[L.Callback]:
        """An ``InitializationMonitor`` (every epoch) when there is an initializer and the trainer has none of its own
        (a configured one, with its settings, is kept)."""
        # Lightning's way for a module to bring a callback; imported here because the callbacks sit above the systems
        from ep_lightning.callbacks.initialization import InitializationMonitor

        configured = self._trainer.callbacks if self._trainer is not None else []  # type: ignore[attr-defined]
        if self.initializer is not None and not any(isinstance(c, InitializationMonitor) for c in configured):
            return [InitializationMonitor()]
        return []

    def initial_state(self, x: Tensor, index: Tensor | None = None) -> State:
        """s^f = f_φ(x) (with graph when grad is enabled: the initializer's loss in training; the phases detach it),
        or the net's zero state when there is no initializer."""
        if self.initializer is None:
            return self.net.init_state(x)
        return self.initializer(x, local=self.local_loss)

    def drive_options(self, start: State) -> dict[str, Any]:
        """The drive of E^λ: with λ > 0 the anchor ``start`` (= s^f) enters every step as λ(s − s^f)."""
        return {"anchor": start, "anchor_strength": self.lam} if self.lam > 0 else {}

    def initializer_sums(self, labels: Tensor, s_f: State, relaxed: State) -> dict[str, Tensor]:
        """Per-batch sums: ``init_acc`` (s^f's output layer) and ``dist_init/<layer>`` = ‖s^f_l − s_l‖ per sample."""
        sums = {"init_acc": (s_f[-1].detach().argmax(dim=1) == labels).sum()}
        for name, a, b in zip(self.net.state_names(), s_f, relaxed):
            sums[f"dist_init/{name}"] = (a.detach() - b).flatten(1).norm(dim=1).sum()
        return sums

    def evaluate_extra(self, x: Tensor, labels: Tensor, stage: str) -> None:
        """``{stage}/init_acc``: the initializer alone."""
        if self.initializer is None:
            return
        accuracy = self.val_init_acc if stage == "val" else self.test_init_acc
        with torch.no_grad():
            accuracy(self.initializer(x)[-1].argmax(dim=1), labels)
        self.log(  # type: ignore[attr-defined]
            f"{stage}/init_acc", accuracy, on_epoch=True, prog_bar=True, batch_size=x.shape[0]
        )

    def initializer_specs(self, lrs: list[float] | None, field: str) -> list[OptimizerSpec]:
        if self.initializer is None:
            return []
        return [OptimizerSpec([list(s.parameters()) for s in self.initializer.synapses], lrs, lrs_field=field)]

    def export_initializer(self) -> FeedforwardInitializer:
        """A standalone copy of f_φ (plain ``nn.Module``, on CPU, eval mode), usable without Lightning."""
        if self.initializer is None:
            raise ValueError("this module has no initializer to export (plain EP: initializer is null)")
        copy = FeedforwardInitializer(self.initializer.layers, leak=self.initializer.leak)
        copy.load_state_dict({k: v.detach().cpu() for k, v in self.initializer.state_dict().items()})
        return copy.to(dtype=next(self.initializer.parameters()).dtype).eval()

    def checkpoint_entries(self) -> dict[str, Any]:
        """The initializer's constructor arguments (read by ``FeedforwardInitializer.from_checkpoint``)."""
        entries = super().checkpoint_entries()  # type: ignore[misc]
        if self.initializer is not None:
            entries[INITIALIZER_CONFIG_KEY] = (lambda: dict(self.initializer.init_args), None)
        return entries


class InitializedEP(_InitializerHooks, EstimatorSystem):
    """EP whose free phase starts from a feedforward prediction s^f, on E^λ anchored at s^f, plus the initializer's
    local loss. With ``initializer: null`` and ``lam: 0`` it is plain EP with the same settings (zero start, random-sign
    β, Xavier init): the paper's baseline.
    """

    #: T is a few negative steps on purpose (the point of the method): an unconverged free phase is expected.
    truncated_free_phase = True

    def __init__(
        self,
        net: EnergyModel,
        initializer: FeedforwardInitializer | None = None,
        T: int = 20,
        K: int = 4,
        beta: float = 0.5,
        nudging: Nudging = "random_sign",
        lam: float = 0.1,
        lrs: Sequence[float] | None = None,
        init_lrs: Sequence[float] | None = None,
        local_loss: bool = True,
        energy_init: Literal["xavier", "keep"] = "xavier",
        eval_steps: int | None = None,
        sign_seed: int | None = None,
        optimizer: OptimizerCallable = sgd,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        """
        Args:
            net: the equilibrating network, e.g. ``EnergyBasedNet(layers, activation='hard_sigmoid', eps=0.5,
                cost_scale=1.0)`` for the paper's E and C = ‖s_L − y‖².
            initializer: f_φ with the same layer sizes (``null``: plain EP from zero, needs ``lam: 0``).
            T: free (negative) phase steps (≥ 0; 0 needs an initializer).
            K: nudged (positive) phase steps (≥ 1).
            beta: β > 0.
            nudging: ``random_sign`` (±β per batch, the paper), ``one_sided`` (+β) or ``symmetric`` (−β, +β).
            lam: anchor strength λ ≥ 0 of E^λ (0.1 in the paper; 10 or more breaks learning).
            lrs: per-layer learning rates η_l of the net, input → output.
            init_lrs: per-layer learning rates of the initializer (default: ``lrs``, as the authors).
            local_loss: layer-local contrast loss (the paper); false back-propagates through the initializer.
            energy_init: ``xavier`` re-initialises the net's Linear layers as the authors (Xavier-uniform, zero
                bias); ``keep`` leaves the net's own initialisation.
            eval_steps: relaxation steps from s^f at validation/test/predict (default: T).
            sign_seed: seed of the β-sign generator (default: the run seed $PL_GLOBAL_SEED, else 0).
            optimizer: optimizer factory for each of the two parameter sets (default plain SGD).
            lr_scheduler: optional scheduler factory for each optimizer, stepped once per epoch.
        """
        super().__init__(net, T, K, beta, nudging, sign_seed, eval_steps, optimizer, lr_scheduler)
        self.save_system_hyperparameters(net=net, initializer=initializer)
        self.local_loss = bool(local_loss)
        self._attach_initializer(initializer, lam)
        self.lrs = float_list(lrs)
        self.init_lrs = float_list(init_lrs if init_lrs is not None else lrs)
        if self.T < 0:
            raise ValueError(f"model.T={self.T} is invalid: use 0 or more free-phase steps")
        if self.eval_steps < 0:
            raise ValueError(f"model.eval_steps={self.eval_steps} is invalid: use 0 or more steps (or null for T)")
        if self.T == 0 and initializer is None:
            raise ValueError("model.T=0 needs an initializer: plain EP must relax from zero")
        self.check_optimizer_settings()
        if energy_init == "xavier":
            xavier_init_(net)
        elif energy_init != "keep":
            raise ValueError(f"model.energy_init={energy_init!r} is not known; allowed: 'xavier', 'keep'")

    def optimizer_specs(self) -> list[OptimizerSpec]:
        net_spec = OptimizerSpec(self.net.parameter_groups(), self.lrs)
        return [net_spec] + self.initializer_specs(self.init_lrs, "init_lrs")

    def extra_loss(self, labels: Tensor, start: State, free: State) -> tuple[Tensor | None, dict[str, Tensor]]:
        """The initializer's contrast loss Σ_l mean ½‖s^f_l − s*_l‖² (its φ-gradient is f_φ's update) and its sums."""
        if self.initializer is None:
            return None, {}
        init_loss = torch.stack(layer_contrast_losses(start, free)).sum()
        n = labels.shape[0]
        return init_loss, {"init_loss": init_loss.detach() * n, **self.initializer_sums(labels, start, free)}


class InitializerDistillation(_InitializerHooks, EnergySystem):
    """Trains only f_φ to predict the fixed points of a frozen, trained network (P or EB, fully connected).

    Per batch: s* = relax(T steps from zero, or from s^f with ``start: init``) of the frozen net; then
    φ_l ← φ_l − η_l ∇_{φ_l} mean ½‖s^f_l − s*_l‖² (layer-local unless ``local_loss: false``). Logged: ``train/loss``
    (the contrast loss), ``train/acc`` (of s*), ``train/init_acc``, ``train/dist_init/<layer>``; evaluation reports
    f_φ alone (``*/init_acc``) and s^f refined by ``eval_steps`` steps (``*/acc``).
    """

    def __init__(
        self,
        net: EnergyModel,
        checkpoint: str | None = None,
        initializer: FeedforwardInitializer | None = None,
        T: int = 20,
        start: Literal["zero", "init"] = "zero",
        lrs: Sequence[float] | None = None,
        local_loss: bool = True,
        eval_steps: int | None = None,
        optimizer: OptimizerCallable = sgd,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        """
        Args:
            net: the trained network, configured exactly as when it was trained (PrototypicalNet or
                EnergyBasedNet); it is frozen.
            checkpoint: a .ckpt of any ep_lightning system whose ``net.*`` weights are loaded into ``net``; null
                keeps ``net`` as given.
            initializer: f_φ (default: a new ``FeedforwardInitializer`` with the net's layer sizes).
            T: relaxation steps that give the target fixed point s*.
            start: relax the target from ``zero`` (the trained network's own free phase) or from ``init`` (s^f).
            lrs: per-layer learning rates of the initializer, input → output.
            local_loss: layer-local contrast loss (true) or back-propagation through f_φ (false).
            eval_steps: relaxation steps from s^f at validation/test/predict (default: T).
            optimizer: optimizer factory (default plain SGD).
            lr_scheduler: optional scheduler factory, stepped once per epoch.
        """
        super().__init__(net, T, eval_steps, optimizer, lr_scheduler)
        self.save_system_hyperparameters(net=net, initializer=initializer)
        self.local_loss = bool(local_loss)
        layers = check_fully_connected(net)
        if checkpoint is not None:
            load_energy_weights(net, checkpoint)
        else:
            rank_zero_warn(
                "InitializerDistillation: model.checkpoint is null, so the initializer learns the fixed points of the "
                "net's initial weights; set model.checkpoint to a trained network's .ckpt to distill it"
            )
        net.requires_grad_(False)
        if initializer is None:
            initializer = FeedforwardInitializer(layers)
            initializer.to(dtype=next(net.parameters()).dtype)
        self._attach_initializer(initializer, lam=0.0)
        if self.T < 1:
            raise ValueError(f"model.T={self.T} is invalid: the target relaxation needs at least 1 step")
        if start not in ("zero", "init"):
            raise ValueError(f"model.start={start!r} is not known; allowed: 'zero', 'init'")
        self.target_start = start
        if self.eval_steps < 0:
            raise ValueError(f"model.eval_steps={self.eval_steps} is invalid: use 0 or more steps (or null for T)")
        self.lrs = float_list(lrs)
        self.check_optimizer_settings()

    #: The learning rule: regress f_φ on the frozen net's fixed points (no EP or BPTT update of the net).
    algorithm = "distillation"

    def optimizer_specs(self) -> list[OptimizerSpec]:
        return self.initializer_specs(self.lrs, "lrs")

    def target_state(self, x: Tensor, trace: PhaseTrace | None = None) -> State:
        """s*: T steps of the frozen net's free phase from zero (``start: zero``) or from s^f, no graph."""
        with torch.no_grad():
            start = self.initial_state(x) if self.target_start == "init" else self.net.init_state(x)
            return self.phases(x, None, start, None, trace=trace).free

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, labels, _ = unpack_batch(batch)
        optimizer = self.optimizers()
        optimizer.zero_grad()
        target = self.target_state(x, self.take_trace_request())
        s_f = self.initializer(x, local=self.local_loss)
        loss = torch.stack(layer_contrast_losses(s_f, target)).sum()
        self.manual_backward(loss)
        if not self.check_training_step(batch_idx, {"free": target}):  # NaN/Inf: raises, or skips the batch
            return loss.detach()
        optimizer.step()
        self.update_epoch_sums(labels, target, loss, **self.initializer_sums(labels, s_f, target))
        return loss.detach()
