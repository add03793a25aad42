"""Coarse-to-fine scale schedules (no torch: the Slicer GUI validates schedules before PyTorch is installed)."""

from __future__ import annotations

from fractions import Fraction
from typing import Sequence, Tuple, Union

from .errors import InputError

#: Smallest size of any axis at any scale; below this the U-Net and NCC window stop making sense.
MIN_SCALED_SIZE = 8

#: Smallest training patch (``patch_size``): one voxel at the U-Net's bottom level (four poolings by 2).
MIN_PATCH_SIZE = 16
#: The training patch of 3D images when none is asked for (2D images train on the whole image): every grid of the
#: paper's sizes (48x64x48 crops, 2 mm brains, 96^3 series) fits in it, so they train as before; a 1 mm brain's
#: finest scale trains on 96^3 patches (11 min instead of about 78 on a 2-core CPU with bfloat16, Dice 97.3 %
#: against 96.6 % with 64^3 patches in 5 min, RESULTS.md "Training on patches").
DEFAULT_PATCH_SIZE_3D = 96

#: Default voxel budget of an automatically chosen working grid (about 161^3: a 1 mm whole brain is registered at
#: about 1.3 mm); ``max_voxels`` / ``--max-voxels`` raise it, ``spacing`` / ``--spacing`` set the grid outright.
DEFAULT_MAX_VOXELS = 2 ** 22

def parse_scales(schedule: Union[str, Sequence[Union[str, float, Fraction]]]) -> Tuple[Fraction, ...]:
    """Parse a schedule such as "1/8,1/4,1/2,1" into strictly increasing fractions in (0, 1]."""
    items = [item for item in schedule.split(",") if item.strip()] if isinstance(schedule, str) else list(schedule)
    if not items:
        raise InputError("The scale schedule is empty; give at least one scale, e.g. '1/2,1'.")
    scales = []
    for item in items:
        text = str(item).strip()
        try:
            value = Fraction(item if isinstance(item, (Fraction, float, int)) else text).limit_denominator(1000)
        except (ValueError, ZeroDivisionError):
            raise InputError(f"Scale {text!r} is not a number; write scales like '1/4,1/2,1'.") from None
        if not 0 < value <= 1:
            raise InputError(f"Scale {text} is outside (0, 1]; scales are fractions of the full resolution "
                             "such as '1/4,1/2,1'.")
        scales.append(value)
    if any(b <= a for a, b in zip(scales, scales[1:])):
        raise InputError(f"Scales must increase from coarse to fine, got {format_scales(scales)}.")
    return tuple(scales)


def format_scale(scale: Fraction) -> str:
    return str(scale)


def format_scales(scales: Sequence[Fraction]) -> str:
    return ",".join(format_scale(s) for s in scales)


def scaled_size(size: Sequence[int], scale: Fraction) -> Tuple[int, ...]:
    """Grid size of a full-resolution grid ``size`` at ``scale`` (rounded, at least 2)."""
    return tuple(max(2, int(round(n * float(scale)))) for n in size)


def fitting_schedule(size: Sequence[int], scales: Sequence[Fraction]) -> Tuple[Fraction, ...]:
    """``scales`` without its leading scales that would shrink an axis of ``size`` below MIN_SCALED_SIZE voxels
    (the finest scale is always kept; ``check_schedule`` then says whether even that fits)."""
    kept = tuple(s for s in scales if min(scaled_size(size, s)) >= MIN_SCALED_SIZE)
    return kept or tuple(scales[-1:])


def check_schedule(size: Sequence[int], scales: Sequence[Fraction]) -> None:
    """Raise InputError if the coarsest scale would shrink an axis below MIN_SCALED_SIZE voxels."""
    coarse = scaled_size(size, scales[0])
    if min(coarse) < MIN_SCALED_SIZE:
        raise InputError(
            f"Scale {format_scale(scales[0])} turns the {'x'.join(map(str, size))} image into "
            f"{'x'.join(map(str, coarse))} voxels; every axis needs at least {MIN_SCALED_SIZE}. "
            "Use a finer coarsest scale (e.g. '1/2,1').")
