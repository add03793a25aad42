"""Real sample images shipped inside registry packages (nothing is downloaded).

* ``echo_frames``: the 30-frame colour echocardiogram shipped with pydicom
  (``examples_ybr_color.dcm``, 240x320 pixels), reduced to its first channel as in the paper.
* ``brain_t1`` / ``brain_tissue_labels``: the ICBM152 2009a T1 template and its grey/white matter
  probability maps, shipped with nilearn (1 mm, 197x233x189 voxels, RAS-oriented NIfTI).
* ``shipped_echo_frames``: a few frames of that echocardiogram, shrunk 2x, shipped with the module itself
  (``Resources/TestData``, written by ``Testing/scripts/make_test_data.py``). Slicer's own pydicom (2.4 at Slicer
  5.6-5.10) does not have the cine, so everything that runs inside Slicer (the self-test and the pytest copies of
  its scenarios) reads these files, with SimpleITK only.
* ``shipped_brain_crop``: a 2 mm crop of the ICBM152 T1 template and its white matter, shipped with the module too
  (nilearn is not in Slicer).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from ..common.errors import InputError
from .images import read_image

GREY_MATTER, WHITE_MATTER = 1, 2


def _package_file(package: str, *parts: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"The sample data needs the Python package {package!r}: pip install {package}")
    path = os.path.join(list(spec.submodule_search_locations)[0], *parts)
    if not os.path.exists(path):
        raise InputError(f"{path!r} is missing from the installed {package!r} package.")
    return path


def echo_cine_path() -> str:
    """Path of pydicom's multi-frame ultrasound example (YBR colour, 30 frames)."""
    return _package_file("pydicom", "data", "test_files", "examples_ybr_color.dcm")


def echo_frames(indices: Optional[Sequence[int]] = None) -> List[sitk.Image]:
    """Frames of the echo cine as 2D float32 images of the first (luma) channel, values 0..255.

    The pixel size comes from the DICOM ultrasound region (PhysicalDeltaX/Y, cm -> mm), as ``read_image``
    gives it. The region coordinates in this example exceed the stored 320x240 frame, so the frames were
    downsized after calibration and the spacing is only indicative.
    """
    cine = read_image(echo_cine_path(), "echo cine")
    channel = sitk.VectorIndexSelectionCast(cine, 0, sitk.sitkFloat32)
    spacing = channel.GetSpacing()[:2]
    images = []
    for index in (range(channel.GetSize()[2]) if indices is None else indices):
        frame = channel[:, :, int(index)]
        frame.SetOrigin((0.0, 0.0))
        frame.SetDirection((1.0, 0.0, 0.0, 1.0))
        frame.SetSpacing(spacing)
        images.append(frame)
    return images


#: The module's ``Resources/TestData`` folder. Slicer installs a scripted module's resources next to its module file,
#: as in the source tree (``SSMSRRegistration/Resources``, beside ``SSMSRRegistrationLib``).
TEST_DATA_DIRECTORY = Path(__file__).resolve().parents[2] / "Resources" / "TestData"
#: Echo frames shipped in ``TEST_DATA_DIRECTORY``: every frame that a Slicer-side scenario uses.
SHIPPED_ECHO_FRAMES = (0, 1, 2, 3, 10, 20)
#: Each shipped frame is the mean of ``SHIPPED_ECHO_SHRINK`` x ``SHIPPED_ECHO_SHRINK`` pixel blocks of the original.
SHIPPED_ECHO_SHRINK = 2


def shipped_echo_frame_path(index: int) -> Path:
    return TEST_DATA_DIRECTORY / f"echo_frame_{int(index):02d}.nrrd"


