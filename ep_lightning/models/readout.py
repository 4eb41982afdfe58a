"""Softmax read-out outside the dynamics with a cross-entropy cost (Laborieux et al. 2021, §2.3).

With ``readout: ce`` the last synapse of a network is not part of the dynamical system: the state ends at the last
hidden layer s_L, and

    logits z = W_out s_L + b_out,            ℓ(s, y) = −Σ_k y_k log softmax(z)_k,
    −∂ℓ/∂s_L = W_outᵀ (y − softmax(z) Σ_k y_k)      (= W_outᵀ(y − p) for one-hot y),

the nudge of s_L, which enters the nudged dynamics *inside* σ: s_L ← σ(∂Φ/∂s_L + β(−∂ℓ/∂s_L)), i.e.
s ← σ(∂Φ^β/∂s) with Φ^β = Φ − βℓ (as in the authors' code). The read-out parameters get the cross-entropy gradient
at the free fixed point s*, ∂ℓ/∂(W_out, b_out)(s*) (``readout_loss``): that is the exact gradient of the loss of
the prediction the network makes (at s*), with no β bias, and it equals the read-out part of the BPTT gradient.
(The authors' code differentiates Φ^β at the nudged state(s) instead, which is the same up to O(β), or O(β²) for
symmetric nudging.)
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from ep_lightning.models.base import State

ReadoutName = Literal["mse", "ce"]
READOUTS: tuple[str, ...] = ("mse", "ce")


def check_readout(readout: str) -> str:
    """Return ``readout`` or raise a ValueError naming the field, the value and the allowed values."""
    if readout not in READOUTS:
        raise ValueError(
            f"readout={readout!r} is not known; allowed: 'mse' (output layer in the dynamics, ½‖s_out − y‖², the "
            f"2019 paper) or 'ce' (softmax read-out outside the dynamics, cross-entropy, Laborieux et al. 2021)"
        )
    return readout


class SoftmaxReadoutMixin:
    """``output``/``cost``/``nudge``/``readout_loss`` for models with a ``readout`` option ('mse' or 'ce').

    Put it before ``EnergyModel`` in the bases; the model provides ``readout_layer()`` (the ``nn.Linear`` W_out, b_out)
    and keeps its last dynamical layer in ``state[-1]``. With ``readout == 'mse'`` every method defers to
    ``EnergyModel`` (the output layer is ``state[-1]``).
    """

    readout: str

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

    def readout_loss(self, state: State, target: Tensor) -> Tensor | None:
        """mean_batch ℓ(s, y) with the state detached: its gradient is the read-out's update (only W_out, b_out get
        one). ``None`` for ``mse``, where the output layer's weights are learned by the EP contrast."""
        if self.readout != "ce":
            return None
        return self.cost(tuple(s.detach() for s in state), target).mean()
