"""The C heap kept during training (``engine.allocator``): on glibc, large tensors freed and allocated again inside
``kept_heap`` reuse the heap instead of fresh zeroed pages. (After the block glibc's defaults are set again; how many
pages the next allocations fault then depends on where the trimmed heap's free chunks lie, so it is not asserted.)"""

import platform
import resource

import pytest
import torch

from SSMSRRegistrationLib.engine.allocator import kept_heap

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def page_faults_of_reallocating(megabytes: int = 64, times: int = 8) -> int:
    """Minor page faults of allocating, writing and freeing a tensor of ``megabytes`` ``times`` times."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(times):
        block = torch.empty(megabytes * 2 ** 18)  # float32
        block.fill_(1.0)
        del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(not GLIBC, reason="glibc's allocator only")
def test_inside_the_block_a_large_tensor_reuses_the_heap_where_by_default_it_is_mapped_anew():
    pages = 64 * 2 ** 20 // resource.getpagesize()
    assert page_faults_of_reallocating() > 4 * pages  # glibc's default: each 64 MiB block mapped and faulted anew
    with kept_heap() as kept:
        assert kept
        page_faults_of_reallocating()  # the heap grows to hold them
        assert page_faults_of_reallocating() < 2 * pages  # at most one of the 8 blocks on fresh pages
        with kept_heap():  # nested: still kept after the inner block
            pass
        assert page_faults_of_reallocating() < 2 * pages  # at most one of the 8 blocks on fresh pages
