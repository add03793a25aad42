"""Fields in physical space: anisotropic spacing, offset origin, oblique directions, every file format."""

import math

import nibabel
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SSMSRRegistrationLib import register
from SSMSRRegistrationLib.engine.spatial import warp
from SSMSRRegistrationLib.imaging.fields import (displacement_transform, image_to_voxel_field, read_field,
                                                 voxel_field_to_image, write_field)
from realimages import brain_slice, sine_field
from SSMSRRegistrationLib.imaging import sample_data


def rotation(ndim):
    if ndim == 2:
        a = math.radians(30)
        return (math.cos(a), -math.sin(a), math.sin(a), math.cos(a))
    # A proper rotation about an oblique axis, then a flip of the first axis (a valid LPS/RAS-like frame).
    axis = np.array([1.0, 2.0, 0.5]) / np.linalg.norm([1.0, 2.0, 0.5])
    a = math.radians(25)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    r = np.eye(3) + math.sin(a) * k + (1 - math.cos(a)) * k @ k
    return tuple((r @ np.diag([-1.0, 1.0, 1.0])).ravel())


def oblique_image(array: np.ndarray) -> sitk.Image:
    """An image with anisotropic spacing, a non-zero origin and an oblique direction."""
    image = sitk.GetImageFromArray(array.astype(np.float32))
    ndim = array.ndim
    image.SetSpacing((0.7, 1.9, 1.3)[:ndim])
    image.SetOrigin((-31.0, 12.5, 140.0)[:ndim])
    image.SetDirection(rotation(ndim))
    return image


def brain_volume() -> np.ndarray:
    t1 = sitk.GetArrayFromImage(sample_data.brain_t1())
    volume = t1[60:108:2, 70:134:2, 50:146:3].astype(np.float32)  # 24 x 32 x 32
    return volume / volume.max()


