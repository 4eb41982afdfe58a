"""The nudging strength β as a float (one β for the batch) or a per-sample tensor (symmetric nudging relaxes the
+β and −β phases as one doubled batch, β = (+β, …, +β, −β, …, −β)).

Every model's ``step`` adds its nudge through :func:`add_nudge`, so both forms work everywhere. A step is nudged
exactly when it is given a target (``step(state, drive, beta, target)``); β itself is never a switch.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

#: β: a float for the whole batch, or a tensor with one entry per sample, shaped (batch,) or (batch, 1).
Beta = float | Tensor


class NudgingPair(NamedTuple):
    """(β_a, β_b), β_a ≠ β_b: the two nudging strengths whose states give the EP update
    (∂Φ/∂θ(s_{β_b}) − ∂Φ/∂θ(s_{β_a})) / (β_b − β_a). One-sided (0, β), random sign (0, ±β), symmetric (−β, +β);
    a β of 0 stands for s* itself (EP's s^0 is the free fixed point)."""

    a: float
    b: float


def add_nudge(h: Tensor, nudge: Tensor, coefficient: Beta) -> Tensor:
    """h + c·nudge, with c a float or a per-sample tensor broadcast over the units of the layer (any layer shape).

    A float keeps the fused ``torch.add(h, nudge, alpha=c)``; a tensor c of shape (batch,) or (batch, 1) is reshaped
    to (batch, 1, …, 1) so it also fits 4-d convolutional layers.
    """
    if isinstance(coefficient, Tensor):
        c = coefficient.reshape(coefficient.shape[0], *([1] * (h.dim() - 1))).to(h.dtype)
        return h + c * nudge
    return torch.add(h, nudge, alpha=coefficient)


def repeat_batch(value: Any, batch: int, times: int = 2) -> Any:
    """``value`` for the batch repeated ``times`` times along dim 0, without recomputing it: every tensor with at least
    2 dims whose first dim is ``batch`` (a per-sample term: W x, P(conv(x)), a state) is concatenated ``times`` times;
    everything else (1-d per-unit biases, floats, None) is shared, as are the fields a NamedTuple drive declares in
    its ``SHARED_FIELDS`` (weights; every NamedTuple drive declares it). Walks tuples, lists and NamedTuples.
    Equals ``model.drive(torch.cat([x] * times))`` for this package's models (tested) at a fraction of the cost.
    """
    if isinstance(value, Tensor):
        return torch.cat([value] * times) if value.dim() >= 2 and value.shape[0] == batch else value
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # the NamedTuple idiom; SHARED_FIELDS are not repeated
        shared = value.SHARED_FIELDS
        return type(value)(
            *(v if name in shared else repeat_batch(v, batch, times) for name, v in zip(value._fields, value))
        )
    if isinstance(value, (tuple, list)):
        return type(value)(repeat_batch(v, batch, times) for v in value)
    return value
