"""The contract every convergent network fulfils (what a network *is*, independent of how it learns).

Conventions, shared by all models:

- **Layer order is input → output.** ``state`` is a tuple of tensors ``(s_1, …, s_L)`` with ``s_1`` next to the
  input and ``state[-1]`` the output layer. The papers and the authors' code index from the output (their ``s_0``
  is our ``state[-1]``); translate at the boundary, never inside the code.
- **Φ is returned for both settings.** For prototypical (P) models ``phi`` is the primitive function Φ(x, s, θ);
  for energy-based (EB) models it is −E(x, s, θ). The EP update is then always
  Δθ = (1/β)(∂Φ/∂θ(s^β) − ∂Φ/∂θ(s*)), applied as the gradient of the surrogate (Φ(s*) − Φ(s^β))/β.
- ``step`` computes the transition in closed form (no autograd inside), so it runs under ``torch.no_grad`` for EP
  and builds a graph for BPTT with the same code.
- The cost is ℓ(s, y) = ½‖s_out − y‖² per sample (``cost_scale`` c = ½); nudging adds β·(−∂ℓ/∂s_out) = β(y − s_out)
  to the output update (times ε for EB models, see ``nudge_scale``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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

    @abstractmethod
    def init_state(self, x: Tensor) -> State:
        """The state every free phase starts from (zeros unless the model says otherwise)."""

    @abstractmethod
    def drive(self, x: Tensor) -> Any:
        """The input term of the dynamics, constant during relaxation: compute it once per batch."""

    @abstractmethod
    def step(self, state: State, drive: Any, beta: float = 0.0, target: Tensor | None = None) -> State:
        """One synchronous update of all layers; with β ≠ 0 the output is nudged toward ``target``."""

    @abstractmethod
    def phi(self, x: Tensor, state: State) -> Tensor:
        """Per-sample Φ(x, s, θ) for P models, −E(x, s, θ) for EB models; shape (batch,)."""

    def ep_contrast(self, x: Tensor, free: State, nudged: State, scale: float = 1.0) -> Tensor:
        """scale · Σ_batch [Φ(x, s*, θ) − Φ(x, s^β, θ)] with states treated as constants; its θ-gradient is the
        (negated) EP update times the scale. Models whose Φ is linear in θ override this with a cheaper form that
        has the same value and gradient (tested against this default)."""
        total = (self.phi(x, free) - self.phi(x, nudged)).sum()
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

    def forward(self, x: Tensor, steps: int) -> Tensor:
        """Inference: relax the free phase ``steps`` steps from ``init_state`` and return the output layer."""
        from ep_lightning.relaxation import relax

        with torch.no_grad():
            state = relax(self, self.drive(x), self.init_state(x), steps)
        return self.output(state)
