"""2D+t and 3D+t cines in physical space: reading a cine from a multi-frame file, a 4D image, a folder of frames or
volumes (a DICOM series with several temporal positions too) or a list, its frame and stack geometry, intensities in
[0, 1], and the tracking masks (the paper's automatic mask or the user's).

Frames are numbered from 0; arrays are (T, H, W) (2D frames) or (T, D, H, W) (3D frames) in array-axis order.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk

from ..common.errors import InputError
from .images import ImageLike, read_image

CineSource = Union[str, os.PathLike, sitk.Image, Sequence[ImageLike]]

#: Default mask (Sec. III-A): normalised intensities within [low, high], dilated by a disk of this radius.
MASK_LOW, MASK_HIGH, MASK_DILATION_RADIUS = 0.005, 0.995, 16

@dataclass
class Cine:
    """A 2D+t or 3D+t cine ready for tracking.

    frames: (T, H, W) or (T, D, H, W) float32 in [0, 1]: the first channel; 8-bit data divided by 255 (as in the
        paper), other data mapped linearly from the cine's minimum..maximum.
    frame_grid: 2D or 3D image carrying the frames' geometry (size W x H [x D], spacing, origin, direction).
    cine_grid: 3D or 4D image carrying the geometry of the stack (size W x H [x D] x T, last axis time).
    name: what the cine was read from, for messages and the summary.
    """

    frames: np.ndarray
    frame_grid: sitk.Image
    cine_grid: sitk.Image
    name: str

    @property
    def dimension(self) -> int:
        """2 for 2D+t, 3 for 3D+t."""
        return self.frames.ndim - 1


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


def _is_volume_stack(image: sitk.Image) -> bool:
    """A 4D image (x, y, z, t) of 3D frames (more than one z slice)."""
    return image.GetDimension() == 4 and image.GetSize()[2] > 1


def _stack_geometry(image: sitk.Image, role: str):
    """(frame_grid, cine_grid) of a 3D (x, y, t) or 4D (x, y, 1, t) image of 2D frames, or a 4D (x, y, z, t) image
    of 3D frames; rejects 2D frames oblique in 3D and a time axis mixed with space."""
    ndim = image.GetDimension()
    size, spacing, origin = image.GetSize(), image.GetSpacing(), image.GetOrigin()
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(ndim, ndim)
    if _is_volume_stack(image):
        if not (np.allclose(direction[3, :3], 0, atol=1e-6) and np.allclose(direction[:3, 3], 0, atol=1e-6)):
            raise InputError(f"The {role}'s fourth axis is not time alone: its direction mixes it with space "
                             f"({np.round(direction, 3).tolist()}). Give a 4D image whose last axis is time.")
        return _grid(size[:3], spacing[:3], origin[:3], direction[:3, :3]), _grid(size, spacing, origin, direction)
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
    """(T, H, W) first-channel array of a 2D+t image (3D x, y, t or 4D with a single z slice), or (T, D, H, W) of a
    3D+t image (4D x, y, z, t)."""
    ndim = image.GetDimension()
    size = image.GetSize()
    if ndim > 4:
        raise InputError(f"The {role} is {ndim}D ({_size_text(size)}); tracking works on 2D+t (x, y, time) and 3D+t "
                         "(x, y, z, time) cines.")
    if ndim == 2 or size[-1] == 1:
        frame = _size_text(size[:2] if ndim < 4 or size[2] == 1 else size[:3])
        raise InputError(f"The {role} has a single frame ({frame}); tracking needs at least two frames: a "
                         "multi-frame DICOM, a NIfTI/NRRD whose last axis is time, or a folder of frames.")
    spatial = (size[2], size[1], size[0]) if _is_volume_stack(image) else (size[1], size[0])
    return sitk.GetArrayFromImage(_first_channel(image)).reshape((-1,) + spatial)


#: DICOM tags that order a series' files in time, most specific first: Temporal Position Identifier, Trigger Time
#: (cardiac phase), Acquisition Time; then Series Number, which orders series (one per phase) but not files.
TEMPORAL_TAGS = ("0020|0100", "0018|1060", "0008|0032")
SERIES_NUMBER_TAG = "0020|0011"


def _dicom_tags(path: str) -> Dict[str, str]:
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    return {key: reader.GetMetaData(key).strip() for key in reader.GetMetaDataKeys()}


def _time_value(tags: Dict[str, str], keys: Sequence[str]):
    """The first of ``keys`` present in ``tags``, as a number where it is one (a DICOM TM "hhmmss.ff" too)."""
    for key in keys:
        value = tags.get(key, "")
        if value:
            try:
                return (0, float(value))
            except ValueError:
                return (1, value)
    return None


def _slice_position(tags: Dict[str, str]) -> float:
    """A file's position along its slice normal (mm), from Image Position and Image Orientation (Patient)."""
    try:
        position = np.array([float(v) for v in tags["0020|0032"].split("\\")])
        orientation = np.array([float(v) for v in tags["0020|0037"].split("\\")])
    except (KeyError, ValueError):
        return 0.0
    return float(np.dot(position, np.cross(orientation[:3], orientation[3:])))


