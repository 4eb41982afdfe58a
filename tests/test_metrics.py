"""EpochMeans (per-epoch training metrics) against a direct computation over the whole epoch."""

from __future__ import annotations

import pytest
import torch

from ep_lightning.systems.base import EpochMeans


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
    means = EpochMeans()
    losses, hits = [], []
    for n in (5, 3, 1):
        per_sample = torch.rand(n, generator=generator, dtype=torch.float64)
        correct = torch.rand(n, generator=generator) > 0.5
        means.update(n, loss=per_sample.sum(), acc=correct.sum())
        losses.append(per_sample)
        hits.append(correct)
    result = means.compute()
    # float64 sums of 9 numbers: equal to rounding.
    torch.testing.assert_close(result["loss"], torch.cat(losses).mean(), rtol=1e-12, atol=0)
    assert float(result["acc"]) == float(torch.cat(hits).double().mean())
    means.reset()
    assert means.compute() == {}


def test_ranks_are_pooled_by_samples_not_by_rank_means() -> None:
    """Rank 0 saw 4 samples (all correct, loss 1 each), rank 1 (simulated) 1 sample (wrong, loss 3): accuracy 4/5
    and loss 7/5, where a mean of rank means would give 1/2 and 2."""
    means = EpochMeans()
    means.update(4, loss=torch.tensor(4.0, dtype=torch.float64), acc=torch.tensor(4))
    other_rank = torch.tensor([3.0, 0.0, 1.0], dtype=torch.float64)  # Σ loss, Σ correct, count
    result = means.compute(SummingStrategy(other_rank))
    assert float(result["acc"]) == 0.8
    assert float(result["loss"]) == 7.0 / 5


def test_changing_names_within_an_epoch_is_an_error() -> None:
    means = EpochMeans()
    means.update(2, loss=torch.tensor(1.0))
    with pytest.raises(ValueError, match="accumulates"):
        means.update(2, acc=torch.tensor(1))


def test_vector_sums_and_a_checkpointed_epoch_continue_as_one_epoch() -> None:
    """Per-class prediction counts (a vector sum) next to scalars; the sums saved after 2 of 4 batches and restored
    into a fresh EpochMeans give, after the remaining 2 batches, exactly the means of the uninterrupted epoch."""
    generator = torch.Generator().manual_seed(1)
    batches = []
    for n in (4, 3, 5, 2):
        predicted = torch.randint(0, 3, (n,), generator=generator)
        counts = torch.zeros(3).scatter_add_(0, predicted, torch.ones(n))
        batches.append((n, torch.rand(n, generator=generator).sum(), (predicted == 0).sum(), counts))
    whole, first, second = EpochMeans(), EpochMeans(), EpochMeans()
    for i, (n, loss, acc, counts) in enumerate(batches):
        whole.update(n, loss=loss, acc=acc, predicted=counts)
        if i < 2:
            first.update(n, loss=loss, acc=acc, predicted=counts)
    saved = first.state_dict()
    second.load_state_dict(saved)
    for n, loss, acc, counts in batches[2:]:
        second.update(n, loss=loss, acc=acc, predicted=counts)
    expected, got = whole.compute(), second.compute()
    assert got.keys() == expected.keys() == {"loss", "acc", "predicted"}
    assert got["predicted"].shape == (3,)
    total = torch.stack([b[3] for b in batches]).sum(0)
    # the shares of predictions per class: counts / 14 samples (float32 sums of small integers: exact)
    assert torch.equal(expected["predicted"], total / 14)
    for key in expected:  # same sums added in the same order: bit for bit
        assert torch.equal(got[key], expected[key]), key
    empty = EpochMeans()
    empty.load_state_dict({})
    assert empty.compute() == {} and EpochMeans().state_dict() == {}
