"""Metrics of one registration field, computed the same way for every method.

The field (ITK displacement field on the fixed grid, mm) resamples the moving image (linear) and the moving
labels (nearest neighbour) onto the fixed grid with SimpleITK; MSE, NLCC and the folding measures are the
product's (``engine.metrics``: the Jacobian determinant by central differences in voxel units, one-sided at the
border, over the whole grid).
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import SimpleITK as sitk
import torch
from scipy.ndimage import distance_transform_edt

from SSMSRRegistrationLib.engine.metrics import folding_statistics, masked_mse, masked_nlcc
from SSMSRRegistrationLib.imaging.fields import displacement_transform, image_to_voxel_field

from .cases import Pair

#: Percentile of the symmetric surface distance reported as HD95.
HAUSDORFF_PERCENTILE = 95.0


def warp_image(image: sitk.Image, field: sitk.Image, labels: bool = False) -> sitk.Image:
    """``image`` resampled onto the field's grid at p + u(p): linear (float32) or nearest neighbour (labels)."""
    transform = displacement_transform(field)
    if labels:
        return sitk.Resample(image, field, transform, sitk.sitkNearestNeighbor, 0, image.GetPixelID())
    return sitk.Resample(image, field, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def dice(fixed: np.ndarray, warped: np.ndarray) -> float:
    """2|A n B| / (|A| + |B|) of two boolean arrays (NaN if both are empty)."""
    total = int(fixed.sum()) + int(warped.sum())
    return 2.0 * int(np.logical_and(fixed, warped).sum()) / total if total else float("nan")


def _surface(mask: sitk.Image) -> np.ndarray:
    """Boolean array of the mask's surface voxels (inside voxels with a face neighbour outside)."""
    return sitk.GetArrayFromImage(sitk.LabelContour(mask, fullyConnected=False)) > 0


def _surface_distances(source: sitk.Image, target: sitk.Image) -> np.ndarray:
    """Euclidean distances (mm) from each surface voxel of ``source`` to the nearest surface voxel of
    ``target`` (binary images on one grid)."""
    spacing = tuple(reversed(source.GetSpacing()))  # array axis order
    distance_to_target = distance_transform_edt(~_surface(target), sampling=spacing)
    return distance_to_target[_surface(source)]


def hausdorff95(fixed: sitk.Image, warped: sitk.Image) -> float:
    """95th-percentile Hausdorff distance (mm) between two binary masks on one grid: the larger of the two
    directed 95th percentiles of surface-to-surface distances (as MONAI's ``compute_hausdorff_distance``)."""
    if not (sitk.GetArrayViewFromImage(fixed).any() and sitk.GetArrayViewFromImage(warped).any()):
        return float("nan")
    forward = _surface_distances(fixed, warped)
    backward = _surface_distances(warped, fixed)
    return float(max(np.percentile(forward, HAUSDORFF_PERCENTILE), np.percentile(backward, HAUSDORFF_PERCENTILE)))


def label_overlap(fixed_labels: sitk.Image, warped_labels: sitk.Image, label: int) -> Dict[str, float]:
    """Dice and HD95 (mm) of one label."""
    fixed_mask, warped_mask = fixed_labels == label, warped_labels == label
    return {"dice": dice(sitk.GetArrayViewFromImage(fixed_mask) > 0, sitk.GetArrayViewFromImage(warped_mask) > 0),
            "hd95_mm": hausdorff95(fixed_mask, warped_mask)}


def _tensor(image: sitk.Image) -> torch.Tensor:
    return torch.from_numpy(sitk.GetArrayFromImage(image).astype(np.float32))[None, None]


def intensity_agreement(fixed: sitk.Image, warped: sitk.Image, mask: Optional[sitk.Image],
                        radius: int) -> Dict[str, float]:
    """MSE and NLCC (mean squared local NCC, window 2 radius + 1, paper Eq. 2) inside ``mask`` (everywhere if
    None), on the [0, 1] intensities."""
    fixed_t, warped_t = _tensor(fixed), _tensor(warped)
    inside = (_tensor(mask) > 0).float() if mask is not None else torch.ones_like(fixed_t)
    return {"mse": float(masked_mse(fixed_t, warped_t, inside)[0]),
            "nlcc": float(masked_nlcc(fixed_t, warped_t, inside, radius)[0])}


def field_regularity(field: sitk.Image) -> Dict[str, float]:
    """Std of log|J| over voxels with J > 0, and % of voxels with J <= 0 (whole fixed grid)."""
    voxels = torch.from_numpy(image_to_voxel_field(field))[None]
    return folding_statistics(voxels)


def endpoint_error(field: sitk.Image, truth: sitk.Image, mask: Optional[sitk.Image]) -> float:
    """Mean |u - u_true| (mm) inside ``mask``."""
    difference = sitk.GetArrayFromImage(field) - sitk.GetArrayFromImage(truth)
    norms = np.linalg.norm(difference, axis=-1)
    inside = sitk.GetArrayViewFromImage(mask) > 0 if mask is not None else np.ones(norms.shape, bool)
    return float(norms[inside].mean())


def evaluate_pair(pair: Pair, field: sitk.Image, label_names: Dict[int, str], radius: int):
    """All metrics of one field on one pair.

    Returns (pair_metrics, label_metrics, warped): pair_metrics has mse, nlcc, std_log_jacobian,
    percent_non_positive_jacobian, endpoint_error_mm (NaN without a true field); label_metrics maps each label
    to its dice and hd95_mm (empty without labels); warped is the moving image resampled by the field.
    """
    warped = warp_image(pair.moving, field)
    metrics = {**intensity_agreement(pair.fixed, warped, pair.mask, radius), **field_regularity(field),
               "endpoint_error_mm": (endpoint_error(field, pair.true_field, pair.mask)
                                     if pair.true_field is not None else float("nan"))}
    labels = {}
    if pair.fixed_labels is not None:
        warped_labels = warp_image(pair.moving_labels, field, labels=True)
        labels = {label: label_overlap(pair.fixed_labels, warped_labels, label) for label in label_names}
    return metrics, labels, warped
