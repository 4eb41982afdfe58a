"""Toy models on which the GDU theorem holds exactly: the transition is F = ∂Φ/∂s (Ernoult et al. 2019, §4.2).

- ``linear``: ``PrototypicalNet(layers, activation="identity")``. With σ = id and dt = 1 the P transition
  h ← ∂Φ/∂h is exactly the gradient of Φ = Σ_n h_{n+1}·(W_n h_n + b_n). The recurrent weights W_1 … W_{L−1}
  are rescaled to spectral norm ``gain`` so that the linear dynamics contract (the update matrix is symmetric
  block-tridiagonal with blocks W_n, so its spectral radius is below 2·gain, below gain for one hidden layer).
- ``energy_tanh``: ``EnergyBasedNet(layers, activation="tanh", eps, clamp=False)``, the paper's toy energy-based
  model. s ← s − ε∂E/∂s = ∂Φ_ε/∂s with Φ_ε = ½‖s‖² − εE, and the nudge ε·β(y − s_out) is β times the gradient of
  −εℓ: Δ^EP_s must be divided by ``nudge_scale`` = ε, weight updates need no correction.

Default sizes 5 → 50 → 10, random input and a random one-hot target, batch 1 (``toy_batch``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from ep_lightning.models.base import EnergyModel
from ep_lightning.models.energy import EnergyBasedNet
from ep_lightning.models.prototypical import PrototypicalNet

ToyKind = Literal["linear", "energy_tanh"]
TOY_KINDS: tuple[str, ...] = ("linear", "energy_tanh")


def toy_model(
    kind: ToyKind = "linear",
    layers: Sequence[int] = (5, 50, 10),
    gain: float = 0.4,
    eps: float = 0.2,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> EnergyModel:
    """A network whose transition is exactly ∂Φ/∂s (see the module docstring), in ``dtype`` (float64 by default).

    Args:
        kind: ``linear`` (prototypical, σ = identity) or ``energy_tanh`` (energy-based, tanh, no clamp).
        layers: sizes input → output.
        gain: spectral norm given to every recurrent weight matrix of the ``linear`` model (contraction: < 0.5).
        eps: Euler step ε of the ``energy_tanh`` model.
        seed: seed of the weight initialisation.
        dtype: parameter dtype.
    """
    if kind not in TOY_KINDS:
        raise ValueError(f"kind={kind!r} is not known; allowed: {', '.join(TOY_KINDS)}")
    if not 0.0 < gain:
        raise ValueError(f"gain={gain} is invalid: use a positive spectral norm (< 0.5 for a contraction)")
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        if kind == "linear":
            model: EnergyModel = PrototypicalNet(layers=layers, activation="identity", dt=1.0)
            with torch.no_grad():
                for synapse in model.synapses[1:]:
                    synapse.weight.mul_(gain / torch.linalg.matrix_norm(synapse.weight, ord=2))
        else:
            model = EnergyBasedNet(layers=layers, activation="tanh", eps=eps, clamp=False)
    finally:
        torch.random.set_rng_state(generator_state)
    return model.to(dtype)


def toy_batch(model: EnergyModel, batch_size: int = 1, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Random input x ~ N(0, 1) of the model's input size and random class labels (one-hot via ``encode_target``)."""
    generator = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    x = torch.randn(batch_size, model.layers[0], generator=generator, dtype=dtype)
    labels = torch.randint(0, model.num_classes, (batch_size,), generator=generator)
    return x, labels
