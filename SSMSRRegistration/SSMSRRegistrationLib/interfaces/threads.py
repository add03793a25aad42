"""How many CPU threads a run uses, and how its threads wait: chosen before the OpenMP runtime starts.

PyTorch's OpenMP threads spin while they wait for work (``OMP_WAIT_POLICY`` ACTIVE by default); next to another
busy process on the same cores that spinning takes the cores the other process needs, and both slow down several
fold. The command line (and so the Slicer worker) therefore waits passively unless the user set a policy, and uses
the cores this process may run on: its CPU affinity, bounded by a container's CPU quota (cgroup ``cpu.max``).
"""

from __future__ import annotations

import math
import os
from typing import Optional

from ..common.errors import InputError


def available_cores() -> int:
    """The cores this process may use: its affinity mask, bounded by a cgroup v2/v1 CPU quota (at least 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        cores = min(cores, max(1, math.floor(quota)))
    return max(1, cores)


def _cgroup_cpu_quota() -> Optional[float]:
    """CPUs allowed by the cgroup's quota, or None when unlimited or unknown."""
    try:
        with open("/sys/fs/cgroup/cpu.max", encoding="utf-8") as stream:  # cgroup v2: "max 100000" or "200000 100000"
            quota, period = stream.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", encoding="utf-8") as stream:  # cgroup v1
            quota = int(stream.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us", encoding="utf-8") as stream:
            period = int(stream.read())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def configure_threads(requested: Optional[int] = None) -> int:
    """Set the OpenMP wait policy (passive unless the user set one) and thread count in the environment, before
    torch is imported; return the thread count to give ``torch.set_num_threads``.

    ``requested``: an explicit thread count (``--threads``); None: ``OMP_NUM_THREADS`` if the user set it, else
    ``available_cores()``.
    """
    if requested is not None and int(requested) < 1:
        raise InputError(f"--threads must be at least 1 (got {requested}).")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if requested is not None:
        threads = int(requested)
    elif os.environ.get("OMP_NUM_THREADS", "").strip().isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        threads = int(os.environ["OMP_NUM_THREADS"])
    else:
        threads = available_cores()
    os.environ["OMP_NUM_THREADS"] = str(threads)
    return threads
