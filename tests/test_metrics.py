"""EpochTotals (per-epoch training loss/accuracy) against a direct computation over the whole epoch."""

from __future__ import annotations

import torch

from ep_lightning.metrics import EpochTotals


class SummingStrategy:
    """Stand-in for a 2-rank DDP strategy: ``reduce(sum)`` adds the other rank's totals."""

    def __init__(self, other: torch.Tensor) -> None:
        self.other = other

    def reduce(self, tensor: torch.Tensor, reduce_op: str = "mean") -> torch.Tensor:
        assert reduce_op == "sum"
        return tensor + self.other


def test_epoch_means_are_sample_weighted_over_unequal_batches() -> None:
    """Batches of 5, 3 and 1 samples: loss = Σ_i ℓ_i / N and accuracy = Σ correct / N over all 9 samples (not a mean
    of batch means, which would weight the 1-sample batch 3× too much)."""
    generator = torch.Generator().manual_seed(0)
    totals = EpochTotals()
    losses, hits = [], []
    for n in (5, 3, 1):
        per_sample = torch.rand(n, generator=generator, dtype=torch.float64)
        correct = torch.rand(n, generator=generator) > 0.5
        totals.update(per_sample.mean(), correct)
        losses.append(per_sample)
        hits.append(correct)
    means = totals.compute()
    assert means is not None
    # float64 sums of 9 numbers: exact to rounding.
    torch.testing.assert_close(means["loss"], torch.cat(losses).mean(), rtol=1e-12, atol=0)
    assert float(means["acc"]) == float(torch.cat(hits).double().mean())
    totals.reset()
    assert totals.compute() is None


def test_ranks_are_pooled_by_samples_not_by_rank_means() -> None:
    """Rank 0 saw 4 samples (all correct), rank 1 (simulated by the strategy) 1 sample (wrong): accuracy 4/5."""
    totals = EpochTotals()
    totals.update(torch.tensor(1.0, dtype=torch.float64), torch.ones(4, dtype=torch.bool))
    other_rank = torch.tensor([3.0, 0.0, 1.0], dtype=torch.float64)  # Σ loss·n = 3, Σ correct = 0, n = 1
    means = totals.compute(SummingStrategy(other_rank))
    assert means is not None
    assert float(means["acc"]) == 0.8
    assert float(means["loss"]) == (4.0 + 3.0) / 5
