"""Softmax read-out outside the dynamics with a cross-entropy cost (Laborieux et al. 2021, §2.3).

With ``readout: ce`` the last synapse of a network is not part of the dynamical system: the state ends at the last
hidden layer s_L, and

    logits z = W_out s_L + b_out,            ℓ(s, y) = −Σ_k y_k log softmax(z)_k,
    −∂ℓ/∂s_L = W_outᵀ (y − softmax(z) Σ_k y_k)      (= W_outᵀ(y − p) for one-hot y),

the nudge of s_L, which enters the nudged dynamics *inside* σ: s_L ← σ(∂Φ/∂s_L + β(−∂ℓ/∂s_L)), i.e.
s ← σ(∂Φ^β/∂s) with Φ^β = Φ − βℓ (as in the authors' code).

The read-out parameters θ_out = (W_out, b_out) are learned by one of two estimators (``readout_gradient``), both
through ``readout_loss``, whose gradient joins the EP update:

- ``free`` (default): ∂ℓ/∂θ_out at the free fixed point s*, the exact gradient of the loss of the prediction the
  network makes, with no β bias; it equals the read-out part of the BPTT gradient.
- ``nudged``: the EP finite difference of Φ^β = Φ − βℓ over the nudging pair (β_a, s_a), (β_b, s_b):
  [β_b ∂ℓ/∂θ_out(s_b) − β_a ∂ℓ/∂θ_out(s_a)] / (β_b − β_a), i.e. ∂ℓ/∂θ_out(s^β) for one-sided (0, β) and the mean
  of ∂ℓ/∂θ_out at s^{+β} and s^{−β} for symmetric (−β, +β). This is what Laborieux et al.'s code computes
  (``P_CNN.compute_syn_grads`` differentiates Φ^β at the nudged states); it differs from ``free`` by O(β)
  (one-sided) or O(β²) (symmetric).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from ep_lightning.models.base import State

ReadoutName = Literal["mse", "ce"]
READOUTS: tuple[str, ...] = ("mse", "ce")
ReadoutGradient = Literal["free", "nudged"]
READOUT_GRADIENTS: tuple[str, ...] = ("free", "nudged")


def check_readout(readout: str) -> str:
    """Return ``readout`` or raise a ValueError naming the field, the value and the allowed values."""
    if readout not in READOUTS:
        raise ValueError(
            f"readout={readout!r} is not known; allowed: 'mse' (output layer in the dynamics, ½‖s_out − y‖², the "
            f"2019 paper) or 'ce' (softmax read-out outside the dynamics, cross-entropy, Laborieux et al. 2021)"
        )
    return readout


def check_readout_gradient(readout_gradient: str) -> str:
    """Return ``readout_gradient`` or raise a ValueError naming the field, the value and the allowed values."""
    if readout_gradient not in READOUT_GRADIENTS:
        raise ValueError(
            f"readout_gradient={readout_gradient!r} is not known; allowed: 'free' (cross-entropy gradient of the "
            f"read-out at s*) or 'nudged' (EP difference of Φ − βℓ at the nudged states, Laborieux et al.'s code)"
        )
    return readout_gradient


class SoftmaxReadoutMixin:
    """``output``/``cost``/``nudge``/``readout_loss`` for models with a ``readout`` option ('mse' or 'ce').

    Put it before ``EnergyModel`` in the bases; the model provides ``readout_layer()`` (the ``nn.Linear`` W_out, b_out)
    and keeps its last dynamical layer in ``state[-1]``. With ``readout == 'mse'`` every method defers to
    ``EnergyModel`` (the output layer is ``state[-1]``).
    """

    readout: str
    #: Estimator of the read-out's update, ``free`` or ``nudged`` (module docstring); models may set it per instance.
    readout_gradient: str = "free"

    def readout_layer(self) -> nn.Linear:
        raise NotImplementedError

    def output(self, state: State) -> Tensor:
        """Logits z = W_out s_L + b_out for ``ce``; the output layer's state for ``mse``."""
        if self.readout != "ce":
            return super().output(state)  # type: ignore[misc]
        layer = self.readout_layer()
        return F.linear(state[-1].flatten(1), layer.weight, layer.bias)

    def cost(self, state: State, target: Tensor) -> Tensor:
        """ℓ = −Σ_k y_k log softmax(z)_k per sample for ``ce``; c‖s_out − y‖² for ``mse``."""
        if self.readout != "ce":
            return super().cost(state, target)  # type: ignore[misc]
        return -(target * F.log_softmax(self.output(state), dim=1)).sum(dim=1)

    def nudge(self, state: State, target: Tensor) -> Tensor:
        """−∂ℓ/∂s_L = W_outᵀ(y − softmax(z)Σ_k y_k), shaped like s_L, for ``ce``; 2c(y − s_out) for ``mse``."""
        if self.readout != "ce":
            return super().nudge(state, target)  # type: ignore[misc]
        probs = F.softmax(self.output(state), dim=1)
        error = target - probs * target.sum(dim=1, keepdim=True)
        return (error @ self.readout_layer().weight).view_as(state[-1])

    def readout_loss(self, state: State, target: Tensor, nudged: Sequence[tuple[float, State]] = ()) -> Tensor | None:
        """The loss whose gradient is the read-out's update (only W_out, b_out get one; states detached):

        ``free``: mean_batch ℓ(s*, y) at ``state`` (s*); ``nudged``: [β_b mean ℓ(s_b, y) − β_a mean ℓ(s_a, y)] /
        (β_b − β_a) over ``nudged`` = ((β_a, s_a), (β_b, s_b)), the nudging pair (a state at β = 0 is s*).
        ``None`` for ``mse``, where the output layer's weights are learned by the EP contrast."""
        if self.readout != "ce":
            return None
        if self.readout_gradient == "free":
            return self.cost(tuple(s.detach() for s in state), target).mean()
        if len(nudged) != 2:
            raise ValueError(
                "readout_gradient='nudged' needs the nudging pair ((β_a, s_a), (β_b, s_b)) in readout_loss(…, nudged=…)"
            )
        (beta_a, state_a), (beta_b, state_b) = nudged
        total = beta_b * self.cost(tuple(s.detach() for s in state_b), target).mean()
        if beta_a != 0.0:
            total = total - beta_a * self.cost(tuple(s.detach() for s in state_a), target).mean()
        return total / (beta_b - beta_a)
