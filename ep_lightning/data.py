"""MNIST (or any dataset in the same IDX layout) as a LightningDataModule that works offline.

Files are read straight from ``<data_dir>/<name>/raw/*-idx?-ubyte[.gz]`` (torchvision's layout) into uint8 tensors;
no PIL, no per-sample transform. Checksums of the official MNIST files are verified before use.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from ep_lightning.errors import DataFileError

#: MD5 of the *uncompressed* official MNIST files (LeCun, Cortes, Burges).
MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_DTYPES = {0x08: torch.uint8}


def find_idx_file(raw_dir: Path, stem: str) -> Path:
    """Return ``raw_dir/stem`` or ``raw_dir/stem.gz``, whichever exists, or raise naming the file."""
    for candidate in (raw_dir / stem, raw_dir / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DataFileError(
        f"missing data file {raw_dir / stem}[.gz]. Put the IDX files in {raw_dir} (a clone of this repository ships "
        f"MNIST in data/MNIST/raw), point `data.data_dir` at the folder that holds '{raw_dir.parent.name}/raw', "
        f"or set `data.download: true` (needs torchvision and network)."
    )


def read_idx_bytes(path: Path) -> bytes:
    """Uncompressed bytes of an IDX file (gzip or plain); a corrupt gzip stream is reported by file name."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DataFileError(
            f"data file {path} is corrupt or truncated ({err}); replace it with the official file"
        ) from err


