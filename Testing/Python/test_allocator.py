"""The C heap kept during training (``engine.allocator``): on glibc, a large tensor allocated inside ``kept_heap``
comes from the heap (and is reused when allocated again), where by default glibc maps it anew with ``mmap``.

Measured in a fresh process (this file run as a script): in the test process an earlier test's training may have left
large free chunks in the heap, which glibc then serves before mapping anything. Asserted on glibc's own accounting
(``mallinfo2``: bytes in mmapped chunks) more than on page faults: with transparent huge pages set to ``always`` (as
on the CI machine) a fresh 64 MiB mapping faults 32 times, not 16384. The faults inside the block are asserted too:
whatever the page size, a block allocated again there faults at most one block in eight anew."""

import ctypes
import json
import resource
import subprocess
import sys

import pytest
import torch

from SSMSRRegistrationLib.engine.allocator import _glibc, kept_heap

MEGABYTES = 64


class MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (malloc.h, glibc >= 2.33): every field a size_t."""
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def glibc_mallinfo2():
    """glibc's ``mallinfo2`` returning ``MallInfo2``, or None where the C library is not glibc >= 2.33."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = MallInfo2
    return libc.mallinfo2


def mapped_bytes_added_by_a_tensor() -> int:
    """Bytes glibc holds in mmapped chunks while a float32 tensor of MEGABYTES lives, minus those before it."""
    mallinfo2 = glibc_mallinfo2()
    before = mallinfo2().hblkhd
    block = torch.empty(MEGABYTES * 2 ** 18)
    block.fill_(1.0)
    during = mallinfo2().hblkhd
    del block
    return during - before


def page_faults_of_reallocating(times: int = 8) -> int:
    """Minor page faults of allocating, writing and freeing a float32 tensor of MEGABYTES ``times`` times."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(times):
        block = torch.empty(MEGABYTES * 2 ** 18)
        block.fill_(1.0)
        del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def measure() -> dict:
    """Where a tensor's memory comes from by default, inside ``kept_heap``, and inside after a nested block."""
    figures = {"mapped_by_default": mapped_bytes_added_by_a_tensor()}
    with kept_heap() as kept:
        figures["kept"] = kept
        figures["mapped_inside"] = mapped_bytes_added_by_a_tensor()
        page_faults_of_reallocating()  # the heap grows to hold them
        figures["faults_inside"] = page_faults_of_reallocating()
        with kept_heap():
            pass
        figures["mapped_after_a_nested_block"] = mapped_bytes_added_by_a_tensor()
    return figures


@pytest.mark.skipif(glibc_mallinfo2() is None, reason="glibc >= 2.33 only (mallinfo2)")
def test_inside_the_block_a_large_tensor_comes_from_the_heap_where_by_default_it_is_mapped_anew():
    run = subprocess.run([sys.executable, __file__], check=True, capture_output=True, text=True)
    figures = json.loads(run.stdout)
    assert figures["mapped_by_default"] >= MEGABYTES * 2 ** 20  # glibc's default: a chunk of its own, mmapped
    assert figures["kept"]
    assert figures["mapped_inside"] <= 0
    assert figures["faults_inside"] < 2 * MEGABYTES * 2 ** 20 // resource.getpagesize()
    assert figures["mapped_after_a_nested_block"] <= 0  # nested blocks share one: still kept


if __name__ == "__main__":
    print(json.dumps(measure()))
