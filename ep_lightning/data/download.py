"""``data.download: true``: fetch the official files with the standard library (urllib) and verify their MD5.

Only missing files are fetched; a file that is present is never replaced (a corrupt one is reported by the
loader, for the user to inspect). Every download goes to a temporary file in the target folder and is renamed into
place only once its checksum matched, so an interrupted or wrong download leaves nothing behind.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from ep_lightning.data.sources import CIFARSource, IDXSource
from ep_lightning.errors import DataFileError

#: Seconds without data after which a download is abandoned.
TIMEOUT_S = 60.0
_CHUNK = 1 << 20


def md5_of_file(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(url: str, target: Path, verify: Callable[[Path], None]) -> Path:
    """Download ``url`` into ``target``: written to a temporary file next to it, checked by ``verify`` (which raises
    a :class:`DataFileError`), then renamed; on any failure nothing is left at ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"downloading {url} to {target}", file=sys.stderr, flush=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            request = urllib.request.Request(url, headers={"User-Agent": "ep_lightning"})
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
                shutil.copyfileobj(response, out, _CHUNK)
            out.flush()
            os.fsync(out.fileno())
        verify(Path(temporary))
        os.replace(temporary, target)
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise DataFileError(f"download of {url} failed ({err}); copy the file to {target} by hand") from err
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return target


def _expect_md5(expected: str, what: str) -> Callable[[Path], None]:
    def verify(path: Path) -> None:
        digest = md5_of_file(path)
        if digest != expected:
            raise DataFileError(f"downloaded {what} has MD5 {digest}, the official file {expected}; nothing was kept")

    return verify


def _expect_gzip_content_md5(expected: str, what: str) -> Callable[[Path], None]:
    def verify(path: Path) -> None:
        try:
            with gzip.open(path, "rb") as f:
                digest = hashlib.md5(f.read()).hexdigest()
        except (OSError, EOFError) as err:
            raise DataFileError(f"downloaded {what} is not a gzip file ({err}); nothing was kept") from err
        if digest != expected:
            raise DataFileError(
                f"downloaded {what} has uncompressed MD5 {digest}, the official file {expected}; nothing was kept"
            )

    return verify


def _first_mirror(urls: Sequence[str], target: Path, verify: Callable[[Path], None]) -> Path:
    """``fetch`` from the first of ``urls`` that works; the last failure is raised if none does."""
    failure: DataFileError | None = None
    for url in urls:
        try:
            return fetch(url, target, verify)
        except DataFileError as err:
            failure = err
    assert failure is not None
    raise failure


def download_idx(source: IDXSource, raw_dir: Path, stems: Sequence[str]) -> None:
    """Fetch ``<stem>.gz`` for each of ``stems`` into ``raw_dir``, checking the MD5 of its uncompressed content."""
    for stem in stems:
        urls = [f"{mirror}{stem}.gz" for mirror in source.mirrors]
        _first_mirror(urls, raw_dir / f"{stem}.gz", _expect_gzip_content_md5(source.md5[stem], f"{source.name} {stem}"))


def download_cifar(source: CIFARSource, root: Path, names: Sequence[str]) -> None:
    """Fetch the official archive into ``root``, check its MD5, unpack the files ``names`` of ``<root>/<folder>/``
    (each checked against its official MD5; files already there are left alone), and remove the archive."""
    archive = root / Path(source.url).name
    if not archive.is_file():
        _first_mirror([source.url], archive, _expect_md5(source.archive_md5, f"{source.title} archive"))
    folder = root / source.folder
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for name in names:
                try:
                    member = tar.getmember(f"{source.folder}/{name}")
                    data = tar.extractfile(member)
                except KeyError as err:
                    raise DataFileError(
                        f"{archive} has no {source.folder}/{name}; it is not the official archive"
                    ) from err
                if data is None:
                    raise DataFileError(f"{archive}: {source.folder}/{name} is not a regular file")
                handle, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=folder)
                try:
                    with os.fdopen(handle, "wb") as out:
                        shutil.copyfileobj(data, out, _CHUNK)
                    _expect_md5(source.files[name], f"{source.folder}/{name}")(Path(temporary))
                    os.replace(temporary, folder / name)
                finally:
                    if os.path.exists(temporary):
                        os.unlink(temporary)
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DataFileError(f"{archive} cannot be unpacked ({err}); delete it and download again") from err
    archive.unlink()
