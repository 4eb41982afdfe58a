"""CIFAR-10 / CIFAR-100 DataModules on small folders written in the official format (tests/cifar_files.py): the
pixels land where the format puts them, normalisation is (x/255 − mean)/std, the splits and class counts are right,
and every bad file is one error naming it (never executed, never used)."""

from __future__ import annotations

import dataclasses
import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from cifar_files import write_cifar

from ep_lightning.cli import cli_main
from ep_lightning.data import (
    CIFAR10,
    LABORIEUX_MEAN,
    LABORIEUX_STD,
    CIFAR10DataModule,
    CIFAR100DataModule,
    DataFileError,
)

RAW_ONLY = {"verify_checksums": False, "mean": None, "std": None, "augment": False}


def test_pixels_are_read_row_major_chw(tmp_path: Path) -> None:
    """Row n of b'data' holds image n as red, green, blue planes of 32 × 32, row-major: pixel (c, i, j) is byte
    1024·c + 32·i + j. Checked byte by byte against the file's own array, read back with pickle independently."""
    written = write_cifar(tmp_path, train=7, test=5)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), **RAW_ONLY)
    dm.setup("fit")
    raw = pickle.loads((written.folder / "test_batch").read_bytes())[b"data"]
    x = dm.test_set.images
    assert x.shape == (5, 3, 32, 32) and x.dtype == torch.float32
    for n, c, i, j in [(0, 0, 0, 0), (1, 1, 5, 31), (4, 2, 31, 0), (3, 2, 17, 9)]:
        assert x[n, c, i, j].item() == np.float32(raw[n, 1024 * c + 32 * i + j]) / np.float32(255), (n, c, i, j)
    assert torch.equal(dm.test_set.labels, torch.as_tensor(written.test_labels))
    # training files are concatenated in order data_batch_1 … data_batch_5
    assert torch.equal(dm.train_set.labels, torch.as_tensor(written.train_labels))
    assert torch.equal((dm.train_set.images * 255).round().to(torch.uint8), torch.as_tensor(written.train_images))
    assert dm.input_shape == (3, 32, 32) and dm.num_classes == 10
    assert dm.class_names == [f"class{i}" for i in range(10)]


def test_normalisation_is_laborieux_per_channel(tmp_path: Path) -> None:
    """Default normalisation: (x/255 − mean_c)/std_c with Laborieux et al.'s values, against float64 arithmetic.
    Tolerance: the loader computes in float32 (x/255, minus, divide: 3 roundings of ≤ 2^-24 relative on values of
    size ≤ 2.5), so 1e-6 absolute is a few ulps."""
    written = write_cifar(tmp_path, train=3, test=4)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), verify_checksums=False)
    dm.setup("test")
    mean = np.array([0.4914, 0.4822, 0.4465])[None, :, None, None]
    std = 3 * np.array([0.2023, 0.1994, 0.2010])[None, :, None, None]
    expected = (written.test_images.astype(np.float64) / 255 - mean) / std
    np.testing.assert_allclose(dm.test_set.images.double().numpy(), expected, rtol=0, atol=1e-6)
    assert LABORIEUX_MEAN == (0.4914, 0.4822, 0.4465) and LABORIEUX_STD == (3 * 0.2023, 3 * 0.1994, 3 * 0.2010)


def test_cifar100_reads_the_fine_labels(tmp_path: Path) -> None:
    written = write_cifar(tmp_path, kind="cifar100", train=30, test=10)
    dm = CIFAR100DataModule(data_dir=str(tmp_path), **RAW_ONLY)
    dm.setup("fit")
    assert torch.equal(dm.train_set.labels, torch.as_tensor(written.train_labels))
    assert not torch.equal(dm.train_set.labels, torch.as_tensor(written.train_labels) // 5), "not the coarse labels"
    assert dm.num_classes == 100 and dm.input_shape == (3, 32, 32) and len(dm.class_names) == 100


@pytest.mark.parametrize("protocol", [2, 5])
def test_pickle_protocols_load(tmp_path: Path, protocol: int) -> None:
    """Protocol 2 (as the official Python-2 files) and 5 (numpy's out-of-band-capable path) read the same."""
    written = write_cifar(tmp_path, train=2, test=3, protocol=protocol)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), **RAW_ONLY)
    dm.setup("test")
    assert torch.equal((dm.test_set.images * 255).round().to(torch.uint8), torch.as_tensor(written.test_images))


def test_validation_split_and_subsets(tmp_path: Path) -> None:
    """val_size images drawn with split_seed (the MNIST protocol), train_subset after the split."""
    write_cifar(tmp_path, train=20, test=10)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), val_size=30, train_subset=50, test_subset=4, **RAW_ONLY)
    dm.setup("fit")
    perm = torch.randperm(100, generator=torch.Generator().manual_seed(0))
    everything = CIFAR10DataModule(data_dir=str(tmp_path), **RAW_ONLY)
    everything.setup("fit")
    assert torch.equal(dm.val_set.images, everything.train_set.images[perm[:30].sort().values])
    assert torch.equal(dm.train_set.images, everything.train_set.images[perm[30:].sort().values][:50])
    assert len(dm.test_set) == 4


def test_official_checksums_are_checked_by_default(tmp_path: Path) -> None:
    """A file in the right format that is not the official one: one error naming it and the official MD5."""
    write_cifar(tmp_path, train=2, test=2)
    dm = CIFAR10DataModule(data_dir=str(tmp_path))
    path = tmp_path / "cifar-10-batches-py" / "batches.meta"
    with pytest.raises(DataFileError, match=rf"checksum mismatch for {path}: .* has {CIFAR10.meta_file[1]}"):
        dm.setup("test")
    assert dm.test_set is None


