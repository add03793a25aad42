"""Training a scale on patches: where a scale's grid is larger than the patch, each training step runs the U-Net on
one patch of the pair (the same region in every pair of the step) instead of on the whole image, so that a step
costs the patch's voxels whatever the image's size. After training, the residual field of the whole image is
predicted patch by patch (``predict_tiled``): overlapping tiles of the patch's size, blended with weights that fall
off towards each tile's border, so that every prediction is made with the context the network was trained with (its
receptive field spans the whole patch: predicted on the whole image at once, the field differed).

Patches are drawn where the fixed image has structure: the patch's centre is a voxel drawn with a probability
proportional to the fixed image's gradient magnitude (inside the fixed mask when there is one), then the patch is
moved inside the image. The draws come from the run's seeded generator, so a seed gives the same patches.
"""

from __future__ import annotations

import itertools
from typing import Callable, List, Optional, Sequence, Tuple

import torch

Region = Tuple[slice, ...]


def patch_shape(size: Sequence[int], patch_size: int) -> Optional[Tuple[int, ...]]:
    """The patch of side ``patch_size`` voxels on a grid of ``size`` (each axis at most the grid's), or None when
    ``patch_size`` is 0 or the whole grid fits in the patch (the scale then trains on the whole image)."""
    if patch_size <= 0 or all(n <= patch_size for n in size):
        return None
    return tuple(min(int(n), int(patch_size)) for n in size)


def structure_weights(fixed: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sum over the pairs and axes of the absolute forward differences of ``fixed`` (N, 1, *S), zero outside
    ``mask`` (N, 1, *S) when given: (*S) float64 weights on the CPU."""
    ndim = fixed.dim() - 2
    magnitude = torch.zeros(fixed.shape[2:], dtype=torch.float64)
    for axis in range(ndim):
        step = torch.diff(fixed.detach(), dim=2 + axis).abs()
        if mask is not None:
            step = step * mask.narrow(2 + axis, 0, step.shape[2 + axis])
        magnitude.narrow(axis, 0, step.shape[2 + axis]).add_(step.sum(dim=(0, 1)).double().cpu())
    return magnitude


class PatchSampler:
    """Draws the training regions of one scale.

    fixed: (N, 1, *S) fixed images at the scale; mask: optional (N, 1, *S) fixed mask; shape: the patch (from
    ``patch_shape``); generator: the run's seeded CPU generator.
    """

    def __init__(self, fixed: torch.Tensor, mask: Optional[torch.Tensor], shape: Sequence[int],
                 generator: torch.Generator):
        self.size = tuple(int(n) for n in fixed.shape[2:])
        self.shape = tuple(int(n) for n in shape)
        self.generator = generator
        weights = structure_weights(fixed, mask).flatten()
        if not weights.sum() > 0:  # a flat image (refused upstream) or an empty mask: every voxel alike
            weights = torch.ones_like(weights)
        self.cumulative = torch.cumsum(weights, 0)

    def draw(self) -> Tuple[Region, Tuple[int, ...]]:
        """One region: (slices per spatial axis, its corner voxel)."""
        target = torch.rand((), generator=self.generator, dtype=torch.float64) * self.cumulative[-1]
        index = int(torch.searchsorted(self.cumulative, target.reshape(1)).clamp_max(self.cumulative.numel() - 1))
        corner = []
        for n, side in zip(reversed(self.size), reversed(self.shape)):
            index, centre = divmod(index, n)
            corner.append(min(max(centre - side // 2, 0), n - side))
        corner.reverse()
        return tuple(slice(c, c + side) for c, side in zip(corner, self.shape)), tuple(corner)


def tile_starts(length: int, side: int) -> List[int]:
    """First voxels of the tiles of ``side`` voxels that cover an axis of ``length`` voxels, half a tile apart (the
    last one ends at the axis's end)."""
    starts = list(range(0, max(length - side, 0) + 1, max(side // 2, 1)))
    if starts[-1] + side < length:
        starts.append(length - side)
    return starts


def tile_weights(shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """(1, 1, *shape) blending weights of a tile: a Gaussian around its centre (1 there) with a standard deviation of
    an eighth of the side on each axis, so about 3e-4 at the middle of a face: never 0, every voxel gets a weight."""
    weights = torch.ones((1, 1) + tuple(shape), device=device)
    for axis, side in enumerate(shape):
        position = torch.arange(side, device=device, dtype=torch.float32) - (side - 1) / 2
        profile = torch.exp(-0.5 * (position / (side / 8)) ** 2)
        weights = weights * profile.view((1, 1) + tuple(side if a == axis else 1 for a in range(len(shape))))
    return weights


def predict_tiled(predict: Callable[[torch.Tensor], torch.Tensor], pair: torch.Tensor,
                  shape: Sequence[int]) -> torch.Tensor:
    """The field of a whole (N, 2, *S) pair predicted tile by tile: ``predict`` maps an (N, 2, *shape) tile to its
    (N, ndim, *shape) field; overlapping tiles (``tile_starts``) are blended with ``tile_weights``.
    Returns (N, ndim, *S)."""
    size = tuple(pair.shape[2:])
    weights = tile_weights(shape, pair.device)
    field = torch.zeros((pair.shape[0], len(size)) + size, device=pair.device)
    total = torch.zeros((1, 1) + size, device=pair.device)
    for corner in itertools.product(*(tile_starts(n, side) for n, side in zip(size, shape))):
        region = (slice(None), slice(None)) + tuple(slice(c, c + side) for c, side in zip(corner, shape))
        field[region] += predict(pair[region]) * weights
        total[region] += weights
    return field / total
