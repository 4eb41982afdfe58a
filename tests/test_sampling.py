"""The resumable distributed sampler: DistributedSampler's order, global batches equal to one process's, and a
mid-epoch resume of every rank that continues with exactly the rest of its shard. The end-to-end proof (a 2-process
``train.py`` run SIGTERMed and resumed equals the uninterrupted run) is in tests/test_data_user_paths.py."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils.data import DistributedSampler

from ep_lightning.data import (
    EpochShuffleSampler,
    PermutationBatchSampler,
    ResumableDataLoader,
    ResumableDistributedSampler,
    TensorPairDataset,
    keep_batch,
)


def dataset(n: int) -> TensorPairDataset:
    return TensorPairDataset(torch.zeros(n, 1), torch.arange(n), return_index=True)


@pytest.mark.parametrize(
    "n, world, shuffle, drop_last",
    [(50, 2, True, False), (53, 4, True, False), (53, 4, True, True), (7, 3, False, False)],
)
def test_order_is_torch_distributed_samplers(n: int, world: int, shuffle: bool, drop_last: bool) -> None:
    """Same samples in the same order as torch's DistributedSampler (Lightning's default under DDP) for every rank
    and epoch, padding and dropping included."""
    data = dataset(n)
    for rank in range(world):
        ours = ResumableDistributedSampler(data, world, rank, seed=5, shuffle=shuffle, drop_last=drop_last)
        theirs = DistributedSampler(data, world, rank, shuffle=shuffle, seed=5, drop_last=drop_last)
        for epoch in (0, 1, 7):
            ours.set_epoch(epoch)
            theirs.set_epoch(epoch)
            assert list(ours) == list(theirs), (rank, epoch)
            assert len(ours) == len(theirs)


def test_ranks_together_see_the_single_process_batches() -> None:
    """2 ranks × batch 5 = the batches of one process with batch 10 (same seed): DDP trains on the same global
    batches, in the same order, as a single process (n divisible by the global batch, so no padding)."""
    n, world, batch = 60, 2, 5
    single = list(PermutationBatchSampler(EpochShuffleSampler(n, seed=9), world * batch))
    shards = [list(ResumableDistributedSampler(dataset(n), world, r, seed=9)) for r in range(world)]
    for b, expected in enumerate(single):
        together = sorted(i for shard in shards for i in shard[b * batch : (b + 1) * batch])
        assert together == sorted(expected.tolist()), b


def _loader(n: int, world: int, rank: int, seed: int, done: dict[str, int]) -> ResumableDataLoader:
    sampler = ResumableDistributedSampler(dataset(n), world, rank, seed=seed)
    return ResumableDataLoader(
        dataset(n), batch_size=4, sampler=sampler, collate_fn=keep_batch, batches_done=lambda: done["n"]
    )


def test_every_rank_resumes_mid_epoch_on_the_rest_of_its_shard() -> None:
    n, world = 50, 2
    for rank in range(world):
        done = {"n": 0}
        loader = _loader(n, world, rank, seed=3, done=done)
        loader.sampler.set_epoch(2)
        full = [b[2].tolist() for b in loader]
        done["n"] = 4  # the trainer finished 4 batches of this epoch (the loader may have prefetched more)
        state = loader.state_dict()
        assert state == {"seed": 3, "epoch": 2, "samples_done": 16, "num_replicas": 2}
        fresh = _loader(n, world, rank, seed=999, done={"n": 0})
        fresh.load_state_dict(state)
        fresh.sampler.set_epoch(2)  # Lightning sets the same epoch again on resume: the position is kept
        assert [b[2].tolist() for b in fresh] == full[4:], rank
        assert [b[2].tolist() for b in fresh] == full, "the next pass over the epoch starts from its beginning"
        # control: without the saved state the fresh loader starts another order (seed 999) from the beginning
        control = _loader(n, world, rank, seed=999, done={"n": 0})
        control.sampler.set_epoch(2)
        assert [b[2].tolist() for b in control][: len(full) - 4] != full[4:]


def test_resume_with_another_world_size_continues_at_the_global_position_and_says_so() -> None:
    """A checkpoint of 2 ranks × 8 samples done, resumed by 4 ranks: each skips 4 (16 samples of the epoch's order
    done), with a warning that the batches differ from the original run; in one process: 16 skipped."""
    state = {"seed": 1, "epoch": 0, "samples_done": 8, "num_replicas": 2}
    four = ResumableDistributedSampler(dataset(40), 4, 0, seed=0)
    with pytest.warns(UserWarning, match="written by 2 process\\(es\\) with 4: .*after sample 16"):
        four.load_state_dict(state)
    assert four.start == 4 and four.seed == 1
    single = EpochShuffleSampler(40, seed=0)
    with pytest.warns(UserWarning, match="written by 2 process\\(es\\) with 1"):
        single.load_state_dict(state)
    assert list(single) == single.permutation()[16:].tolist()
    same = ResumableDistributedSampler(dataset(40), 2, 1, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same.load_state_dict(state)  # same world size: exact, no warning
    assert same.start == 8


def test_datamodule_builds_the_distributed_loader_under_ddp(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a trainer of world size 2 the training loader holds a ResumableDistributedSampler (a DistributedSampler,
    which Lightning leaves in place) for this rank, seeded with the run seed; evaluation loaders are plain."""
    from pathlib import Path

    from ep_lightning.data import MNISTDataModule

    class FakeTrainer:
        world_size = 2

        @property
        def distributed_sampler_kwargs(self) -> dict[str, int]:
            return {"num_replicas": 2, "rank": 1}

    monkeypatch.setenv("PL_GLOBAL_SEED", "17")
    dm = MNISTDataModule(data_dir=str(Path(__file__).resolve().parents[1] / "data"), train_subset=30, batch_size=4)
    dm.setup("fit")
    dm.trainer = FakeTrainer()  # type: ignore[assignment]
    loader = dm.train_dataloader()
    assert isinstance(loader, ResumableDataLoader) and isinstance(loader.sampler, DistributedSampler)
    assert (loader.sampler.num_replicas, loader.sampler.rank, loader.sampler.seed) == (2, 1, 17)
    assert len(loader) == 4  # 15 samples of rank 1 in batches of 4
    assert not isinstance(dm.test_dataloader().sampler, DistributedSampler)
