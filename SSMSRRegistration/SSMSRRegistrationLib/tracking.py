"""Cine tracking (paper Sec. III-A/D): SSMSR on every consecutive frame pair of a 2D+t cine.

The test-time training runs once for the whole sequence: pair t registers frame t-1 (moving) onto
frame t (fixed), all pairs share one U-Net per scale, each step trains on a random mini-batch of pairs,
and the steps per scale are counted for the sequence.

    >>> from SSMSRRegistrationLib.tracking import track
    >>> result = track("echo.dcm", scales="1/4,1/2,1", steps=500)
    >>> result.save("echo_tracking")

Conventions: frames are numbered from 0; the field of pair t (t >= 1) is an ITK displacement field on the
frame grid (millimetres, LPS, resampling direction) that warps frame t-1 onto frame t:
frame_t(p) ~ frame_{t-1}(p + u_t(p)). In memory, fields are engine voxel fields (see ``engine.spatial``)
stacked as (T-1, 2, H, W), pair t at index t-1.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk
import torch

from .engine.losses import local_ncc_map
from .engine.multiscale import RegistrationSettings, register_tensors, resolve_device
from .engine.schedule import format_scale, parse_scales
from .engine.spatial import compose, warp
from .errors import InputError
from .imaging.fields import voxel_field_to_image, write_field, write_image
from .imaging.images import ImageLike, read_image
from .presets import DEFAULT_PRESET, budget

CineSource = Union[str, os.PathLike, sitk.Image, Sequence[ImageLike]]

#: Default mask (Sec. III-A): normalised intensities within [low, high], dilated by a disk of this radius.
MASK_LOW, MASK_HIGH, MASK_DILATION_RADIUS = 0.005, 0.995, 16

#: Radius in pixels of the local NCC window of the evaluation metric NLCC (Sec. III-B): window 2r+1.
NLCC_RADIUS = 10

#: Pairs evaluated at once when computing the metrics.
METRIC_CHUNK = 8

#: Names of the per-pair metrics, as in ``metrics.csv``.
METRIC_NAMES = ("mse_identity", "mse", "nlcc_identity", "nlcc")


@dataclass
class Cine:
    """A 2D+t cine ready for tracking.

    frames: (T, H, W) float32 in [0, 1]: the first channel; 8-bit data divided by 255 (as in the paper),
        other data mapped linearly from the cine's minimum..maximum.
    frame_grid: 2D image carrying the frames' geometry (size W x H, spacing, origin, direction).
    cine_grid: 3D image carrying the geometry of the stack (size W x H x T, third axis time).
    name: what the cine was read from, for messages and the summary.
    """

    frames: np.ndarray
    frame_grid: sitk.Image
    cine_grid: sitk.Image
    name: str


def _size_text(size: Sequence[int]) -> str:
    return "x".join(str(int(n)) for n in size)


def _first_channel(image: sitk.Image) -> sitk.Image:
    if image.GetNumberOfComponentsPerPixel() > 1:
        return sitk.VectorIndexSelectionCast(image, 0)
    return image


def _grid(size: Sequence[int], spacing, origin, direction) -> sitk.Image:
    grid = sitk.Image([int(n) for n in size], sitk.sitkUInt8)
    grid.SetSpacing([float(v) for v in spacing])
    grid.SetOrigin([float(v) for v in origin])
    grid.SetDirection([float(v) for v in np.asarray(direction, dtype=np.float64).ravel()])
    return grid


def _stack_geometry(image: sitk.Image, role: str):
    """(frame_grid, cine_grid) of a 3D (x, y, t) or 4D (x, y, 1, t) image; rejects frames oblique in 3D."""
    ndim = image.GetDimension()
    size, spacing, origin = image.GetSize(), image.GetSpacing(), image.GetOrigin()
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(ndim, ndim)
    in_plane = direction[:2, :2]
    if not np.allclose(in_plane.T @ in_plane, np.eye(2), atol=1e-4):
        raise InputError(f"The {role}'s frames lie in a plane oblique to its first two axes (direction "
                         f"{np.round(direction, 3).tolist()}); 2D fields cannot hold that geometry. Resample the "
                         "cine so that its first two axes span the image plane.")
    frame_grid = _grid(size[:2], spacing[:2], origin[:2], in_plane)
    if ndim == 3:
        cine_grid = _grid(size, spacing, origin, direction)
    else:
        keep = [0, 1, 3]
        cine_grid = _grid([size[k] for k in keep], [spacing[k] for k in keep], [origin[k] for k in keep],
                          direction[np.ix_(keep, keep)])
    return frame_grid, cine_grid


def _frames_of_stack(image: sitk.Image, role: str) -> np.ndarray:
    """(T, H, W) first-channel array of a 2D+t image: 3D (x, y, t) or 4D with a single z slice."""
    ndim = image.GetDimension()
    size = image.GetSize()
    if ndim == 2 or all(n == 1 for n in size[2:]):
        raise InputError(f"The {role} has a single frame ({_size_text(size[:2])}); tracking needs at least two "
                         "frames: a multi-frame DICOM, or a NIfTI/NRRD whose last axis is time.")
    if ndim > 4 or (ndim == 4 and size[2] != 1):
        raise InputError(f"The {role} is {_size_text(size)}; tracking works on 2D+t cines (x, y, time).")
    return sitk.GetArrayFromImage(_first_channel(image)).reshape(-1, size[1], size[0])


def _frame_files(folder: str) -> List[str]:
    """The frame files of a folder: a DICOM series in its own order, otherwise every visible file by name
    with numbers in numeric order (frame_2 before frame_10)."""
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)
    if len(series) > 1:
        raise InputError(f"The cine folder {folder!r} holds {len(series)} DICOM series; put one cine per folder.")
    if series:
        return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, series[0]))
    names = sorted((name for name in os.listdir(folder) if not name.startswith(".")),
                   key=lambda name: [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)])
    files = [os.path.join(folder, name) for name in names if os.path.isfile(os.path.join(folder, name))]
    if not files:
        raise InputError(f"The cine folder {folder!r} is empty; give a cine file or a folder of frame images.")
    return files


def _frames_of_list(frames: Sequence[ImageLike], name: str):
    """(T, H, W) array, frame grid and cine grid of a list of 2D frames (files or images) of one size."""
    arrays, first = [], None
    for index, source in enumerate(frames):
        image = read_image(source, f"frame {index} of the cine {name}")
        if image.GetDimension() == 3 and image.GetSize()[2] == 1:
            image = image[:, :, 0]
        if image.GetDimension() != 2:
            raise InputError(f"Frame {index} of the cine {name} is {image.GetDimension()}D "
                             f"({_size_text(image.GetSize())}); every frame must be a 2D image.")
        if first is None:
            first = image
        elif image.GetSize() != first.GetSize():
            raise InputError(f"The frames of the cine {name} have different sizes: frame 0 is "
                             f"{_size_text(first.GetSize())} but frame {index} is {_size_text(image.GetSize())}; "
                             "all frames must share one grid.")
        arrays.append(sitk.GetArrayFromImage(_first_channel(image)))
    if len(arrays) < 2:
        raise InputError(f"The cine {name} has a single frame; tracking needs at least two frames.")
    direction = np.array(first.GetDirection(), dtype=np.float64).reshape(2, 2)
    frame_grid = _grid(first.GetSize(), first.GetSpacing(), first.GetOrigin(), direction)
    cine_direction = np.eye(3)
    cine_direction[:2, :2] = direction
    cine_grid = _grid(list(first.GetSize()) + [len(arrays)], list(first.GetSpacing()) + [1.0],
                      list(first.GetOrigin()) + [0.0], cine_direction)
    return np.stack(arrays), frame_grid, cine_grid


def normalise_intensities(stack: np.ndarray, name: str) -> np.ndarray:
    """(T, H, W) raw values -> float32 in [0, 1]: 8-bit data / 255 (the paper), otherwise min..max of the cine."""
    if np.issubdtype(stack.dtype, np.floating) and not np.isfinite(stack).all():
        raise InputError(f"The cine {name} contains {int((~np.isfinite(stack)).sum())} NaN or infinite pixels.")
    low, high = float(stack.min()), float(stack.max())
    if high == low:
        what = "all black (every pixel of every frame is 0)" if high == 0 else f"constant (every pixel is {high:g})"
        raise InputError(f"The cine {name} is {what}; there is nothing to track. Check that the right file was "
                         "given.")
    if np.issubdtype(stack.dtype, np.integer) and low >= 0 and high <= 255:
        return (stack / 255.0).astype(np.float32)
    return ((stack.astype(np.float64) - low) / (high - low)).astype(np.float32)


def read_cine(source: CineSource) -> Cine:
    """Read a 2D+t cine for tracking.

    Args:
        source: a multi-frame DICOM file (colour YBR/RGB or grey), a NIfTI/NRRD/MHA... file whose last axis
            is time (x, y, t or x, y, 1, t), a folder of 2D frame files (a DICOM series in its own order,
            otherwise by name with numbers in numeric order), a list of 2D frames (paths or SimpleITK images),
            or a SimpleITK image.
    Raises:
        InputError: a single frame, frames of different sizes, a blank or constant cine, NaN pixels,
            frames oblique in 3D.
    """
    if isinstance(source, (list, tuple)):
        name = f"given as a list of {len(source)} frames"
        stack, frame_grid, cine_grid = _frames_of_list(source, name)
        return Cine(normalise_intensities(stack, name), frame_grid, cine_grid, name)
    name = "image" if isinstance(source, sitk.Image) else repr(os.fspath(source))
    if not isinstance(source, sitk.Image) and os.path.isdir(source):
        files = _frame_files(os.fspath(source))
        if len(files) > 1:
            stack, frame_grid, cine_grid = _frames_of_list(files, name)
            return Cine(normalise_intensities(stack, name), frame_grid, cine_grid, name)
        source = files[0]
    image = read_image(source, "cine")
    stack = _frames_of_stack(image, f"cine {name}")
    frame_grid, cine_grid = _stack_geometry(image, f"cine {name}")
    return Cine(normalise_intensities(stack, name), frame_grid, cine_grid, name)


def default_masks(frames: np.ndarray, low: float = MASK_LOW, high: float = MASK_HIGH,
                  radius: int = MASK_DILATION_RADIUS) -> np.ndarray:
    """The paper's masks: (T, H, W) normalised frames -> (T, H, W) bool.

    Pixels within [low, high], dilated in each frame by a disk of ``radius`` pixels (Euclidean distance).
    """
    masks = np.zeros(frames.shape, dtype=bool)
    for index, frame in enumerate(frames):
        inside = sitk.GetImageFromArray(((frame >= low) & (frame <= high)).astype(np.uint8))
        squared_distance = sitk.SignedMaurerDistanceMap(inside, insideIsPositive=False, squaredDistance=True,
                                                        useImageSpacing=False)
        masks[index] = sitk.GetArrayViewFromImage(squared_distance) <= radius * radius
    return masks


def read_masks(source: ImageLike, cine: Cine) -> np.ndarray:
    """A user mask (non-zero inside) as (T, H, W) bool: one 2D mask for every frame, or one mask per frame.

    The mask of frame t restricts the similarity of pair t (frame t is the fixed image); that of frame 0
    is unused. The mask must have the frames' pixel size (W x H, or W x H x T).
    """
    frames, height, width = cine.frames.shape
    image = read_image(source, "mask")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"The mask has {image.GetNumberOfComponentsPerPixel()} components per pixel; give a "
                         "label map or binary mask (non-zero inside).")
    size = image.GetSize()
    if image.GetDimension() > 4 or (image.GetDimension() == 4 and size[2] != 1):
        raise InputError(f"The mask is {image.GetDimension()}D ({_size_text(size)}); give a 2D mask or a 2D+t "
                         "mask (x, y, time).")
    array = sitk.GetArrayFromImage(image).reshape(-1, size[1], size[0])
    if array.shape[1:] != (height, width) or array.shape[0] not in (1, frames):
        raise InputError(f"The mask is {_size_text(size)} but the cine's frames are {width}x{height} "
                         f"({frames} frames); give one 2D mask of {width}x{height} pixels or one mask per frame "
                         f"({width}x{height}x{frames}).")
    masks = np.broadcast_to(array != 0, (frames, height, width)).copy()
    if not masks[1:].any():
        raise InputError("The mask is empty (no pixel is set in frames 1 and later); give a mask that covers the "
                         "region to track.")
    return masks


def _masked_means(values: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) values and masks -> (N,) means inside each mask (NaN where a mask is empty)."""
    inside = masks.sum(dim=(1, 2, 3))
    return (values * masks).sum(dim=(1, 2, 3)) / inside.where(inside > 0, torch.nan)


