"""Per-epoch training metrics accumulated on the device with one in-place add per step."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class EpochMeans:
    """Sample-weighted epoch means of named quantities: mean_k = Σ_batches sum_k / Σ_batches count.

    ``update(count, loss=Σ_i ℓ_i, correct=Σ_i [ŷ_i = y_i], …)`` adds one batch's sums with one stack and one in-place
    add, and no host synchronisation (cheaper than a ``self.log`` or a torchmetrics update per step). ``compute``
    sums the totals over DDP ranks (``strategy.reduce``) and divides by the total count: exact means over every
    sample of every rank, not a mean of rank means. The names must be the same at every update of an epoch.
    """

    def __init__(self) -> None:
        self.names: tuple[str, ...] = ()
        self.sums: Tensor | None = None
        self.count = 0

    def update(self, count: int, **sums: Tensor) -> None:
        """Add one batch of ``count`` samples and its per-quantity sums (scalar tensors, any dtype)."""
        names = tuple(sums)
        if self.sums is not None and names != self.names:
            raise ValueError(f"EpochMeans.update got {names}, but this epoch accumulates {self.names}")
        first = next(iter(sums.values()))
        dtype = first.dtype if first.is_floating_point() else torch.get_default_dtype()
        step = torch.stack([s.detach().to(dtype) for s in sums.values()])
        self.names, self.sums = names, step if self.sums is None else self.sums.add_(step)
        self.count += int(count)

    def compute(self, strategy: Any | None = None) -> dict[str, Tensor]:
        """{name: Σ sums / Σ count}, summed over ranks through ``strategy.reduce``; {} before any update."""
        if self.sums is None:
            return {}
        totals = torch.cat((self.sums, self.sums.new_tensor([float(self.count)])))
        if strategy is not None:
            totals = strategy.reduce(totals, reduce_op="sum")
        return {name: totals[i] / totals[-1] for i, name in enumerate(self.names)}

    def reset(self) -> None:
        """Start a new epoch."""
        self.names, self.sums, self.count = (), None, 0
