"""The training order: a seeded permutation per epoch, batches as slices of it, and exact mid-epoch resume, in one
process and under DDP.

Order of epoch e: ``randperm(n)`` from a generator seeded with ``seed + e`` — the order of Lightning's
``DistributedSampler`` — so that N processes with batch B/N see the same global batches as one process with batch
B. A checkpoint holds (seed, epoch, samples done); a resumed run continues with exactly the rest of that epoch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sized
from typing import Any, Protocol

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler, Sampler


def epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool = True) -> Tensor:
    """``randperm(n)`` from a generator seeded with ``seed + epoch`` (the file's order without ``shuffle``)."""
    if not shuffle:
        return torch.arange(n)
    generator = torch.Generator().manual_seed((int(seed) + int(epoch)) % 2**63)
    return torch.randperm(n, generator=generator)


class ResumableSampler(Protocol):
    """What :class:`ResumableDataLoader` needs of its sampler."""

    seed: int
    epoch: int

    def __len__(self) -> int: ...

    def state_dict(self, samples_done: int) -> dict[str, int]: ...

    def load_state_dict(self, state: dict[str, int]) -> None: ...


def _resume_position(state: dict[str, int], num_replicas: int, length: int) -> int:
    """Samples of the saved epoch this process skips: the saved per-process count, converted when the checkpoint
    was written by another number of processes (then the continuation is approximate, and said so)."""
    saved = int(state.get("num_replicas", 1))
    done = int(state["samples_done"])
    if saved != num_replicas:
        global_done = done * saved
        rank_zero_warn(
            f"resuming a checkpoint written by {saved} process(es) with {num_replicas}: the rest of epoch "
            f"{state['epoch']} starts after sample {global_done} of its order, but the batches differ from those of "
            f"the original run (exact resume needs the same number of processes)"
        )
        done = global_done // num_replicas
    return min(done, length)


class EpochShuffleSampler(Sampler[int]):
    """Shuffles ``range(n)`` with a permutation fixed by (``seed``, epoch) and can resume in the middle of an epoch.

    Lightning calls ``set_epoch(e)`` before every epoch. ``state_dict``/``load_state_dict`` carry the seed, the
    epoch and the number of samples already consumed, so a resumed run sees exactly the rest of the same epoch
    (with a plain RandomSampler it would start a fresh random permutation).
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True) -> None:
        self.n, self.seed, self.shuffle = int(n), int(seed), bool(shuffle)
        self.epoch = 0
        self.start = 0  # samples of the current epoch to skip on the next __iter__ (set by load_state_dict)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.start = int(epoch), 0

    def permutation(self) -> Tensor:
        return epoch_permutation(self.n, self.seed, self.epoch, self.shuffle)

    def remaining(self) -> Tensor:
        """The current epoch's permutation from the resume position on (the position is then reset to 0)."""
        start, self.start = self.start, 0
        return self.permutation()[start:]

    def __iter__(self) -> Iterator[int]:
        yield from self.remaining().tolist()

    def __len__(self) -> int:
        return self.n

    def state_dict(self, samples_done: int) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "samples_done": int(samples_done)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed, self.epoch = int(state["seed"]), int(state["epoch"])
        self.start = _resume_position(state, 1, self.n)


# Lightning replaces any training sampler that is not a DistributedSampler by its own one under DDP, which cannot
# resume mid-epoch: subclassing it keeps ours in place.
class ResumableDistributedSampler(DistributedSampler):
    """This process's shard of the epoch permutation — ``DistributedSampler``'s order: the permutation padded with
    its own head to a multiple of ``num_replicas``, then every ``num_replicas``-th sample from ``rank`` on — that
    resumes mid-epoch like :class:`EpochShuffleSampler`. Every rank skips the samples it had done, so a DDP run
    resumed from a checkpoint continues with exactly the global batches of the interrupted run."""

    def __init__(
        self, dataset: Sized, num_replicas: int, rank: int, seed: int, shuffle: bool = True, drop_last: bool = False
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.start = int(epoch), 0

    def shard(self) -> Tensor:
        """This rank's samples of the current epoch, in order (``num_samples`` of them)."""
        n = len(self.dataset)  # type: ignore[arg-type]
        order = epoch_permutation(n, self.seed, self.epoch, self.shuffle)
        order = order.repeat(math.ceil(self.total_size / n))[: self.total_size]  # pad with the head (or drop the tail)
        return order[self.rank : self.total_size : self.num_replicas]

    def remaining(self) -> Tensor:
        """The shard from the resume position on (the position is then reset to 0)."""
        start, self.start = self.start, 0
        return self.shard()[start:]

    def __iter__(self) -> Iterator[int]:
        yield from self.remaining().tolist()

    def state_dict(self, samples_done: int) -> dict[str, int]:
        return {
            "seed": int(self.seed),
            "epoch": int(self.epoch),
            "samples_done": int(samples_done),
            "num_replicas": int(self.num_replicas),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed, self.epoch = int(state["seed"]), int(state["epoch"])
        self.start = _resume_position(state, self.num_replicas, self.num_samples)


class PermutationBatchSampler(Sampler[Tensor]):
    """Batches as consecutive slices of an :class:`EpochShuffleSampler`'s permutation, one int64 tensor each (no
    Python int per sample): the batches of ``BatchSampler(sampler, batch_size, drop_last=False)``. Lightning sets
    the epoch through ``.sampler`` (``set_epoch``); the resume position is the sampler's."""

    def __init__(self, sampler: EpochShuffleSampler, batch_size: int) -> None:
        self.sampler, self.batch_size = sampler, int(batch_size)

    def __iter__(self) -> Iterator[Tensor]:
        yield from self.sampler.remaining().split(self.batch_size)

    def __len__(self) -> int:
        return (self.sampler.n + self.batch_size - 1) // self.batch_size


class ResumableDataLoader(DataLoader):
    """DataLoader over a resumable sampler (:class:`EpochShuffleSampler` as ``sampler`` or inside a
    :class:`PermutationBatchSampler` as ``batch_sampler``; :class:`ResumableDistributedSampler` as ``sampler``) that
    Lightning saves in checkpoints (its ``_Stateful`` protocol), so ``--ckpt_path last`` resumes mid-epoch on exactly
    the batches an uninterrupted run would see.

    ``batches_done`` returns how many batches of the current epoch the trainer has finished (Lightning prefetches
    one batch ahead, so the loader's own count would be one too many); without it, yielded batches are counted.
    """

    def __init__(self, *args: Any, batches_done: Callable[[], int | None] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batches_done = batches_done

    def epoch_sampler(self) -> tuple[ResumableSampler, int]:
        """The sampler that holds the order and resume position, and the batch size."""
        if isinstance(self.batch_sampler, PermutationBatchSampler):
            return self.batch_sampler.sampler, self.batch_sampler.batch_size
        if not isinstance(self.sampler, (EpochShuffleSampler, ResumableDistributedSampler)):
            raise TypeError(f"ResumableDataLoader needs a resumable sampler, got {type(self.sampler).__name__}")
        return self.sampler, int(self.batch_size or 1)

    def state_dict(self) -> dict[str, int]:
        sampler, batch_size = self.epoch_sampler()
        done = self.batches_done() if self.batches_done is not None else None
        samples = len(sampler) if done is None else min(done * batch_size, len(sampler))
        return sampler.state_dict(samples)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch_sampler()[0].load_state_dict(state)


def shuffle_seed(default: int | None = None) -> int:
    """Seed of the training order: the run seed ($PL_GLOBAL_SEED, set by ``seed_everything``), so the order does
    not depend on how many random numbers the model's initialisation drew; without one ``default``, else a fresh
    random seed (never under DDP: the ranks must agree on the order, so there ``default`` is 0 as in Lightning)."""
    env = os.environ.get("PL_GLOBAL_SEED", "")
    if env.lstrip("-").isdigit():
        return int(env)
    if default is not None:
        return int(default)
    return int(torch.empty((), dtype=torch.int64).random_().item())
