"""Shared algebra of layered networks whose Φ is bilinear in the layers: Φ = Σ_n u_{n+1} · (W_n u_n + b_n) + r(s)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def bilinear_contrast(synapses: Sequence[nn.Linear], free: Sequence[Tensor], nudged: Sequence[Tensor]) -> Tensor:
    """Σ_batch Σ_n [u*_{n+1}·(W_n u*_n + b_n) − u^β_{n+1}·(W_n u^β_n + b_n)] = Σ_n ⟨W_n, A_n⟩ + ⟨b_n, a_n⟩,

    with A_n = u*_{n+1}ᵀ u*_n − u^βᵀ_{n+1} u^β_n and a_n = Σ_batch (u*_{n+1} − u^β_{n+1}) computed without graph.
    ``free``/``nudged`` hold u_0 … u_L (u_0, the input term, is shared). One outer product per layer instead of
    two forward and two backward products: same value, same θ-gradient (the EP update).
    """
    total = free[0].new_zeros(())
    for n, synapse in enumerate(synapses):
        with torch.no_grad():
            below_free, below_nudged = free[n].flatten(1), nudged[n].flatten(1)
            delta_above = free[n + 1] - nudged[n + 1]
            if below_free is below_nudged:
                outer = delta_above.T @ below_free
            else:
                outer = torch.cat([free[n + 1], -nudged[n + 1]]).T @ torch.cat([below_free, below_nudged])
            bias_term = delta_above.sum(dim=0)
        total = total + (synapse.weight * outer).sum()
        if synapse.bias is not None:
            total = total + (synapse.bias * bias_term).sum()
    return total
