"""Reading the official file formats into uint8 tensors: IDX (MNIST's layout) and CIFAR's python pickles.

Every failure is a :class:`~ep_lightning.errors.DataFileError` naming the file and what is wrong with it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ep_lightning.data.sources import MNIST_MD5
from ep_lightning.errors import DataFileError

_IDX_DTYPES = {0x08: torch.uint8}
#: CIFAR images: 3 × 32 × 32 bytes per row of ``data``, red plane, green plane, blue plane, each row-major.
CIFAR_IMAGE = (3, 32, 32)


# --- IDX ---------------------------------------------------------------------------------------------------------
def find_idx_file(raw_dir: Path, stem: str, hint: str = "") -> Path:
    """Return ``raw_dir/stem`` or ``raw_dir/stem.gz``, whichever exists, or raise naming the file (and ``hint``)."""
    for candidate in (raw_dir / stem, raw_dir / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    hint = hint or (
        f"put the IDX files in {raw_dir}, point `data.init_args.data_dir` at the folder that holds "
        f"'{raw_dir.parent.name}/raw', or set `data.init_args.download: true`"
    )
    raise DataFileError(f"missing data file {raw_dir / stem}[.gz]: {hint}")


def read_idx_bytes(path: Path) -> bytes:
    """Uncompressed bytes of an IDX file (gzip or plain); a corrupt gzip stream is reported by file name."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DataFileError(
            f"data file {path} is corrupt or truncated ({err}); replace it with the official file"
        ) from err


def parse_idx(raw: bytes, path: Path) -> Tensor:
    """Decode an IDX byte string (magic 0x0000 <dtype> <ndim>, big-endian dims) into a uint8 tensor."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataFileError(f"data file {path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    count = 1
    for d in dims:
        count *= d
    if len(raw) != header + count:
        raise DataFileError(
            f"data file {path} is truncated or padded: header promises {dims} = {count} bytes of data, "
            f"file holds {len(raw) - header}"
        )
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).reshape(dims)


def check_md5(content: bytes, path: Path, expected: str, official: str) -> None:
    """Raise if the MD5 of ``content`` (read from ``path``) is not ``expected``, the official ``official`` file's."""
    digest = hashlib.md5(content).hexdigest()
    if digest != expected:
        raise DataFileError(
            f"checksum mismatch for {path}: MD5 of its uncompressed content is {digest}, the official {official} has "
            f"{expected}. The file is corrupt or not the official one; replace it with the official file (or, for "
            f"other files in the same format, set `data.init_args.verify_checksums: false`)."
        )


def load_idx(raw_dir: Path, stem: str, verify: bool, md5: dict[str, str] = MNIST_MD5, hint: str = "") -> Tensor:
    """Read one IDX file, checking the MD5 of its uncompressed bytes against ``md5[stem]`` when ``verify`` and the
    value is known."""
    path = find_idx_file(raw_dir, stem, hint)
    raw = read_idx_bytes(path)
    if verify and stem in md5:
        check_md5(raw, path, md5[stem], stem)
    return parse_idx(raw, path)


# --- CIFAR python pickles ----------------------------------------------------------------------------------------
def _numpy_global(module: str, name: str) -> Any:
    """The few numpy callables a pickled uint8 array refers to (numpy 1 and 2 spell their module differently)."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    allowed = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("numpy.core.multiarray", "_reconstruct"): core.multiarray._reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): core.multiarray._reconstruct,
        ("numpy.core.numeric", "_frombuffer"): core.numeric._frombuffer,
        ("numpy._core.numeric", "_frombuffer"): core.numeric._frombuffer,
    }
    return allowed.get((module, name))


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts of lists, bytes and numpy arrays only: a pickle is a program, and ``verify_checksums: false``
    loads files nobody vouched for."""

    def find_class(self, module: str, name: str) -> Any:
        found = _numpy_global(module, name)
        if found is None and (module, name) == ("_codecs", "encode"):  # bytes in protocol-2 pickles written by py3
            import _codecs

            found = _codecs.encode
        if found is None:
            raise pickle.UnpicklingError(f"refers to {module}.{name}, which a CIFAR file never does")
        return found


def read_checked_bytes(path: Path, md5: str | None) -> bytes:
    """The bytes of ``path``; with ``md5`` given, they must have that MD5 (the official file's)."""
    try:
        content = path.read_bytes()
    except OSError as err:
        raise DataFileError(f"data file {path} cannot be read ({err})") from err
    if md5 is not None:
        check_md5(content, path, md5, path.name)
    return content


def unpickle_dict(content: bytes, path: Path) -> dict[str, Any]:
    """A CIFAR pickle (written by Python 2 with byte-string keys, or by Python 3) as a dict with str keys."""
    try:
        loaded = _ArrayUnpickler(io.BytesIO(content), encoding="bytes").load()
    except Exception as err:  # any unpickling failure means "not a CIFAR file"
        raise DataFileError(
            f"data file {path} is not a CIFAR python pickle ({err}); replace it with the official file"
        ) from err
    if not isinstance(loaded, dict):
        raise DataFileError(f"data file {path} holds a {type(loaded).__name__}, not the dict of a CIFAR file")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in loaded.items()}


def load_cifar_batch(path: Path, md5: str | None, label_key: str) -> tuple[Tensor, Tensor]:
    """One CIFAR file → (uint8 images (N, 3, 32, 32), int64 labels (N,)).

    ``data`` is uint8 (N, 3072): each row the red, green and blue 32 × 32 planes, row-major; ``label_key``
    (``labels`` or ``fine_labels``) lists N integers.
    """
    import numpy as np

    entry = unpickle_dict(read_checked_bytes(path, md5), path)
    for key in ("data", label_key):
        if key not in entry:
            raise DataFileError(f"data file {path} has no '{key}' entry (keys: {sorted(entry)}); not a CIFAR file")
    data, labels = entry["data"], entry[label_key]
    row = CIFAR_IMAGE[0] * CIFAR_IMAGE[1] * CIFAR_IMAGE[2]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != row:
        shape = getattr(data, "shape", None)
        raise DataFileError(f"data file {path}: 'data' must be uint8 of shape (N, {row}), found {shape}")
    try:
        targets = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    except (TypeError, ValueError) as err:
        raise DataFileError(f"data file {path}: '{label_key}' is not a list of integers ({err})") from err
    if targets.shape != (data.shape[0],):
        raise DataFileError(
            f"data file {path}: {data.shape[0]} images but '{label_key}' has shape {tuple(targets.shape)}"
        )
    images = torch.from_numpy(np.ascontiguousarray(data)).reshape(-1, *CIFAR_IMAGE)
    return images, targets


def load_cifar_names(path: Path, md5: str | None, names_key: str) -> list[str]:
    """The class names of a CIFAR meta file (``label_names``; CIFAR-100: ``fine_label_names``)."""
    entry = unpickle_dict(read_checked_bytes(path, md5), path)
    names = entry.get(names_key)
    if not isinstance(names, list):
        raise DataFileError(f"data file {path} has no '{names_key}' list (keys: {sorted(entry)}); not a CIFAR file")
    return [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]
