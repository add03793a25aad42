"""Choosing the working grid of a registration before it starts: millimetres, the voxel budget, the device's memory,
and what the run will cost (reported in the ``started`` event and the log)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import SimpleITK as sitk
import torch

from ..common.errors import InputError
from ..common.schedule import DEFAULT_MAX_VOXELS
from ..engine.footprint import (OVERHEAD_BYTES, PROBE_VOXELS, USABLE_FRACTION, available_memory_bytes,
                                format_bytes, seconds_per_voxel_step, training_memory_bytes)
from ..engine.multiscale import RegistrationSettings
from ..engine.unet import bfloat16_supported
from ..imaging.working_grid import WorkingGrid, working_grid

#: Below this many training steps per scale no time estimate is made (timing it would cost a noticeable share).
ESTIMATE_MIN_STEPS = 50


@dataclass
class WorkingPlan:
    """The grid a registration runs on and what it is expected to cost.

    window: the NCC window in voxels of the grid. memory_bytes: estimated peak; available_bytes: free on the
    device (None if unknown). estimated_seconds: on a CPU, all scales (None when not estimated). note: why the
    grid is coarser than asked ("" if it is not).
    """

    grid: WorkingGrid
    window: int
    memory_bytes: int
    available_bytes: Optional[int]
    estimated_seconds: Optional[float]
    note: str

    def started_fields(self) -> dict:
        """Fields added to the ``started`` event (sizes in x, y[, z] order)."""
        return {"working_grid": {"size": list(self.grid.size), "spacing_mm": self.grid.spacing,
                                 "resampled": self.grid.resampled},
                "ncc_window_voxels": self.window, "ncc_window_mm": self.window * self.grid.spacing,
                "memory_estimate_bytes": self.memory_bytes, "available_memory_bytes": self.available_bytes,
                "estimated_seconds": self.estimated_seconds, "note": self.note, "plan": self.describe()}

    def describe(self) -> str:
        """One line for the log."""
        size = "x".join(map(str, self.grid.size))
        text = (f"working grid {size} at {self.grid.spacing:.3g} mm"
                f"{'' if self.grid.resampled else ' (the fixed grid)'}, NCC window {self.window} voxels "
                f"({self.window * self.grid.spacing:.3g} mm), memory about {format_bytes(self.memory_bytes)}")
        if self.available_bytes is not None:
            text += f" of {format_bytes(self.available_bytes)} free"
        if self.estimated_seconds is not None:
            text += f", about {self.estimated_seconds / 60:.1f} min on this CPU"
        return text + (f"; {self.note}" if self.note else "")


def _memory(grid: WorkingGrid, settings: RegistrationSettings, pairs: int) -> int:
    size = tuple(reversed(grid.size))
    # The scale whose step trains the most voxels (pairs x voxels each) sets the training's share.
    per_step, trained = max(((settings.pairs_per_step_at(index, pairs, size), settings.trained_voxels(size, index))
                             for index in range(len(settings.scales))), key=math.prod)
    return training_memory_bytes(grid.voxels, grid.reference.GetDimension(), pairs, per_step, len(settings.scales),
                                 trained)


def plan_working_grid(fixed: sitk.Image, settings: RegistrationSettings, device: torch.device,
                      spacing: Optional[float] = None, max_voxels: Optional[int] = DEFAULT_MAX_VOXELS,
                      ncc_window_mm: Optional[float] = None, pairs: int = 1, estimate: bool = True) -> WorkingPlan:
    """The working grid for ``fixed`` (see ``imaging.working_grid``), coarsened automatically when the training
    would not fit the device's free memory; an explicit ``spacing`` that does not fit raises InputError with the
    figures. ``ncc_window_mm`` sets the NCC window in millimetres (else ``settings``' window in voxels).
    ``estimate``: time the run (``estimated_seconds``); False leaves it to the caller (a plan that may be redone with
    other settings)."""
    if ncc_window_mm is not None and not (math.isfinite(ncc_window_mm) and ncc_window_mm > 0):
        raise InputError(f"The NCC window must be a positive number of millimetres, got {ncc_window_mm}.")
    ndim = fixed.GetDimension()
    grid = working_grid(fixed, spacing, None if spacing is not None else max_voxels)
    memory, available, note = _memory(grid, settings, pairs), available_memory_bytes(device), ""
    if available is not None and memory > USABLE_FRACTION * available:
        asked = f"a {'x'.join(map(str, grid.size))} grid at {grid.spacing:.3g} mm needs about {format_bytes(memory)}"
        fitting, coarser = grid.voxels, grid
        while memory > USABLE_FRACTION * available:
            # Memory grows with the voxels, not in proportion where the scales train on patches: shrink and retry.
            fitting = int(fitting * (USABLE_FRACTION * available - OVERHEAD_BYTES) / max(memory - OVERHEAD_BYTES, 1)
                          * 0.95)
            if fitting < 8 ** ndim:
                raise InputError(f"Not enough memory on {device}: {asked} but only {format_bytes(available)} is "
                                 "free. Close other programs or use another device.")
            coarser = working_grid(fixed, None, fitting)
            memory = _memory(coarser, settings, pairs)
        if spacing is not None:
            raise InputError(f"Not enough memory on {device}: {asked} but only {format_bytes(available)} is free. "
                             f"Choose a working spacing of at least {coarser.spacing:.3g} mm, or leave it automatic.")
        grid = coarser
        note = (f"coarsened automatically: {asked}, {format_bytes(available)} is free on {device}; set the "
                "working spacing to override")
    window = max(2, int(round(ncc_window_mm / grid.spacing))) if ncc_window_mm is not None \
        else settings.window_for(ndim)
    plan = WorkingPlan(grid, window, memory, available, None, note)
    if estimate:
        plan.estimated_seconds = estimated_seconds(plan, settings, device, pairs)
    return plan


def estimated_seconds(plan: WorkingPlan, settings: RegistrationSettings, device: torch.device,
                      pairs: int = 1) -> Optional[float]:
    """The training's seconds on ``plan``'s grid with ``settings``, from one timed step per distinct probe (None off
    the CPU or below ESTIMATE_MIN_STEPS steps a scale)."""
    schedule = settings.schedule_steps()
    if device.type != "cpu" or max(schedule) < ESTIMATE_MIN_STEPS:
        return None
    grid, ndim = plan.grid, plan.grid.reference.GetDimension()
    size = tuple(reversed(grid.size))
    trained = [settings.trained_voxels(size, index) for index in range(len(settings.scales))]
    on_grid = replace(settings, voxel_mm=grid.spacing)
    # Sizes above the probe's share its time; a scale predicting at half resolution is timed so.
    probes = [(min(voxels, PROBE_VOXELS[ndim]), on_grid.half_field_at(index, ndim))
              for index, voxels in enumerate(trained)]
    mixed = settings.mixed_precision and bfloat16_supported(device)
    per_voxel_step = {probe: seconds_per_voxel_step(ndim, probe[0], device, settings.encoder_channels,
                                                    settings.decoder_channels, plan.window, mixed, probe[1])
                      for probe in set(probes)}
    return sum(settings.pairs_per_step_at(index, pairs, size) * steps * per_voxel_step[probe] * voxels
               for index, (steps, probe, voxels) in enumerate(zip(schedule, probes, trained)))
