"""The official files of each dataset: where they live on disk, where they are published, and their MD5s.

Sources of the checksums:

- MNIST: the uncompressed files of http://yann.lecun.com/exdb/mnist/ (the values in ``data/MNIST/SOURCE.md``);
- Fashion-MNIST: the uncompressed upstream IDX files of https://github.com/zalandoresearch/fashion-mnist (the values
  in ``data/FashionMNIST/SOURCE.md``);
- CIFAR-10 / CIFAR-100: the python versions of https://www.cs.toronto.edu/~kriz/cifar.html; the archive MD5s are
  the ones published on that page, the MD5s of the unpacked files the ones torchvision's ``datasets.CIFAR10`` and
  ``datasets.CIFAR100`` check.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: MD5 of the *uncompressed* official MNIST files (LeCun, Cortes, Burges).
MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
#: MD5 of the *uncompressed* official Fashion-MNIST files (Xiao, Rasul, Vollgraf, Zalando Research).
FASHION_MNIST_MD5 = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}
#: (images, labels) file stems of each split, in every IDX dataset of MNIST's layout.
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass(frozen=True)
class IDXSource:
    """An IDX dataset in ``<data_dir>/<name>/raw/``: its published ``<stem>.gz`` files (tried mirror by mirror)
    and the MD5 of each uncompressed file."""

    name: str
    md5: dict[str, str]
    mirrors: tuple[str, ...]
    num_classes: int = 10


@dataclass(frozen=True)
class CIFARSource:
    """A CIFAR python-pickle folder ``<data_dir>/<folder>/`` as unpacked from the published archive."""

    title: str
    folder: str
    url: str
    archive_md5: str
    #: file name → MD5, for the training files (in order), the test file and the metadata file
    train_files: dict[str, str]
    test_files: dict[str, str]
    meta_file: tuple[str, str]
    #: pickle key of the labels (``labels``; CIFAR-100: ``fine_labels``) and of the class names in the meta file
    label_key: str
    names_key: str
    num_classes: int
    counts: dict[str, int] = field(default_factory=lambda: {"train": 50_000, "test": 10_000})

    @property
    def files(self) -> dict[str, str]:
        """Every official file of the folder and its MD5."""
        return {**self.train_files, **self.test_files, self.meta_file[0]: self.meta_file[1]}


IDX_SOURCES = {
    "MNIST": IDXSource(
        "MNIST",
        MNIST_MD5,
        ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
    ),
    "FashionMNIST": IDXSource(
        "FashionMNIST", FASHION_MNIST_MD5, ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)
    ),
}

CIFAR10 = CIFARSource(
    title="CIFAR-10",
    folder="cifar-10-batches-py",
    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    archive_md5="c58f30108f718f92721af3b95e74349a",
    train_files={
        "data_batch_1": "c99cafc152244af753f735de768cd75f",
        "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
        "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
        "data_batch_4": "634d18415352ddfa80567beed471001a",
        "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    },
    test_files={"test_batch": "40351d587109b95175f43aff81a1287e"},
    meta_file=("batches.meta", "5ff9c542aee3614f3951f8cda6e48888"),
    label_key="labels",
    names_key="label_names",
    num_classes=10,
)
CIFAR100 = CIFARSource(
    title="CIFAR-100",
    folder="cifar-100-python",
    url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    archive_md5="eb9058c3a382ffc7106e4002c42a8d85",
    train_files={"train": "16019d7e3df5f24257cddd939b257f8d"},
    test_files={"test": "f0ef6b0ae62326f3e7ffdfab6717acfc"},
    meta_file=("meta", "7973b15100ade9c7d40fb424638fde48"),
    label_key="fine_labels",
    names_key="fine_label_names",
    num_classes=100,
)
