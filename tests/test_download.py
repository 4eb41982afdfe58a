"""``data.download: true`` against a local HTTP server on 127.0.0.1 that serves files this test writes: the
official sources are replaced by that server and by the MD5s of the served files (no network is reachable here).
Only missing files are fetched, mirrors are tried in order, a wrong checksum or a dead server is one error line and
leaves nothing behind."""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import http.server
import io
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from cifar_files import write_cifar

from ep_lightning.data import CIFAR10, CIFAR10DataModule, DataFileError, MNISTDataModule, sources

REPO_RAW = Path(__file__).resolve().parents[1] / "data" / "MNIST" / "raw"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(base URL, folder it serves): a ThreadingHTTPServer on an ephemeral port of 127.0.0.1."""
    root = tmp_path / "served"
    root.mkdir()

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", root
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


def serve_small_idx(served: Path) -> dict[str, str]:
    """Gzipped IDX files (the first 30 training / 20 test MNIST images) under served/mnist/; their MD5s."""
    from ep_lightning.data import SPLIT_FILES, load_idx

    folder = served / "mnist"
    folder.mkdir()
    md5 = {}
    for split, count in (("train", 30), ("test", 20)):
        for stem in SPLIT_FILES[split]:
            full = load_idx(REPO_RAW, stem, verify=False)[:count].contiguous()
            dims = b"".join(d.to_bytes(4, "big") for d in full.shape)
            content = bytes([0, 0, 0x08, full.ndim]) + dims + full.numpy().tobytes()
            (folder / f"{stem}.gz").write_bytes(gzip.compress(content))
            md5[stem] = hashlib.md5(content).hexdigest()
    return md5


def test_idx_download_tries_mirrors_and_checks_the_uncompressed_md5(
    server: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, served = server
    md5 = serve_small_idx(served)
    mirrors = (f"{url}/nowhere/", f"{url}/mnist/")  # the first mirror answers 404 for every file
    monkeypatch.setitem(sources.IDX_SOURCES, "MNIST", sources.IDXSource("MNIST", md5, mirrors))
    data_dir = tmp_path / "data"
    dm = MNISTDataModule(data_dir=str(data_dir), download=True)
    dm.prepare_data()
    raw = data_dir / "MNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(f"{s}.gz" for s in md5), "no temporary files left"
    dm.setup("fit")  # verify_checksums on, against the served files' MD5s
    reference = MNISTDataModule(
        data_dir=str(REPO_RAW.parents[1]), train_subset=30, test_subset=20, verify_checksums=False
    )
    reference.setup("fit")
    assert torch.equal(dm.train_set.images, reference.train_set.images), "the first 30 images of the file"
    assert torch.equal(dm.test_set.labels, reference.test_set.labels)


def test_only_missing_files_are_fetched(server: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    url, served = server
    md5 = serve_small_idx(served)
    monkeypatch.setitem(sources.IDX_SOURCES, "MNIST", sources.IDXSource("MNIST", md5, (f"{url}/mnist/",)))
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    kept = raw / "t10k-labels-idx1-ubyte"
    kept.write_bytes(b"a present file is never replaced")
    MNISTDataModule(data_dir=str(tmp_path), download=True).prepare_data()
    assert kept.read_bytes() == b"a present file is never replaced"
    assert not (raw / "t10k-labels-idx1-ubyte.gz").exists()
    assert len(list(raw.iterdir())) == 4


def test_wrong_checksum_is_one_line_and_keeps_nothing(
    server: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, served = server
    md5 = serve_small_idx(served)
    md5["train-images-idx3-ubyte"] = "0" * 32
    monkeypatch.setitem(sources.IDX_SOURCES, "MNIST", sources.IDXSource("MNIST", md5, (f"{url}/mnist/",)))
    with pytest.raises(DataFileError) as info:
        MNISTDataModule(data_dir=str(tmp_path), download=True).prepare_data()
    message = str(info.value)
    assert "\n" not in message and "downloaded MNIST train-images-idx3-ubyte has uncompressed MD5" in message
    assert "0" * 32 in message and "nothing was kept" in message
    assert not (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").exists()
    assert not list((tmp_path / "MNIST" / "raw").glob(".*part")), "no temporary file left"


def test_unreachable_server_names_the_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mirror = f"http://127.0.0.1:{port}/"
    source = sources.IDXSource("MNIST", sources.MNIST_MD5, (mirror,))
    monkeypatch.setitem(sources.IDX_SOURCES, "MNIST", source)
    with pytest.raises(DataFileError, match=rf"download of {mirror}train-images-idx3-ubyte.gz failed .*by hand"):
        MNISTDataModule(data_dir=str(tmp_path), download=True).prepare_data()
    assert not list((tmp_path / "MNIST" / "raw").iterdir())


def serve_cifar_archive(served: Path, tmp_path: Path) -> tuple[sources.CIFARSource, Path]:
    """A cifar-10-python.tar.gz of a small official-format folder; the source describing it (URL and MD5s)."""
    written = write_cifar(tmp_path / "fixture", train=3, test=4)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(written.folder, arcname="cifar-10-batches-py")
    archive = served / "cifar-10-python.tar.gz"
    archive.write_bytes(buffer.getvalue())
    md5 = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in written.folder.iterdir()}
    source = dataclasses.replace(
        CIFAR10,
        url=f"{{base}}/{archive.name}",
        archive_md5=hashlib.md5(archive.read_bytes()).hexdigest(),
        train_files={k: md5[k] for k in CIFAR10.train_files},
        test_files={"test_batch": md5["test_batch"]},
        meta_file=("batches.meta", md5["batches.meta"]),
        counts={"train": 15, "test": 4},
    )
    return source, written.folder


def test_cifar_download_unpacks_the_verified_archive(
    server: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, served = server
    source, fixture = serve_cifar_archive(served, tmp_path)
    monkeypatch.setattr(CIFAR10DataModule, "source", dataclasses.replace(source, url=source.url.format(base=url)))
    data_dir = tmp_path / "data"
    dm = CIFAR10DataModule(data_dir=str(data_dir), download=True, augment=False)
    dm.prepare_data()
    folder = data_dir / "cifar-10-batches-py"
    assert sorted(p.name for p in folder.iterdir()) == sorted(source.files)
    assert all((folder / n).read_bytes() == (fixture / n).read_bytes() for n in source.files)
    assert sorted(p.name for p in data_dir.iterdir()) == ["cifar-10-batches-py"], "the archive is removed"
    dm.setup("fit")  # checksums and counts on
    assert len(dm.train_set) == 15 and len(dm.test_set) == 4


def test_cifar_archive_with_a_wrong_md5_is_not_unpacked(
    server: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, served = server
    source, _ = serve_cifar_archive(served, tmp_path)
    source = dataclasses.replace(source, url=source.url.format(base=url), archive_md5=CIFAR10.archive_md5)
    monkeypatch.setattr(CIFAR10DataModule, "source", source)
    data_dir = tmp_path / "data"
    with pytest.raises(
        DataFileError, match=rf"downloaded CIFAR-10 archive has MD5 \w+, the official file {CIFAR10.archive_md5}"
    ):
        CIFAR10DataModule(data_dir=str(data_dir), download=True).prepare_data()
    assert not list(data_dir.rglob("*")), f"left {list(data_dir.rglob('*'))}"
