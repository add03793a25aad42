"""The near-isotropic grid the engine registers on, and moving fields between it and the fixed grid (SimpleITK).

The engine works in voxels: its NCC window, its smoothness term and its pyramid are isotropic only if the voxels
are. A clinical scan of 0.5 x 0.5 x 4 mm is therefore registered on a working grid that covers the same physical
region with cubic (square in 2D) voxels, and the field found there is resampled back onto the fixed grid. An image
whose voxels are already (nearly) isotropic, and that fits the voxel budget, is registered on its own grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import SimpleITK as sitk

from ..common.errors import InputError
from .images import same_grid

#: Voxels whose largest and smallest sides differ by at most this factor count as isotropic.
ISOTROPY_TOLERANCE = 1.1


@dataclass(frozen=True)
class WorkingGrid:
    """A grid in the fixed image's frame (same direction, same centre) with isotropic ``spacing`` (mm).

    reference: an image carrying the grid's geometry (its voxels are not used). resampled: False when the grid is
    the fixed image's own.
    """

    reference: sitk.Image
    spacing: float
    resampled: bool

    @property
    def size(self) -> Tuple[int, ...]:
        """(x, y[, z]) voxels."""
        return tuple(self.reference.GetSize())

    @property
    def voxels(self) -> int:
        return int(np.prod(self.size))


def grid_size_at(fixed: sitk.Image, spacing: float) -> Tuple[int, ...]:
    """(x, y[, z]) voxels of an isotropic grid of ``spacing`` mm spanning the fixed image's voxel centres."""
    extent = [(n - 1) * s for n, s in zip(fixed.GetSize(), fixed.GetSpacing())]
    return tuple(int(math.floor(e / spacing + 1e-6)) + 1 for e in extent)


def working_grid(fixed: sitk.Image, spacing: Optional[float] = None,
                 max_voxels: Optional[int] = None) -> WorkingGrid:
    """The grid to register ``fixed`` on.

    Args:
        fixed: the fixed image.
        spacing: the working voxel side in mm; None chooses the fixed image's finest spacing, coarsened until the
            grid has at most ``max_voxels`` voxels.
        max_voxels: the voxel budget of an automatic spacing (None: no limit).
    Returns:
        The fixed image's own grid when its voxels are isotropic (within ISOTROPY_TOLERANCE) and the chosen spacing
        is its own; otherwise a grid with the fixed image's direction and centre and cubic voxels.
    """
    if spacing is not None and not (math.isfinite(spacing) and spacing > 0):
        raise InputError(f"The working spacing must be a positive number of millimetres, got {spacing}.")
    if max_voxels is not None and max_voxels < 2 ** fixed.GetDimension():
        raise InputError(f"The voxel budget must allow at least {2 ** fixed.GetDimension()} voxels, got {max_voxels}.")
    spacings = fixed.GetSpacing()
    isotropic = max(spacings) <= ISOTROPY_TOLERANCE * min(spacings)
    chosen = float(spacing) if spacing is not None else float(min(spacings))
    if spacing is None and max_voxels is not None:
        voxels = int(np.prod(grid_size_at(fixed, chosen)))
        while voxels > max_voxels:
            chosen *= max((voxels / max_voxels) ** (1.0 / fixed.GetDimension()), 1.001)
            voxels = int(np.prod(grid_size_at(fixed, chosen)))
    if isotropic and math.isclose(chosen, min(spacings), rel_tol=1e-6):
        return WorkingGrid(fixed, chosen, resampled=False)
    size = grid_size_at(fixed, chosen)
    if min(size) < 2:
        raise InputError(f"A working spacing of {chosen:g} mm leaves an axis of the fixed image with fewer than two "
                         "voxels; choose a smaller spacing.")
    ndim = fixed.GetDimension()
    direction = np.array(fixed.GetDirection(), dtype=np.float64).reshape(ndim, ndim)
    centre = np.array(fixed.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in fixed.GetSize()]))
    origin = centre - direction @ (np.array([(n - 1) / 2.0 for n in size]) * chosen)
    grid = sitk.Image([int(n) for n in size], sitk.sitkUInt8)
    grid.SetSpacing([chosen] * ndim)
    grid.SetDirection(fixed.GetDirection())
    grid.SetOrigin([float(v) for v in origin])
    return WorkingGrid(grid, chosen, resampled=True)


def field_onto(field: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """A displacement field (mm, on the working grid) resampled linearly onto ``reference``'s grid (float64
    vectors); points of ``reference`` just outside the working grid take the nearest border vector."""
    if same_grid(field, reference):
        return field
    padded = sitk.ZeroFluxNeumannPad(field, [1] * field.GetDimension(), [1] * field.GetDimension())
    return sitk.Resample(padded, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
