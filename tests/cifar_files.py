"""Writes small CIFAR-10 / CIFAR-100 folders in the exact official format (the python version's pickles), for the
loader tests: no machine of this project can fetch the real files.

Official layout (https://www.cs.toronto.edu/~kriz/cifar.html): each file is a pickled dict with byte-string keys;
``b'data'`` is a uint8 numpy array (N, 3072) whose rows hold the red, green and blue 32 × 32 planes, each
row-major; ``b'labels'`` (CIFAR-10) or ``b'fine_labels'`` and ``b'coarse_labels'`` (CIFAR-100) are lists of ints;
``batches.meta`` / ``meta`` list the class names.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CIFAR10_TRAIN = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"]


@dataclass
class Written:
    """What was written: the images (N, 3, 32, 32) and labels of each split, in file order, and the folder."""

    folder: Path
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def _dump(path: Path, entry: dict, protocol: int) -> None:
    path.write_bytes(pickle.dumps(entry, protocol=protocol))


def write_cifar(
    root: Path, kind: str = "cifar10", train: int = 50, test: int = 20, seed: int = 0, protocol: int = 2
) -> Written:
    """``root/cifar-10-batches-py/`` (``train`` images in each of the five training files) or
    ``root/cifar-100-python/`` (``train`` images in ``train``), ``test`` test images, random pixels and labels."""
    rng = np.random.default_rng(seed)
    classes = 10 if kind == "cifar10" else 100
    folder = root / ("cifar-10-batches-py" if kind == "cifar10" else "cifar-100-python")
    folder.mkdir(parents=True, exist_ok=True)
    files = CIFAR10_TRAIN if kind == "cifar10" else ["train"]
    images = {split: [] for split in ("train", "test")}
    labels = {split: [] for split in ("train", "test")}
    for split, names, n in (("train", files, train), ("test", ["test_batch" if kind == "cifar10" else "test"], test)):
        for name in names:
            chw = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
            fine = rng.integers(0, classes, size=n)
            data = chw.reshape(n, 3072)  # row n: R plane, G plane, B plane, each row-major: the official layout
            entry: dict = {b"batch_label": f"{name} of the test fixture".encode(), b"data": data}
            entry[b"filenames"] = [f"image_{i}.png".encode() for i in range(n)]
            if kind == "cifar10":
                entry[b"labels"] = [int(v) for v in fine]
            else:
                entry[b"fine_labels"] = [int(v) for v in fine]
                entry[b"coarse_labels"] = [int(v) // 5 for v in fine]  # differ from the fine labels: must not be read
            _dump(folder / name, entry, protocol)
            images[split].append(chw)
            labels[split].append(fine)
    if kind == "cifar10":
        meta = {
            b"label_names": [f"class{i}".encode() for i in range(10)],
            b"num_cases_per_batch": train,
            b"num_vis": 3072,
        }
        _dump(folder / "batches.meta", meta, protocol)
    else:
        meta = {
            b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)],
        }
        _dump(folder / "meta", meta, protocol)
    return Written(
        folder,
        np.concatenate(images["train"]),
        np.concatenate(labels["train"]),
        np.concatenate(images["test"]),
        np.concatenate(labels["test"]),
    )
