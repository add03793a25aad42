"""Warping, resizing and composing displacement fields (2D and 3D).

Conventions used throughout the engine:

* Images are tensors of shape (N, C, *S) with S = (H, W) or (D, H, W), the
  array-axis order of numpy/SimpleITK arrays ((y, x) or (z, y, x)).
* A displacement field is a tensor of shape (N, ndim, *S) in *voxels of its
  own grid*, with channel k the displacement along array axis k (so channel 0
  is z in 3D, y in 2D).  It is a "resampling" field: the output voxel p takes
  the value of the input at p + u(p).
* Voxel coordinates map to the normalised [-1, 1] range of ``grid_sample``
  with ``align_corners=True``: voxel 0 is -1 and voxel n-1 is +1.  The same
  convention is used by every resize, so a grid of m voxels covering the same
  extent as a grid of n voxels scales voxel distances by (n-1)/(m-1).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

_LINEAR_MODES = {2: "bilinear", 3: "trilinear"}


def spatial_dims(tensor: torch.Tensor) -> int:
    """Number of spatial dimensions of an (N, C, *S) tensor."""
    return tensor.dim() - 2


def voxel_grid(shape: Sequence[int], device=None, dtype=torch.float32) -> torch.Tensor:
    """Voxel coordinates of a grid, shape (1, ndim, *shape), channel k = index along axis k."""
    axes = [torch.arange(n, device=device, dtype=dtype) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij")).unsqueeze(0)


def _to_normalised_grid(positions: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """(N, ndim, *P) voxel positions in a grid of size ``shape`` -> (N, *P, ndim) grid_sample grid with the last axis
    (x, y[, z])."""
    scale = torch.tensor([2.0 / max(n - 1, 1) for n in shape], device=positions.device, dtype=positions.dtype)
    scale = scale.view(1, -1, *([1] * len(shape)))
    normalised = positions * scale - 1.0
    return normalised.flip(1).movedim(1, -1)


def warp(image: torch.Tensor, displacement: torch.Tensor, mode: str = "linear",
         padding_mode: str = "border", corner: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Resample ``image`` at p + displacement(p).

    Args:
        image: (N, C, *S) tensor.
        displacement: (N, ndim, *S) in voxels of the same grid; with ``corner``, (N, ndim, *P) over the region of
            the grid that starts at voxel ``corner`` (one index per axis) and has size P.
        mode: "linear" for intensities, "nearest" for label maps.
        padding_mode: grid_sample padding for points outside the image ("border" or "zeros").
    Returns:
        (N, C, *S) warped image; with ``corner``, (N, C, *P): the warped region, sampled from the whole image.
    """
    if corner is None and image.shape[2:] != displacement.shape[2:]:
        raise ValueError(f"image grid {tuple(image.shape[2:])} != field grid {tuple(displacement.shape[2:])}")
    positions = voxel_grid(displacement.shape[2:], image.device, displacement.dtype) + displacement
    if corner is not None:
        positions = positions + torch.tensor(corner, device=image.device, dtype=displacement.dtype).view(
            1, -1, *([1] * spatial_dims(image)))
    grid = _to_normalised_grid(positions, image.shape[2:])
    sample_mode = "bilinear" if mode == "linear" else "nearest"
    return F.grid_sample(image.to(displacement.dtype) if mode == "linear" else image.float(), grid,
                         mode=sample_mode, padding_mode=padding_mode, align_corners=True)


def _gaussian_kernel_1d(sigma: float, device, dtype) -> torch.Tensor:
    radius = max(1, int(math.ceil(3.0 * sigma)))
    x = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(image: torch.Tensor, sigmas: Sequence[float]) -> torch.Tensor:
    """Separable Gaussian blur of an (N, C, *S) tensor; sigma per axis in voxels (0 = no blur on that axis)."""
    ndim = spatial_dims(image)
    channels = image.shape[1]
    conv = F.conv2d if ndim == 2 else F.conv3d
    for axis, sigma in enumerate(sigmas):
        if sigma <= 0:
            continue
        kernel = _gaussian_kernel_1d(sigma, image.device, image.dtype)
        shape = [1] * ndim
        shape[axis] = kernel.numel()
        weight = kernel.view(1, 1, *shape).repeat(channels, 1, *([1] * ndim))
        pad = [0, 0] * ndim
        radius = kernel.numel() // 2
        # F.pad lists the last axis first.
        pad[2 * (ndim - 1 - axis)] = pad[2 * (ndim - 1 - axis) + 1] = radius
        image = conv(F.pad(image, pad, mode="replicate"), weight, groups=channels)
    return image


def resize_image(image: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Linearly resize an (N, C, *S) image to ``size``, Gaussian anti-aliasing when shrinking."""
    size = tuple(int(n) for n in size)
    if tuple(image.shape[2:]) == size:
        return image
    factors = [(n_in - 1) / max(n_out - 1, 1) for n_in, n_out in zip(image.shape[2:], size)]
    sigmas = [0.5 * math.sqrt(f * f - 1.0) if f > 1.0 else 0.0 for f in factors]
    if any(s > 0 for s in sigmas):
        image = gaussian_blur(image, sigmas)
    return F.interpolate(image, size=size, mode=_LINEAR_MODES[spatial_dims(image)], align_corners=True)


def resize_field(displacement: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize an (N, ndim, *S) voxel displacement field to ``size`` and rescale it to that grid's voxels."""
    size = tuple(int(n) for n in size)
    old = displacement.shape[2:]
    if tuple(old) == size:
        return displacement
    resized = F.interpolate(displacement, size=size, mode=_LINEAR_MODES[spatial_dims(displacement)],
                            align_corners=True)
    factors = torch.tensor([(n_new - 1) / max(n_old - 1, 1) for n_old, n_new in zip(old, size)],
                           device=displacement.device, dtype=displacement.dtype)
    return resized * factors.view(1, -1, *([1] * len(size)))


def compose(first: torch.Tensor, then: torch.Tensor) -> torch.Tensor:
    """Field equivalent to warping by ``first`` and then warping the result by ``then``.

    Warping an image M by ``first`` gives M1(q) = M(q + first(q)); warping M1 by
    ``then`` gives M(p + then(p) + first(p + then(p))).  So the composed field is
    u(p) = then(p) + first(p + then(p)).  Both are (N, ndim, *S) voxel fields on one grid.
    (The paper's Eq. 5 writes the other order; tests check that this one is the
    order that reproduces sequential warping.)
    """
    return then + warp(first, then, mode="linear", padding_mode="border")
