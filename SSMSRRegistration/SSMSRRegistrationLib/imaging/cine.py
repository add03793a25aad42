"""2D+t cines in physical space: reading a cine from a multi-frame file, a folder of frames or a list, its frame
and stack geometry, intensities in [0, 1], and the tracking masks (the paper's automatic mask or the user's).

Frames are numbered from 0; arrays are (T, H, W) in array-axis order.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import List, Sequence, Union

import numpy as np
import SimpleITK as sitk

from ..common.errors import InputError
from .images import ImageLike, read_image

CineSource = Union[str, os.PathLike, sitk.Image, Sequence[ImageLike]]

#: Default mask (Sec. III-A): normalised intensities within [low, high], dilated by a disk of this radius.
MASK_LOW, MASK_HIGH, MASK_DILATION_RADIUS = 0.005, 0.995, 16

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
