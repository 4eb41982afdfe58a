"""Plumbing shared by layered fully-connected networks (layer sizes input → output, one ``nn.Linear`` per pair of
adjacent layers), and the algebra of nets whose Φ is bilinear in the layers: Φ = Σ_n u_{n+1} · (W_n u_n + b_n) + r(s).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ep_lightning.models.base import EnergyModel, State


def check_layers(layers: Sequence[int], field: str = "layers") -> list[int]:
    """``layers`` as a list of ints, or a ValueError naming ``field``: at least [n_in, n_out], all sizes positive."""
    sizes = [int(n) for n in layers]
    if len(sizes) < 2 or any(n <= 0 for n in sizes):
        raise ValueError(f"{field}={sizes} is invalid: give at least [n_in, n_out], every size a positive integer")
    return sizes


def make_synapses(layers: Sequence[int]) -> nn.ModuleList:
    """W_n, b_n for n = 0 … L−1: ``nn.Linear(layers[n], layers[n + 1])`` (PyTorch's default initialisation)."""
    return nn.ModuleList(nn.Linear(layers[n], layers[n + 1]) for n in range(len(layers) - 1))


class LayeredNet(EnergyModel):
    """An ``EnergyModel`` with layers ``[n_in, n_1, …, n_out]``: ``synapses[n]`` maps layer n to layer n + 1, the
    state holds the first ``n_dynamic`` layers above the input (zeros at the start of every free phase), and the
    parameters form one group (one learning rate) per synapse, input → output."""

    def __init__(self, layers: Sequence[int]) -> None:
        super().__init__()
        self.layers = check_layers(layers)
        self.num_classes = self.layers[-1]
        self.synapses = make_synapses(self.layers)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """``(layers[0],)``: every input is flattened to n_in values."""
        return (self.layers[0],)

    @property
    def n_dynamic(self) -> int:
        """Number of state layers (synapses inside Φ); all layers above the input unless a subclass says otherwise."""
        return len(self.layers) - 1

    def init_state_shapes(self) -> list[tuple[int, ...]]:
        return [(n,) for n in self.layers[1 : 1 + self.n_dynamic]]

    def init_state(self, x: Tensor) -> State:
        """s_n = 0 for every state layer, in the parameters' dtype and device."""
        w = self.synapses[0].weight
        sizes = self.layers[1 : 1 + self.n_dynamic]
        return tuple(torch.zeros(x.shape[0], n, dtype=w.dtype, device=w.device) for n in sizes)

    def parameter_groups(self) -> list[list[nn.Parameter]]:
        """One group per synapse (W_n, b_n), input → output."""
        return [list(synapse.parameters()) for synapse in self.synapses]


class BilinearForm(torch.autograd.Function):
    """f(θ_1, …, θ_m) = Σ_i ⟨θ_i, C_i⟩ for constant coefficients C_i (no graph), ∂f/∂θ_i = C_i: one autograd node
    instead of a multiply, a sum and an add per parameter and their backward nodes. Its backward scales each C_i by
    the incoming scalar gradient g in place and hands it over as parameter i's gradient (no new tensor, no copy: the
    saved reference is released; g = 1, the usual case, leaves C_i unchanged); backward runs once."""

    @staticmethod
    def forward(ctx: Any, coefficients: tuple[Tensor, ...], *params: Tensor) -> Tensor:
        ctx.save_for_backward(*coefficients)
        total = params[0].new_zeros(())
        for p, c in zip(params, coefficients):
            total = total + torch.dot(p.reshape(-1), c.reshape(-1))
        return total

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        # Autograd releases the saved coefficients once this returns (no retain_graph), before the gradients are
        # accumulated: each C_i, scaled in place, becomes the parameter's gradient without a copy.
        return (None, *(c.mul_(grad) for c in ctx.saved_tensors))


def bilinear_contrast(
    synapses: Sequence[nn.Linear], state_a: Sequence[Tensor], state_b: Sequence[Tensor], scale: float = 1.0
) -> Tensor:
    """scale · Σ_batch Σ_n [a_{n+1}·(W_n a_n + b_n) − b_{n+1}·(W_n b_n + b_n)] = Σ_n ⟨W_n, A_n⟩ + ⟨b_n, c_n⟩,

    for the layers a = s_a and b = s_b of two states (e.g. s* and s^β), with A_n = scale · (a_{n+1}ᵀ a_n − b_{n+1}ᵀ b_n)
    and c_n = scale · Σ_batch (a_{n+1} − b_{n+1}) computed without graph (the scale multiplies the layer above before
    the product). ``state_a``/``state_b`` hold u_0 … u_L (u_0, the input term, is shared). One outer product per
    layer instead of two forward and two backward products, and one ``BilinearForm`` node for all parameters: same
    value (up to summation order), same θ-gradient (the EP update; bit for bit when the scale is a power of 2, else up
    to the rounding of where the scale is applied).
    """
    params: list[Tensor] = []
    coefficients: list[Tensor] = []
    with torch.no_grad():
        for n, synapse in enumerate(synapses):
            below_a, below_b = state_a[n].flatten(1), state_b[n].flatten(1)
            delta_above = state_a[n + 1] - state_b[n + 1]
            if scale != 1.0:
                delta_above.mul_(scale)
            if below_a is below_b:
                outer = delta_above.T @ below_a
            else:
                above = (
                    torch.cat([state_a[n + 1] * scale, state_b[n + 1] * -scale])
                    if scale != 1.0
                    else torch.cat([state_a[n + 1], -state_b[n + 1]])
                )
                outer = above.T @ torch.cat([below_a, below_b])
            params.append(synapse.weight)
            coefficients.append(outer)
            if synapse.bias is not None:
                params.append(synapse.bias)
                coefficients.append(delta_above.sum(dim=0))
    return BilinearForm.apply(tuple(coefficients), *params)
