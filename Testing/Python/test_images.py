"""Reading images: DICOM series folders keep their geometry; intensity normalisation."""

import numpy as np
import pytest
import SimpleITK as sitk

from SSMSRRegistrationLib.common.errors import InputError
from SSMSRRegistrationLib.imaging.images import intensity_window, read_image, rescale


def write_dicom_series(volume: sitk.Image, folder) -> None:
    """Write a 3D int16 volume as one DICOM file per slice with position, orientation and spacing tags."""
    direction = volume.GetDirection()
    orientation = "\\".join(f"{v:.6f}" for v in (direction[0], direction[3], direction[6],
                                                    direction[1], direction[4], direction[7]))
    for k in range(volume.GetDepth()):
        image = volume[:, :, k]
        position = volume.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {"0008|0060": "MR", "0020|000d": "1.2.826.0.1.3680043.2.1125.1", "0020|000e": "1.2.826.0.1.3680043.2.1125.2",
                "0020|0013": str(k + 1), "0020|0032": "\\".join(f"{p:.6f}" for p in position),
                "0020|0037": orientation, "0018|0050": f"{volume.GetSpacing()[2]:.6f}",
                "0028|0030": f"{volume.GetSpacing()[1]:.6f}\\{volume.GetSpacing()[0]:.6f}"}
        for tag, value in tags.items():
            image.SetMetaData(tag, value)
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(image)


def test_dicom_series_folder_keeps_geometry(tmp_path):
    rng = np.random.default_rng(0)
    volume = sitk.GetImageFromArray(rng.integers(0, 1000, (6, 20, 24)).astype(np.int16))
    volume.SetSpacing((0.8, 0.9, 2.5))
    volume.SetOrigin((-20.0, 31.5, 7.25))
    angle = np.radians(20)
    volume.SetDirection((np.cos(angle), 0, np.sin(angle), 0, 1, 0, -np.sin(angle), 0, np.cos(angle)))
    write_dicom_series(volume, tmp_path)
    read = read_image(tmp_path, "fixed image")
    assert read.GetSize() == volume.GetSize()
    np.testing.assert_allclose(read.GetSpacing(), volume.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(read.GetOrigin(), volume.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(read.GetDirection(), volume.GetDirection(), atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(volume))


def test_folder_without_dicom_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(InputError, match="contains no DICOM series"):
        read_image(tmp_path, "moving image")


def test_normalisation_clips_beyond_six_standard_deviations_and_maps_to_unit_range():
    rng = np.random.default_rng(1)
    array = rng.normal(100.0, 10.0, 100000)
    array[:20] = 1e4  # rare hot voxels, as in the paper's MR volumes
    low, high = intensity_window(array, "fixed image")
    mean, std = array.mean(), array.std()
    assert low == pytest.approx(array.min()) and high == pytest.approx(mean + 6 * std)
    assert high < 1e4
    scaled = rescale(array, (low, high))
    assert scaled.min() == 0.0 and scaled.max() == 1.0
    assert np.all(scaled[:20] == 1.0)
    with pytest.raises(InputError, match="constant"):
        intensity_window(np.full(50, 7.0), "moving image")


def test_ultrasound_dicom_gets_its_region_calibration():
    """pydicom's echo cine has no Pixel Spacing; its ultrasound region says 0.0510497 cm per pixel."""
    from SSMSRRegistrationLib.imaging import sample_data

    cine = read_image(sample_data.echo_cine_path(), "cine")
    assert cine.GetSpacing()[:2] == pytest.approx((0.510497, 0.510497), abs=1e-6)
    assert cine.GetSpacing()[2] == 1.0


def test_images_are_normalised_on_the_reference_grid_and_must_overlap():
    from SSMSRRegistrationLib.imaging.images import normalised_on_grid

    rng = np.random.default_rng(2)
    reference = sitk.GetImageFromArray(rng.random((20, 24)).astype(np.float32) * 100)
    coarse = sitk.GetImageFromArray(rng.random((10, 12)).astype(np.float32) * 50)
    coarse.SetSpacing((2.0, 2.0))
    on_grid = normalised_on_grid(coarse, reference, "moving image", "fixed image")
    assert on_grid.shape == (20, 24) and on_grid.dtype == np.float32
    assert 0.0 <= on_grid.min() and on_grid.max() <= 1.0
    # A CT-like image (air -1000 HU) covering only part of the reference: outside it, the bottom of its window
    # (0), not a raw 0 HU (mid-grey); inside, its own window applied to the resampled values.
    ct = sitk.GetImageFromArray((rng.random((8, 10)) * 2000 - 1000).astype(np.float32))
    ct.SetSpacing((1.0, 1.0))
    ct.SetOrigin((6.0, 4.0))
    normalised = normalised_on_grid(ct, reference, "moving image", "fixed image")
    rows, columns = np.mgrid[0:20, 0:24]
    inside = (columns >= 6) & (columns <= 15) & (rows >= 4) & (rows <= 11)
    assert np.all(normalised[~inside] == 0.0)
    window = intensity_window(sitk.GetArrayFromImage(ct), "moving image")
    np.testing.assert_allclose(normalised[4:12, 6:16], rescale(sitk.GetArrayFromImage(ct), window), atol=1e-6)
    far = sitk.Image(coarse)
    far.SetOrigin((1000.0, 1000.0))
    with pytest.raises(InputError, match="moving image does not overlap the fixed image"):
        normalised_on_grid(far, reference, "moving image", "fixed image")
