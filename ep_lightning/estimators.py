"""The two learning rules as scalar losses whose gradient *is* the update.

Both go through ``LightningModule.manual_backward`` so that DDP all-reduces them like any gradient.
"""

from __future__ import annotations

from torch import Tensor

from ep_lightning.models.base import EnergyModel, State


def ep_surrogate(model: EnergyModel, x: Tensor, free: State, nudged: State, beta: float) -> Tensor:
    """EP surrogate L_EP = mean_batch[Φ(x, s*, θ) − Φ(x, s^β, θ)] / β, states detached.

    Its gradient is −Δθ with Δθ = (1/β)(∂Φ/∂θ(s^β) − ∂Φ/∂θ(s*)), the EP update (batch mean); for EB models
    (Φ = −E) that is Δθ = (1/β)(∂E/∂θ(s*) − ∂E/∂θ(s^β)). A gradient-descent step on L_EP applies θ ← θ + η Δθ.
    """
    free = tuple(s.detach() for s in free)
    nudged = tuple(s.detach() for s in nudged)
    return model.ep_contrast(x, free, nudged) / (beta * x.shape[0])


def bptt_loss(model: EnergyModel, state: State, target: Tensor) -> Tensor:
    """L = mean_batch ½‖s_out^T − y‖², the loss BPTT back-propagates through the last K steps."""
    return model.cost(state, target).mean()
