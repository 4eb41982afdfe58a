"""Image datasets as LightningDataModules that work offline, resume exactly mid-epoch (also under DDP) and augment on
the training device.

- ``sources``   the official files of each dataset: folders, URLs, MD5s
- ``formats``   reading IDX files and CIFAR python pickles into uint8 tensors
- ``tensors``   datasets held as tensors, indexed a whole batch at a time
- ``sampling``  seeded epoch permutations, batches as slices, exact resume, the resumable distributed sampler
- ``augment``   per-channel normalisation, random flip + edge-padded crop as a function of (seed, epoch, sample)
- ``download``  ``data.download: true`` with urllib, MD5-checked
- ``base``      the shared DataModule: splits, checks, device-resident tensors, loaders, augmentation hook
- ``mnist``     MNISTDataModule, FashionMNISTDataModule         ``cifar``  CIFAR10DataModule, CIFAR100DataModule
"""

from ep_lightning.data.augment import LABORIEUX_MEAN, LABORIEUX_STD, RandomFlipCrop, flip_crop, normalize
from ep_lightning.data.base import ImageDataModule
from ep_lightning.data.cifar import CIFAR10DataModule, CIFAR100DataModule, CIFARDataModule
from ep_lightning.data.formats import find_idx_file, load_cifar_batch, load_idx, parse_idx, read_idx_bytes
from ep_lightning.data.mnist import FashionMNISTDataModule, IDXDataModule, MNISTDataModule
from ep_lightning.data.sampling import (
    EpochShuffleSampler,
    PermutationBatchSampler,
    ResumableDataLoader,
    ResumableDistributedSampler,
    epoch_permutation,
    shuffle_seed,
)
from ep_lightning.data.sources import CIFAR10, CIFAR100, FASHION_MNIST_MD5, MNIST_MD5, SPLIT_FILES
from ep_lightning.data.tensors import TensorPairDataset, keep_batch, to_float_images
from ep_lightning.errors import DataFileError

__all__ = [
    "CIFAR10",
    "CIFAR100",
    "FASHION_MNIST_MD5",
    "LABORIEUX_MEAN",
    "LABORIEUX_STD",
    "MNIST_MD5",
    "SPLIT_FILES",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "CIFARDataModule",
    "DataFileError",
    "EpochShuffleSampler",
    "FashionMNISTDataModule",
    "IDXDataModule",
    "ImageDataModule",
    "MNISTDataModule",
    "PermutationBatchSampler",
    "RandomFlipCrop",
    "ResumableDataLoader",
    "ResumableDistributedSampler",
    "TensorPairDataset",
    "epoch_permutation",
    "find_idx_file",
    "flip_crop",
    "keep_batch",
    "load_cifar_batch",
    "load_idx",
    "normalize",
    "parse_idx",
    "read_idx_bytes",
    "shuffle_seed",
    "to_float_images",
]