def shipped_echo_frames(indices: Sequence[int]) -> List[sitk.Image]:
    """Frames of the module's own copy of the echo cine: 2D float32 images (first channel, values 0..255, 160x120
    pixels of about 1.02 mm), equal to ``echo_frames`` binned by ``SHIPPED_ECHO_SHRINK``. Needs neither pydicom nor
    network; raises ``InputError`` for a frame that is not shipped (``SHIPPED_ECHO_FRAMES``)."""
    images = []
    for index in indices:
        if int(index) not in SHIPPED_ECHO_FRAMES:
            raise InputError(f"Echo frame {index} is not shipped with the module (frames {list(SHIPPED_ECHO_FRAMES)}); "
                             "add it to SHIPPED_ECHO_FRAMES and run Testing/scripts/make_test_data.py.")
        path = shipped_echo_frame_path(index)
        if not path.is_file():
            raise InputError(f"The module's test data file {str(path)!r} is missing.")
        images.append(sitk.ReadImage(str(path), sitk.sitkFloat32))
    return images


#: The shipped brain crop: every 2nd voxel of the ICBM152 template from (i, j, k) = BRAIN_CROP_START on, BRAIN_CROP_SIZE
#: voxels (i, j, k) of 2 mm.
BRAIN_CROP_START = (40, 50, 40)
BRAIN_CROP_SIZE = (32, 40, 32)
BRAIN_T1_CROP_FILE = "icbm152_t1_crop.nrrd"
BRAIN_WHITE_MATTER_CROP_FILE = "icbm152_white_matter_crop.nrrd"


def brain_crop(image: sitk.Image) -> sitk.Image:
    """The shipped crop's region of a template-grid image (every 2nd voxel; spacing, origin and axes kept)."""
    (i, j, k), (ni, nj, nk) = BRAIN_CROP_START, BRAIN_CROP_SIZE
    return image[i:i + 2 * ni:2, j:j + 2 * nj:2, k:k + 2 * nk:2]


def shipped_brain_crop() -> tuple:
    """The module's own 2 mm crop of the ICBM152 T1 template (float32, values 0..255 as in the template) and its
    white matter (uint8, 1 inside): equal to ``brain_crop`` of ``brain_t1()`` and of ``brain_tissue_labels() ==
    WHITE_MATTER``. Read with SimpleITK only."""
    images = []
    for name, pixel in ((BRAIN_T1_CROP_FILE, sitk.sitkFloat32), (BRAIN_WHITE_MATTER_CROP_FILE, sitk.sitkUInt8)):
        path = TEST_DATA_DIRECTORY / name
        if not path.is_file():
            raise InputError(f"The module's test data file {str(path)!r} is missing.")
        images.append(sitk.ReadImage(str(path), pixel))
    return tuple(images)


def _nilearn_data(name: str) -> str:
    return _package_file("nilearn", "datasets", "data", name)


def brain_t1() -> sitk.Image:
    """The ICBM152 2009a symmetric T1 template (float32, 1 mm)."""
    return sitk.Cast(sitk.ReadImage(_nilearn_data("mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")),
                     sitk.sitkFloat32)


def brain_tissue_labels() -> sitk.Image:
    """Tissue label map on the T1 template's grid: 0 background, 1 grey matter, 2 white matter.

    A voxel gets the tissue of highest probability when that probability is at least 0.5.
    """
    grey = sitk.GetArrayFromImage(sitk.ReadImage(_nilearn_data("mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz")))
    white = sitk.GetArrayFromImage(sitk.ReadImage(_nilearn_data("mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz")))
    grey, white = grey.astype(np.float32), white.astype(np.float32)
    scale = max(float(grey.max()), float(white.max()), 1e-6)
    grey, white = grey / scale, white / scale
    labels = np.zeros(grey.shape, np.uint8)
    labels[(grey >= 0.5) & (grey >= white)] = GREY_MATTER
    labels[(white >= 0.5) & (white > grey)] = WHITE_MATTER
    image = sitk.GetImageFromArray(labels)
    image.CopyInformation(brain_t1())
    return image


def crop_and_shrink(image: sitk.Image, start: Sequence[int], size: Sequence[int], shrink: int = 1,
                    labels: bool = False) -> sitk.Image:
    """Crop (ITK index order start/size) then shrink by an integer factor, keeping physical geometry."""
    cropped = sitk.RegionOfInterest(image, [int(s) for s in size], [int(s) for s in start])
    if shrink == 1:
        return cropped
    if labels:
        return sitk.Shrink(cropped, [shrink] * image.GetDimension())
    return sitk.BinShrink(cropped, [shrink] * image.GetDimension())
