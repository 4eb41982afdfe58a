"""Process-wide CPU settings chosen by measurement: torch's thread count and glibc's allocator thresholds.

Both are applied by the CLI (``--threads``, ``--malloc_tuning``) and by ``benchmarks/throughput.py``; figures in the
README's "Performance" section.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

import torch

#: Default intra-op threads on CPU. Relaxation of small batches is a chain of small matrix products: on the
#: 2-core CI machine kind two OpenMP threads ran EP up to 10× slower than one under load (README "Performance").
DEFAULT_THREADS = 1

#: glibc ``mallopt`` parameters (malloc.h): M_TRIM_THRESHOLD = -1, M_MMAP_THRESHOLD = -3.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: Blocks up to this size come from the heap instead of a fresh ``mmap`` (32 MiB, glibc's own upper bound).
MMAP_THRESHOLD_BYTES = 32 * 2**20
#: Free heap memory kept by the process instead of being returned to the kernel after every step.
TRIM_THRESHOLD_BYTES = 256 * 2**20


def configure_threads(threads: int | None) -> int:
    """Set torch's intra-op thread count: ``threads`` if given, else $OMP_NUM_THREADS, else DEFAULT_THREADS."""
    if threads is None:
        env = os.environ.get("OMP_NUM_THREADS")
        threads = int(env) if env and env.isdigit() else DEFAULT_THREADS
    if threads < 1:
        raise ValueError(f"threads={threads} is invalid: use a positive number of CPU threads")
    torch.set_num_threads(threads)
    return threads


def tune_allocator() -> bool:
    """Keep freed CPU tensors of up to 32 MiB in the process heap instead of unmapping them (glibc ``mallopt``).

    Every training step allocates and frees the same few large tensors (the EP update of W_0 is 1.6 MB for P-1h).
    glibc serves blocks above its mmap threshold with a fresh ``mmap`` and returns freed heap tops to the kernel, so
    each step pays page faults and zeroing for memory it just gave back: on the 2-core CI machine that was ~25 % of
    P-1h's step time (the EP contrast ran 0.95 → 0.48 ms per batch with the thresholds raised). This raises
    M_MMAP_THRESHOLD to 32 MiB and M_TRIM_THRESHOLD to 256 MiB, the effect of ``MALLOC_MMAP_THRESHOLD_`` /
    ``MALLOC_TRIM_THRESHOLD_`` set before start-up. Numerics are untouched; the cost is up to 256 MiB of freed memory
    kept by the process. Returns False (and changes nothing) where the C library is not glibc.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None)
    except OSError:
        return False
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
