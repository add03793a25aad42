"""The Python API: ``register``, ``track``, ``train`` and ``segment`` (the workflows), ``save_tracking``, which
writes a tracking's files together with its figures, and ``apply`` / ``read_transform``, which bring a saved result
to other images, label maps and points.

    >>> import SSMSRRegistrationLib as ssmsr
    >>> output = ssmsr.register("fixed.nii.gz", "moving.nii.gz", preset="fast")  # doctest: +SKIP
    >>> output.save("field.nii.gz", warped_path="warped.nii.gz")  # doctest: +SKIP
    >>> tracking = ssmsr.track("echo.dcm", preset="fast")  # doctest: +SKIP
    >>> ssmsr.save_tracking(tracking, "echo_tracking")  # fields, metrics and figures  # doctest: +SKIP
"""

from __future__ import annotations

import os
from typing import Dict, Optional

from ..common.schedule import format_scale
from ..report import figures
from ..workflows.register import register
from ..workflows.segment import segment
from ..workflows.track import TrackingResult, track
from ..workflows.apply import apply, read_transform
from ..workflows.train import train

__all__ = ["register", "track", "train", "segment", "save_tracking", "apply", "read_transform"]


def save_tracking(result: TrackingResult, folder: str, accumulated: bool = False,
                  draw_figures: bool = True) -> Dict[str, Optional[str]]:
    """``result.save(folder, accumulated)`` plus, with ``draw_figures``, tracking.gif (the motion of every pair) and
    tracking.png (a few pairs after each scale), written before the folder is published; of 3D frames, the middle
    slice of their third image axis (z) with the motion in that slice."""
    if not draw_figures:
        return result.save(folder, accumulated)
    figures.check_figure_support()
    spacing_x, spacing_y = result.cine.frame_grid.GetSpacing()[:2]
    aspect = spacing_y / spacing_x
    frames, masks = result.cine.frames, result.masks
    per_scale = [field.numpy() for field in result.displacements_per_scale]
    where = ""
    if result.cine.dimension == 3:  # the middle slice of the third image axis, with the in-slice motion
        middle = frames.shape[1] // 2
        frames, masks = frames[:, middle], masks[:, middle]
        per_scale = [field[:, 1:, middle] for field in per_scale]
        where = f", slice {middle}"
    scale_names = [format_scale(scale) for scale in result.settings.scales]

    def write_figures(staging: str) -> Dict[str, str]:
        figures.write_animation(os.path.join(staging, "tracking.gif"), frames, masks, per_scale[-1],
                                result.frame_pairs, aspect, where)
        figures.write_overview(os.path.join(staging, "tracking.png"), frames, masks, per_scale, scale_names,
                               result.frame_pairs, aspect, where)
        return {"animation": "tracking.gif", "figure": "tracking.png"}

    return result.save(folder, accumulated, extra_files=write_figures)