def pair_metrics(fixed: torch.Tensor, moving: torch.Tensor, displacements: torch.Tensor,
                 masks: torch.Tensor, radius: int = NLCC_RADIUS) -> Dict[str, np.ndarray]:
    """MSE and NLCC inside the masks of each pair, for the identity and for the fields (paper Sec. III-B).

    Args:
        fixed, moving, masks: (N, 1, H, W) frames in [0, 1] and fixed-frame masks (non-zero inside).
        displacements: (N, 2, H, W) voxel fields warping ``moving`` onto ``fixed``.
        radius: NLCC window radius in pixels (window 2r+1); NLCC is the mean squared local NCC of Eq. 2.
    Returns:
        {"mse_identity", "mse", "nlcc_identity", "nlcc"}: (N,) float64 arrays (NaN for an empty mask).
    """
    window = 2 * radius + 1
    device = displacements.device
    results: Dict[str, List[torch.Tensor]] = {name: [] for name in METRIC_NAMES}
    with torch.no_grad():
        for start in range(0, fixed.shape[0], METRIC_CHUNK):
            chunk = slice(start, start + METRIC_CHUNK)
            fixed_c, moving_c = fixed[chunk].to(device), moving[chunk].to(device)
            masks_c = (masks[chunk].to(device) > 0).float()
            for suffix, warped in (("_identity", moving_c), ("", warp(moving_c, displacements[chunk]))):
                results["mse" + suffix].append(_masked_means((fixed_c - warped) ** 2, masks_c).cpu())
                results["nlcc" + suffix].append(_masked_means(local_ncc_map(fixed_c, warped, window), masks_c).cpu())
    return {name: torch.cat(values).double().numpy() for name, values in results.items()}


