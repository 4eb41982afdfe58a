"""The learning rules as scalar losses whose gradient *is* the update.

Both go through ``LightningModule.manual_backward`` so that DDP all-reduces them like any gradient.
"""

from __future__ import annotations

from torch import Tensor

from ep_lightning.models.base import EnergyModel, State
from ep_lightning.models.nudging import NudgingPair

__all__ = ["NudgingPair", "bptt_loss", "ep_surrogate"]


def ep_surrogate(net: EnergyModel, x: Tensor, state_a: State, state_b: State, betas: NudgingPair) -> Tensor:
    """L_EP = mean_batch[Φ(x, s_{β_a}, θ) − Φ(x, s_{β_b}, θ)] / (β_b − β_a), states detached.

    −∇_θ L_EP = (∂Φ/∂θ(s_{β_b}) − ∂Φ/∂θ(s_{β_a})) / (β_b − β_a): the EP update Δθ for the nudging pair (β_a, β_b),
    the batch mean. One-sided (0, β) gives (1/β)(∂Φ/∂θ(s^β) − ∂Φ/∂θ(s*)); symmetric (−β, β) gives
    (1/2β)(∂Φ/∂θ(s^{+β}) − ∂Φ/∂θ(s^{−β})). For EB models (Φ = −E) the same with E's sign. A gradient-descent step on
    L_EP applies θ ← θ + η Δθ.
    """
    beta_a, beta_b = betas
    if beta_a == beta_b:
        raise ValueError(f"nudging pair {betas} is invalid: β_a and β_b must differ (the update divides by β_b − β_a)")
    state_a = tuple(s.detach() for s in state_a)
    state_b = tuple(s.detach() for s in state_b)
    # The factor 1/((β_b − β_a)·batch) enters the contrast (a power of 2 for one-sided β = 0.1, batch 20: exact).
    return net.ep_contrast(x, state_a, state_b, scale=1.0 / ((beta_b - beta_a) * x.shape[0]))


def bptt_loss(net: EnergyModel, state: State, target: Tensor) -> Tensor:
    """L = mean_batch ℓ(s^T, y), the loss BPTT back-propagates through the last steps of the relaxation."""
    return net.cost(state, target).mean()
