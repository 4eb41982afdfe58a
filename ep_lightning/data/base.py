"""The shared base of the image DataModules: splits, option checks, device-resident tensors, resumable loaders and
the training augmentation hook. A dataset module says only where its files are, how to read and fetch them."""

from __future__ import annotations

import inspect
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from ep_lightning.data.augment import RandomFlipCrop, normalize
from ep_lightning.data.sampling import (
    EpochShuffleSampler,
    PermutationBatchSampler,
    ResumableDataLoader,
    ResumableDistributedSampler,
    shuffle_seed,
)
from ep_lightning.data.tensors import TensorPairDataset, keep_batch, to_float_images
from ep_lightning.errors import DataFileError

SPLITS = ("train", "test")


class ImageDataModule(L.LightningDataModule):
    """Images and labels of a dataset with a training and a test file set, held as tensors.

    Batches are ``(images, labels)``: float32 images (B, C, H, W) and int64 labels (B,); with ``return_index``
    training batches are ``(images, labels, indices)``. After ``setup``, ``input_shape`` (C, H, W) and
    ``num_classes`` describe the data (the systems check the network against them).

    Subclasses declare their options in ``__init__`` (the shared ones are documented in :class:`MNISTDataModule`)
    and implement :meth:`missing_files`, :meth:`missing_file_error`, :meth:`_download` and :meth:`read_split`.
    """

    def __init__(self) -> None:
        super().__init__()
        # the options are the arguments of the concrete class's __init__, the frame that called this one
        frame = inspect.currentframe()
        self.save_hyperparameters(frame=frame.f_back if frame is not None else None)
        self.check_options()
        self.train_set: TensorPairDataset | None = None
        self.val_set: TensorPairDataset | None = None
        self.test_set: TensorPairDataset | None = None
        #: per-sample image shape (C, H, W) and number of classes, known after ``setup`` (checked against the model)
        self.input_shape: tuple[int, ...] | None = None
        self.num_classes: int | None = None
        #: the training augmentation (None: none) and the sampler whose seed it draws with
        self.augmentation: RandomFlipCrop | None = None
        self._train_sampler: EpochShuffleSampler | ResumableDistributedSampler | None = None

    # --- options ---------------------------------------------------------------------------------------------
    def check_options(self) -> None:
        """Reject impossible option values, naming the field and what is allowed."""
        h = self.hparams
        for field in ("batch_size", "eval_batch_size"):
            if h[field] < 1:
                raise ValueError(f"data.{field}={h[field]} is invalid: use a positive integer")
        if h.val_size < 0:
            raise ValueError(f"data.val_size={h.val_size} is invalid: use 0 (no validation split) or a positive size")
        for field in ("train_subset", "test_subset"):
            if h[field] is not None and h[field] < 1:
                raise ValueError(f"data.{field}={h[field]} is invalid: use null (all) or a positive size")
        if h.val_split not in ("random", "last"):
            raise ValueError(f"data.val_split={h.val_split!r} is not known; allowed: 'random', 'last'")
        if h.num_workers < 0:
            raise ValueError(f"data.num_workers={h.num_workers} is invalid: use 0 or more")
        mean, std = h.get("mean"), h.get("std")
        if (mean is None) != (std is None):
            raise ValueError(f"data.mean={mean} and data.std={std}: give both (per-channel values) or neither")
        if std is not None and (len(std) != len(mean) or any(s <= 0 for s in std)):
            raise ValueError(f"data.std={std} is invalid: one positive value per channel, as many as data.mean={mean}")
        if h.get("crop_padding", 0) < 0:
            raise ValueError(f"data.crop_padding={h.crop_padding} is invalid: use 0 (no crop) or more pixels")

    # --- what a dataset provides -----------------------------------------------------------------------------
    def missing_files(self) -> list[str]:
        """Names of the dataset's files that are not on disk."""
        raise NotImplementedError

    def missing_file_error(self, name: str) -> DataFileError:
        """The one-line error for the missing file ``name``: the folder expected, the official URL, the options."""
        raise NotImplementedError

    def _download(self) -> None:
        """Fetch the missing official files (``data.download: true``)."""
        raise NotImplementedError

    def read_split(self, split: str) -> tuple[Tensor, Tensor]:
        """The files of ``split`` (``train`` or ``test``), verified: uint8 images (N, C, H, W), int64 labels (N,)."""
        raise NotImplementedError

    def count_classes(self, labels: Tensor) -> int:
        """The number of classes, checked against the labels just read."""
        raise NotImplementedError

    # --- Lightning hooks -------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Runs on one process per node: download if asked and missing; otherwise only check presence."""
        missing = self.missing_files()
        if missing and self.hparams.download:
            self._download()
        elif missing:
            raise self.missing_file_error(missing[0])

    def setup(self, stage: str | None = None) -> None:
        """Runs on every process: read, verify and split (deterministic, so all ranks agree)."""
        h = self.hparams
        if stage in ("fit", "validate", None) and self.train_set is None:
            images, labels = self._load("train")
            n = labels.shape[0]
            if h.val_size >= n:
                raise ValueError(
                    f"data.val_size={h.val_size} is impossible: the training file holds {n} images; "
                    f"use 0 ≤ val_size < {n}"
                )
            if h.val_split == "last":
                perm = torch.cat((torch.arange(n - h.val_size, n), torch.arange(n - h.val_size)))
            else:
                perm = torch.randperm(n, generator=torch.Generator().manual_seed(h.split_seed))
            train_idx, val_idx = perm[h.val_size :].sort().values, perm[: h.val_size].sort().values
            train_idx = self._subset(train_idx, h.train_subset, "train_subset")
            self.augmentation = self.training_augmentation(len(train_idx))
            with_index = bool(h.return_index) or self.augmentation is not None
            self.train_set = self._make(images[train_idx], labels[train_idx], with_index)
            self.val_set = self._make(images[val_idx], labels[val_idx]) if h.val_size > 0 else None
        # `fit` tests the final weights (test_after_fit): verify the test files now, not after the last epoch
        if stage in ("fit", "test", "predict", None) and self.test_set is None:
            images, labels = self._load("test")
            idx = self._subset(torch.arange(labels.shape[0]), h.test_subset, "test_subset")
            self.test_set = self._make(images[idx], labels[idx])

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None
        h = self.hparams
        shuffle = bool(h.get("shuffle", True))
        on_device = self.train_set.labels.device.type != "cpu"
        workers = {
            "num_workers": 0 if on_device else h.num_workers,
            "persistent_workers": bool(h.num_workers) and not on_device,
        }
        trainer = self.trainer
        distributed = trainer.distributed_sampler_kwargs if trainer is not None and trainer.world_size > 1 else None
        if distributed:
            sampler = ResumableDistributedSampler(
                self.train_set, distributed["num_replicas"], distributed["rank"], shuffle_seed(0), shuffle
            )
            self._train_sampler = sampler
            return ResumableDataLoader(
                self.train_set,
                batch_size=h.batch_size,
                sampler=sampler,
                collate_fn=keep_batch,
                batches_done=self._train_batches_done,
                **workers,
            )
        self._train_sampler = EpochShuffleSampler(len(self.train_set), shuffle_seed(), shuffle)
        return ResumableDataLoader(
            self.train_set,
            batch_sampler=PermutationBatchSampler(self._train_sampler, h.batch_size),
            collate_fn=keep_batch,
            batches_done=self._train_batches_done,
            **workers,
        )

    def _train_batches_done(self) -> int | None:
        """Training batches the trainer has finished in the current epoch (saved with the loader's state)."""
        trainer = self.trainer
        return None if trainer is None else trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        return self._loader(self.val_set, self.hparams.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        assert self.test_set is not None
        return self._loader(self.test_set, self.hparams.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Training batches, on the training device: the augmentation of each sample for this epoch, drawn with the
        training order's seed (saved in checkpoints); the index is dropped again unless ``return_index``."""
        trainer = self.trainer
        if self.augmentation is None or trainer is None or not trainer.training or self._train_sampler is None:
            return batch
        images, labels, index = batch
        images = self.augmentation(images, index, self._train_sampler.seed, trainer.current_epoch)
        return (images, labels, index) if self.hparams.return_index else (images, labels)

    # --- helpers ---------------------------------------------------------------------------------------------
    def training_augmentation(self, size: int) -> RandomFlipCrop | None:
        """Flip + crop for the ``size`` training samples if ``augment`` is on (never for evaluation data)."""
        if not self.hparams.get("augment", False):
            return None
        return RandomFlipCrop(size, padding=self.hparams.get("crop_padding", 4))

    def _load(self, split: str) -> tuple[Tensor, Tensor]:
        images, labels = self.read_split(split)
        if images.ndim != 4 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise DataFileError(
                f"{split} images have shape {tuple(images.shape)} and labels {tuple(labels.shape)}; "
                f"expected (N, C, H, W) images and N labels"
            )
        self.input_shape = tuple(images.shape[1:])
        self.num_classes = self.count_classes(labels)
        return images, labels

    @staticmethod
    def _subset(idx: Tensor, size: int | None, field: str) -> Tensor:
        if size is None:
            return idx
        if size > idx.shape[0]:
            raise ValueError(f"data.{field}={size} is impossible: only {idx.shape[0]} images are available")
        return idx[:size]

    def _make(self, images: Tensor, labels: Tensor, return_index: bool = False) -> TensorPairDataset:
        """uint8 images → float32 x / 255, normalised per channel with ``mean``/``std`` if given."""
        x = to_float_images(images)
        mean, std = self.hparams.get("mean"), self.hparams.get("std")
        if mean is not None:
            if len(mean) != x.shape[1]:
                raise ValueError(f"data.mean={mean} has {len(mean)} values; the images have {x.shape[1]} channels")
            x = normalize(x, mean, std)
        if self.hparams.device_resident and self.trainer is not None:
            device = self.trainer.strategy.root_device
            x, labels = x.to(device), labels.to(device)
        return TensorPairDataset(x, labels, return_index)

    def _loader(self, dataset: TensorPairDataset, batch_size: int) -> DataLoader:
        on_device = dataset.labels.device.type != "cpu"
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=False,
            collate_fn=keep_batch,
            num_workers=0 if on_device else self.hparams.num_workers,
            persistent_workers=bool(self.hparams.num_workers) and not on_device,
        )
