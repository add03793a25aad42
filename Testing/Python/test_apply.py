"""ssmsr apply: a saved result applied to images, label maps and points (CSV, Slicer markups), in both directions,
checked against register's own outputs, a label's centroid, and ANTs' apply_transforms."""

import argparse
import json
import math
import os
import time
from functools import lru_cache

import numpy as np
import pytest
import SimpleITK as sitk

from SSMSRRegistrationLib.common.errors import InputError
from SSMSRRegistrationLib.imaging import sample_data
from SSMSRRegistrationLib.imaging.alignment import grid_points
from SSMSRRegistrationLib.imaging.fields import displacement_transform, write_field
from SSMSRRegistrationLib.interfaces import apply_command
from SSMSRRegistrationLib.report.progress import Reporter
from SSMSRRegistrationLib.workflows.apply import (Transform, UnmappedPointsWarning, apply, apply_to_point_file,
                                                  read_transform)

SLICE, ROWS, COLUMNS = 95, slice(20, 212, 2), slice(10, 186, 2)  # realimages.brain_slice's region


def rotation3(angles_degrees):
    transform = sitk.Euler3DTransform()
    transform.SetRotation(*[math.radians(a) for a in angles_degrees])
    return transform.GetMatrix()


def rotation2(degrees):
    a = math.radians(degrees)
    return (math.cos(a), -math.sin(a), math.sin(a), math.cos(a))


@lru_cache(maxsize=None)
def template_slices():
    """Two axial slices (4 mm apart) of the ICBM152 T1 and the first one's tissue labels, 96x88 pixels at 2 mm."""
    t1 = sitk.GetArrayFromImage(sample_data.brain_t1())
    labels = sitk.GetArrayFromImage(sample_data.brain_tissue_labels())
    scale = float(t1.max())
    return t1[SLICE, ROWS, COLUMNS] / scale, t1[SLICE + 4, ROWS, COLUMNS] / scale, labels[SLICE, ROWS, COLUMNS]


def image2d(array, spacing=(2.0, 2.0), origin=(0.0, 0.0), direction=(1.0, 0.0, 0.0, 1.0), pixel=np.float32):
    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=pixel))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


@lru_cache(maxsize=None)
def oblique_volume():
    """A 3D crop of the ICBM152 T1 and its tissue labels on an anisotropic (2 x 2.5 x 3 mm), rotated grid, plus
    label 3: the white matter within 9 mm of a point, a small structure whose centroid is followed."""
    t1 = sitk.GetArrayFromImage(sample_data.brain_t1())[60:108:2, 70:134:2, 50:146:3].astype(np.float32)
    tissue = sitk.GetArrayFromImage(sample_data.brain_tissue_labels())[60:108:2, 70:134:2, 50:146:3]
    image = sitk.GetImageFromArray(t1 / t1.max())
    image.SetSpacing((2.0, 2.5, 3.0))
    image.SetOrigin((-40.0, 25.0, 10.0))
    image.SetDirection(rotation3((12, -8, 20)))
    points = grid_points(image)
    centre = image.TransformContinuousIndexToPhysicalPoint((16.0, 15.0, 12.0))
    tissue = tissue.copy()
    tissue[(np.linalg.norm(points - centre, axis=-1) < 9.0) & (tissue == sample_data.WHITE_MATTER)] = 3
    labels = sitk.GetImageFromArray(tissue)
    labels.CopyInformation(image)
    return image, labels


@lru_cache(maxsize=None)
def known_field():
    """A smooth field of up to 3 mm (wavelength 70 mm: p -> p + u(p) is invertible) on a fixed grid that differs
    from the moving one in spacing (2.2 x 2.0 x 2.6 mm), rotation and extent."""
    moving, _ = oblique_volume()
    centre = np.array(moving.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in moving.GetSize()]))
    grid = sitk.Image([34, 40, 30], sitk.sitkFloat32)
    grid.SetSpacing((2.2, 2.0, 2.6))
    grid.SetDirection(rotation3((-15, 5, -10)))
    grid.SetOrigin(tuple(centre - np.array(grid.TransformContinuousIndexToPhysicalPoint(
        [(n - 1) / 2 for n in grid.GetSize()]))))
    points = grid_points(grid)
    k = 2 * math.pi / 70.0
    vectors = np.stack([3.0 * np.sin(k * points[..., 1] + 0.3), 2.5 * np.cos(k * points[..., 2] - 0.5),
                        2.0 * np.sin(k * (points[..., 0] + points[..., 1]))], axis=-1)
    field = sitk.GetImageFromArray(vectors, isVector=True)
    field.CopyInformation(grid)
    return field


