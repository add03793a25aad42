"""What a test-time training run will cost before it starts: peak memory on its device and, on a CPU, time.

The memory model was measured on this project's CPU (torch 2.13, float32, default U-Net widths) from the peak
resident memory of a fresh process training 2 steps at one scale, with the C heap kept as training keeps it
(``allocator.kept_heap``: freed blocks stay resident, so the peak is higher than the live tensors'). Four runs each,
2026-12-03: 3D grids of 48^3, 56^3 (the network pads it to 64^3), 80^3 and 112^3 voxels rose by at most 339, 678,
1298 and 2405 MiB; 2D grids of 256^2, 512^2 and 1024^2 by at most 180, 627 and 2448 MiB (the same 1024^2 run with
glibc's defaults: at most 1629 MiB); a CI machine measured 722 MiB at 56^3. That is up to 2.05 kB per voxel of one
pair on top of 400 MiB; the model below rounds it up. The rise varies between runs of the same size by up to a
quarter (the heap's layout and oneDNN's scratch space differ), hence the margin.
"""

from __future__ import annotations

import os
import time
from typing import Optional, Sequence

import torch

from .losses import registration_loss
from .optimizer import Adam
from .spatial import warp
from .unet import RegistrationUNet, predict, use_mixed_precision

#: Bytes per voxel per pair trained together at one step (activations, gradients, warps; float32).
TRAINING_BYTES_PER_VOXEL = 2400
#: Bytes per voxel per pair held for the whole run: images, masks, and the field after each scale.
RESIDENT_FLOATS_PER_VOXEL = 4  # fixed, moving, fixed mask, field of view (float32 each) + ndim per scale
#: Weights, Adam state, the runtime's own arena.
OVERHEAD_BYTES = 400 * 2 ** 20
#: Share of the free memory a run may plan to use.
USABLE_FRACTION = 0.8
#: Largest grid timed to estimate a CPU run (the time per voxel changes little above this size); each scale's size is
#: timed up to it.
PROBE_VOXELS = {2: 192 * 192, 3: 64 * 64 * 64}


def training_memory_bytes(voxels: int, ndim: int, pairs: int = 1, pairs_per_step: int = 1, scales: int = 1,
                          trained_voxels: Optional[int] = None) -> int:
    """Estimated peak memory (bytes) of training on a ``voxels`` grid: ``pairs`` held, ``pairs_per_step`` trained
    together, ``scales`` fields kept. ``trained_voxels``: the voxels of the largest patch trained on (``patches``;
    None: the whole grid); the tiled prediction then also holds its sums (ndim + 1 floats per voxel)."""
    trained = voxels if trained_voxels is None else min(trained_voxels, voxels)
    tiling = 4 * voxels * pairs_per_step * (ndim + 1) if trained < voxels else 0
    resident = 4 * voxels * pairs * (RESIDENT_FLOATS_PER_VOXEL + ndim * (scales + 1))
    return int(OVERHEAD_BYTES + resident + tiling + TRAINING_BYTES_PER_VOXEL * trained * pairs_per_step)


def _cgroup_memory_left() -> Optional[int]:
    """Bytes the process's cgroup (v2) may still allocate, or None without a limit."""
    try:
        with open("/sys/fs/cgroup/memory.max") as limit_file:
            limit = limit_file.read().strip()
        if limit == "max":
            return None
        with open("/sys/fs/cgroup/memory.current") as current_file:
            return int(limit) - int(current_file.read().strip())
    except (OSError, ValueError):
        return None


def available_memory_bytes(device: torch.device) -> Optional[int]:
    """Free memory on ``device`` (CUDA: free device memory; CPU: MemAvailable, within a cgroup limit), or None
    where it cannot be read."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    available = None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if available is None and hasattr(os, "sysconf"):
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            available = None
    cgroup = _cgroup_memory_left()
    if cgroup is not None:
        available = cgroup if available is None else min(available, cgroup)
    return available


def seconds_per_voxel_step(ndim: int, voxels: int, device: torch.device, encoder_channels: Sequence[int],
                           decoder_channels: Sequence[int], window: int, mixed_precision: bool = False,
                           half_resolution: bool = False) -> float:
    """Seconds one training step of one pair costs per voxel on ``device``, timed on random data on a cube of
    min(``voxels``, PROBE_VOXELS) voxels (``voxels``: those a step trains on), one warm-up step then one timed, in
    the run's precision (``mixed_precision``: bfloat16 convolutions, see ``unet.predict``) and with the field at
    half resolution where the scale predicts it so (``half_resolution``)."""
    side = max(8, int(round(min(voxels, PROBE_VOXELS[ndim]) ** (1.0 / ndim))))
    generator = torch.Generator().manual_seed(0)
    pair = torch.rand((1, 2) + (side,) * ndim, generator=generator).to(device)
    network = RegistrationUNet(ndim, encoder_channels, decoder_channels).to(device)
    if mixed_precision:
        network = use_mixed_precision(network)
    optimizer = Adam(network.parameters(), lr=1e-3)
    window = min(window, side)

    def step() -> None:
        optimizer.zero_grad()
        residual = predict(network, pair, mixed_precision, half_resolution)
        registration_loss(pair[:, 1:], warp(pair[:, :1], residual), residual, window, 1.0).backward()
        optimizer.step()

    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / side ** ndim


def format_bytes(count: float) -> str:
    """Bytes as GiB (or MiB below 1 GiB) with one decimal."""
    return f"{count / 2 ** 30:.1f} GiB" if count >= 2 ** 30 else f"{count / 2 ** 20:.0f} MiB"
