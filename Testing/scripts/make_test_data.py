"""Write the small test images that the module ships in ``SSMSRRegistration/Resources/TestData``.

Run it with the project's venv (it needs pydicom >= 3.0, which has the echocardiogram, and nilearn):

    .venv/bin/python Testing/scripts/make_test_data.py [--out FOLDER]

Why: inside Slicer the module's self-test (and the pytest copies of its scenarios) must run on the packages Slicer
ships, and Slicer's pydicom (2.4.3 at Slicer 5.6.2, 2.4.4 at 5.8.1 and 5.10.0) does not have the cine. So the module
carries the frames it needs, and reads them with SimpleITK alone (``imaging.sample_data.shipped_echo_frames``).

What, and where it comes from:

* ``echo_frame_NN.nrrd`` for NN in ``sample_data.SHIPPED_ECHO_FRAMES`` (0, 1, 2, 3, 10, 20): frame NN of
  ``pydicom/data/test_files/examples_ybr_color.dcm`` from the pydicom wheel (written with pydicom 3.0.2; a 30-frame
  colour ultrasound cine, 320x240 pixels, YBR_FULL_422 JPEG), read by ``sample_data.echo_frames``: the first channel
  (luma, 0..255), pixel size from the DICOM ultrasound region (0.5105 mm). Each frame is then binned 2x2
  (``sitk.BinShrink``, the mean of each block: 160x120 pixels of 1.021 mm, origin moved half an original pixel, as
  the binning gives) and written as float32, gzip-compressed NRRD. Binning by 2 is what every Slicer-side scenario
  uses, so the values they see are the ones they saw when they read the DICOM file.
  Frames 0/20 are the registration pair, 0 the segmentation propagation, 0/10/20 the atlases, 0-3 the cine.
* ``icbm152_t1_crop.nrrd`` (uint8) and ``icbm152_white_matter_crop.nrrd`` (uint8, 1 = white matter): from the
  nilearn wheel (written with nilearn 0.14.1), ``nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz``
  (the ICBM 2009a symmetric T1 template, 1 mm, uint8) and the grey/white matter probability maps beside it, turned
  into labels by ``sample_data.brain_tissue_labels``. Every 2nd voxel from index (40, 50, 40), 32 x 40 x 32 voxels
  of 2 mm (``sample_data.brain_crop``), the template's physical geometry kept. Used by the 3D tests of the Slicer
  logic. The template is (c) McConnell Brain Imaging Centre, Montreal Neurological Institute, McGill University,
  whose licence lets it be copied and redistributed with its copyright notice (see ``Resources/TestData/README.md``).

The output is byte-for-byte the same on every run with the same SimpleITK (``Testing/Python/test_test_data.py``
checks the committed files against a fresh run).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "SSMSRRegistration"))

import SimpleITK as sitk  # noqa: E402

from SSMSRRegistrationLib.imaging import sample_data  # noqa: E402


def make_test_data(out: Path) -> list[Path]:
    """Write every shipped file into ``out``; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    shrink = sample_data.SHIPPED_ECHO_SHRINK
    written = []
    frames = sample_data.echo_frames(sample_data.SHIPPED_ECHO_FRAMES)
    for index, frame in zip(sample_data.SHIPPED_ECHO_FRAMES, frames):
        binned = sitk.Cast(sitk.BinShrink(frame, [shrink, shrink]), sitk.sitkFloat32)
        path = out / sample_data.shipped_echo_frame_path(index).name
        sitk.WriteImage(binned, str(path), True)
        written.append(path)
    t1 = sitk.Cast(sample_data.brain_crop(sample_data.brain_t1()), sitk.sitkUInt8)  # the template is uint8
    whiteMatter = sitk.Cast(sample_data.brain_crop(sample_data.brain_tissue_labels()) == sample_data.WHITE_MATTER,
                            sitk.sitkUInt8)
    for image, name in ((t1, sample_data.BRAIN_T1_CROP_FILE), (whiteMatter, sample_data.BRAIN_WHITE_MATTER_CROP_FILE)):
        path = out / name
        sitk.WriteImage(image, str(path), True)
        written.append(path)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=sample_data.TEST_DATA_DIRECTORY,
                        help="folder to write to (default: the module's Resources/TestData)")
    args = parser.parse_args(argv)
    for path in make_test_data(args.out):
        print(f"{path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