def centroid(labels: sitk.Image, value: int) -> np.ndarray:
    return grid_points(labels)[sitk.GetArrayFromImage(labels) == value].mean(axis=0)


# --- register's own outputs -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A quick 2D registration of two real slices on different grids, saved with its inverse (float64 .h5 field)."""
    from SSMSRRegistrationLib import register

    first, second, tissue = template_slices()
    fixed = image2d(first, origin=(-90.0, -80.0), direction=rotation2(10))
    moving = image2d(second[2:-2, 3:-3], spacing=(2.1, 1.9), origin=(-85.0, -78.0), direction=rotation2(4))
    labels = image2d(tissue[2:-2, 3:-3], spacing=(2.1, 1.9), origin=(-85.0, -78.0), direction=rotation2(4),
                     pixel=np.uint8)
    result = register(fixed, moving, moving_labels=labels, scales="1/2,1", steps=5, device="cpu")
    folder = tmp_path_factory.mktemp("registered")
    outputs = result.save(str(folder / "field.h5"), warped_path=str(folder / "warped.nrrd"),
                          inverse_path=str(folder / "inverse.nii.gz"))
    return result, outputs, fixed, moving, labels


def test_apply_to_image_and_labels_equal_registers_warped_outputs_bit_for_bit(registered):
    result, outputs, fixed, moving, labels = registered
    for source in (result, outputs["field"], outputs["provenance"]):  # in memory, the .h5 file, its provenance
        transform = read_transform(source)
        warped = transform.apply_to_image(moving)
        assert warped.GetPixelID() == sitk.sitkFloat32 and warped.GetSize() == fixed.GetSize()
        assert np.array_equal(sitk.GetArrayFromImage(warped), sitk.GetArrayFromImage(result.warped))
        assert np.array_equal(sitk.GetArrayFromImage(transform.apply_to_labels(labels)),
                              sitk.GetArrayFromImage(result.warped_labels))
    assert np.array_equal(sitk.GetArrayFromImage(read_transform(outputs["field"]).apply_to_image(moving)),
                          sitk.GetArrayFromImage(sitk.ReadImage(outputs["warped"])))
    with_inverse = read_transform(outputs["provenance"])
    assert with_inverse.inverse_field is not None  # register --inverse's field, a start for the points' iteration
    points = grid_points(moving)[10:-10:7, 10:-10:7].reshape(-1, 2)
    np.testing.assert_allclose(with_inverse.apply_to_points(points),
                               read_transform(outputs["field"]).apply_to_points(points), atol=1e-3)


def test_a_float32_field_file_and_bspline_interpolation(registered, tmp_path):
    result, _, _, moving, _ = registered
    path = str(tmp_path / "field.nii.gz")
    write_field(result.field, path)  # image files hold float32 vectors: the warp differs in the last bits
    warped = sitk.GetArrayFromImage(read_transform(path).apply_to_image(moving))
    expected = sitk.GetArrayFromImage(result.warped)
    print(f"float32 field: max |difference| {np.abs(warped - expected).max():.3g} of {np.ptp(expected):.3g}")
    assert np.abs(warped - expected).max() < 1e-5 * np.ptp(expected)
    cubic = sitk.GetArrayFromImage(apply(path, image=moving, interpolation="bspline"))
    assert 0 < np.abs(cubic - expected).max() < 0.2 * np.ptp(expected)
    with pytest.raises(InputError, match="interpolation must be linear or bspline"):
        apply(path, image=moving, interpolation="cubic")


def test_the_inverse_brings_the_warped_image_back_onto_the_moving_grid(registered):
    result, outputs, _, moving, _ = registered
    with pytest.raises(InputError, match="reference"):
        read_transform(outputs["field"]).inverse().apply_to_image(result.warped)
    interior = (slice(10, -10), slice(10, -10))
    back = {}
    for source in (outputs["provenance"], outputs["field"]):  # register's inverse file, or inverted here
        back[source] = sitk.GetArrayFromImage(read_transform(source).inverse().apply_to_image(result.warped,
                                                                                                reference=moving))
        error = np.abs(back[source] - sitk.GetArrayFromImage(moving))[interior]
        print(f"inverse: median error {np.median(error):.3g}, max {error.max():.3g}")
        assert np.median(error) < 0.03, source
    assert np.abs(back[outputs["provenance"]] - back[outputs["field"]])[interior].max() < 0.05


