"""Reading, checking and preparing images in physical space (SimpleITK).

Arrays taken from SimpleITK images are indexed in reverse axis order ((y, x) or
(z, y, x)); every function here keeps to that order.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple, Union

import numpy as np
import SimpleITK as sitk

from ..common.errors import InputError
from ..common.protocol import GRID_TOLERANCE

ImageLike = Union[str, os.PathLike, sitk.Image]


def read_image(source: ImageLike, role: str) -> sitk.Image:
    """Read an image file (any format SimpleITK reads) or a DICOM series folder; pass sitk.Image through.

    ``role`` ("fixed image", "moving labels", ...) names the input in error messages.
    """
    if isinstance(source, sitk.Image):
        return source
    path = os.fspath(source)
    if not os.path.exists(path):
        raise InputError(f"The {role} file {path!r} does not exist; check the path.")
    try:
        if os.path.isdir(path):
            series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(path)
            if not series:
                raise InputError(f"The {role} folder {path!r} contains no DICOM series; "
                                 "give an image file or a folder of one DICOM series.")
            if len(series) > 1:
                raise InputError(f"The {role} folder {path!r} holds {len(series)} DICOM series; "
                                 "put one series per folder.")
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(path, series[0]))
            return reader.Execute()
        return _with_ultrasound_calibration(sitk.ReadImage(path), path)
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[-1] if str(error).strip() else ""
        raise InputError(f"Cannot read the {role} {path!r}: it is not an image SimpleITK can read "
                         f"(NIfTI, NRRD, MHA, DICOM, ...). {first_line}") from None


#: DICOM "Physical Units X/Y Direction" code for centimetres.
_DICOM_UNITS_CM = 3


def ultrasound_pixel_spacing(path: str) -> Optional[Tuple[float, float]]:
    """(x, y) pixel size in mm from a DICOM file's first ultrasound region calibrated in cm, else None.

    Needs pydicom (optional); returns None without it or when the file has no such region.
    """
    try:
        import pydicom
    except ImportError:
        return None
    try:
        regions = pydicom.dcmread(path, stop_before_pixels=True).get("SequenceOfUltrasoundRegions")
    except Exception:  # noqa: BLE001 - not readable as DICOM by pydicom: no calibration to offer
        return None
    for region in regions or []:
        if (region.get("PhysicalUnitsXDirection") == _DICOM_UNITS_CM
                and region.get("PhysicalUnitsYDirection") == _DICOM_UNITS_CM
                and region.get("PhysicalDeltaX") and region.get("PhysicalDeltaY")):
            return float(region.PhysicalDeltaX) * 10.0, float(region.PhysicalDeltaY) * 10.0
    return None


def _with_ultrasound_calibration(image: sitk.Image, path: str) -> sitk.Image:
    """Give a DICOM ultrasound image without Pixel Spacing (0028,0030) its ultrasound-region pixel size."""
    is_ultrasound = image.HasMetaDataKey("0008|0060") and image.GetMetaData("0008|0060").strip() == "US"
    if is_ultrasound and not image.HasMetaDataKey("0028|0030"):
        spacing = ultrasound_pixel_spacing(path)
        if spacing is not None:
            image.SetSpacing(spacing + tuple(image.GetSpacing()[2:]))
    return image


def check_image(image: sitk.Image, role: str, dimension: Optional[int] = None) -> None:
    """Reject what the engine cannot register: wrong dimension, several components, NaN, too small."""
    ndim = image.GetDimension()
    if ndim not in (2, 3):
        raise InputError(f"The {role} is {ndim}D; SSMSR registers 2D or 3D images. For a 2D+t cine use "
                         "`ssmsr track`; for a 4D series pick one 3D volume first.")
    if dimension is not None and ndim != dimension:
        raise InputError(f"The {role} is {ndim}D but the fixed image is {dimension}D; "
                         "both images must have the same dimension.")
    components = image.GetNumberOfComponentsPerPixel()
    if components != 1:
        raise InputError(f"The {role} has {components} components per voxel (colour or vector image); "
                         "convert it to a single-channel grey-scale image first.")
    size = image.GetSize()
    if min(size) < 2:
        raise InputError(f"The {role} has size {'x'.join(map(str, size))}: an axis with a single voxel. "
                         "Save a single slice as a 2D image.")
    array = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        count = int((~np.isfinite(array)).sum())
        raise InputError(f"The {role} contains {count} NaN or infinite voxels; fill or mask them before "
                         "registering.")


def intensity_window(array: np.ndarray, role: str, clip_std: float = 6.0) -> Tuple[float, float]:
    """Paper's normalisation window: mean +/- ``clip_std`` standard deviations, within the data range.

    Raises InputError for a constant image.
    """
    values = array.astype(np.float64, copy=False)
    mean, std = float(values.mean()), float(values.std())
    low = max(float(values.min()), mean - clip_std * std)
    high = min(float(values.max()), mean + clip_std * std)
    if not high > low:
        raise InputError(f"The {role} is constant (every voxel is {values.flat[0]:g}); there is nothing "
                         "to register. Check that the right file was given.")
    return low, high


def rescale(array: np.ndarray, window: Tuple[float, float]) -> np.ndarray:
    """Clip to ``window`` and map it linearly to [0, 1]; float32 array of the same shape."""
    low, high = window
    return ((np.clip(array.astype(np.float64, copy=False), low, high) - low) / (high - low)).astype(np.float32)


def same_grid(a: sitk.Image, b: sitk.Image, tolerance: float = GRID_TOLERANCE) -> bool:
    """True if two images share size, spacing, origin and direction (within a relative tolerance)."""
    if a.GetDimension() != b.GetDimension() or a.GetSize() != b.GetSize():
        return False
    scale = max(max(a.GetSpacing()), 1e-12)
    return (np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=tolerance, atol=0)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=tolerance * scale)
            and np.allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=tolerance))


def resample_onto(image: sitk.Image, reference: sitk.Image, labels: bool = False) -> sitk.Image:
    """Resample ``image`` onto ``reference``'s grid by world coordinates (identity transform).

    Linear interpolation, or nearest neighbour for label maps; 0 outside the image.
    """
    interpolator = sitk.sitkNearestNeighbor if labels else sitk.sitkLinear
    output_type = image.GetPixelID() if labels else sitk.sitkFloat32
    return sitk.Resample(image, reference, sitk.Transform(), interpolator, 0, output_type)


def overlaps(a: sitk.Image, b: sitk.Image) -> bool:
    """True if the physical bounding boxes of the two images intersect."""
    def box(image):
        corners = []
        size = image.GetSize()
        for corner in np.ndindex(*([2] * image.GetDimension())):
            index = [c * (n - 1) for c, n in zip(corner, size)]
            corners.append(image.TransformContinuousIndexToPhysicalPoint([float(i) for i in index]))
        corners = np.array(corners)
        return corners.min(0), corners.max(0)
    (a_low, a_high), (b_low, b_high) = box(a), box(b)
    return bool(np.all(a_low <= b_high) and np.all(b_low <= a_high))


def normalised_on_grid(image: sitk.Image, reference: sitk.Image, role: str, reference_role: str,
                       transform: Optional[sitk.Transform] = None) -> np.ndarray:
    """``image``'s intensities scaled to [0, 1] on ``reference``'s grid, as a float32 array (array-axis order).

    The normalisation window comes from the image's own voxels (so pretraining and test-time registration give a
    network the same input); an image on another grid, or seen through ``transform`` (reference point -> image
    point, e.g. a pre-alignment), is then resampled onto the reference by world coordinates, and reference voxels
    outside the image get the bottom of the window (0), not a raw 0 that could be mid-grey (0 HU in a CT).
    Raises InputError if the two do not overlap in physical space.
    """
    array = sitk.GetArrayFromImage(image)
    window = intensity_window(array, role)
    if transform is None and same_grid(image, reference):
        return rescale(array, window)
    if transform is None and not overlaps(image, reference):
        raise InputError(f"The {role} does not overlap the {reference_role} in physical space; align it first "
                         "({setting} rigid or affine) or check its origin and direction.", setting="initial")
    if transform is not None and not field_of_view(image, reference, transform).any():
        raise InputError(f"The {role} does not overlap the {reference_role} after the initial transform; check "
                         "the transform (it maps fixed points to moving points) or set {setting} to none.",
                         setting="initial")
    resampled = sitk.Resample(image, reference, transform or sitk.Transform(), sitk.sitkLinear, float(window[0]),
                              sitk.sitkFloat32)
    return rescale(sitk.GetArrayFromImage(resampled), window)


def field_of_view(image: sitk.Image, reference: sitk.Image, transform: Optional[sitk.Transform] = None) -> np.ndarray:
    """Bool array on ``reference``'s grid: True where the reference point (through ``transform``, if given) falls
    inside ``image``'s grid, i.e. where a resampled ``image`` has data."""
    ones = sitk.Image(image.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(image)
    inside = sitk.Resample(ones, reference, transform or sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(inside) > 0