def _dicom_volumes(folder: str, series: Sequence[str]) -> Optional[List[List[str]]]:
    """A DICOM folder holding a 3D+t series: one file list per time point (each in slice order), time points in
    order; None when the folder holds a 2D+t series (one frame per file, or a single multi-frame file).

    A 3D+t series comes as several series of several slices each (one per phase, as 4D CT is often exported), ordered
    by their temporal tags, then their series number; or as one series whose files carry several temporal positions
    (Temporal Position Identifier or Trigger Time), the same slice positions at each.
    """
    files = {uid: list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, uid)) for uid in series}
    if len(series) > 1:
        if any(len(names) < 2 for names in files.values()):
            raise InputError(f"The cine folder {folder!r} holds {len(series)} DICOM series, not all of them 3D "
                             "volumes; put one cine per folder (a 3D+t cine may be one series per time point).")
        tags = {uid: _dicom_tags(names[0]) for uid, names in files.items()}
        order = sorted(series, key=lambda uid: (_time_value(tags[uid], TEMPORAL_TAGS) or (2, ""),
                                                _time_value(tags[uid], (SERIES_NUMBER_TAG,)) or (2, "")))
        return [files[uid] for uid in order]
    names = files[series[0]]
    if len(names) < 2:
        return None
    tags = {name: _dicom_tags(name) for name in names}
    times = {name: _time_value(tags[name], TEMPORAL_TAGS[:2]) for name in names}
    groups: Dict[object, List[str]] = {}
    for name in names:
        groups.setdefault(times[name], []).append(name)
    if len(groups) < 2 or None in groups or len({len(group) for group in groups.values()}) != 1 \
            or len(next(iter(groups.values()))) < 2:
        return None
    return [sorted(groups[time], key=lambda name: _slice_position(tags[name])) for time in sorted(groups)]


def _frame_files(folder: str) -> List[Union[str, sitk.Image]]:
    """The frames of a folder: the volumes of a 3D+t DICOM series (``_dicom_volumes``), the files of a 2D+t DICOM
    series in its own order, otherwise every visible file by name with numbers in numeric order (frame_2 before
    frame_10)."""
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)
    if series:
        volumes = _dicom_volumes(folder, series)
        if volumes is not None:
            return [sitk.ReadImage(names) for names in volumes]
        return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, series[0]))
    names = sorted((name for name in os.listdir(folder) if not name.startswith(".")),
                   key=lambda name: [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)])
    files = [os.path.join(folder, name) for name in names if os.path.isfile(os.path.join(folder, name))]
    if not files:
        raise InputError(f"The cine folder {folder!r} is empty; give a cine file or a folder of frame images.")
    return files


def check_reference(reference: Optional[int], frames: int) -> None:
    """InputError unless ``reference`` is None (consecutive pairs) or a frame number of a cine of ``frames``."""
    if reference is not None and not 0 <= reference < frames:
        raise InputError(f"The reference frame {reference} is not a frame of the cine (frames 0 to {frames - 1}).",
                         setting="reference")


def _same_grid(image: sitk.Image, reference: sitk.Image) -> bool:
    return (image.GetSize() == reference.GetSize()
            and np.allclose(image.GetSpacing(), reference.GetSpacing(), rtol=1e-5, atol=1e-6)
            and np.allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-4 * min(reference.GetSpacing()))
            and np.allclose(image.GetDirection(), reference.GetDirection(), atol=1e-5))