def test_verified_files_must_have_the_official_counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With checksums on, the image counts are checked too (here with the fixture's MD5s standing in for the
    official ones, so that the count check is reached)."""
    written = write_cifar(tmp_path, train=2, test=2)
    md5 = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in written.folder.iterdir()}
    source = dataclasses.replace(
        CIFAR10,
        train_files={k: md5[k] for k in CIFAR10.train_files},
        test_files={"test_batch": md5["test_batch"]},
        meta_file=("batches.meta", md5["batches.meta"]),
    )
    monkeypatch.setattr(CIFAR10DataModule, "source", source)
    with pytest.raises(DataFileError, match=r"the test files hold 2 images, the official ones 10000"):
        CIFAR10DataModule(data_dir=str(tmp_path)).setup("test")
    monkeypatch.setattr(CIFAR10DataModule, "source", dataclasses.replace(source, counts={"train": 10, "test": 2}))
    dm = CIFAR10DataModule(data_dir=str(tmp_path))
    dm.setup("fit")
    assert len(dm.train_set) == 10 and len(dm.test_set) == 2


def test_missing_file_names_folder_url_and_download(tmp_path: Path) -> None:
    write_cifar(tmp_path, train=2, test=2)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    dm = CIFAR10DataModule(data_dir=str(tmp_path), verify_checksums=False)
    with pytest.raises(DataFileError) as info:
        dm.prepare_data()
    message = str(info.value)
    assert "\n" not in message
    assert f"missing data file {tmp_path / 'cifar-10-batches-py' / 'data_batch_3'}" in message
    assert (
        CIFAR10.url in message and "data.init_args.download: true" in message and "data.init_args.data_dir" in message
    )


def test_missing_folder_through_the_cli_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    configs = Path(__file__).resolve().parents[1] / "configs"
    with pytest.raises(SystemExit) as info:
        cli_main(
            [
                "fit",
                "--config",
                str(configs / "mnist/pconv_ep.yaml"),
                "--data.class_path",
                "ep_lightning.data.CIFAR100DataModule",
                "--data.init_args.data_dir",
                str(tmp_path),
                "--trainer.logger",
                "false",
                "--trainer.enable_progress_bar",
                "false",
            ]
        )
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert info.value.code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith(f"error: missing data file {tmp_path / 'cifar-100-python'}"), err
    assert "cifar-100-python.tar.gz" in errors[0] and "data.init_args.download: true" in errors[0]
    assert not (tmp_path / "cifar-100-python").exists(), "nothing is created without download: true"


def test_a_pickle_that_runs_code_is_refused_unexecuted(tmp_path: Path) -> None:
    """verify_checksums: false reads unvouched files; a pickle calling a function other than numpy's array
    reconstruction is refused by name before anything runs."""
    write_cifar(tmp_path, train=2, test=2)
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({b"data": Payload()}))
    with pytest.raises(DataFileError, match=r"test_batch is not a CIFAR python pickle .*pathlib"):
        CIFAR10DataModule(data_dir=str(tmp_path), **RAW_ONLY).setup("test")
    assert not marker.exists()


@pytest.mark.parametrize(
    "entry, fragment",
    [
        ({b"data": np.zeros((2, 3072), np.uint8)}, "has no 'labels' entry"),
        ({b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]}, r"'data' must be uint8 of shape \(N, 3072\)"),
        ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, "'data' must be uint8"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "2 images but 'labels' has shape"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, r"label 10 is outside 0…9"),
        ([1, 2, 3], "holds a list, not the dict"),
    ],
)
def test_malformed_files_are_reported_by_name(tmp_path: Path, entry: object, fragment: str) -> None:
    write_cifar(tmp_path, train=2, test=2)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(pickle.dumps(entry, protocol=2))
    with pytest.raises(DataFileError, match=fragment) as info:
        CIFAR10DataModule(data_dir=str(tmp_path), **RAW_ONLY).setup("test")
    assert "label 10" in fragment or str(path) in str(info.value)


def test_truncated_pickle_is_reported_by_name(tmp_path: Path) -> None:
    write_cifar(tmp_path, train=2, test=2)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DataFileError, match=rf"data file {path} is not a CIFAR python pickle"):
        CIFAR10DataModule(data_dir=str(tmp_path), **RAW_ONLY).setup("fit")


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"mean": (0.5, 0.5, 0.5), "std": None}, "give both"),
        ({"std": (1.0, 0.0, 1.0)}, "data.std=.* is invalid"),
        ({"crop_padding": -1}, "data.crop_padding=-1 is invalid"),
        ({"batch_size": 0}, "data.batch_size=0 is invalid"),
    ],
)
def test_invalid_options_are_rejected_at_construction(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        CIFAR10DataModule(**kwargs)


def test_augmentation_only_for_training_data(tmp_path: Path) -> None:
    """augment: true gives the training set an augmentation and indices to draw it with; evaluation sets stay
    (images, labels) and are never augmented; augment: false has none."""
    write_cifar(tmp_path, train=4, test=3)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), verify_checksums=False, val_size=5)
    dm.setup("fit")
    assert dm.augmentation is not None and dm.augmentation.size == len(dm.train_set) == 15
    assert len(dm.train_set[0]) == 3 and len(dm.val_set[0]) == 2 and len(dm.test_set[0]) == 2
    plain = CIFAR10DataModule(data_dir=str(tmp_path), verify_checksums=False, augment=False)
    plain.setup("fit")
    assert plain.augmentation is None and len(plain.train_set[0]) == 2
