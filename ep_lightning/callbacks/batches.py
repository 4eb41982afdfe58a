"""The fixed batches the monitors relax: the first samples of a loader's dataset, taken without touching any RNG."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset


def first_loader(loaders: Any) -> DataLoader | None:
    """The first non-empty DataLoader in ``loaders`` (a loader, a list/tuple/dict of them, or nothing)."""
    if isinstance(loaders, DataLoader):
        return loaders
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        for loader in loaders:
            found = first_loader(loader)
            if found is not None:
                return found
    return None


def first_samples(loader: DataLoader, n: int) -> tuple[Tensor, Tensor]:
    """The first ``n`` samples of the loader's dataset by index (no shuffling, no RNG use) as (x, labels)."""
    dataset = loader.dataset
    if not isinstance(dataset, IterableDataset):
        # A private generator: starting a DataLoader iterator draws a seed, which must not come from the global RNG
        # (that would change the shuffling of the training run being monitored).
        fixed = DataLoader(
            dataset,
            batch_size=n,
            shuffle=False,
            collate_fn=loader.collate_fn,
            num_workers=0,
            generator=torch.Generator(),
        )
        batch = next(iter(fixed))
        return batch[0], batch[1]
    xs, ys, count = [], [], 0
    with torch.random.fork_rng(devices=[]):  # an iterable dataset is read through its loader: restore the CPU RNG
        for batch in loader:
            xs.append(batch[0])
            ys.append(batch[1])
            count += batch[0].shape[0]
            if count >= n:
                break
    return torch.cat(xs)[:n], torch.cat(ys)[:n]
