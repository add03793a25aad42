"""Registration losses: local normalised cross-correlation (paper Eq. 2) and gradient smoothness."""

from __future__ import annotations

from typing import Optional

import torch

from .spatial import spatial_dims

#: Guard added to the product of local variances (means over the window, intensities in [0, 1]):
#: windows whose variance product is far below it (flat background) count as uncorrelated.
NCC_EPSILON = 1e-8


def _box_sum_along(values: torch.Tensor, dim: int, before: int, after: int) -> torch.Tensor:
    """Sum of ``values[i - before : i + after + 1]`` along ``dim`` at every ``i`` (zero outside); same shape. Shifted
    in-place additions: on a 2-core CPU a quarter of avg_pool3d's time (Testing/benchmarks/RESULTS.md)."""
    length = values.shape[dim]
    total = values.clone()
    for shift in range(1, min(before, length - 1) + 1):
        total.narrow(dim, shift, length - shift).add_(values.narrow(dim, 0, length - shift))
    for shift in range(1, min(after, length - 1) + 1):
        total.narrow(dim, 0, length - shift).add_(values.narrow(dim, shift, length - shift))
    return total


class _BoxSum(torch.autograd.Function):
    """``_box_sum_along`` with its adjoint as the backward: the same sum with ``before`` and ``after`` swapped."""

    @staticmethod
    def forward(ctx, values: torch.Tensor, dim: int, before: int, after: int) -> torch.Tensor:
        ctx.box = (dim, before, after)
        return _box_sum_along(values, dim, before, after)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        dim, before, after = ctx.box
        return _box_sum_along(grad, dim, after, before), None, None, None


def _box_mean(stack: torch.Tensor, window: int) -> torch.Tensor:
    """Mean over the part of a window^ndim box around each voxel that lies inside the image.

    (N, C, *S) -> same shape. Even windows extend one voxel further before the centre than after it.
    The box is separable: one 1D moving sum per axis (3 x window instead of window^3 reads in 3D),
    each divided by the number of its voxels inside the image.
    """
    ndim = spatial_dims(stack)
    before, after = window // 2, (window - 1) // 2
    result = stack
    for axis in range(ndim):
        length = stack.shape[2 + axis]
        index = torch.arange(length, device=stack.device)
        inside = ((index + after).clamp_max(length - 1) - (index - before).clamp_min(0) + 1).to(stack.dtype)
        inside = inside.reshape((length,) + (1,) * (ndim - 1 - axis))
        result = _BoxSum.apply(result, 2 + axis, before, after) / inside
    return result


def local_ncc_map(fixed: torch.Tensor, warped: torch.Tensor, window: int) -> torch.Tensor:
    """Squared local normalised cross-correlation at every voxel (paper Eq. 2 before averaging).

    Args:
        fixed, warped: (N, 1, *S) images.
        window: side of the local box in voxels (clipped at the image border).
    Returns:
        (N, 1, *S) values in [0, 1], computed in float32 even under autocast;
        0 where either image is locally constant (no NaN).
    """
    with torch.autocast(device_type=fixed.device.type, enabled=False):
        i = fixed.float()
        j = warped.float()
        n = i.shape[1]
        moments = _box_mean(torch.cat([i, j, i * i, j * j, i * j], dim=1), window)
        mean_i, mean_j, mean_ii, mean_jj, mean_ij = torch.split(moments, n, dim=1)
        cross = mean_ij - mean_i * mean_j
        var_i = (mean_ii - mean_i * mean_i).clamp_min(0.0)
        var_j = (mean_jj - mean_j * mean_j).clamp_min(0.0)
        # Eq. 2's sums are (voxels in window) times these means; the ratio is the same.
        return cross * cross / (var_i * var_j + NCC_EPSILON)


def masked_mean(values: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean of (N, 1, *S) values over a (N, 1, *S) weight mask (all voxels when None)."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def local_ncc(fixed: torch.Tensor, warped: torch.Tensor, window: int,
              mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean squared local NCC (higher is better), optionally restricted to a fixed-image mask."""
    return masked_mean(local_ncc_map(fixed, warped, window), mask)


def gradient_smoothness(displacement: torch.Tensor) -> torch.Tensor:
    """Mean squared forward difference of an (N, ndim, *S) field, averaged over the axes.

    The paper's L_S (sum of |grad u_i|^2) normalised by the number of voxels, as in VoxelMorph.
    """
    ndim = spatial_dims(displacement)
    total = displacement.new_zeros(())
    for axis in range(2, 2 + ndim):
        diff = torch.diff(displacement, dim=axis)
        total = total + (diff * diff).mean()
    return total / ndim


def registration_loss(fixed: torch.Tensor, warped: torch.Tensor, displacement: torch.Tensor,
                      window: int, smoothness_weight: float,
                      mask: Optional[torch.Tensor] = None, mse_weight: float = 0.0) -> torch.Tensor:
    """Paper Eq. 1, -local NCC + lambda * smoothness, plus ``mse_weight`` times the mean squared intensity difference
    (intensities in [0, 1]; inside ``mask``). ``mse_weight`` 0 is the paper's loss."""
    loss = -local_ncc(fixed, warped, window, mask) + smoothness_weight * gradient_smoothness(displacement)
    if mse_weight:
        loss = loss + mse_weight * masked_mean((fixed.float() - warped.float()) ** 2, mask)
    return loss