def accumulate(displacements: torch.Tensor) -> torch.Tensor:
    """Fields from the first frame: (T-1, 2, H, W) pair fields -> (T-1, 2, H, W), index t-1 warping frame 0
    onto frame t, i.e. frame_t(p) ~ frame_0(p + a_t(p)), with a_1 = u_1 and a_t = u_t + a_{t-1}(p + u_t(p))."""
    accumulated = [displacements[:1]]
    for index in range(1, displacements.shape[0]):
        accumulated.append(compose(accumulated[-1], displacements[index:index + 1]))
    return torch.cat(accumulated)


def check_figure_support() -> None:
    """Raise InputError when matplotlib, which draws the GIF and PNG, is missing."""
    if importlib.util.find_spec("matplotlib") is None:
        raise InputError("The tracking GIF and PNG need matplotlib: pip install matplotlib (or ask for no "
                         "figures: --no-figures, figures=False).")


def check_output_folder(folder: str) -> str:
    """Absolute path of an output folder that does not exist yet, or is empty, in an existing folder."""
    folder = os.path.abspath(os.fspath(folder))
    parent = os.path.dirname(folder)
    if not os.path.isdir(parent):
        raise InputError(f"The folder {parent!r} that should hold the output folder does not exist; create it "
                         "first.")
    if os.path.exists(folder) and (not os.path.isdir(folder) or os.listdir(folder)):
        raise InputError(f"The output folder {folder!r} already exists and is not an empty folder; choose a new "
                         "folder (it is created) or remove the old results.")
    return folder


