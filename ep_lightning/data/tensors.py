"""Datasets held as tensors (on the CPU or the training device), indexed a whole batch at a time."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ep_lightning.errors import DataFileError


class TensorPairDataset(Dataset):
    """(images, labels) held as tensors; ``__getitems__`` returns a whole batch in one indexing operation.

    With ``return_index`` every item also carries its index in this dataset: (images, labels, indices).
    """

    def __init__(self, images: Tensor, labels: Tensor, return_index: bool = False) -> None:
        if images.shape[0] != labels.shape[0]:
            raise DataFileError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        self.images = images
        self.labels = labels
        self.return_index = bool(return_index)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, ...]:
        if self.return_index:
            return self.images[index], self.labels[index], torch.tensor(index, device=self.labels.device)
        return self.images[index], self.labels[index]

    def __getitems__(self, indices: Sequence[int] | Tensor) -> tuple[Tensor, ...]:
        """The batch at ``indices`` (a list of ints or an int64 tensor, e.g. a slice of a permutation)."""
        idx = torch.as_tensor(indices, device=self.labels.device)
        if self.return_index:
            return self.images.index_select(0, idx), self.labels.index_select(0, idx), idx
        return self.images.index_select(0, idx), self.labels.index_select(0, idx)


def keep_batch(batch: Any) -> Any:
    """collate_fn for ``__getitems__`` datasets: the batch is already stacked."""
    return batch


def to_float_images(images: Tensor) -> Tensor:
    """uint8 images → float32 in [0, 1]: x / 255; (N, H, W) gains a channel axis, (N, 1, H, W)."""
    x = images.to(torch.float32) / 255.0
    return x.unsqueeze(1) if x.ndim == 3 else x
