"""The 2D+t case: consecutive frame pairs of the echocardiogram cine shipped with pydicom (paper Sec. III-A/B).

Frames: the first (luma) channel divided by 255, as in the paper. Pair t registers frame t-1 (moving) onto
frame t (fixed). Mask of pair t: the paper's default mask of frame t (intensities in [0.005, 0.995] dilated by
a 16-pixel disk, ``tracking.default_masks``). The first ``cine_frames`` frames give the evaluated pairs; the
pairs among the remaining frames train the VoxelMorph-equivalent network (no frame is shared).
"""

from __future__ import annotations

from typing import List

import numpy as np
import SimpleITK as sitk

from SSMSRRegistrationLib.imaging import sample_data
from SSMSRRegistrationLib.imaging.cine import MASK_DILATION_RADIUS, default_masks
from SSMSRRegistrationLib.engine.metrics import NLCC_RADIUS

from .cases import Case, Pair
from .config import Config


def echo_frames(shrink: int = 1) -> List[sitk.Image]:
    """All frames of pydicom's echo cine as float32 images in [0, 1] (value / 255), optionally downsampled."""
    frames = []
    for frame in sample_data.echo_frames():
        scaled = sitk.Cast(frame, sitk.sitkFloat32) / 255.0
        frames.append(sitk.BinShrink(scaled, [shrink, shrink]) if shrink > 1 else scaled)
    return frames


def _as_image(array: np.ndarray, like: sitk.Image, pixel=sitk.sitkFloat32) -> sitk.Image:
    image = sitk.Cast(sitk.GetImageFromArray(array), pixel)
    image.CopyInformation(like)
    return image


def echo_cine(config: Config) -> Case:
    frames = echo_frames(config.echo_shrink)
    radius = max(1, MASK_DILATION_RADIUS // config.echo_shrink)
    masks = default_masks(np.stack([sitk.GetArrayFromImage(frame) for frame in frames]), radius=radius)
    evaluated = min(config.cine_frames, len(frames) - 2)
    pairs, training = [], []
    for t in range(1, len(frames)):
        if t == evaluated:
            continue  # frame evaluated-1 belongs to the evaluated pairs, frame evaluated to the training pairs
        mask = _as_image(masks[t].astype(np.uint8), frames[t], sitk.sitkUInt8)
        (pairs if t < evaluated else training).append(Pair(f"frames {t - 1}->{t}", frames[t], frames[t - 1], mask))
    width, height = frames[0].GetSize()
    description = (
        f"pydicom's examples_ybr_color.dcm: a real 30-frame echocardiogram ({width}x{height} pixels"
        f"{f' after {config.echo_shrink}x downsampling' if config.echo_shrink > 1 else ''}), first channel / 255. "
        f"Pairs (t-1 -> t) for t = 1..{evaluated - 1} are evaluated ({len(pairs)} pairs); the "
        f"{len(training)} pairs among frames {evaluated}..{len(frames) - 1} train the VoxelMorph-equivalent "
        "network. No ground truth exists (as in the paper): MSE and NLCC inside the mask.")
    return Case(name="echo_cine", title="Echocardiogram cine (pydicom), consecutive frames", description=description,
                pairs=pairs, training=training, schedule=config.schedule_2d,
                nlcc_radius=max(1, NLCC_RADIUS // config.echo_shrink),
                mask_source=(f"paper's default: fixed-frame intensities in [0.005, 0.995] dilated by a {radius}-pixel "
                             "disk; also given to SSMSR, SSR, VoxelMorph-equivalent, ANTs and elastix as the fixed "
                             "mask (demons takes no mask)"),
                masked_registration=True, sequence=True)