def parse_idx(raw: bytes, path: Path) -> Tensor:
    """Decode an IDX byte string (magic 0x0000 <dtype> <ndim>, big-endian dims) into a uint8 tensor."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataFileError(f"data file {path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    count = 1
    for d in dims:
        count *= d
    if len(raw) != header + count:
        raise DataFileError(
            f"data file {path} is truncated or padded: header promises {dims} = {count} bytes of data, "
            f"file holds {len(raw) - header}"
        )
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).reshape(dims)


def load_idx(raw_dir: Path, stem: str, verify: bool) -> Tensor:
    """Read one IDX file, checking its MD5 against the official value when ``verify`` and the value is known."""
    path = find_idx_file(raw_dir, stem)
    raw = read_idx_bytes(path)
    if verify and stem in MNIST_MD5:
        digest = hashlib.md5(raw).hexdigest()
        if digest != MNIST_MD5[stem]:
            raise DataFileError(
                f"checksum mismatch for {path}: MD5 of its uncompressed content is {digest}, the official "
                f"{stem} has {MNIST_MD5[stem]}. The file is corrupt or not MNIST; replace it with the official file "
                f"(or, for another dataset in the same layout, set `data.verify_checksums: false`)."
            )
    return parse_idx(raw, path)


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

    def __getitems__(self, indices: list[int] | Tensor) -> tuple[Tensor, ...]:
        """The batch at ``indices`` (a list of ints or an int64 tensor, e.g. a slice of a permutation)."""
        idx = torch.as_tensor(indices, device=self.labels.device)
        if self.return_index:
            return self.images.index_select(0, idx), self.labels.index_select(0, idx), idx
        return self.images.index_select(0, idx), self.labels.index_select(0, idx)


def keep_batch(batch: Any) -> Any:
    """collate_fn for ``__getitems__`` datasets: the batch is already stacked."""
    return batch


def to_float_images(images: Tensor) -> Tensor:
    """uint8 (N, 28, 28) → float32 (N, 1, 28, 28) in [0, 1]."""
    return (images.to(torch.float32) / 255.0).unsqueeze(1)


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
        if not self.shuffle:  # the file's order, every epoch
            return torch.arange(self.n)
        # seed + epoch, as Lightning's DistributedSampler: N processes × batch B/N then see the same global batches
        # as one process with batch B.
        generator = torch.Generator().manual_seed((self.seed + self.epoch) % 2**63)
        return torch.randperm(self.n, generator=generator)

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
        self.start = min(int(state["samples_done"]), self.n)


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
    """DataLoader over an :class:`EpochShuffleSampler` (as ``sampler``, or inside a ``PermutationBatchSampler`` as
    ``batch_sampler``) that Lightning saves in checkpoints (its ``_Stateful`` protocol), so ``--ckpt_path last``
    resumes mid-epoch on exactly the batches an uninterrupted run would see.

    ``batches_done`` returns how many batches of the current epoch the trainer has finished (Lightning prefetches
    one batch ahead, so the loader's own count would be one too many); without it, yielded batches are counted.
    """

    def __init__(self, *args: Any, batches_done: Callable[[], int | None] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batches_done = batches_done

    def epoch_sampler(self) -> tuple[EpochShuffleSampler, int]:
        """The sampler that holds the order and resume position, and the batch size."""
        if isinstance(self.batch_sampler, PermutationBatchSampler):
            return self.batch_sampler.sampler, self.batch_sampler.batch_size
        assert isinstance(self.sampler, EpochShuffleSampler)
        return self.sampler, int(self.batch_size or 1)

    def state_dict(self) -> dict[str, int]:
        sampler, batch_size = self.epoch_sampler()
        done = self.batches_done() if self.batches_done is not None else None
        samples = sampler.n if done is None else min(done * batch_size, sampler.n)
        return sampler.state_dict(samples)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch_sampler()[0].load_state_dict(state)


def shuffle_seed() -> int:
    """Seed of the training order: the run seed ($PL_GLOBAL_SEED, set by ``seed_everything``), so the order does
    not depend on how many random numbers the model's initialisation drew; a fresh random seed without one."""
    env = os.environ.get("PL_GLOBAL_SEED", "")
    if env.lstrip("-").isdigit():
        return int(env)
    return int(torch.empty((), dtype=torch.int64).random_().item())


class MNISTDataModule(L.LightningDataModule):
    """MNIST from IDX files, offline, with a seeded validation split and optional device-resident tensors.

    Batches are ``(images, labels)``: float32 images (B, 1, 28, 28) in [0, 1] and int64 labels (B,); with
    ``return_index`` training batches are ``(images, labels, indices)``.
    """

    def __init__(
        self,
        data_dir: str = "data",
        name: str = "MNIST",
        batch_size: int = 20,
        eval_batch_size: int = 1000,
        val_size: int = 0,
        split_seed: int = 0,
        train_subset: int | None = None,
        test_subset: int | None = None,
        verify_checksums: bool = True,
        device_resident: bool = False,
        num_workers: int = 0,
        download: bool = False,
        return_index: bool = False,
        val_split: Literal["random", "last"] = "random",
        shuffle: bool = True,
    ) -> None:
        """
        Args:
            data_dir: folder holding ``<name>/raw/`` with the four IDX files (gzip or plain).
            name: dataset folder name; any dataset in MNIST's IDX layout (FashionMNIST, KMNIST) works.
            batch_size: training batch size (the papers use 20).
            eval_batch_size: batch size for validation, test and predict.
            val_size: images split off the 60k training images for validation (0 = none, the paper's protocol).
            split_seed: seed of the generator that draws the validation split (independent of the run seed).
            train_subset: use only the first N training images (after the split); for quick runs and tests.
            test_subset: use only the first N test images.
            verify_checksums: check the official MNIST MD5s (files of other datasets are not checked).
            device_resident: keep the whole dataset on the training device; batches are sliced there, no copies.
            num_workers: DataLoader workers (0 is fastest for in-memory tensors).
            download: if files are missing, fetch them with torchvision (needs torchvision and network).
            val_split: which training images form the validation split: ``random`` (drawn with ``split_seed``) or
                ``last`` (the last ``val_size`` images of the training file: Initialized EP's authors' protocol).
            shuffle: reshuffle the training set every epoch (default); false keeps the file's order (the Initialized
                EP authors' protocol).
            return_index: training batches are ``(images, labels, indices)`` with each sample's int64 index in the
                training set (stable across epochs; needed by ``warm_start``); validation/test/predict batches stay
                ``(images, labels)``.
        """
        super().__init__()
        self.save_hyperparameters()
        for field, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value < 1:
                raise ValueError(f"data.{field}={value} is invalid: use a positive integer")
        if val_size < 0:
            raise ValueError(f"data.val_size={val_size} is invalid: use 0 (no validation split) or a positive size")
        for field, value in (("train_subset", train_subset), ("test_subset", test_subset)):
            if value is not None and value < 1:
                raise ValueError(f"data.{field}={value} is invalid: use null (all) or a positive size")
        if val_split not in ("random", "last"):
            raise ValueError(f"data.val_split={val_split!r} is not known; allowed: 'random', 'last'")
        if num_workers < 0:
            raise ValueError(f"data.num_workers={num_workers} is invalid: use 0 or more")
        self.raw_dir = Path(data_dir) / name / "raw"
        self.train_set: TensorPairDataset | None = None
        self.val_set: TensorPairDataset | None = None
        self.test_set: TensorPairDataset | None = None
        #: per-sample image shape (C, H, W) and number of classes, known after ``setup`` (checked against the model)
        self.input_shape: tuple[int, ...] | None = None
        self.num_classes: int | None = None

    # --- Lightning hooks -------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Runs on one process per node: download if asked and missing; otherwise only check presence."""
        missing = [s for pair in SPLIT_FILES.values() for s in pair if not self._exists(s)]
        if missing and self.hparams.download:
            self._download()
        elif missing:
            find_idx_file(self.raw_dir, missing[0])  # raises with the file name and what to do

    def setup(self, stage: str | None = None) -> None:
        """Runs on every process: read, verify and split (deterministic, so all ranks agree)."""
        if stage in ("fit", "validate", None) and self.train_set is None:
            images, labels = self._load("train")
            n = labels.shape[0]
            val = self.hparams.val_size
            if val >= n:
                raise ValueError(
                    f"data.val_size={val} is impossible: the training file holds {n} images; use 0 ≤ val_size < {n}"
                )
            if self.hparams.get("val_split", "random") == "last":
                perm = torch.cat((torch.arange(n - val, n), torch.arange(n - val)))
            else:
                perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.hparams.split_seed))
            train_idx, val_idx = perm[val:].sort().values, perm[:val].sort().values
            train_idx = self._subset(train_idx, self.hparams.train_subset, "train_subset")
            self.train_set = self._make(images[train_idx], labels[train_idx], self.hparams.return_index)
            self.val_set = self._make(images[val_idx], labels[val_idx]) if val > 0 else None
        # `fit` tests the final weights (test_after_fit): verify the test files now, not after the last epoch
        if stage in ("fit", "test", "predict", None) and self.test_set is None:
            images, labels = self._load("test")
            idx = self._subset(torch.arange(labels.shape[0]), self.hparams.test_subset, "test_subset")
            self.test_set = self._make(images[idx], labels[idx])

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None
        trainer = self.trainer
        shuffle = bool(self.hparams.get("shuffle", True))
        if trainer is not None and trainer.world_size > 1:  # Lightning installs a DistributedSampler (epoch-seeded)
            return self._loader(self.train_set, self.hparams.batch_size, shuffle=shuffle)
        on_device = self.train_set.labels.device.type != "cpu"
        sampler = EpochShuffleSampler(len(self.train_set), shuffle_seed(), shuffle)
        return ResumableDataLoader(
            self.train_set,
            batch_sampler=PermutationBatchSampler(sampler, self.hparams.batch_size),
            collate_fn=keep_batch,
            num_workers=0 if on_device else self.hparams.num_workers,
            persistent_workers=bool(self.hparams.num_workers) and not on_device,
            batches_done=self._train_batches_done,
        )

    def _train_batches_done(self) -> int | None:
        """Training batches the trainer has finished in the current epoch (saved with the loader's state)."""
        trainer = self.trainer
        return None if trainer is None else trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        return self._loader(self.val_set, self.hparams.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        assert self.test_set is not None
        return self._loader(self.test_set, self.hparams.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    # --- helpers ---------------------------------------------------------------------------------------------
    def _exists(self, stem: str) -> bool:
        return (self.raw_dir / stem).is_file() or (self.raw_dir / f"{stem}.gz").is_file()

    def _load(self, split: str) -> tuple[Tensor, Tensor]:
        image_stem, label_stem = SPLIT_FILES[split]
        verify = self.hparams.verify_checksums
        images = load_idx(self.raw_dir, image_stem, verify)
        labels = load_idx(self.raw_dir, label_stem, verify).long()
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise DataFileError(
                f"{self.raw_dir}: {split} images have shape {tuple(images.shape)} and labels {tuple(labels.shape)}; "
                f"expected (N, H, W) images and N labels"
            )
        self.input_shape = (1, *images.shape[1:])
        classes = int(labels.max()) + 1 if labels.numel() else None  # over every split loaded so far
        self.num_classes = max(c for c in (classes, self.num_classes) if c is not None) if classes else self.num_classes
        return images, labels

    @staticmethod
    def _subset(idx: Tensor, size: int | None, field: str) -> Tensor:
        if size is None:
            return idx
        if size > idx.shape[0]:
            raise ValueError(f"data.{field}={size} is impossible: only {idx.shape[0]} images are available")
        return idx[:size]

    def _make(self, images: Tensor, labels: Tensor, return_index: bool = False) -> TensorPairDataset:
        x = to_float_images(images)
        if self.hparams.device_resident and self.trainer is not None:
            device = self.trainer.strategy.root_device
            x, labels = x.to(device), labels.to(device)
        return TensorPairDataset(x, labels, return_index)

    def _loader(self, dataset: TensorPairDataset, batch_size: int, shuffle: bool) -> DataLoader:
        on_device = dataset.labels.device.type != "cpu"
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            collate_fn=keep_batch,
            num_workers=0 if on_device else self.hparams.num_workers,
            persistent_workers=bool(self.hparams.num_workers) and not on_device,
        )

    def _download(self) -> None:
        try:
            from torchvision import datasets
        except Exception as err:  # torchvision missing or unusable next to a CPU torch build
            raise DataFileError(
                f"data files are missing in {self.raw_dir} and data.download=true needs torchvision, which could not "
                f"be imported ({err}). Copy the IDX files into {self.raw_dir} instead (this repository ships MNIST "
                f"in data/MNIST/raw)."
            ) from err
        dataset_cls = getattr(datasets, self.hparams.name, None)
        if dataset_cls is None:
            raise DataFileError(f"torchvision has no dataset named {self.hparams.name!r} to download")
        for train in (True, False):
            dataset_cls(root=str(self.raw_dir.parent.parent), train=train, download=True)
