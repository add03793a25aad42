"""Wall time and peak memory of a call: resident memory sampled by a thread, and torch's CUDA peak."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Callable, Tuple, TypeVar

import torch

T = TypeVar("T")

#: Seconds between two samples of the resident set size.
SAMPLE_SECONDS = 0.02


def resident_mib() -> float:
    """Resident set size of this process in MiB, from /proc/self/statm (Linux); NaN elsewhere."""
    try:
        with open("/proc/self/statm") as stream:
            pages = int(stream.read().split()[1])
    except OSError:
        return float("nan")
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


@dataclass
class Usage:
    """seconds: wall time; peak_rss_mib: peak resident memory above the level at the start (MiB);
    peak_gpu_mib: torch's peak CUDA allocation during the call (MiB), NaN without CUDA."""

    seconds: float
    peak_rss_mib: float
    peak_gpu_mib: float


def measured(call: Callable[[], T]) -> Tuple[T, Usage]:
    """Run ``call`` and return its result with its wall time and peak memory."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start_rss = resident_mib()
    peak = [start_rss]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(SAMPLE_SECONDS):
            peak[0] = max(peak[0], resident_mib())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    try:
        result = call()
        if cuda:
            torch.cuda.synchronize()
    finally:
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
    peak_rss = max(peak[0], resident_mib()) - start_rss
    peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")
    return result, Usage(seconds, peak_rss, peak_gpu)


def torch_device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA)"
    return f"CPU, {torch.get_num_threads()} torch threads"