# --- labels and points in physical space ----------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_a_labels_centroid_mapped_as_a_point_lands_on_the_warped_labels_centroid(tmp_path, mode):
    _, labels = oblique_volume()
    path = str(tmp_path / "field.nrrd")
    write_field(known_field(), path)
    transform = read_transform(path)
    warped = transform.apply_to_labels(labels, mode=mode)
    assert warped.GetPixelID() == labels.GetPixelID() and warped.GetSize() == known_field().GetSize()
    assert set(np.unique(sitk.GetArrayFromImage(warped))) <= {0, 1, 2, 3}
    moved = transform.apply_to_points(centroid(labels, 3)[None])[0]
    distance = np.linalg.norm(moved - centroid(warped, 3))
    assert distance < 0.5 * min(known_field().GetSpacing()), f"{distance:.3f} mm"
    # Not a coincidence of a small field: the centroid itself moved by 2 mm, twice the tolerance and more.
    assert np.linalg.norm(moved - centroid(labels, 3)) > 1.5


def test_points_forward_then_inverse_come_back_and_match_itk(tmp_path):
    moving, _ = oblique_volume()
    transform = Transform(known_field())
    rng = np.random.default_rng(1)
    indices = rng.uniform(7, np.array(moving.GetSize()) - 8, size=(200, 3))  # inside the fixed grid too
    points = np.array([moving.TransformContinuousIndexToPhysicalPoint(list(index)) for index in indices])
    on_fixed = transform.apply_to_points(points)
    itk = displacement_transform(known_field())
    solved = np.array([itk.TransformPoint(list(point)) for point in on_fixed])  # p + u(p) by ITK: back to q
    assert np.abs(solved - points).max() < 1e-4
    back = transform.inverse().apply_to_points(on_fixed)
    assert np.abs(back - points).max() < 0.01
    assert np.linalg.norm(on_fixed - points, axis=1).max() > 2.0


def test_points_outside_the_field_are_nan_with_a_warning_or_an_error():
    transform = Transform(known_field())
    centre = known_field().TransformContinuousIndexToPhysicalPoint((17.0, 20.0, 15.0))
    points = np.array([centre, np.array(centre) + 500.0])
    with pytest.warns(UnmappedPointsWarning, match="1 of 2 points .*: point number 2,"):
        mapped = transform.apply_to_points(points)
    assert np.isfinite(mapped[0]).all() and np.isnan(mapped[1]).all()
    with pytest.raises(InputError, match="outside the field's grid"):
        transform.inverse().apply_to_points(points, unmapped="error")
    with pytest.raises(InputError, match=r"\(N, 3\)"):
        transform.apply_to_points(points[:, :2])


def test_csv_points_in_ras_come_back_in_ras_with_their_other_columns(tmp_path):
    moving, _ = oblique_volume()
    field_path = str(tmp_path / "field.nii.gz")
    write_field(known_field(), field_path)
    lps = np.array([moving.TransformContinuousIndexToPhysicalPoint(i) for i in ((10, 12, 8), (20, 15, 12), (6, 20, 9))])
    ras = lps * [-1, -1, 1]
    source = tmp_path / "landmarks.csv"
    source.write_text("label,R,A,S,note\n" + "".join(f"{n},{r},{a},{s},landmark {n}\n" for n, (r, a, s)
                                                         in enumerate(ras, start=1)))
    moved_path, back_path = str(tmp_path / "moved.csv"), str(tmp_path / "back.csv")
    assert apply_to_point_file(read_transform(field_path), str(source), moved_path) == {"points": 3,
                                                                                         "points_not_mapped": 0}
    lines = open(moved_path).read().splitlines()
    assert lines[0] == "label,R,A,S,note"
    rows = [line.split(",") for line in lines[1:]]
    assert [row[0] for row in rows] == ["1", "2", "3"] and rows[1][4] == "landmark 2"
    expected = Transform(known_field()).apply_to_points(lps) * [-1, -1, 1]
    np.testing.assert_allclose([[float(v) for v in row[1:4]] for row in rows], expected, atol=1e-12)
    apply_to_point_file(read_transform(field_path).inverse(), moved_path, back_path)
    back = [[float(v) for v in line.split(",")[1:4]] for line in open(back_path).read().splitlines()[1:]]
    np.testing.assert_allclose(back, ras, atol=0.01)


