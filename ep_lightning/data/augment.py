"""Per-channel normalisation and the CIFAR training augmentation, in plain torch on whole batches.

The augmentation is Laborieux et al. 2021's (torchvision ``RandomHorizontalFlip(0.5)`` then ``RandomCrop(32,
padding=4, padding_mode='edge')``), applied on the training device. Its randomness carries no state: the draws of
training sample i in epoch e are row i of a table drawn from a generator seeded by (seed, e), so they are a
function of (seed, epoch, sample) — the same after a resume, for any batch size and any number of DDP processes,
on the CPU and on a GPU.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import Tensor

#: Laborieux et al. 2021 (main.py of Laborieux-Axel/Equilibrium-Propagation): CIFAR-10 channel means, and three
#: times the channel standard deviations they divide by.
LABORIEUX_MEAN = (0.4914, 0.4822, 0.4465)
LABORIEUX_STD = (3 * 0.2023, 3 * 0.1994, 3 * 0.2010)


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """(x − mean_c) / std_c for every channel c of images (N, C, H, W) (torchvision's ``Normalize``)."""
    m = torch.tensor(list(mean), dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(list(std), dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - m) / s


def flip_crop(images: Tensor, flip: Tensor, offsets: Tensor, padding: int) -> Tensor:
    """Flip then crop every image of a batch (B, C, H, W) back to H × W from its edge-padded copy.

    out[b, :, i, j] = x_b[:, clamp(i + dy_b − p, 0, H − 1), c] with c = clamp(j + dx_b − p, 0, W − 1) or, where
    ``flip[b]``, W − 1 − that: edge padding by p pixels is clamping the indices, (dy_b, dx_b) = ``offsets[b]`` in
    [0, 2p] is the corner of the crop in the padded image.
    """
    b, c, h, w = images.shape
    offsets = offsets.to(images.device)
    rows = (offsets[:, :1] - padding + torch.arange(h, device=images.device)).clamp(0, h - 1)
    cols = (offsets[:, 1:] - padding + torch.arange(w, device=images.device)).clamp(0, w - 1)
    cols = torch.where(flip.to(images.device)[:, None], w - 1 - cols, cols)
    out = images.gather(2, rows[:, None, :, None].expand(b, c, h, w))
    return out.gather(3, cols[:, None, None, :].expand(b, c, h, w))


def augmentation_seed(seed: int, epoch: int) -> int:
    """The generator seed of epoch ``epoch``'s draws: a hash of (seed, epoch), unrelated to the order's seed + epoch."""
    digest = hashlib.blake2b(f"{int(seed)}:{int(epoch)}".encode(), digest_size=8, person=b"ep-augment").digest()
    return int.from_bytes(digest, "little") % 2**63


class RandomFlipCrop:
    """Random horizontal flip with probability ``flip_probability`` and random crop with ``padding`` pixels of
    edge padding, for the ``size`` samples of a training set; the draws of each epoch are drawn once (on the CPU,
    so every device gets the same) and indexed by the samples' dataset indices."""

    def __init__(self, size: int, padding: int = 4, flip_probability: float = 0.5) -> None:
        if padding < 0:
            raise ValueError(f"crop padding={padding} is invalid: use 0 (no crop) or more pixels")
        self.size, self.padding, self.flip_probability = int(size), int(padding), float(flip_probability)
        self._key: tuple[int, int, str] | None = None
        self._table: tuple[Tensor, Tensor] | None = None

    def draws(self, seed: int, epoch: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """(flip: bool (size,), offsets: int64 (size, 2)) of epoch ``epoch``, on ``device``."""
        key = (int(seed), int(epoch), str(device))
        if self._key != key or self._table is None:
            generator = torch.Generator().manual_seed(augmentation_seed(seed, epoch))
            flip = torch.rand(self.size, generator=generator) < self.flip_probability
            offsets = torch.randint(0, 2 * self.padding + 1, (self.size, 2), generator=generator)
            self._key, self._table = key, (flip.to(device), offsets.to(device))
        return self._table

    def __call__(self, images: Tensor, indices: Tensor, seed: int, epoch: int) -> Tensor:
        """The batch ``images`` of the samples ``indices``, augmented with their draws of epoch ``epoch``."""
        flip, offsets = self.draws(seed, epoch, images.device)
        idx = indices.to(flip.device)
        return flip_crop(images, flip[idx], offsets[idx], self.padding)
