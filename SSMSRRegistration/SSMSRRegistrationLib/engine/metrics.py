"""The quality measures of a registration, one function and one name each (torch, no I/O).

Measures (their names in ``common.protocol``: ``MSE``, ``NLCC``, ``FOLDED_PERCENT``):

- ``masked_mse``: mean squared intensity difference inside a mask, per image of a batch;
- ``masked_nlcc``: NLCC, the mean squared local NCC (paper Eq. 2, window 2r+1) inside a mask, per image;
- ``jacobian_determinant`` of p -> p + u(p), and from it ``folded_percent`` (the percentage of voxels where the
  determinant is not positive: the field folds) and ``std_log_jacobian`` (the spread of log |J| where it does not).

``pair_metrics`` measures a batch of pairs before and after their fields (the per-pair table of ``track``);
``folding_statistics`` gives the two field measures under the keys of ``register``'s metrics.
"""

from __future__ import annotations

from typing import Dict, List

import numpy as np
import torch

from ..common.protocol import FOLDED_PERCENT, IDENTITY_SUFFIX, MSE, NLCC, PAIR_METRIC_NAMES
from .losses import local_ncc_map
from .spatial import warp

#: Radius in pixels of the local NCC window of the evaluation measure NLCC (Sec. III-B): window 2r+1.
NLCC_RADIUS = 10

#: Pairs measured at once by ``pair_metrics``.
METRIC_CHUNK = 8

#: The key of the folded percentage in ``register``'s metrics (and so in its "finished" event, a batch case's
#: case.json and the benchmarks' tables). It keeps this older name because the Slicer logic reads it; the tables
#: of pairs and cases (track's metrics.csv, batch's results.csv) call the same measure ``FOLDED_PERCENT``.
REGISTER_FOLDED_KEY = "percent_non_positive_jacobian"

#: The key of ``std_log_jacobian`` in ``register``'s metrics.
STD_LOG_JACOBIAN = "std_log_jacobian"


def jacobian_determinant(displacement: torch.Tensor) -> torch.Tensor:
    """Jacobian determinant of p -> p + u(p) by central differences (one-sided at the borders).

    Args:
        displacement: (N, ndim, *S) field in voxels (channel k along array axis k).
    Returns:
        (N, *S) determinants; values <= 0 mark folding.
    """
    ndim = displacement.shape[1]
    grads = []
    for axis in range(ndim):
        grads.append(torch.gradient(displacement, dim=2 + axis)[0])  # d u_k / d x_axis
    # jac[n, k, axis] = delta_{k,axis} + d u_k / d x_axis
    jac = torch.stack(grads, dim=2).movedim((1, 2), (-2, -1))
    jac = jac + torch.eye(ndim, dtype=jac.dtype, device=jac.device)
    return torch.linalg.det(jac)


def _folded(determinant: torch.Tensor) -> torch.Tensor:
    """Where a field folds: its Jacobian determinant is not positive."""
    return ~(determinant > 0)


def folded_percent(displacement: torch.Tensor) -> torch.Tensor:
    """(N,) percentage of each field's voxels (over its whole grid) where it folds (Jacobian determinant <= 0).

    Args:
        displacement: (N, ndim, *S) voxel fields, as for ``jacobian_determinant``.
    """
    return 100.0 * _folded(jacobian_determinant(displacement)).float().flatten(1).mean(dim=1)


def std_log_jacobian(displacement: torch.Tensor) -> float:
    """Standard deviation of log |J| over the voxels (of all fields of the batch) where the field does not fold;
    0 with fewer than two such voxels."""
    determinant = jacobian_determinant(displacement)
    positive = ~_folded(determinant)
    log_det = torch.log(determinant[positive]) if positive.any() else determinant.new_zeros(1)
    return float(log_det.std()) if log_det.numel() > 1 else 0.0


def folding_statistics(displacement: torch.Tensor) -> Dict[str, float]:
    """``std_log_jacobian`` and ``folded_percent`` of a (1, ndim, *S) field, under the keys of ``register``'s
    metrics (STD_LOG_JACOBIAN, REGISTER_FOLDED_KEY)."""
    return {STD_LOG_JACOBIAN: std_log_jacobian(displacement),
            REGISTER_FOLDED_KEY: float(folded_percent(displacement).mean())}


def masked_mean(values: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(N, 1, *S) values and 0/1 masks -> (N,) means inside each mask (NaN where a mask is empty)."""
    inside = masks.flatten(1).sum(dim=1)
    return (values * masks).flatten(1).sum(dim=1) / inside.where(inside > 0, torch.nan)


def masked_mse(fixed: torch.Tensor, warped: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(N,) mean squared difference of (N, 1, *S) images inside 0/1 masks (NaN for an empty mask)."""
    return masked_mean((fixed - warped) ** 2, masks)


def masked_nlcc(fixed: torch.Tensor, warped: torch.Tensor, masks: torch.Tensor,
                radius: int = NLCC_RADIUS) -> torch.Tensor:
    """(N,) NLCC of (N, 1, *S) images inside 0/1 masks: the mean squared local NCC (paper Eq. 2) in a window of
    2 radius + 1 voxels, in float32 (NaN for an empty mask)."""
    with torch.no_grad():
        return masked_mean(local_ncc_map(fixed, warped, 2 * radius + 1), masks)


def pair_metrics(fixed: torch.Tensor, moving: torch.Tensor, displacements: torch.Tensor,
                 masks: torch.Tensor, radius: int = NLCC_RADIUS) -> Dict[str, np.ndarray]:
    """MSE and NLCC inside the masks of each pair, for the identity and for the fields (paper Sec. III-B).

    Args:
        fixed, moving, masks: (N, 1, *S) frames in [0, 1] and fixed-frame masks (non-zero inside), 2D or 3D.
        displacements: (N, ndim, *S) voxel fields warping ``moving`` onto ``fixed``.
        radius: NLCC window radius in pixels (window 2r+1).
    Returns:
        PAIR_METRIC_NAMES -> (N,) float64 arrays: ``masked_mse`` and ``masked_nlcc`` of the identity
        (names ending in IDENTITY_SUFFIX) and of the fields, and ``folded_percent`` (over the whole frame).
    """
    device = displacements.device
    results: Dict[str, List[torch.Tensor]] = {name: [] for name in PAIR_METRIC_NAMES}
    with torch.no_grad():
        for start in range(0, fixed.shape[0], METRIC_CHUNK):
            chunk = slice(start, start + METRIC_CHUNK)
            fixed_c, moving_c = fixed[chunk].to(device), moving[chunk].to(device)
            masks_c = (masks[chunk].to(device) > 0).float()
            for suffix, warped in ((IDENTITY_SUFFIX, moving_c), ("", warp(moving_c, displacements[chunk]))):
                results[MSE + suffix].append(masked_mse(fixed_c, warped, masks_c).cpu())
                results[NLCC + suffix].append(masked_nlcc(fixed_c, warped, masks_c, radius).cpu())
            results[FOLDED_PERCENT].append(folded_percent(displacements[chunk]).cpu())
    return {name: torch.cat(values).double().numpy() for name, values in results.items()}
