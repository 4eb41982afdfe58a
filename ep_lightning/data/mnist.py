"""MNIST and Fashion-MNIST (or any dataset in the same IDX layout) from ``<data_dir>/<name>/raw/*-idx?-ubyte[.gz]``
(torchvision's layout), offline; no PIL, no per-sample transform."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from torch import Tensor

from ep_lightning.data.base import ImageDataModule
from ep_lightning.data.download import download_idx
from ep_lightning.data.formats import load_idx
from ep_lightning.data.sources import IDX_SOURCES, SPLIT_FILES
from ep_lightning.errors import DataFileError


class IDXDataModule(ImageDataModule):
    """A dataset in MNIST's IDX layout in ``<data_dir>/<name>/raw/``; ``name`` is the class's ``dataset`` unless the
    subclass offers it as an option."""

    dataset = "MNIST"

    @property
    def dataset_name(self) -> str:
        """The folder under ``data_dir``: the ``name`` option where the class has one, else ``dataset``."""
        return self.hparams.get("name", self.dataset)

    def check_options(self) -> None:
        super().check_options()
        if self.hparams.verify_checksums and self.dataset_name not in IDX_SOURCES:
            raise ValueError(
                f"data.name={self.dataset_name!r} has no official checksums here (known: {', '.join(IDX_SOURCES)}); "
                f"set data.init_args.verify_checksums: false to read it unchecked"
            )

    @property
    def raw_dir(self) -> Path:
        return Path(self.hparams.data_dir) / self.dataset_name / "raw"

    def _md5(self) -> dict[str, str]:
        source = IDX_SOURCES.get(self.dataset_name)
        return source.md5 if source is not None else {}  # unknown datasets are read with verify_checksums: false

    # --- files -----------------------------------------------------------------------------------------------
    def missing_files(self) -> list[str]:
        raw = self.raw_dir
        stems = [stem for pair in SPLIT_FILES.values() for stem in pair]
        return [s for s in stems if not ((raw / s).is_file() or (raw / f"{s}.gz").is_file())]

    def _hint(self) -> str:
        """What to do about a missing file: where the official files are, which folder, which options."""
        name, raw = self.dataset_name, self.raw_dir
        source = IDX_SOURCES.get(name)
        official = f"the official files ({source.mirrors[0]}<file>.gz)" if source is not None else "the IDX files"
        shipped = f" (a clone of this repository ships {name} in data/{name}/raw)" if source is not None else ""
        download = ", or set `data.init_args.download: true`" if source is not None else ""
        return (
            f"put {official} in {raw}{shipped}, point `data.init_args.data_dir` at the folder that holds "
            f"'{name}/raw'{download}"
        )

    def missing_file_error(self, name: str) -> DataFileError:
        return DataFileError(f"missing data file {self.raw_dir / name}[.gz]: {self._hint()}")

    def _download(self) -> None:
        source = IDX_SOURCES.get(self.dataset_name)
        if source is None:
            raise DataFileError(
                f"data.download=true: no official source is known for data.name={self.dataset_name!r} "
                f"(known: {', '.join(IDX_SOURCES)}); copy its IDX files into {self.raw_dir}"
            )
        download_idx(source, self.raw_dir, self.missing_files())

    def read_split(self, split: str) -> tuple[Tensor, Tensor]:
        image_stem, label_stem = SPLIT_FILES[split]
        verify, md5, hint = self.hparams.verify_checksums, self._md5(), self._hint()
        images = load_idx(self.raw_dir, image_stem, verify, md5, hint)
        labels = load_idx(self.raw_dir, label_stem, verify, md5, hint).long()
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise DataFileError(
                f"{self.raw_dir}: {split} images have shape {tuple(images.shape)} and labels {tuple(labels.shape)}; "
                f"expected (N, H, W) images and N labels"
            )
        return images.unsqueeze(1), labels

    def count_classes(self, labels: Tensor) -> int:
        """1 + the largest label over every split read so far."""
        classes = int(labels.max()) + 1 if labels.numel() else 0
        return max(classes, self.num_classes or 0)


class MNISTDataModule(IDXDataModule):
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
            name: dataset folder name; any dataset in MNIST's IDX layout works (``MNIST`` and ``FashionMNIST`` have
                their official checksums; for others set ``verify_checksums: false``).
            batch_size: training batch size (the papers use 20).
            eval_batch_size: batch size for validation, test and predict.
            val_size: images split off the 60k training images for validation (0 = none, the paper's protocol).
            split_seed: seed of the generator that draws the validation split (independent of the run seed).
            train_subset: use only the first N training images (after the split); for quick runs and tests.
            test_subset: use only the first N test images.
            verify_checksums: check the MD5 of every file against the official one of dataset ``name``.
            device_resident: keep the whole dataset on the training device; batches are sliced there, no copies.
            num_workers: DataLoader workers (0 is fastest for in-memory tensors).
            download: fetch missing files from the official site (standard library; MD5-checked).
            return_index: training batches are ``(images, labels, indices)`` with each sample's int64 index in the
                training set (stable across epochs; needed by ``warm_start``); validation/test/predict batches stay
                ``(images, labels)``.
            val_split: which training images form the validation split: ``random`` (drawn with ``split_seed``) or
                ``last`` (the last ``val_size`` images of the training file: Initialized EP's authors' protocol).
            shuffle: reshuffle the training set every epoch (default); false keeps the file's order (the Initialized
                EP authors' protocol).
        """
        super().__init__()


class FashionMNISTDataModule(IDXDataModule):
    """Fashion-MNIST (Xiao, Rasul, Vollgraf 2017: ten classes of Zalando article images in MNIST's IDX layout and
    sizes) from ``<data_dir>/FashionMNIST/raw/``, checked against the official MD5s.

    Options as :class:`MNISTDataModule` except ``name`` (the folder is always ``FashionMNIST``: switching
    ``data.class_path`` from MNIST cannot carry ``name: MNIST`` over).
    """

    dataset = "FashionMNIST"

    def __init__(
        self,
        data_dir: str = "data",
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
        super().__init__()