@pytest.mark.parametrize("extension", [".nii.gz", ".nrrd", ".mha", ".h5"])
@pytest.mark.parametrize("ndim", [2, 3])
def test_written_field_applied_by_simpleitk_matches_the_engine_warp(tmp_path, ndim, extension):
    array = brain_slice() if ndim == 2 else brain_volume()
    moving = oblique_image(array)
    voxel_field = sine_field(array.shape, amplitude=2.5, period=25.0)
    engine_warped = warp(torch.from_numpy(array)[None, None], voxel_field, padding_mode="zeros")[0, 0].numpy()

    path = str(tmp_path / f"field{extension}")
    write_field(voxel_field_to_image(voxel_field[0].double().numpy(), moving), path)
    field = read_field(path)
    assert field.GetSpacing() == pytest.approx(moving.GetSpacing())
    assert field.GetOrigin() == pytest.approx(moving.GetOrigin())
    assert field.GetDirection() == pytest.approx(moving.GetDirection())

    resampled = sitk.Resample(moving, moving, displacement_transform(field), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    inner = tuple(slice(4, -4) for _ in range(ndim))
    np.testing.assert_allclose(sitk.GetArrayFromImage(resampled)[inner], engine_warped[inner], atol=1e-4)
    np.testing.assert_allclose(image_to_voxel_field(field), voxel_field[0].numpy(), atol=1e-4)


def test_nifti_fields_follow_the_itk_vector_convention(tmp_path):
    reference = oblique_image(brain_volume())
    field = voxel_field_to_image(sine_field((24, 32, 32), 2.0, 20.0)[0].double().numpy(), reference)
    path = str(tmp_path / "field.nii.gz")
    write_field(field, path)
    stored = nibabel.load(path)
    assert int(stored.header["intent_code"]) == 1007  # NIFTI_INTENT_VECTOR: LPS vectors, as ITK and ANTs write
    on_disk = np.asarray(stored.dataobj)[:, :, :, 0, :]  # (x, y, z, component)
    np.testing.assert_allclose(on_disk.transpose(2, 1, 0, 3), sitk.GetArrayFromImage(field), atol=1e-5)


def test_register_resamples_a_moving_image_on_another_grid_and_keeps_physical_space(tmp_path):
    """The moving image is the fixed anatomy moved by a known physical shift and sampled on a coarser, shifted grid:
    the field must map each fixed point to its moving point (u = -shift), in millimetres, on the fixed grid."""
    fixed = oblique_image(brain_slice())
    shift = np.array([2.5, -2.0])  # mm, physical (LPS) frame
    moved = sitk.TranslationTransform(2, tuple(shift))  # moving(q) = fixed(q + shift)
    moving = sitk.Resample(fixed, [60, 56], moved, sitk.sitkLinear,
                           fixed.TransformContinuousIndexToPhysicalPoint((2.0, 3.0)),
                           (1.4, 2.8), fixed.GetDirection(), 0.0, sitk.sitkFloat32)
    result = register(fixed, moving, scales="1/4,1/2,1", steps=80, device="cpu")
    assert result.field.GetSize() == fixed.GetSize()
    assert result.field.GetOrigin() == pytest.approx(fixed.GetOrigin())
    assert result.field.GetDirection() == pytest.approx(fixed.GetDirection())
    assert result.warped.GetSize() == fixed.GetSize()
    vectors = sitk.GetArrayFromImage(result.field)[8:-8, 8:-8].reshape(-1, 2)
    error = np.linalg.norm(vectors + shift, axis=-1)
    assert np.median(error) < 0.35 * np.linalg.norm(shift), f"median error {np.median(error):.2f} mm"
    assert result.metrics["ncc_after"] > result.metrics["ncc_before"] + 0.02


def test_register_output_matches_the_engine_on_a_known_oblique_deformation(tmp_path):
    """End to end in physical space on an anisotropic oblique grid (0.7 x 1.9 mm): the engine runs on an isotropic
    working grid of 0.7 mm in the fixed image's frame; its warp there, the written field and the warped output
    agree; NCC improves."""
    array = brain_slice()
    fixed = oblique_image(array)
    moving_array = warp(torch.from_numpy(array)[None, None], -sine_field(array.shape, 3.0, 60.0))[0, 0].numpy()
    moving = oblique_image(moving_array)
    labels = oblique_image((moving_array > 0.45).astype(np.float32) + (moving_array > 0.7))
    labels = sitk.Cast(labels, sitk.sitkUInt8)
    result = register(fixed, moving, moving_labels=labels, scales="1/4,1/2,1", steps=80, device="cpu")
    assert result.metrics["ncc_after"] > result.metrics["ncc_before"] + 0.05
    assert result.metrics["percent_non_positive_jacobian"] == 0.0

    grid = result.plan.grid.reference
    assert result.plan.grid.resampled and grid.GetSpacing() == pytest.approx((0.7, 0.7))
    assert grid.GetDirection() == pytest.approx(fixed.GetDirection())
    # The engine's warp on the working grid is SimpleITK's resampling through the engine's field in millimetres.
    engine_field = result.engine_result.displacement
    moving_on_grid = sitk.Resample(moving, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    engine_warped = warp(torch.from_numpy(sitk.GetArrayFromImage(moving_on_grid))[None, None], engine_field,
                         padding_mode="zeros")[0, 0]
    working_field = voxel_field_to_image(engine_field[0].double().numpy(), grid)
    through_sitk = sitk.Resample(moving_on_grid, grid, displacement_transform(working_field), sitk.sitkLinear, 0.0,
                                 sitk.sitkFloat32)
    inner = (slice(8, -8),) * 2
    np.testing.assert_allclose(sitk.GetArrayFromImage(through_sitk)[inner], engine_warped.numpy()[inner], atol=1e-3)
    # The field written on the fixed grid is the working field at the fixed grid's points.
    points = [fixed.TransformIndexToPhysicalPoint((i, j)) for i in range(10, 80, 7) for j in range(5, 40, 4)]
    on_fixed = np.array([displacement_transform(result.field).TransformPoint(p) for p in points])
    on_working = np.array([displacement_transform(working_field).TransformPoint(p) for p in points])
    np.testing.assert_allclose(on_fixed, on_working, atol=1e-6)
    warped = sitk.Resample(moving, fixed, displacement_transform(result.field), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    np.testing.assert_allclose(sitk.GetArrayFromImage(result.warped), sitk.GetArrayFromImage(warped), atol=1e-5)

    paths = result.save(str(tmp_path / "f.nrrd"), str(tmp_path / "w.nii.gz"), str(tmp_path / "l.nii.gz"))
    warped_labels = sitk.ReadImage(paths["warped_labels"])
    assert warped_labels.GetPixelID() == sitk.sitkUInt8
    assert set(np.unique(sitk.GetArrayFromImage(warped_labels))) <= {0, 1, 2}
    dice = lambda a, b: 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())  # noqa: E731
    fixed_brain, moving_brain = array > 0.45, moving_array > 0.45
    assert dice(sitk.GetArrayFromImage(warped_labels) > 0, fixed_brain) > dice(moving_brain, fixed_brain)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.nrrd", "f.provenance.json", "l.nii.gz", "w.nii.gz"]


@pytest.mark.slow
def test_3d_brain_labels_propagate_through_a_known_deformation():
    """ICBM152 T1 crop (2 mm) and its grey/white matter labels: Dice against the fixed labels rises."""
    t1 = sample_data.crop_and_shrink(sample_data.brain_t1(), [58, 70, 66], [80, 96, 80], 2)  # 40x48x40
    labels = sample_data.crop_and_shrink(sample_data.brain_tissue_labels(), [58, 70, 66], [80, 96, 80], 2,
                                         labels=True)
    true = sine_field(tuple(reversed(t1.GetSize())), amplitude=2.0, period=40.0)[0].double().numpy()
    deformation = displacement_transform(voxel_field_to_image(-true, t1))
    moving = sitk.Resample(t1, t1, deformation, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    moving_labels = sitk.Resample(labels, labels, deformation, sitk.sitkNearestNeighbor, 0, labels.GetPixelID())

    result = register(t1, moving, moving_labels=moving_labels, scales="1/2,1", steps=60, device="cpu")
    fixed_labels = sitk.GetArrayFromImage(labels)

    def dice(candidate, label):
        a, b = candidate == label, fixed_labels == label
        return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())

    warped = sitk.GetArrayFromImage(result.warped_labels)
    before = sitk.GetArrayFromImage(moving_labels)
    for label in (sample_data.GREY_MATTER, sample_data.WHITE_MATTER):
        assert dice(warped, label) > dice(before, label) + 0.05, label
    assert result.metrics["percent_non_positive_jacobian"] < 0.1
