"""Cine tracking (paper Sec. III-A/D): SSMSR on the frame pairs of a 2D+t or 3D+t cine.

The test-time training runs once for the whole sequence: all pairs share one U-Net per scale, each step trains on
a random mini-batch of pairs, and the steps per scale are counted for the sequence. The pairs are consecutive (the
paper's echo protocol: pair t registers frame t-1, moving, onto frame t, fixed) or, with a reference frame r (4D CT
practice), the reference onto every other frame (pair t registers frame r onto frame t).

    >>> from SSMSRRegistrationLib.workflows.track import track
    >>> result = track("echo.dcm", scales="1/4,1/2,1", steps=500)  # doctest: +SKIP
    >>> result.save("echo_tracking")  # files only; interfaces.api.save_tracking adds the figures  # doctest: +SKIP

Conventions: frames are numbered from 0; a pair is numbered by its fixed frame t; its field is an ITK displacement
field on the frame grid (millimetres, LPS, resampling direction) that warps its moving frame m onto frame t:
frame_t(p) ~ frame_m(p + u_t(p)). In memory, fields are engine voxel fields (see ``engine.spatial``) stacked as
(N, d, *frame shape), d = 2 or 3, in the order of ``TrackingResult.frame_pairs``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import SimpleITK as sitk
import torch

from ..common.errors import InputError
from ..common.protocol import PAIR_METRIC_NAMES, ProgressCallback, json_safe
from ..common.run_config import RunConfiguration, combined, takes_run_options
from ..common.schedule import fitting_schedule, format_scale
from ..engine.metrics import NLCC_RADIUS, pair_metrics
from ..engine.multiscale import RegistrationSettings, register_tensors, resolve_device
from ..engine.spatial import compose
from ..imaging.atomic import check_output_folder, publish_folder
from ..imaging.cine import (MASK_DILATION_RADIUS, MASK_HIGH, MASK_LOW, Cine, CineSource, check_reference,
                            default_masks, read_cine, read_masks)
from ..imaging.fields import sample_field, voxel_field_to_image, write_field, write_image
from ..imaging.images import ImageLike
from ..imaging.points import read_cine_landmarks
from .provenance import file_digest, image_digest, run_record

__all__ = ["ExtraFiles", "TrackingResult", "accumulate", "check_output_folder", "frame_pairs", "frames_digest",
           "track"]

#: Writes extra files into a results folder before it is published; returns {output name: file name}.
ExtraFiles = Callable[[str], Dict[str, str]]
#: Per-pair metrics of a tracking with landmarks (``landmark_errors``): target registration error (mm) without
#: registration and with the pair's field.
LANDMARK_METRIC_NAMES = ("tre_identity_mm", "tre_mm")


def frame_pairs(frames: int, reference: Optional[int] = None) -> List[Tuple[int, int]]:
    """(moving frame, fixed frame) of every pair: consecutive (t-1, t) for t = 1..T-1 when ``reference`` is None,
    else (reference, t) for every other frame t."""
    check_reference(reference, frames)
    if reference is None:
        return [(t - 1, t) for t in range(1, frames)]
    return [(reference, t) for t in range(frames) if t != reference]


def shared_labels(landmarks: Dict[int, Dict[str, np.ndarray]], moving: int, fixed: int) -> List[str]:
    """The labels of the landmarks that both frames have, sorted."""
    return sorted(set(landmarks.get(moving, {})) & set(landmarks.get(fixed, {})))


def landmark_errors(fields: List[sitk.Image], pairs: List[Tuple[int, int]],
                    landmarks: Dict[int, Dict[str, np.ndarray]]) -> Dict[str, np.ndarray]:
    """Target registration error of each pair ((moving, fixed) frames, with its field on the fixed frame): the mean
    distance (mm) between a landmark of the moving frame and the same landmark of the fixed frame carried by the
    field (p + u(p), u linearly interpolated), and without registration (p itself); NaN for a pair whose frames share
    no landmark. Returns {name of LANDMARK_METRIC_NAMES: (pairs,) array}."""
    errors = {name: np.full(len(pairs), np.nan) for name in LANDMARK_METRIC_NAMES}
    for index, (field, (moving, fixed)) in enumerate(zip(fields, pairs)):
        labels = shared_labels(landmarks, moving, fixed)
        if labels:
            on_fixed, on_moving = (np.array([landmarks[frame][label] for label in labels]) for frame in (fixed, moving))
            displacement, _ = sample_field(field, on_fixed)
            errors["tre_identity_mm"][index] = np.linalg.norm(on_fixed - on_moving, axis=1).mean()
            errors["tre_mm"][index] = np.linalg.norm(on_fixed + displacement - on_moving, axis=1).mean()
    return errors


def accumulate(displacements: torch.Tensor) -> torch.Tensor:
    """Fields from the first frame: (T-1, d, *S) consecutive pair fields -> (T-1, d, *S), index t-1 warping frame 0
    onto frame t, i.e. frame_t(p) ~ frame_0(p + a_t(p)), with a_1 = u_1 and a_t = u_t + a_{t-1}(p + u_t(p))."""
    accumulated = [displacements[:1]]
    for index in range(1, displacements.shape[0]):
        accumulated.append(compose(accumulated[-1], displacements[index:index + 1]))
    return torch.cat(accumulated)


@dataclass
class TrackingResult:
    """What ``track`` returns.

    cine: the cine as tracked. masks: (T, *frame shape) bool, mask t restricting the pair whose fixed frame is t.
    reference: the reference frame, or None for consecutive pairs (see ``frame_pairs``).
    displacements: (N, d, *frame shape) voxel fields on the CPU, index i warping frame_pairs[i][0] onto
    frame_pairs[i][1].
    displacements_per_scale: the same after each scale of the schedule, coarse to fine.
    metrics: per-pair arrays (N,) named as in PAIR_METRIC_NAMES.
    loss_history: per scale, the training loss of every step (one mini-batch each).
    settings: the engine settings used. seconds: training time. device: where it ran. mask_source: "auto" or
    the mask given.
    """

    cine: Cine
    masks: np.ndarray
    reference: Optional[int]
    displacements: torch.Tensor
    displacements_per_scale: List[torch.Tensor]
    metrics: Dict[str, np.ndarray]
    loss_history: Dict[str, List[float]]
    settings: RegistrationSettings
    seconds: float
    device: str
    mask_source: str
    provenance: dict

    @property
    def frame_pairs(self) -> List[Tuple[int, int]]:
        """(moving frame, fixed frame) of each pair, in the order of ``displacements``."""
        return frame_pairs(self.cine.frames.shape[0], self.reference)

    @property
    def pairs(self) -> List[int]:
        """The pair numbers: each pair's fixed frame."""
        return [fixed for _, fixed in self.frame_pairs]

    def field(self, pair: int, displacements: Optional[torch.Tensor] = None) -> sitk.Image:
        """The ITK displacement field (mm, LPS, on the frame grid) of ``pair`` (a number of ``pairs``)."""
        chosen = self.displacements if displacements is None else displacements
        return voxel_field_to_image(chosen[self.pairs.index(pair)].double().numpy(), self.cine.frame_grid)

    def stacked_field(self, displacements: Optional[torch.Tensor] = None) -> sitk.Image:
        """All pair fields as one displacement field on the cine grid (x, y[, z], t), mm, LPS: 3D for a 2D+t cine,
        4D for a 3D+t one.

        Time slice t holds the field of pair t with a zero time component; the slice of a frame that is no pair's
        fixed frame (frame 0, or the reference frame) is zero.
        """
        chosen = self.displacements if displacements is None else displacements
        voxels = np.zeros((chosen.shape[1] + 1, self.cine.frames.shape[0]) + tuple(chosen.shape[2:]))
        voxels[1:, self.pairs] = chosen.double().numpy().swapaxes(0, 1)
        return voxel_field_to_image(voxels, self.cine.cine_grid)

    def summary(self) -> dict:
        """Means over the pairs (ignoring pairs with an empty mask), named as the ``register`` metrics:
        mse_before/mse_after (identity/SSMSR MSE), ncc_before/ncc_after (identity/SSMSR NLCC, radius
        ``nlcc_radius``); the largest percentage of folded pixels of a pair (max_folded_percent); with landmarks,
        tre_before_mm/tre_after_mm (over the pairs whose frames share landmarks); with the frame and pair counts, the
        training time and the device."""
        means = {name: float(np.nanmean(values)) for name, values in self.metrics.items()}
        landmarks = ({"tre_before_mm": means["tre_identity_mm"], "tre_after_mm": means["tre_mm"]}
                     if "tre_mm" in self.metrics else {})
        return {"frames": int(self.cine.frames.shape[0]), "pairs": len(self.pairs),
                "mse_before": means["mse_identity"], "mse_after": means["mse"],
                "ncc_before": means["nlcc_identity"], "ncc_after": means["nlcc"], "nlcc_radius": NLCC_RADIUS,
                "max_folded_percent": float(np.max(self.metrics["folded_percent"])), **landmarks,
                "seconds": self.seconds, "device": self.device}

    def save(self, folder: str, accumulated: bool = False,
             extra_files: Optional[ExtraFiles] = None) -> Dict[str, Optional[str]]:
        """Write the results into ``folder`` (created; it must not exist or be empty).

        Everything is written into a hidden sibling folder that is renamed onto ``folder`` at the end
        (``imaging.atomic.publish_folder``), so a failure or cancel leaves no partial results. The files are those of
        ``write_files``. Returns the paths of the written files (None for those not asked for) and the "folder".
        """
        if accumulated and self.reference is not None:
            raise InputError("Accumulated fields compose consecutive pairs; fields to a reference frame already go "
                             "from that frame to every other.", setting="accumulated")
        with publish_folder(folder) as staging:
            names = self.write_files(staging, accumulated, extra_files)
        folder = os.path.abspath(os.fspath(folder))
        return {"folder": folder, **{key: os.path.join(folder, name) if name is not None else None
                                     for key, name in names.items()}}

    def write_files(self, folder: str, accumulated: bool = False,
                    extra_files: Optional[ExtraFiles] = None) -> Dict[str, Optional[str]]:
        """Write the results into an existing, empty ``folder`` as they are (``save`` publishes them atomically;
        a batch case writes them into the folder it publishes).

        Writes field_NNNN.nii.gz (pair NNNN), fields.nii.gz (see ``stacked_field``), mask.nii.gz (on the cine grid),
        metrics.csv, summary.json and, optionally, accumulated_NNNN.nii.gz + accumulated.nii.gz (from frame 0),
        provenance.json (``provenance``, with the digests of the fields, the mask and the metrics) and what
        ``extra_files`` writes (the figures of ``interfaces.api.save_tracking``). Returns {output name: file name}
        (None for those not asked for).
        """
        self._write(folder, accumulated)
        extra = extra_files(folder) if extra_files is not None else {}
        return {"fields": "fields.nii.gz", "mask": "mask.nii.gz", "metrics": "metrics.csv",
                "summary": "summary.json", "accumulated": "accumulated.nii.gz" if accumulated else None,
                "provenance": "provenance.json", **extra}

    def _write(self, folder: str, accumulated: bool) -> None:
        for pair in self.pairs:
            write_field(self.field(pair), os.path.join(folder, f"field_{pair:04d}.nii.gz"))
        write_field(self.stacked_field(), os.path.join(folder, "fields.nii.gz"))
        mask = sitk.GetImageFromArray(self.masks.astype(np.uint8), isVector=False)
        mask.CopyInformation(self.cine.cine_grid)
        write_image(mask, os.path.join(folder, "mask.nii.gz"))
        if accumulated:
            from_first = accumulate(self.displacements)
            for pair in self.pairs:
                write_field(self.field(pair, from_first), os.path.join(folder, f"accumulated_{pair:04d}.nii.gz"))
            write_field(self.stacked_field(from_first), os.path.join(folder, "accumulated.nii.gz"))
        self._write_metrics(os.path.join(folder, "metrics.csv"))
        with open(os.path.join(folder, "summary.json"), "w", encoding="utf-8") as stream:
            json.dump(self._description(), stream, indent=2, allow_nan=False)
        # Everything written so far but the summary (it holds the time) is repeatable: digest it.
        repeatable = sorted(name for name in os.listdir(folder) if name != "summary.json")
        outputs = {name: {"file": name, "sha256": file_digest(os.path.join(folder, name))} for name in repeatable}
        with open(os.path.join(folder, "provenance.json"), "w", encoding="utf-8") as stream:
            json.dump({**self.provenance, "outputs": outputs}, stream, indent=2, allow_nan=False, default=str)

    def _write_metrics(self, path: str) -> None:
        names = [*PAIR_METRIC_NAMES, *(name for name in LANDMARK_METRIC_NAMES if name in self.metrics)]
        with open(path, "w", newline="", encoding="utf-8") as stream:
            writer = csv.writer(stream)
            writer.writerow(["pair", "moving_frame", "fixed_frame", *names])
            for index, (moving, fixed) in enumerate(self.frame_pairs):
                writer.writerow([fixed, moving, fixed, *(f"{self.metrics[name][index]:.6g}" for name in names)])

    def _description(self) -> dict:
        settings = self.settings
        return {**json_safe(self.summary()), "cine": self.cine.name, "frame_size": list(self.cine.frame_grid.GetSize()),
                "spacing_mm": list(self.cine.frame_grid.GetSpacing()), "mask": self.mask_source,
                "reference_frame": self.reference,
                "scales": [format_scale(s) for s in settings.scales], "steps_per_scale": settings.steps_per_scale,
                "finest_steps": settings.finest_steps, "batch_size": settings.batch_size,
                "smoothness_weight": settings.smoothness_weight, "mse_weight": settings.mse_weight,
                "ncc_window": settings.window_for(self.cine.dimension),
                "learning_rate": settings.learning_rate, "seed": settings.seed,
                "mixed_precision_requested": settings.mixed_precision}


