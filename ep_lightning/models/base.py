"""The contract every convergent network fulfils (what a network *is*, independent of how it learns).

Conventions, shared by all models:

- **Layer order is input → output.** ``state`` is a tuple of tensors ``(s_1, …, s_L)`` with ``s_1`` next to the
  input and ``state[-1]`` the output layer. The papers and the authors' code index from the output (their ``s_0``
  is our ``state[-1]``); translate at the boundary, never inside the code.
- **Φ is returned for both settings.** For prototypical (P) models ``phi`` is the primitive function Φ(x, s, θ);
  for energy-based (EB) models it is −E(x, s, θ). The EP update is then always
  Δθ = (1/β)(∂Φ/∂θ(s^β) − ∂Φ/∂θ(s*)), applied as the gradient of the surrogate (Φ(s*) − Φ(s^β))/β.
- ``step`` computes the transition in closed form (no autograd inside), so it runs under ``torch.no_grad`` for EP
  and builds a graph for BPTT with the same code. A step is nudged exactly when it is given a ``target``.
- The cost is ℓ(s, y) = ½‖s_out − y‖² per sample (``cost_scale`` c = ½); nudging adds β·(−∂ℓ/∂s_out) = β(y − s_out)
  to the output update (times ε for EB models, see ``nudge_scale``).

Besides the dynamics, a model declares the facts that systems, monitors and checks read (never probe):
``input_shape``, ``num_classes``, ``activation_name`` / ``activation_bounds``, ``step_sizes``, ``readout``,
``supports_anchor`` and ``init_args`` (the constructor arguments that rebuild the same network, written into
checkpoints).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ep_lightning.models.activations import ACTIVATION_BOUNDS

State = tuple[Tensor, ...]


class EnergyModel(nn.Module, ABC):
    """A convergent recurrent network with a scalar function Φ (or energy E) and its one-step transition."""

    #: Number of output units (classes).
    num_classes: int
    #: Factor with which β enters the step relative to the cost gradient: 1 for P models (s ← σ(…) + β(y − s)),
    #: ε for EB models (s ← s − ε∂E/∂s − εβ∂ℓ/∂s). EP *neural* updates (s^β_{t+1} − s^β_t)/β must be divided by it
    #: to compare with BPTT gradients; weight updates need no correction.
    nudge_scale: float = 1.0
    #: c in the cost ℓ = c‖s_out − y‖² (½ in Ernoult et al.; 1 in O'Connor et al.'s Initialized EP).
    cost_scale: float = 0.5
    #: Config name of the activation σ (or ρ) of the state layers (``models/activations.py``).
    activation_name: str
    #: ``mse``: the output layer is a state layer; ``ce``: a softmax read-out outside the dynamics (``readout.py``).
    readout: str = "mse"
    #: Whether ``drive(x, anchor=s^f, anchor_strength=λ)`` adds Initialized EP's anchor (λ/2)‖s − s^f‖² to E.
    supports_anchor: bool = False

    # --- declared facts -----------------------------------------------------------------------------------------
    @property
    @abstractmethod
    def input_shape(self) -> tuple[int, ...]:
        """Per-sample input shape: ``(n_in,)`` for layered nets (any input is flattened to n_in values), ``(C, H, W)``
        for convolutional ones."""

    @property
    @abstractmethod
    def init_args(self) -> dict[str, Any]:
        """The constructor arguments of this network (plain values): ``type(net)(**net.init_args)`` builds the same
        architecture. Checkpoints carry them as the network's description."""

    @property
    def activation_bounds(self) -> tuple[float, float] | None:
        """(lower, upper) bounds of the state layers' activation range (saturation is measured against them); None
        for an unbounded activation."""
        return ACTIVATION_BOUNDS.get(self.activation_name)

    @property
    def step_sizes(self) -> dict[str, float]:
        """The step-size hyperparameters of the dynamics by constructor name (``dt`` of P nets, ``eps`` of EB nets;
        none for nets with a fixed step): what to lower when the relaxation diverges."""
        return {}

    @abstractmethod
    def init_state(self, x: Tensor) -> State:
        """The state every free phase starts from (zeros unless the model says otherwise)."""

    @abstractmethod
    def drive(self, x: Tensor) -> Any:
        """The input term of the dynamics, constant during relaxation: compute it once per batch."""

    @abstractmethod
    def step(self, state: State, drive: Any, beta: float | Tensor = 0.0, target: Tensor | None = None) -> State:
        """One synchronous update of all layers; with a ``target`` the output is nudged toward it with strength β
        (a float, or one value per sample)."""

    @abstractmethod
    def phi(self, x: Tensor, state: State) -> Tensor:
        """Per-sample Φ(x, s, θ) for P models, −E(x, s, θ) for EB models; shape (batch,)."""

    def ep_contrast(self, x: Tensor, state_a: State, state_b: State, scale: float = 1.0) -> Tensor:
        """scale · Σ_batch [Φ(x, s_a, θ) − Φ(x, s_b, θ)] with the states treated as constants (s_a, s_b: the states
        of a nudging pair, e.g. s* and s^β); with scale = 1/(β_b − β_a) its θ-gradient is the negated EP update.
        Models whose Φ is linear in θ override this with a cheaper form that has the same value and gradient (tested
        against this default)."""
        total = (self.phi(x, state_a) - self.phi(x, state_b)).sum()
        return total if scale == 1.0 else total * scale

    @abstractmethod
    def parameter_groups(self) -> list[list[nn.Parameter]]:
        """Parameters grouped by layer, input → output, one group per per-layer learning rate."""

    def output(self, state: State) -> Tensor:
        """The network's prediction: the output layer's state."""
        return state[-1]

    def cost(self, state: State, target: Tensor) -> Tensor:
        """ℓ(s, y) = c‖s_out − y‖² per sample (c = ``cost_scale``, ½ by default); shape (batch,)."""
        return self.cost_scale * (self.output(state) - target).pow(2).flatten(1).sum(dim=1)

    def nudge(self, state: State, target: Tensor) -> Tensor:
        """−∂ℓ/∂s_out = 2c(y − s_out): the direction the output is pulled in the nudged phase."""
        diff = target - self.output(state)
        return diff if self.cost_scale == 0.5 else (2.0 * self.cost_scale) * diff

    def readout_loss(self, state: State, target: Tensor, nudged: Sequence[tuple[float, State]] = ()) -> Tensor | None:
        """Extra loss of a read-out outside the dynamics whose θ-gradient joins the update (e.g. the softmax read-out's
        cross-entropy at s* = ``state``, or at the nudged states ``nudged`` = ((β_a, s_a), (β_b, s_b)));
        ``None`` when the model has none (every θ is learned by the EP contrast or BPTT)."""
        return None

    def encode_target(self, labels: Tensor, like: Tensor) -> Tensor:
        """One-hot targets y in the dtype and device of ``like``."""
        return F.one_hot(labels, self.num_classes).to(dtype=like.dtype, device=like.device)

    def predict(self, state: State) -> Tensor:
        """Predicted class per sample: argmax of the output layer."""
        return self.output(state).argmax(dim=1)

    def state_names(self) -> list[str]:
        """Display names of the state layers, input → output (``layer1`` … ``output``)."""
        n = len(self.init_state_shapes())
        return [f"layer{i + 1}" for i in range(n - 1)] + ["output"]

    @abstractmethod
    def init_state_shapes(self) -> list[tuple[int, ...]]:
        """Per-sample shape of each state layer, input → output."""

    def forward(self, x: Tensor, steps: int, start: State | None = None, **drive_options: Any) -> Tensor:
        """Inference: relax the free phase ``steps`` steps from ``start`` (default ``init_state(x)``) with the drive
        ``drive(x, **drive_options)``, without graph, and return the output (``output``)."""
        from ep_lightning.relaxation import relax

        with torch.no_grad():
            start = self.init_state(x) if start is None else start
            state = relax(self, self.drive(x, **drive_options), start, steps)
        return self.output(state)
