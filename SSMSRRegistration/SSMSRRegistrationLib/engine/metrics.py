"""Quality measures of a displacement field and of an overlap (numpy/torch, no I/O)."""

from __future__ import annotations

from typing import Dict

import torch


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


def folding_statistics(displacement: torch.Tensor) -> Dict[str, float]:
    """Std of log |J| over non-folded voxels and percentage of voxels with J <= 0."""
    det = jacobian_determinant(displacement)
    positive = det > 0
    log_det = torch.log(det[positive]) if positive.any() else det.new_zeros(1)
    return {"std_log_jacobian": float(log_det.std()) if log_det.numel() > 1 else 0.0,
            "percent_non_positive_jacobian": float(100.0 * (~positive).float().mean())}