def frames_digest(cine: Cine) -> str:
    """SHA-256 of the frames as tracked ((T, *frame shape) float32 in [0, 1]) and of their grid."""
    digest = hashlib.sha256(np.ascontiguousarray(cine.frames, dtype=np.float32).tobytes())
    digest.update(image_digest(cine.cine_grid).encode())
    return digest.hexdigest()


@takes_run_options("cine")
def track(cine: Union[CineSource, Cine], *, mask: Optional[ImageLike] = "auto", reference: Optional[int] = None,
          landmarks: Optional[str] = None, progress: Optional[ProgressCallback] = None,
          should_stop: Optional[Callable[[], bool]] = None, config: Optional[RunConfiguration] = None,
          preset: Optional[str] = None, **options) -> TrackingResult:
    """Track a 2D+t or 3D+t cine: SSMSR on all its pairs with one test-time training for the sequence.

    Args:
        cine: see ``read_cine``, or a ``Cine`` already read.
        mask: "auto" (or None) for the paper's masks (``default_masks``), or a mask file/image (``read_masks``).
        reference: None for consecutive pairs; a frame number to register that frame onto every other (its grid is
            the one 3D frames on different grids are resampled onto).
        landmarks: None, or a CSV of landmarks per frame (``imaging.points.read_cine_landmarks``): each pair's target
            registration error is then measured (``landmark_errors``; metrics tre_identity_mm and tre_mm).
        progress, should_stop: the engine's progress callback and cancel poll.
        config, preset, options: the run configuration, as for ``register``, with the preset's values for 2D+t cines
            or for 3D+t cines (``presets.KINDS``); a preset's schedule drops the scales that would leave a frame axis
            under 8 pixels.

    Four frames of a real echocardiogram (shipped with the module), a short schedule:

    >>> import tempfile, SSMSRRegistrationLib as ssmsr
    >>> from SSMSRRegistrationLib.imaging.sample_data import shipped_echo_frames
    >>> tracking = ssmsr.track(shipped_echo_frames([0, 1, 2, 3]), scales="1/2,1", steps=10, batch_size=2, device="cpu")
    >>> tracking.summary()["pairs"], tracking.field(1).GetNumberOfComponentsPerPixel()
    (3, 2)
    >>> written = ssmsr.save_tracking(tracking, tempfile.mkdtemp() + "/tracking", draw_figures=False)
    >>> [name for name in ("fields", "metrics", "provenance") if written[name].endswith((".nii.gz", ".csv", ".json"))]
    ['fields', 'metrics', 'provenance']
    """
    configuration = combined(config, preset, **options)
    configuration.resolve("cine")  # bad options are reported before the cine is read
    source = cine if isinstance(cine, (str, os.PathLike, sitk.Image)) else None  # else: the frames' digest
    if not isinstance(cine, Cine):
        cine = read_cine(cine, reference or 0)
    run = configuration.resolve("cine" if cine.dimension == 2 else "volume_cine")
    settings = RegistrationSettings.from_run(run)
    settings.voxel_mm = max(cine.frame_grid.GetSpacing())  # half-resolution fields where every side is finer
    settings.validate()
    torch_device = resolve_device(run.device)
    pairs = frame_pairs(cine.frames.shape[0], reference)
    frame_landmarks = None
    if landmarks is not None:
        frame_landmarks = read_cine_landmarks(landmarks, cine.dimension, cine.frames.shape[0])
        if not any(shared_labels(frame_landmarks, *pair) for pair in pairs):
            raise InputError(f"No pair's two frames share a landmark of {os.fspath(landmarks)!r}; give the same "
                             "labels (or as many rows) in the frames of at least one pair.", setting="landmarks")
    if "scales" not in configuration.overrides:  # a preset's schedule: scales too coarse for small frames go
        settings.scales = fitting_schedule(cine.frames.shape[1:], settings.scales)
    automatic = mask is None or (isinstance(mask, str) and mask == "auto")
    masks = default_masks(cine.frames) if automatic else read_masks(mask, cine)
    if not masks[[fixed for _, fixed in pairs]].any():
        raise InputError("The mask is empty in every fixed frame of the pairs; give a mask that covers the region to "
                         "track.")
    mask_source = (f"auto: intensities in [{MASK_LOW}, {MASK_HIGH}] dilated by a {MASK_DILATION_RADIUS}-pixel disk"
                   if automatic else (os.fspath(mask) if not isinstance(mask, sitk.Image) else "image"))

    frames = torch.from_numpy(cine.frames)[:, None]
    moving_index, fixed_index = ([pair[k] for pair in pairs] for k in (0, 1))
    fixed, moving = frames[fixed_index], frames[moving_index]
    fixed_masks = torch.from_numpy(masks[fixed_index][:, None].astype(np.float32))
    result = register_tensors(fixed, moving, settings, fixed_mask=fixed_masks, device=torch_device,
                              progress=progress, should_stop=should_stop)
    metrics = pair_metrics(fixed, moving, result.displacement, fixed_masks)
    provenance = run_record("track", settings, configuration,
                            inputs={"cine": source, "mask": None if automatic else mask, "landmarks": landmarks},
                            options={"mask": mask_source, "reference": reference,
                                     "frames_sha256": frames_digest(cine)}, device=result.device)
    tracking = TrackingResult(cine=cine, masks=masks, reference=reference, displacements=result.displacement.cpu(),
                              displacements_per_scale=[d.cpu() for d in result.displacements_per_scale],
                              metrics=metrics, loss_history=result.loss_history, settings=settings,
                              seconds=result.seconds, device=result.device, mask_source=mask_source,
                              provenance=provenance)
    if frame_landmarks is not None:
        fields = [tracking.field(pair) for pair in tracking.pairs]
        tracking.metrics.update(landmark_errors(fields, pairs, frame_landmarks))
    return tracking