def test_slicer_markups_keep_their_content_and_coordinate_system(tmp_path):
    moving, _ = oblique_volume()
    transform = Transform(known_field())
    lps = np.array([moving.TransformContinuousIndexToPhysicalPoint(i) for i in ((10, 12, 8), (20, 15, 12))])
    control = lambda n, position: {"id": str(n), "label": f"F-{n}", "description": "", "associatedNodeID": "",  # noqa
                                   "position": position, "orientation": [-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0],
                                   "selected": True, "locked": False, "visibility": True, "positionStatus": "defined"}
    markups = {"@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/"
                          "Schema/markups-schema-v1.0.3.json#",
               "markups": [{"type": "Fiducial", "coordinateSystem": "RAS", "coordinateUnits": "mm", "locked": False,
                            "controlPoints": [control(1, (lps[0] * [-1, -1, 1]).tolist()),
                                              {**control(2, ""), "positionStatus": "undefined"}],
                            "display": {"visibility": True, "color": [0.4, 1.0, 1.0]}},
                           {"type": "Line", "coordinateSystem": "LPS", "controlPoints": [control(3, lps[1].tolist())]}]}
    source, output = tmp_path / "points.mrk.json", tmp_path / "moved.mrk.json"
    source.write_text(json.dumps(markups, indent=4))
    assert apply_to_point_file(transform, str(source), str(output))["points"] == 2
    written = json.loads(output.read_text())
    expected = transform.apply_to_points(lps)
    np.testing.assert_allclose(written["markups"][0]["controlPoints"][0]["position"], expected[0] * [-1, -1, 1])
    np.testing.assert_allclose(written["markups"][1]["controlPoints"][0]["position"], expected[1])
    for markup in written["markups"]:
        for point in markup["controlPoints"]:
            point.pop("position")
    for markup in markups["markups"]:
        for point in markup["controlPoints"]:
            point.pop("position")
    assert written == markups  # everything but the positions is kept
    roi = {"@schema": markups["@schema"], "markups": [{"type": "ROI", "controlPoints": []}]}
    source.write_text(json.dumps(roi))
    with pytest.raises(InputError, match="not ROIs or planes"):
        apply_to_point_file(transform, str(source), str(tmp_path / "roi.mrk.json"))


# --- ANTs -------------------------------------------------------------------------------------------------------------

def test_an_ants_warp_applied_here_equals_ants_apply_transforms(tmp_path):
    ants = pytest.importorskip("ants", reason="antspyx (the bench extra) is not installed")
    first, second, _ = template_slices()
    fixed_path, moving_path = str(tmp_path / "fixed.nii.gz"), str(tmp_path / "moving.nii.gz")
    sitk.WriteImage(image2d(first * 100, origin=(-90.0, -80.0)), fixed_path)
    sitk.WriteImage(image2d(second * 100, spacing=(2.0, 2.0), origin=(-88.0, -79.0)), moving_path)
    fixed, moving = ants.image_read(fixed_path), ants.image_read(moving_path)
    registration = ants.registration(fixed, moving, type_of_transform="SyN", outprefix=str(tmp_path / "ants_"),
                                     random_seed=1)
    warp_path = next(path for path in registration["fwdtransforms"] if path.endswith("Warp.nii.gz"))
    ants_result = ants.apply_transforms(fixed, moving, [warp_path], interpolator="linear")
    ants.image_write(ants_result, str(tmp_path / "ants_warped.nii.gz"))
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "ants_warped.nii.gz")))
    ours = sitk.GetArrayFromImage(read_transform(warp_path).apply_to_image(moving_path))
    # The same field through the same ITK linear interpolation: equal (0 with antspyx 0.5.3 and SimpleITK 2.5); the
    # tolerance allows float32 rounding (ANTs keeps float32 images and fields) should either library change the
    # order of its arithmetic, and is still far below one grey level of an 8-bit image (1/255 of the range).
    print(f"ANTs: max |difference| {np.abs(ours - expected).max():.3g} of a range {np.ptp(expected):.3g}")
    assert np.abs(ours - expected).max() < 1e-5 * np.ptp(expected)
    assert np.abs(sitk.GetArrayFromImage(sitk.ReadImage(warp_path))).max() > 1.0  # SyN moved something


# --- the command ----------------------------------------------------------------------------------------------------

class Recorder(Reporter):
    def __init__(self):
        self.outputs, self.metrics = None, None

    def finished(self, outputs, metrics):
        self.outputs, self.metrics = outputs, metrics


def run_command(argv):
    parser = argparse.ArgumentParser(prog="ssmsr")
    apply_command.add_parser(parser.add_subparsers(dest="command"))
    reporter = Recorder()
    apply_command.run(parser.parse_args(["apply", *argv]), reporter)
    return reporter


