"""Real test images (from registry packages) and known smooth deformations of them."""

import math
from functools import lru_cache

import numpy as np
import SimpleITK as sitk
import torch

from SSMSRRegistrationLib.imaging import sample_data
from SSMSRRegistrationLib.engine.spatial import voxel_grid, warp


@lru_cache(maxsize=None)
def brain_slice() -> np.ndarray:
    """An axial slice of the ICBM152 T1 template, 96x88 pixels at 2 mm, scaled to [0, 1]."""
    volume = sitk.GetArrayFromImage(sample_data.brain_t1())
    image = volume[95, 20:212:2, 10:186:2].astype(np.float32)
    return (image - image.min()) / (image.max() - image.min())


def sine_field(shape, amplitude: float, period: float) -> torch.Tensor:
    """(1, ndim, *shape) smooth voxel field of peak ``amplitude`` voxels and spatial ``period`` voxels."""
    grid = voxel_grid(shape)[0]
    channels = []
    for k in range(len(shape)):
        a, b = grid[(k + 1) % len(shape)], grid[k]
        channels.append(amplitude * torch.sin(2 * math.pi * a / period + k) * torch.cos(2 * math.pi * b / (1.3 * period)))
    return torch.stack(channels)[None]


def deformed_pair(fixed: torch.Tensor, amplitude: float, period: float):
    """Moving image = ``fixed`` deformed by a known field; returns (moving, true registration field).

    The moving image is fixed(q - t(q)); the field u registering it (moving(p + u(p)) = fixed(p))
    solves u(p) = t(p + u(p)), found by fixed-point iteration.
    """
    true = sine_field(fixed.shape[2:], amplitude, period)
    moving = warp(fixed, -true)
    field = true.clone()
    for _ in range(30):
        field = warp(true, field)
    return moving, field