def _volumes_on_one_grid(images: List[sitk.Image], reference: int, name: str) -> List[np.ndarray]:
    """(D, H, W) arrays of 3D frames on the grid of frame ``reference``: frames on other grids (size, spacing,
    origin) are resampled onto it (linear, 0 outside); a frame oriented differently is refused."""
    grid = images[reference]
    direction = np.array(grid.GetDirection()).reshape(3, 3)
    on_grid = [_same_grid(image, grid) for image in images]
    if not all(on_grid):
        images = [sitk.Cast(image, sitk.sitkFloat32) for image in images]  # one pixel type for every frame
    arrays = []
    for index, (image, same) in enumerate(zip(images, on_grid)):
        other = np.array(image.GetDirection()).reshape(3, 3)
        if not np.allclose(other, direction, atol=1e-4):
            raise InputError(f"Frame {index} of the cine {name} is oriented differently from frame {reference} "
                             f"(direction {np.round(other, 3).tolist()} against {np.round(direction, 3).tolist()}); "
                             "the frames of a sequence must share one orientation. Resample them onto one grid "
                             "first.")
        if not same:
            image = sitk.Resample(image, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        arrays.append(sitk.GetArrayFromImage(image))
    return arrays


def _frames_of_list(frames: Sequence[ImageLike], name: str, reference: int = 0):
    """(T, H, W) or (T, D, H, W) array, frame grid and cine grid of a list of frames (files or images): 2D frames
    of one size, or 3D frames (on frame ``reference``'s grid, see ``_volumes_on_one_grid``)."""
    images = []
    for index, source in enumerate(frames):
        image = read_image(source, f"frame {index} of the cine {name}")
        if image.GetDimension() == 3 and image.GetSize()[2] == 1:
            image = image[:, :, 0]
        expected = (images[0].GetDimension(),) if images else (2, 3)
        if image.GetDimension() not in expected:
            raise InputError(f"Frame {index} of the cine {name} is {image.GetDimension()}D "
                             f"({_size_text(image.GetSize())}); every frame must be a 2D image, or every frame a "
                             "3D volume.")
        images.append(_first_channel(image))
    if len(images) < 2:
        raise InputError(f"The cine {name} has a single frame; tracking needs at least two frames.")
    check_reference(reference, len(images))
    first = images[reference]
    dimension = first.GetDimension()
    if dimension == 3:
        arrays = _volumes_on_one_grid(images, reference, name)
    else:
        for index, image in enumerate(images):
            if image.GetSize() != first.GetSize():
                raise InputError(f"The frames of the cine {name} have different sizes: frame 0 is "
                                 f"{_size_text(images[0].GetSize())} but frame {index} is "
                                 f"{_size_text(image.GetSize())}; all frames must share one grid.")
        arrays = [sitk.GetArrayFromImage(image) for image in images]
    direction = np.array(first.GetDirection(), dtype=np.float64).reshape(dimension, dimension)
    frame_grid = _grid(first.GetSize(), first.GetSpacing(), first.GetOrigin(), direction)
    cine_direction = np.eye(dimension + 1)
    cine_direction[:dimension, :dimension] = direction
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


def read_cine(source: CineSource, reference: int = 0) -> Cine:
    """Read a 2D+t or 3D+t cine for tracking.

    Args:
        source: a multi-frame DICOM file (colour YBR/RGB or grey); a NIfTI/NRRD/MHA... file whose last axis is time
            (x, y, t or x, y, 1, t; x, y, z, t for 3D frames); a folder of 2D frame files (a DICOM series in its own
            order, otherwise by name with numbers in numeric order), of 3D volumes (files by name, or a DICOM series
            with several temporal positions, or one DICOM series per time point); a list of frames (paths or
            SimpleITK images); or a SimpleITK image.
        reference: the frame whose grid 3D frames given separately are resampled onto when their grids differ.
    Raises:
        InputError: a single frame, 2D frames of different sizes, 3D frames oriented differently, a blank or
            constant cine, NaN pixels, 2D frames oblique in 3D.
    """
    if isinstance(source, (list, tuple)):
        name = f"given as a list of {len(source)} frames"
        stack, frame_grid, cine_grid = _frames_of_list(source, name, reference)
        return Cine(normalise_intensities(stack, name), frame_grid, cine_grid, name)
    name = "image" if isinstance(source, sitk.Image) else repr(os.fspath(source))
    if not isinstance(source, sitk.Image) and os.path.isdir(source):
        files = _frame_files(os.fspath(source))
        if len(files) > 1:
            stack, frame_grid, cine_grid = _frames_of_list(files, name, reference)
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
    """A user mask (non-zero inside) as (T, *frame shape) bool: one mask for every frame, or one mask per frame.

    The mask of frame t restricts the similarity of the pairs whose fixed frame is t (``track`` refuses masks empty
    in every fixed frame). The mask must have the frames' voxel size: W x H [x D] (one mask), or W x H [x D] x T (a
    2D+t mask may also be W x H x 1 x T).
    """
    frames, spatial = cine.frames.shape[0], cine.frames.shape[1:]
    image = read_image(source, "mask")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"The mask has {image.GetNumberOfComponentsPerPixel()} components per pixel; give a "
                         "label map or binary mask (non-zero inside).")
    size, dimension = image.GetSize(), cine.dimension
    frame_size = _size_text(reversed(spatial))
    if image.GetDimension() > 4 or (dimension == 2 and image.GetDimension() == 4 and size[2] != 1) \
            or image.GetDimension() < dimension:
        raise InputError(f"The mask is {image.GetDimension()}D ({_size_text(size)}); give a {dimension}D mask or a "
                         f"{dimension}D+t mask ({frame_size} x time).")
    in_time = [n for n in size[dimension:] if n != 1] or [1]
    if tuple(size[:dimension]) != tuple(reversed(spatial)) or len(in_time) > 1 or in_time[0] not in (1, frames):
        raise InputError(f"The mask is {_size_text(size)} but the cine's frames are {frame_size} ({frames} frames); "
                         f"give one mask of {frame_size} or one mask per frame ({frame_size}x{frames}).")
    array = sitk.GetArrayFromImage(image).reshape((-1,) + tuple(spatial))
    return np.broadcast_to(array != 0, (frames,) + tuple(spatial)).copy()