def test_the_command_applies_a_field_to_an_image_labels_and_points(tmp_path):
    image, labels = oblique_volume()
    paths = {name: str(tmp_path / name) for name in ("field.nii.gz", "image.nrrd", "labels.nii.gz", "points.csv")}
    write_field(known_field(), paths["field.nii.gz"])
    sitk.WriteImage(image, paths["image.nrrd"])
    sitk.WriteImage(labels, paths["labels.nii.gz"])
    point = np.array(image.TransformContinuousIndexToPhysicalPoint((15, 15, 10)))
    with open(paths["points.csv"], "w") as stream:
        stream.write(f"L,P,S\n{point[0]},{point[1]},{point[2]}\n")
    transform = read_transform(paths["field.nii.gz"])

    started = time.perf_counter()
    reporter = run_command([paths["field.nii.gz"], "--image", paths["image.nrrd"], "-o", str(tmp_path / "w.nii.gz"),
                            "--interpolation", "bspline", "--progress", "none"])
    assert time.perf_counter() - started < 30
    assert reporter.outputs == {"image": str(tmp_path / "w.nii.gz")} and reporter.metrics["applied"] == "image"
    np.testing.assert_allclose(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "w.nii.gz"))),
                               sitk.GetArrayFromImage(transform.apply_to_image(image, "bspline")), atol=1e-6)
    run_command([paths["field.nii.gz"], "--labels", paths["labels.nii.gz"], "-o", str(tmp_path / "l.nii.gz"),
                 "--label-mode", "linear"])
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "l.nii.gz"))),
                          sitk.GetArrayFromImage(transform.apply_to_labels(labels, "linear")))
    reporter = run_command([paths["field.nii.gz"], "--points", paths["points.csv"], "-o", str(tmp_path / "p.csv")])
    assert reporter.metrics["points"] == 1 and reporter.metrics["points_not_mapped"] == 0
    moved = [float(v) for v in open(tmp_path / "p.csv").read().splitlines()[1].split(",")]
    np.testing.assert_allclose(moved, transform.apply_to_points(point[None])[0])
    run_command([paths["field.nii.gz"], "--inverse", "--points", str(tmp_path / "p.csv"), "-o",
                 str(tmp_path / "back.csv")])
    back = [float(v) for v in open(tmp_path / "back.csv").read().splitlines()[1].split(",")]
    np.testing.assert_allclose(back, point, atol=0.01)


def test_bad_input_gives_a_clear_error_and_writes_nothing(tmp_path):
    image, _ = oblique_volume()
    field_path, image_path = str(tmp_path / "field.nii.gz"), str(tmp_path / "image.nrrd")
    write_field(known_field(), field_path)
    sitk.WriteImage(image, image_path)
    flat = str(tmp_path / "flat.nrrd")
    sitk.WriteImage(image2d(template_slices()[0]), flat)
    no_header = tmp_path / "points.csv"
    no_header.write_text("x,y,z\n1,2,3\n")
    output = tmp_path / "out.nii.gz"
    cases = [([str(tmp_path / "missing.nii.gz"), "--image", image_path], "does not exist"),
             ([image_path, "--image", image_path], "not a displacement field"),
             ([field_path, "--image", flat], "is 2D but the transform is 3D"),
             ([field_path, "--labels", image_path, "--interpolation", "bspline"], "--interpolation does not apply"),
             ([field_path, "--inverse", "--image", image_path], "give --reference")]
    for argv, message in cases:
        with pytest.raises(InputError, match=message):
            run_command([*argv, "-o", str(output)])
        assert not output.exists()
    with pytest.raises(InputError, match="also an input"):
        run_command([field_path, "--image", image_path, "-o", image_path])
    for argv, message in [([field_path, "--points", str(no_header), "-o", str(tmp_path / "out.csv")],
                           "must state the coordinate convention"),
                          ([field_path, "--points", str(tmp_path / "missing.mrk.json"), "-o",
                            str(tmp_path / "out.mrk.json")], "does not exist")]:
        with pytest.raises(InputError, match=message):
            run_command(argv)
    with pytest.raises(InputError, match="input's format"):
        run_command([field_path, "--points", str(no_header), "-o", str(tmp_path / "out.mrk.json")])
    assert sorted(os.listdir(tmp_path)) == ["field.nii.gz", "flat.nrrd", "image.nrrd", "points.csv"]
