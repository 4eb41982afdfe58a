"""MNISTDataModule error handling: a missing, corrupt or truncated file is reported by name and never used or
downloaded over; impossible split sizes are rejected naming the field. Plus the data contract the model relies on.

Corruption tests use the small t10k files (setup('test')) in a temporary copy of data/MNIST/raw.
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from ep_lightning.cli import cli_main
from ep_lightning.data import MNIST_MD5, DataFileError, MNISTDataModule

RAW = Path(__file__).resolve().parents[1] / "data" / "MNIST" / "raw"
LABELS = "t10k-labels-idx1-ubyte"
IMAGES = "t10k-images-idx3-ubyte"


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A copy of the test-split files (train files linked, they are only read) under tmp/MNIST/raw."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in RAW.iterdir():
        if f.name.startswith("t10k"):
            shutil.copy(f, raw / f.name)
        else:
            (raw / f.name).symlink_to(f)
    return tmp_path


def _raw(data_dir: Path) -> Path:
    return data_dir / "MNIST" / "raw"


def _rewrite_labels(data_dir: Path, change) -> Path:
    """Decompress the test labels, apply ``change`` to the bytes, write them back gzipped; return the path."""
    path = _raw(data_dir) / f"{LABELS}.gz"
    content = bytearray(gzip.decompress(path.read_bytes()))
    path.write_bytes(gzip.compress(bytes(change(content))))
    return path


def test_official_files_pass_their_checksums() -> None:
    """The shipped files are the official ones (independent MD5 over the decompressed bytes)."""
    for stem, md5 in MNIST_MD5.items():
        assert hashlib.md5(gzip.decompress((RAW / f"{stem}.gz").read_bytes())).hexdigest() == md5, stem


def test_data_contract_shapes_and_classes() -> None:
    data = MNISTDataModule(data_dir=str(RAW.parents[1]), test_subset=50)
    data.setup("test")
    x, y = next(iter(data.test_dataloader()))
    assert x.shape == (50, 1, 28, 28) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert y.dtype == torch.int64
    assert data.input_shape == (1, 28, 28) and data.num_classes == 10


def test_changed_label_fails_the_checksum_naming_the_file(data_dir: Path) -> None:
    def flip(content: bytearray) -> bytearray:
        content[100] = (content[100] + 1) % 10  # a valid IDX file with one wrong label
        return content

    path = _rewrite_labels(data_dir, flip)
    data = MNISTDataModule(data_dir=str(data_dir))
    with pytest.raises(
        DataFileError, match=rf"checksum mismatch for {path}.*official {LABELS} has {MNIST_MD5[LABELS]}"
    ):
        data.setup("test")
    assert data.test_set is None, "a file that fails its checksum must not be used"


def test_truncated_gzip_is_reported_by_name(data_dir: Path) -> None:
    path = _raw(data_dir) / f"{IMAGES}.gz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataFileError, match=rf"data file {path} is corrupt or truncated"):
        MNISTDataModule(data_dir=str(data_dir)).setup("test")


def test_garbage_gzip_is_reported_by_name(data_dir: Path) -> None:
    path = _raw(data_dir) / f"{LABELS}.gz"
    path.write_bytes(b"\x1f\x8b" + b"not a gzip stream at all" * 10)
    with pytest.raises(DataFileError, match=rf"data file {path} is corrupt or truncated"):
        MNISTDataModule(data_dir=str(data_dir)).setup("test")


def test_truncated_plain_file_is_reported_by_checksum_and_by_size(data_dir: Path) -> None:
    """An uncompressed IDX file cut short: with checksums on, the MD5 names it; with them off (other datasets),
    the header/size check still refuses it."""
    gz = _raw(data_dir) / f"{LABELS}.gz"
    plain = _raw(data_dir) / LABELS
    plain.write_bytes(gzip.decompress(gz.read_bytes())[:-100])
    gz.unlink()
    with pytest.raises(DataFileError, match=rf"checksum mismatch for {plain}"):
        MNISTDataModule(data_dir=str(data_dir)).setup("test")
    with pytest.raises(DataFileError, match=rf"data file {plain} is truncated or padded.*\[10000\]"):
        MNISTDataModule(data_dir=str(data_dir), verify_checksums=False).setup("test")


def test_bad_magic_number_is_reported(data_dir: Path) -> None:
    def bad_magic(content: bytearray) -> bytearray:
        content[2] = 0x0D  # float IDX: not ours
        return content

    path = _rewrite_labels(data_dir, bad_magic)
    with pytest.raises(DataFileError, match=rf"{path} is not an unsigned-byte IDX file"):
        MNISTDataModule(data_dir=str(data_dir), verify_checksums=False).setup("test")


def test_missing_file_is_reported_with_what_to_do(data_dir: Path) -> None:
    (_raw(data_dir) / f"{LABELS}.gz").unlink()
    data = MNISTDataModule(data_dir=str(data_dir))
    with pytest.raises(DataFileError, match=rf"missing data file {_raw(data_dir) / LABELS}\[\.gz\].*data_dir"):
        data.prepare_data()


def test_corrupt_file_is_never_downloaded_over(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With download: true, a present-but-corrupt file is an error, not a reason to fetch and replace it."""
    path = _rewrite_labels(data_dir, lambda c: c[:-1] + bytearray([(c[-1] + 1) % 10]))
    before = path.read_bytes()
    data = MNISTDataModule(data_dir=str(data_dir), download=True)
    monkeypatch.setattr(data, "_download", lambda: pytest.fail("must not download over an existing file"))
    data.prepare_data()  # all files are present: nothing to download
    with pytest.raises(DataFileError, match=f"checksum mismatch for {path}"):
        data.setup("test")
    assert path.read_bytes() == before, "the corrupt file must be left as it is, for the user to inspect"


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"val_size": 60000}, "data.val_size=60000 is impossible: the training file holds 60000 images"),
        ({"val_size": 59990, "train_subset": 20}, "data.train_subset=20 is impossible: only 10 images"),
        ({"test_subset": 10001}, "data.test_subset=10001 is impossible: only 10000 images"),
    ],
)
def test_impossible_split_sizes(kwargs: dict, fragment: str) -> None:
    data = MNISTDataModule(data_dir=str(RAW.parents[1]), **kwargs)
    with pytest.raises(ValueError, match=fragment):
        data.setup("fit" if "test_subset" not in kwargs else "test")


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"val_size": -1}, "data.val_size=-1 is invalid"),
        ({"batch_size": 0}, "data.batch_size=0 is invalid"),
        ({"eval_batch_size": -5}, "data.eval_batch_size=-5 is invalid"),
        ({"train_subset": 0}, "data.train_subset=0 is invalid"),
        ({"num_workers": -1}, "data.num_workers=-1 is invalid"),
    ],
)
def test_invalid_arguments_are_rejected_at_construction(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        MNISTDataModule(**kwargs)


def test_corrupt_file_through_the_cli_is_one_line(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _rewrite_labels(data_dir, lambda c: c[:-1] + bytearray([(c[-1] + 1) % 10]))
    with pytest.raises(SystemExit) as info:
        cli_main(
            [
                "test",
                "--evaluate_untrained",
                "true",
                "--config",
                str(RAW.parents[2] / "configs/mnist/p1h_ep.yaml"),
                "--trainer.logger",
                "false",
                "--data.data_dir",
                str(data_dir),
                "--trainer.enable_progress_bar",
                "false",
            ]
        )
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("error:") == 1 and "Traceback" not in err, err
    assert f"checksum mismatch for {path}" in err, err


def test_fit_setup_verifies_the_test_files_too(data_dir: Path) -> None:
    """`fit` tests the final weights: a corrupt test file must fail at setup, before the first training step."""
    raw = _raw(data_dir) / f"{LABELS}.gz"
    content = bytearray(gzip.decompress(raw.read_bytes()))
    content[100] ^= 0x01
    raw.write_bytes(gzip.compress(bytes(content)))
    dm = MNISTDataModule(data_dir=str(data_dir))
    with pytest.raises(DataFileError, match=LABELS):
        dm.setup("fit")


def test_val_split_last_takes_the_last_training_images() -> None:
    """`val_split: last` (the Initialized EP authors' protocol): validation = the last val_size images of the file,
    training = the others in file order; compared with the file read directly."""
    from ep_lightning.data import load_idx

    labels = load_idx(RAW, "train-labels-idx1-ubyte", verify=False).long()
    dm = MNISTDataModule(data_dir=str(RAW.parents[1]), val_size=10_000, val_split="last")
    dm.setup("fit")
    assert torch.equal(dm.val_set.labels, labels[50_000:])
    assert torch.equal(dm.train_set.labels, labels[:50_000])


def test_shuffle_false_keeps_the_file_order() -> None:
    dm = MNISTDataModule(data_dir=str(RAW.parents[1]), train_subset=100, batch_size=10, shuffle=False)
    dm.setup("fit")
    for _ in range(2):  # every epoch
        order = torch.cat([batch[1] for batch in dm.train_dataloader()])
        assert torch.equal(order, dm.train_set.labels)
    shuffled = MNISTDataModule(data_dir=str(RAW.parents[1]), train_subset=100, batch_size=10)
    shuffled.setup("fit")
    assert not torch.equal(torch.cat([b[1] for b in shuffled.train_dataloader()]), shuffled.train_set.labels)


def test_unknown_val_split_is_rejected() -> None:
    with pytest.raises(ValueError, match="data.val_split='first'"):
        MNISTDataModule(val_split="first")


def test_permutation_batches_equal_the_int_sampler_batches_and_resume() -> None:
    """Training batches sliced from the epoch's permutation are the batches of the per-sample int sampler (last one
    short), for every epoch, with the same (images, labels, index); mid-epoch resume continues with the same ones."""
    from torch.utils.data import DataLoader

    from ep_lightning.data import EpochShuffleSampler, PermutationBatchSampler, ResumableDataLoader, keep_batch

    dm = MNISTDataModule(data_dir=str(RAW.parents[1]), train_subset=105, batch_size=10, return_index=True)
    dm.setup("fit")
    data = dm.train_set
    for epoch in (0, 3):
        ints = DataLoader(data, batch_size=10, sampler=EpochShuffleSampler(105, 11), collate_fn=keep_batch)
        ints.sampler.set_epoch(epoch)
        sliced = ResumableDataLoader(
            data, batch_sampler=PermutationBatchSampler(EpochShuffleSampler(105, 11), 10), collate_fn=keep_batch
        )
        sliced.batch_sampler.sampler.set_epoch(epoch)
        a, b = list(ints), list(sliced)
        assert len(a) == len(b) == len(sliced) == 11 and b[-1][1].shape == (5,)
        for batch_a, batch_b in zip(a, b):
            assert all(torch.equal(u, v) for u, v in zip(batch_a, batch_b))
    done = {"n": 4}
    loader = ResumableDataLoader(
        data,
        batch_sampler=PermutationBatchSampler(EpochShuffleSampler(105, 11), 10),
        collate_fn=keep_batch,
        batches_done=lambda: done["n"],
    )
    loader.batch_sampler.sampler.set_epoch(2)
    full = [batch[2].tolist() for batch in loader]
    state = loader.state_dict()
    assert state == {"seed": 11, "epoch": 2, "samples_done": 40}
    fresh = ResumableDataLoader(
        data, batch_sampler=PermutationBatchSampler(EpochShuffleSampler(105, 0), 10), collate_fn=keep_batch
    )
    fresh.load_state_dict(state)
    fresh.batch_sampler.sampler.set_epoch(2)  # Lightning sets the same epoch again on resume
    assert [batch[2].tolist() for batch in fresh] == full[4:]
    assert [batch[2].tolist() for batch in fresh] == full
