"""The C heap kept during training on glibc (Linux).

glibc serves an allocation above its mmap threshold (at most 32 MiB on 64-bit) with a fresh ``mmap`` and returns it
with ``munmap`` when freed, so every training step on a large image maps and zeroes its activations anew: on a 2-core
CPU under the AVX2 cap, one 1024x768 2D step took 2.39 s with 783k page faults and 1.70 s of system time, and 1.27 s
with the heap kept (Testing/benchmarks/RESULTS.md). ``kept_heap()`` turns mmap off and trimming off for its duration
(``mallopt``), then restores glibc's defaults and gives the free memory back (``malloc_trim``). Elsewhere (macOS,
Windows, musl) it does nothing. Numbers are unchanged: only where the memory comes from.
"""

from __future__ import annotations

import ctypes
import platform
import threading
from contextlib import contextmanager
from typing import Iterator, Optional

#: mallopt parameters (malloc.h) and glibc's defaults for them.
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536
#: The largest trim threshold mallopt takes (an int).
KEEP_EVERYTHING = 2 ** 31 - 1

_lock = threading.Lock()
_depth = 0


def _glibc() -> Optional[ctypes.CDLL]:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


@contextmanager
def kept_heap() -> Iterator[bool]:
    """Keep freed memory in the C heap while the block runs (nested blocks share one); yields whether it could."""
    global _depth
    libc = _glibc()
    if libc is None:
        yield False
        return
    with _lock:
        _depth += 1
        if _depth == 1:
            libc.mallopt(M_MMAP_MAX, 0)
            libc.mallopt(M_TRIM_THRESHOLD, KEEP_EVERYTHING)
    try:
        yield True
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
                libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
                libc.malloc_trim(0)
