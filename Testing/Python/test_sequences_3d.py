"""3D+t cines (4D CT/MR, 3D echo): reading 4D images, folders of volumes and DICOM series with temporal positions, in
physical space; tracking consecutive pairs and every frame from a reference frame; the outputs on the cine's grid.
A real brain volume (the module's ICBM152 crop) on an oblique, anisotropic grid, moved by known translations."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import SSMSRRegistrationLib as ssmsr
from SSMSRRegistrationLib.common.errors import InputError
from SSMSRRegistrationLib.imaging import sample_data
from SSMSRRegistrationLib.imaging.cine import read_cine, read_masks
from SSMSRRegistrationLib.interfaces.cli import EXIT_INPUT, main

from test_alignment import rotation

#: A drift: frame t is the volume translated by t times AMPLITUDE_MM (LPS millimetres, oblique to the axes), so each
#: pair moves by 5.4 mm, forwards or backwards, and frame 0 onto frame 2 by 10.8 mm.
AMPLITUDE_MM = np.array([3.0, -2.0, 4.0])
SHIFTS_MM = [AMPLITUDE_MM * t for t in range(3)]
#: Short, and enough for these motions on this 32^3 grid: every pair in every step (with 2 of 3 pairs per step, 60 steps
#: left some pairs 6 mm off, in a motion of four frames).
SHORT = dict(scales="1/4,1/2,1", steps=60, batch_size=0, device="cpu")


def oblique(image: sitk.Image) -> sitk.Image:
    """The same voxels on an oblique grid with anisotropic spacing (2 x 2 x 2.5 mm)."""
    placed = sitk.Image(image)
    placed.SetDirection(rotation((1, -1, 2), 20.0).ravel().tolist())
    placed.SetSpacing((2.0, 2.0, 2.5))
    placed.SetOrigin((-30.0, 12.0, 40.0))
    return placed


def moving_volumes():
    """(4D image x, y, z, t of the moving volume, brain mask as a (z, y, x) bool array of the frame grid): the
    volume moved on its 32x40x32 grid, then seen through the central 32 of its 40 rows (a 32^3 field of view, which
    the U-Net computes without padding; the brain moves across its borders)."""
    t1, white_matter = (oblique(image) for image in sample_data.shipped_brain_crop())
    frames = [sitk.Resample(t1, t1, sitk.TranslationTransform(3, tuple(shift)), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
              for shift in SHIFTS_MM]
    brain = sitk.GetArrayFromImage(sitk.BinaryDilate(white_matter, [2, 2, 2])) > 0
    return sitk.JoinSeries(frames)[:, 4:36, :, :], brain[:, 4:36, :]


def mean_field_mm(field: sitk.Image, inside: np.ndarray) -> np.ndarray:
    """The mean (x, y, z) displacement (LPS mm) of an ITK field inside a (z, y, x) bool mask."""
    return sitk.GetArrayFromImage(field)[inside].mean(axis=0)


def landmarks_mm(cine: sitk.Image, brain: np.ndarray) -> dict:
    """{label: (frames, 3) LPS mm}: eight points of the brain in the central 12^3 voxels of frame 0, and where the
    drift takes each of them in every frame (frame t shows the volume translated by -SHIFTS_MM[t])."""
    frame = cine[:, :, :, 0]
    central = np.argwhere(brain[10:22, 10:22, 10:22])[::97][:8] + 10  # (z, y, x)
    starts = [np.array(frame.TransformIndexToPhysicalPoint([int(i) for i in index[::-1]])) for index in central]
    return {f"L{number}": np.array([start - shift for shift in SHIFTS_MM]) for number, start in enumerate(starts)}


def write_landmarks_ras(landmarks: dict, path: Path) -> None:
    """The landmarks as a CSV in RAS (label, frame, R, A, S), as a user would export them from Slicer."""
    rows = ["label,frame,R,A,S"] + [f"{label},{frame},{-x:.6f},{-y:.6f},{z:.6f}" for label, points in landmarks.items()
                                    for frame, (x, y, z) in enumerate(points)]
    path.write_text("\n".join(rows) + "\n")


@pytest.fixture(scope="module")
def cine_4d(tmp_path_factory):
    cine, brain = moving_volumes()
    folder = tmp_path_factory.mktemp("cine")
    sitk.WriteImage(cine, str(folder / "cine.nii.gz"))
    write_landmarks_ras(landmarks_mm(cine, brain), folder / "landmarks.csv")
    return folder / "cine.nii.gz", brain


def test_a_4d_image_is_read_as_3d_frames_on_its_grid(cine_4d):
    path, _ = cine_4d
    cine = read_cine(path)
    image = sitk.ReadImage(str(path))
    assert cine.dimension == 3 and cine.frames.shape == (3, 32, 32, 32)
    assert cine.frame_grid.GetSize() == image.GetSize()[:3]
    assert np.allclose(cine.frame_grid.GetSpacing(), (2.0, 2.0, 2.5))
    assert np.allclose(cine.frame_grid.GetOrigin(), image.GetOrigin()[:3])
    assert np.allclose(cine.frame_grid.GetDirection(), rotation((1, -1, 2), 20.0).ravel(), atol=1e-5)
    assert cine.cine_grid.GetDimension() == 4 and cine.cine_grid.GetSize() == image.GetSize()


@pytest.mark.parametrize("reference", [None, 1])
def test_the_fields_recover_the_known_motion_in_millimetres(cine_4d, reference, tmp_path):
    """Consecutive pairs (frame t-1 onto t) and every frame from frame 1: the mean field in the brain is the known
    translation between the pair's frames (5.4 mm), and frame 0 onto frame 2 through the composed consecutive
    fields is the 10.8 mm drift. Over seeds 0-4 of this very run in both precisions (`python
    Testing/benchmarks/seed_spread.py --scenarios sequence_3d`, with and without the AVX2 cap), a run's largest pair
    error was 0.59 +- 0.17 mm (at most 0.91 mm): the bound, 1.5 mm, is the mean plus 5.4 standard deviations, three
    quarters of the smallest voxel side. The composed field's error was 0.69 +- 0.09 mm (at most 0.81 mm), under the
    same bound.

    With landmarks (eight points of the brain, a CSV in RAS): each pair's target registration error is 5.39 mm
    without registration, and with it the mean distance SimpleITK's DisplacementFieldTransform gives. Eight points
    vary more than the brain's mean: a run's largest pair TRE over the same seeds was 0.71 +- 0.46 mm (at most
    1.82 mm); the bound, half the error without registration (2.7 mm), is the mean plus 4.3 standard deviations."""
    path, brain = cine_4d
    result = ssmsr.track(path, reference=reference, landmarks=str(path.parent / "landmarks.csv"), seed=0, **SHORT)
    expected_pairs = [(0, 1), (1, 2)] if reference is None else [(1, 0), (1, 2)]
    assert result.frame_pairs == expected_pairs
    landmarks = np.array(list(landmarks_mm(sitk.ReadImage(str(path)), brain).values()))  # (label, frame, 3)
    for index, (moving, fixed) in enumerate(result.frame_pairs):
        error = np.linalg.norm(mean_field_mm(result.field(fixed), brain) - (SHIFTS_MM[fixed] - SHIFTS_MM[moving]))
        assert error < 1.5, (moving, fixed, error)
        field = sitk.DisplacementFieldTransform(sitk.Cast(result.field(fixed), sitk.sitkVectorFloat64))
        mapped = np.array([field.TransformPoint(tuple(point)) for point in landmarks[:, fixed]])
        tre = np.linalg.norm(mapped - landmarks[:, moving], axis=1).mean()
        assert result.metrics["tre_identity_mm"][index] == pytest.approx(np.linalg.norm(AMPLITUDE_MM), abs=1e-5)
        assert result.metrics["tre_mm"][index] == pytest.approx(tre, rel=1e-6) and tre < 2.7, (moving, fixed, tre)
    summary = result.summary()  # MSE after / before over the same seeds: 0.44-0.45 (consecutive), 0.05-0.06 (reference)
    assert summary["mse_after"] < 0.6 * summary["mse_before"] and summary["max_folded_percent"] < 0.1

    written = ssmsr.save_tracking(result, str(tmp_path / "out"), accumulated=reference is None)
    stacked = sitk.ReadImage(written["fields"])
    assert stacked.GetDimension() == 4 and stacked.GetNumberOfComponentsPerPixel() == 4
    assert stacked.GetSize() == sitk.ReadImage(str(path)).GetSize()
    voxels = sitk.GetArrayFromImage(stacked)  # (t, z, y, x, 4): x, y, z, time components
    still = 0 if reference is None else reference
    assert not voxels[still].any() and not voxels[..., 3].any()
    for fixed in result.pairs:
        single = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / f"field_{fixed:04d}.nii.gz")))
        np.testing.assert_allclose(voxels[fixed, ..., :3], single, atol=1e-5)
    mask = sitk.ReadImage(written["mask"])
    assert mask.GetDimension() == 4 and mask.GetSize() == stacked.GetSize()
    with open(written["metrics"], newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [(int(row["moving_frame"]), int(row["fixed_frame"])) for row in rows] == expected_pairs
    assert [float(row["tre_mm"]) for row in rows] == pytest.approx(list(result.metrics["tre_mm"]), rel=1e-5)
    described = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert described["reference_frame"] == reference and described["ncc_window"] == 5  # the 3D window (2D: 6)
    assert described["tre_after_mm"] == pytest.approx(float(np.mean(result.metrics["tre_mm"])))
    if reference is None:  # frame 0 onto frame 2: the composed consecutive fields (each pair's error may add up)
        error = mean_field_mm(sitk.ReadImage(str(tmp_path / "out" / "accumulated_0002.nii.gz")), brain) - SHIFTS_MM[2]
        assert np.linalg.norm(error) < 1.5
    else:
        with pytest.raises(InputError, match="compose consecutive pairs"):
            result.save(str(tmp_path / "again"), accumulated=True)
        assert not (tmp_path / "again").exists()


def test_a_folder_of_volumes_on_different_grids_is_resampled_onto_the_reference_frame(tmp_path):
    cine, _ = moving_volumes()
    frames = [cine[:, :, :, t] for t in range(3)]
    frames[2] = sitk.RegionOfInterest(frames[2], [24, 24, 24], [4, 5, 6])  # a smaller field of view, shifted origin
    for index, frame in enumerate(frames):
        sitk.WriteImage(frame, str(tmp_path / f"phase_{index * 10}.nrrd"))
    read = read_cine(tmp_path, reference=1)
    assert read.frames.shape == (3, 32, 32, 32) and read.frame_grid.GetSize() == frames[1].GetSize()
    assert np.allclose(read.frame_grid.GetOrigin(), frames[1].GetOrigin())
    # Frame 2 on frame 1's grid: its voxels are where they were in space, zero outside its field of view.
    resampled = read.frames[2][6:6 + 24, 5:5 + 24, 4:4 + 24]
    original = sitk.GetArrayFromImage(frames[2])
    low, high = float(sitk.GetArrayViewFromImage(cine).min()), float(sitk.GetArrayViewFromImage(cine).max())
    np.testing.assert_allclose(resampled, (original - low) / (high - low), atol=1e-4)
    assert not read.frames[2][:6].any()

    rotated = sitk.Image(frames[0])  # a fourth frame, turned by 5 degrees
    rotated.SetDirection(rotation((0, 0, 1), 5.0).ravel().tolist())
    sitk.WriteImage(rotated, str(tmp_path / "phase_30.nrrd"))
    with pytest.raises(InputError, match="Frame 3 of the cine .* is oriented differently from frame 1"):
        read_cine(tmp_path, reference=1)


def dicom_slices(volume: sitk.Image, folder, series_uid: str, first_instance: int, tags: dict) -> None:
    """Write ``volume`` (int16) as one DICOM file per slice with its position and orientation, in ``series_uid``."""
    direction = volume.GetDirection()
    orientation = "\\".join(f"{v:.6f}" for v in (direction[0], direction[3], direction[6],
                                                  direction[1], direction[4], direction[7]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(volume.GetDepth()):
        image = volume[:, :, k]
        position = volume.TransformIndexToPhysicalPoint((0, 0, k))
        for key, value in {"0008|0060": "CT", "0020|000d": "1.2.826.0.1.3680043.2.1125.1", "0020|000e": series_uid,
                           "0020|0037": orientation, "0020|0032": "\\".join(f"{v:.6f}" for v in position),
                           "0020|0013": str(first_instance + k), "0018|0050": f"{volume.GetSpacing()[2]:.6f}",
                           "0008|0018": f"{series_uid}.{first_instance + k}", **tags}.items():
            image.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"IM{first_instance + k:05d}.dcm"))
        writer.Execute(image)


@pytest.mark.parametrize("layout", ["one series, temporal positions", "one series per phase"])
def test_a_dicom_folder_with_several_time_points_is_read_as_volumes_in_time_order(layout, tmp_path):
    cine, _ = moving_volumes()
    phases = [sitk.Cast(sitk.RescaleIntensity(sitk.BinShrink(cine[:, :, :, t], [4, 4, 4]), 0, 1000), sitk.sitkInt16)
              for t in range(3)]
    for order, phase in enumerate((2, 0, 1)):  # written out of time order: the tags must order them
        one_series = layout == "one series, temporal positions"
        uid = "1.2.826.0.1.3680043.2.1125.2" + ("" if one_series else f".{phase}")
        tags = {"0020|0100": str(phase + 1), "0018|1060": f"{100.0 * phase:.1f}"} if one_series else \
            {"0018|1060": f"{100.0 * phase:.1f}", "0020|0011": str(10 + order)}
        dicom_slices(phases[phase], tmp_path, uid, 1 + 100 * order, tags)
    read = read_cine(tmp_path)
    assert read.frames.shape == (3,) + sitk.GetArrayViewFromImage(phases[0]).shape
    stacked = np.stack([sitk.GetArrayFromImage(phase) for phase in phases]).astype(np.float64)
    np.testing.assert_allclose(read.frames, (stacked - stacked.min()) / (stacked.max() - stacked.min()), atol=1e-6)
    assert np.allclose(read.frame_grid.GetOrigin(), phases[0].GetOrigin(), atol=1e-3)
    assert np.allclose(read.frame_grid.GetDirection(), phases[0].GetDirection(), atol=1e-5)
    assert np.allclose(read.frame_grid.GetSpacing(), phases[0].GetSpacing(), atol=1e-4)


def test_masks_of_3d_frames_one_for_all_or_one_per_frame(cine_4d, tmp_path):
    path, brain = cine_4d
    cine = read_cine(path)
    one = sitk.GetImageFromArray(brain.astype(np.uint8))
    one.CopyInformation(cine.frame_grid)
    sitk.WriteImage(one, str(tmp_path / "one.nii.gz"))
    assert (read_masks(str(tmp_path / "one.nii.gz"), cine) == brain[None]).all()
    per_frame = sitk.JoinSeries([one] * 3)
    sitk.WriteImage(per_frame, str(tmp_path / "each.nii.gz"))
    assert read_masks(str(tmp_path / "each.nii.gz"), cine).shape == (3,) + brain.shape
    only_reference = sitk.JoinSeries([one * 0, one, one * 0])  # set in frame 1 alone: no fixed frame's
    sitk.WriteImage(only_reference, str(tmp_path / "reference_only.nii.gz"))
    with pytest.raises(InputError, match="The mask is empty in every fixed frame of the pairs"):
        ssmsr.track(path, mask=str(tmp_path / "reference_only.nii.gz"), reference=1, **SHORT)
    sitk.WriteImage(one[:, :, :20], str(tmp_path / "small.nii.gz"))
    with pytest.raises(InputError, match="The mask is 32x32x20 but the cine's frames are 32x32x32"):
        read_masks(str(tmp_path / "small.nii.gz"), cine)


def test_the_command_refuses_a_reference_outside_the_cine_and_accumulating_from_a_reference(cine_4d, tmp_path,
                                                                                           capsys):
    path, _ = cine_4d
    arguments = ["track", str(path), "-o", str(tmp_path / "out"), "--steps", "1", "--progress", "none"]
    assert main(arguments + ["--reference", "3"]) == EXIT_INPUT
    assert "The reference frame 3 is not a frame of the cine (frames 0 to 2)" in capsys.readouterr().err
    assert main(arguments + ["--reference", "1", "--accumulate"]) == EXIT_INPUT
    assert "--accumulate composes consecutive pairs" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_real_4d_nifti_is_read_where_nibabel_places_it_and_tracked(tmp_path):
    """nibabel's test fMRI (a real oblique EPI, 2 volumes of 128x96x24 at 2 x 2 x 2.2 mm): every frame voxel is where
    nibabel's affine (RAS) puts it, in LPS; two volumes 2 s apart are tracked with a small, unfolded field on
    their grid."""
    nibabel = pytest.importorskip("nibabel")
    path = Path(nibabel.__file__).parent / "tests" / "data" / "example4d.nii.gz"
    affine = nibabel.load(str(path)).affine
    cine = read_cine(path)
    assert cine.frames.shape == (2, 24, 96, 128)
    for index in [(0, 0, 0), (127, 0, 0), (0, 95, 23), (64, 48, 12)]:
        ras = affine @ np.array(list(index) + [1.0])
        lps = np.array([-ras[0], -ras[1], ras[2]])
        np.testing.assert_allclose(cine.frame_grid.TransformIndexToPhysicalPoint(index), lps, atol=1e-3)
    result = ssmsr.track(path, scales="1", steps=3, device="cpu")
    assert result.summary()["pairs"] == 1 and result.summary()["max_folded_percent"] == 0
    assert float(result.displacements.norm(dim=1).mean()) < 1.0  # voxels: frames 2 s apart barely move
    field = result.field(1)
    assert field.GetSize() == (128, 96, 24)
    np.testing.assert_allclose(field.GetOrigin(), cine.frame_grid.GetOrigin())
    np.testing.assert_allclose(field.GetDirection(), cine.frame_grid.GetDirection())


def test_landmark_files_that_cannot_be_measured_are_refused_before_training(cine_4d, tmp_path):
    path, _ = cine_4d
    cases = {
        "L,P,S\n1,2,3\n": "need one 'frame' column",
        "frame,L,P,S\n3,1,2,3\n": "gives frame '3'; the cine's frames are 0 to 2",
        "frame,label,L,P,S\n0,a,1,2,3\n0,a,1,2,4\n": "gives landmark 'a' of frame 0 a second time",
        "frame,L,P,S\n": "hold no point",
        "frame,label,R,A,S\n0,a,1,2,3\n1,b,1,2,3\n2,c,1,2,3\n": "No pair's two frames share a landmark",
    }
    for number, (text, message) in enumerate(cases.items()):
        landmarks = tmp_path / f"landmarks{number}.csv"
        landmarks.write_text(text)
        with pytest.raises(InputError, match=message):
            ssmsr.track(path, landmarks=str(landmarks), **SHORT)
    markups = tmp_path / "points.mrk.json"
    markups.write_text('{"markups": [{"type": "Fiducial", "controlPoints": [{"position": [1, 2, 3]}]}]}')
    with pytest.raises(InputError, match="must be a CSV with a 'frame' column"):
        ssmsr.track(path, landmarks=str(markups), **SHORT)


def test_the_command_writes_each_pairs_target_registration_error(cine_4d, tmp_path):
    path, _ = cine_4d
    landmarks = path.parent / "landmarks.csv"
    assert main(["track", str(path), "-o", str(tmp_path / "out"), "--landmarks", str(landmarks), "--scales", "1",
                 "--steps", "1", "--no-figures", "--progress", "none"]) == 0
    with open(tmp_path / "out" / "metrics.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [float(row["tre_identity_mm"]) for row in rows] == pytest.approx([np.linalg.norm(AMPLITUDE_MM)] * 2,
                                                                            abs=1e-5)
    provenance = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert provenance["inputs"]["landmarks"]["path"] == str(landmarks)