@dataclass
class TrackingResult:
    """What ``track`` returns.

    cine: the cine as tracked. masks: (T, H, W) bool, mask t restricting pair t.
    displacements: (T-1, 2, H, W) voxel fields on the CPU, index t-1 warping frame t-1 onto frame t.
    displacements_per_scale: the same after each scale of the schedule, coarse to fine.
    metrics: per-pair arrays (T-1,) named as in METRIC_NAMES.
    loss_history: per scale, the training loss of every step (one mini-batch each).
    settings: the engine settings used. seconds: training time. device: where it ran. mask_source: "auto" or
    the mask given.
    """

    cine: Cine
    masks: np.ndarray
    displacements: torch.Tensor
    displacements_per_scale: List[torch.Tensor]
    metrics: Dict[str, np.ndarray]
    loss_history: Dict[str, List[float]]
    settings: RegistrationSettings
    seconds: float
    device: str
    mask_source: str

    @property
    def pairs(self) -> List[int]:
        """The pair numbers: pair t warps frame t-1 onto frame t."""
        return list(range(1, self.cine.frames.shape[0]))

    def field(self, pair: int, displacements: Optional[torch.Tensor] = None) -> sitk.Image:
        """The ITK displacement field (mm, LPS, on the frame grid) of ``pair`` (1..T-1)."""
        chosen = self.displacements if displacements is None else displacements
        return voxel_field_to_image(chosen[pair - 1].double().numpy(), self.cine.frame_grid)

    def stacked_field(self, displacements: Optional[torch.Tensor] = None) -> sitk.Image:
        """All pair fields as one 3D displacement field on the cine grid (x, y, t), mm, LPS.

        Slice t holds the field of pair t with a zero time component; slice 0 is zero.
        """
        chosen = self.displacements if displacements is None else displacements
        voxels = np.zeros((3, self.cine.frames.shape[0]) + tuple(chosen.shape[2:]))
        voxels[1:, 1:] = chosen.double().numpy().transpose(1, 0, 2, 3)
        return voxel_field_to_image(voxels, self.cine.cine_grid)

    def summary(self) -> dict:
        """Means over the pairs (ignoring pairs with an empty mask), named as the ``register`` metrics:
        mse_before/mse_after (identity/SSMSR MSE), ncc_before/ncc_after (identity/SSMSR NLCC, radius
        ``nlcc_radius``); with the frame and pair counts, the training time and the device."""
        means = {name: float(np.nanmean(values)) for name, values in self.metrics.items()}
        return {"frames": int(self.cine.frames.shape[0]), "pairs": len(self.pairs),
                "mse_before": means["mse_identity"], "mse_after": means["mse"],
                "ncc_before": means["nlcc_identity"], "ncc_after": means["nlcc"], "nlcc_radius": NLCC_RADIUS,
                "seconds": self.seconds, "device": self.device}

    def save(self, folder: str, accumulated: bool = False, figures: bool = True) -> Dict[str, Optional[str]]:
        """Write the results into ``folder`` (created; it must not exist or be empty).

        Everything is written into a hidden sibling folder that is renamed onto ``folder`` at the end, so a
        failure or cancel leaves no partial results. Writes field_NNNN.nii.gz (pair NNNN), fields.nii.gz (2D+t,
        see ``stacked_field``), mask.nii.gz (2D+t), metrics.csv, summary.json and, optionally,
        accumulated_NNNN.nii.gz + accumulated.nii.gz (from frame 0) and tracking.gif + tracking.png.
        Returns the paths of the written files (None for those not asked for).
        """
        folder = check_output_folder(folder)
        if figures:
            check_figure_support()
        staging = os.path.join(os.path.dirname(folder), f".{os.path.basename(folder)}.partial-{uuid.uuid4().hex[:8]}")
        os.mkdir(staging)
        try:
            self._write(staging, accumulated, figures)
            if os.path.isdir(folder):
                os.rmdir(folder)
            os.rename(staging, folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        outputs = {"fields": "fields.nii.gz", "mask": "mask.nii.gz", "metrics": "metrics.csv",
                   "summary": "summary.json", "accumulated": "accumulated.nii.gz" if accumulated else None,
                   "animation": "tracking.gif" if figures else None, "figure": "tracking.png" if figures else None}
        return {"folder": folder, **{key: os.path.join(folder, name) if name is not None else None
                                     for key, name in outputs.items()}}

    def _write(self, folder: str, accumulated: bool, figures: bool) -> None:
        for pair in self.pairs:
            write_field(self.field(pair), os.path.join(folder, f"field_{pair:04d}.nii.gz"))
        write_field(self.stacked_field(), os.path.join(folder, "fields.nii.gz"))
        mask = sitk.GetImageFromArray(self.masks.astype(np.uint8))
        mask.CopyInformation(self.cine.cine_grid)
        write_image(mask, os.path.join(folder, "mask.nii.gz"))
        if accumulated:
            from_first = accumulate(self.displacements)
            for pair in self.pairs:
                write_field(self.field(pair, from_first), os.path.join(folder, f"accumulated_{pair:04d}.nii.gz"))
            write_field(self.stacked_field(from_first), os.path.join(folder, "accumulated.nii.gz"))
        self._write_metrics(os.path.join(folder, "metrics.csv"))
        with open(os.path.join(folder, "summary.json"), "w", encoding="utf-8") as stream:
            json.dump(self._provenance(), stream, indent=2, allow_nan=False)
        if figures:
            from . import tracking_figures

            tracking_figures.write_animation(os.path.join(folder, "tracking.gif"), self)
            tracking_figures.write_overview(os.path.join(folder, "tracking.png"), self)

    def _write_metrics(self, path: str) -> None:
        with open(path, "w", newline="", encoding="utf-8") as stream:
            writer = csv.writer(stream)
            writer.writerow(["pair", "moving_frame", "fixed_frame", *METRIC_NAMES])
            for index, pair in enumerate(self.pairs):
                writer.writerow([pair, pair - 1, pair, *(f"{self.metrics[name][index]:.6g}" for name in METRIC_NAMES)])

    def _provenance(self) -> dict:
        summary = {key: (None if isinstance(value, float) and not np.isfinite(value) else value)
                   for key, value in self.summary().items()}
        settings = self.settings
        return {**summary, "cine": self.cine.name, "frame_size": list(self.cine.frame_grid.GetSize()),
                "spacing_mm": list(self.cine.frame_grid.GetSpacing()), "mask": self.mask_source,
                "scales": [format_scale(s) for s in settings.scales], "steps_per_scale": settings.steps_per_scale,
                "batch_size": settings.batch_size, "smoothness_weight": settings.smoothness_weight,
                "ncc_window": settings.window_for(2), "learning_rate": settings.learning_rate, "seed": settings.seed,
                "mixed_precision_requested": settings.mixed_precision}


def track(cine: Union[CineSource, Cine], *, mask: Optional[ImageLike] = "auto", preset: str = DEFAULT_PRESET,
          scales=None, steps: Optional[int] = None, precision: Optional[str] = None, batch_size: int = 1,
          smoothness_weight: float = 10.0, ncc_window: Optional[int] = None,
          learning_rate: float = 1e-3, device: str = "auto", seed: int = 0,
          progress: Optional[Callable[[dict], None]] = None,
          should_stop: Optional[Callable[[], bool]] = None) -> TrackingResult:
    """Track a 2D+t cine: SSMSR on all consecutive pairs with one test-time training for the sequence.

    Args:
        cine: see ``read_cine``, or a ``Cine`` already read.
        mask: "auto" (or None) for the paper's masks (``default_masks``), or a mask file/image (``read_masks``).
        preset: "paper" or "fast" (``presets``): the schedule, steps and precision not given explicitly.
        scales: coarse-to-fine schedule, e.g. "1/8,1/4,1/2,1" (the paper's for echo); default: the preset's.
        steps: training steps per scale for the whole sequence (each on ``batch_size`` pairs); default: the preset's.
        precision: "mixed" or "float32", as for ``api.register``; default: the preset's.
        batch_size: pairs per step, drawn at random with the seed; 0 uses all pairs every step.
        smoothness_weight, ncc_window, learning_rate, device, seed: as for ``api.register``.
        progress, should_stop: the engine's progress callback and cancel poll.
    """
    plan = budget(preset, cine=True, scales=scales, steps=steps, precision=precision)
    settings = RegistrationSettings(scales=parse_scales(plan.scales), steps_per_scale=plan.steps,
                                    mixed_precision=plan.mixed_precision,
                                    smoothness_weight=float(smoothness_weight), ncc_window=ncc_window,
                                    learning_rate=float(learning_rate), seed=int(seed), batch_size=int(batch_size))
    settings.validate()
    torch_device = resolve_device(device)
    if not isinstance(cine, Cine):
        cine = read_cine(cine)
    automatic = mask is None or (isinstance(mask, str) and mask == "auto")
    masks = default_masks(cine.frames) if automatic else read_masks(mask, cine)
    mask_source = (f"auto: intensities in [{MASK_LOW}, {MASK_HIGH}] dilated by a {MASK_DILATION_RADIUS}-pixel disk"
                   if automatic else (os.fspath(mask) if not isinstance(mask, sitk.Image) else "image"))

    frames = torch.from_numpy(cine.frames)[:, None]
    fixed, moving = frames[1:], frames[:-1]
    fixed_masks = torch.from_numpy(masks[1:, None].astype(np.float32))
    result = register_tensors(fixed, moving, settings, fixed_mask=fixed_masks, device=torch_device,
                              progress=progress, should_stop=should_stop)
    metrics = pair_metrics(fixed, moving, result.displacement, fixed_masks)
    return TrackingResult(cine=cine, masks=masks, displacements=result.displacement.cpu(),
                          displacements_per_scale=[d.cpu() for d in result.displacements_per_scale],
                          metrics=metrics, loss_history=result.loss_history, settings=settings,
                          seconds=result.seconds, device=result.device, mask_source=mask_source)
