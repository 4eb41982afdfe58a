"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009) from the official python-pickle folders ``<data_dir>/cifar-10-batches-py/``
and ``<data_dir>/cifar-100-python/`` (torchvision's layout), normalised per channel, with Laborieux et al. 2021's
training augmentation on the training device."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from ep_lightning.data.augment import LABORIEUX_MEAN, LABORIEUX_STD
from ep_lightning.data.base import ImageDataModule
from ep_lightning.data.download import download_cifar
from ep_lightning.data.formats import load_cifar_batch, load_cifar_names
from ep_lightning.data.sources import CIFAR10, CIFAR100, CIFARSource
from ep_lightning.errors import DataFileError


class CIFARDataModule(ImageDataModule):
    """The files of ``source`` (a :class:`~ep_lightning.data.sources.CIFARSource`); see :class:`CIFAR10DataModule`."""

    source: CIFARSource

    def __init__(self) -> None:
        super().__init__()
        #: class names from the meta file, known after ``setup``
        self.class_names: list[str] | None = None

    @property
    def folder(self) -> Path:
        return Path(self.hparams.data_dir) / self.source.folder

    def _md5(self, name: str) -> str | None:
        return self.source.files[name] if self.hparams.verify_checksums else None

    # --- files -----------------------------------------------------------------------------------------------
    def missing_files(self) -> list[str]:
        return [name for name in self.source.files if not (self.folder / name).is_file()]

    def missing_file_error(self, name: str) -> DataFileError:
        s = self.source
        return DataFileError(
            f"missing data file {self.folder / name}: {s.title} is the python version of {s.url}, unpacked into "
            f"{self.folder} ({', '.join(s.files)}); point `data.init_args.data_dir` at the folder that holds "
            f"'{s.folder}', or set `data.init_args.download: true`"
        )

    def _download(self) -> None:
        download_cifar(self.source, Path(self.hparams.data_dir), self.missing_files())

    def read_split(self, split: str) -> tuple[Tensor, Tensor]:
        s = self.source
        for name in s.files:
            if not (self.folder / name).is_file():
                raise self.missing_file_error(name)
        meta_name = s.meta_file[0]
        self.class_names = load_cifar_names(self.folder / meta_name, self._md5(meta_name), s.names_key)
        files = s.train_files if split == "train" else s.test_files
        parts = [load_cifar_batch(self.folder / name, self._md5(name), s.label_key) for name in files]
        images = torch.cat([p[0] for p in parts])
        labels = torch.cat([p[1] for p in parts])
        if self.hparams.verify_checksums and labels.shape[0] != s.counts[split]:
            raise DataFileError(
                f"{self.folder}: the {split} files hold {labels.shape[0]} images, the official ones {s.counts[split]}"
            )
        return images, labels

    def count_classes(self, labels: Tensor) -> int:
        """The dataset's classes (10 or 100); every label must be one of them."""
        bad = labels[(labels < 0) | (labels >= self.source.num_classes)]
        if bad.numel():
            raise DataFileError(
                f"{self.folder}: label {int(bad[0])} is outside 0…{self.source.num_classes - 1} ({self.source.title} "
                f"has {self.source.num_classes} classes)"
            )
        return self.source.num_classes


class CIFAR10DataModule(CIFARDataModule):
    """CIFAR-10: 50,000 training and 10,000 test images, 3 × 32 × 32, 10 classes.

    Batches are ``(images, labels)``: float32 images (B, 3, 32, 32), (x/255 − mean_c)/std_c per channel c, and
    int64 labels (B,); training images are flipped and cropped anew every epoch (``augment``).
    """

    source = CIFAR10

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 128,
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
        mean: tuple[float, float, float] | None = LABORIEUX_MEAN,
        std: tuple[float, float, float] | None = LABORIEUX_STD,
        augment: bool = True,
        crop_padding: int = 4,
    ) -> None:
        """
        Args:
            data_dir: folder holding the unpacked ``cifar-10-batches-py/`` (CIFAR-100: ``cifar-100-python/``).
            batch_size: training batch size (Laborieux et al. 2021: 128).
            eval_batch_size, val_size, split_seed, train_subset, test_subset, device_resident, num_workers,
                return_index, val_split, shuffle: as in :class:`~ep_lightning.data.MNISTDataModule`.
            verify_checksums: check every file's MD5 and the image counts against the official ones; false loads
                files of any size in the official format.
            download: fetch the official archive (standard library; MD5-checked) if files are missing.
            mean, std: per-channel normalisation (x − mean)/std of images in [0, 1]; null for none. Default:
                Laborieux et al.'s mean (0.4914, 0.4822, 0.4465) and 3 × (0.2023, 0.1994, 0.2010).
            augment: training images get a random horizontal flip (probability 0.5) and a random 32 × 32 crop of the
                image edge-padded by ``crop_padding`` pixels, drawn per sample and epoch from the run seed (exactly
                resumable); validation, test and predict images never.
            crop_padding: edge padding of the random crop (4 in Laborieux et al.; 0 = flip only).
        """
        super().__init__()


class CIFAR100DataModule(CIFARDataModule):
    """CIFAR-100: 50,000 training and 10,000 test images, 3 × 32 × 32, 100 classes (the fine labels).

    Options as :class:`CIFAR10DataModule`; the default normalisation is the same (Laborieux et al.'s CIFAR-10
    values).
    """

    source = CIFAR100

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 128,
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
        mean: tuple[float, float, float] | None = LABORIEUX_MEAN,
        std: tuple[float, float, float] | None = LABORIEUX_STD,
        augment: bool = True,
        crop_padding: int = 4,
    ) -> None:
        super().__init__()
