"""The evaluation harness (Testing/benchmarks/evaluate.py): a tiny run end to end, its metrics, and the
conversion of each baseline's result into an ITK displacement field (sign, units, LPS)."""

import csv
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from evaluate import evaluate
from evaluation import baselines, cases
from evaluation.config import TINY
from evaluation.metrics import dice, evaluate_pair, hausdorff95
from evaluation.methods import preset_method, zero_field
from evaluation.report import summarise
from evaluation.runner import COLUMNS, run_case
from SSMSRRegistrationLib.common.presets import PRESETS


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluation")
    evaluate(TINY, str(out), "pytest tiny", log=lambda message: None)
    with open(out / "results.csv", encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream))
    return out, rows


def _values(rows, case, method, column):
    return [float(row[column]) for row in rows if row["case"] == case and row["method"] == method]


@pytest.mark.slow  # the whole harness end to end (about a minute on 2 cores): make test-all
def test_tiny_run_writes_the_table_report_and_figures(tiny_run):
    out, rows = tiny_run
    assert tuple(rows[0]) == COLUMNS
    methods = {row["method"] for row in rows}
    assert {"identity", "VoxelMorph-equivalent", "SSR", "SSMSR (1/2)", "SSMSR (1)",
            "demons (symmetric forces)"} <= methods
    report = (out / "report.md").read_text(encoding="utf-8")
    for method in (baselines.ANTS, baselines.ELASTIX):
        assert (method.name in methods) == (method.missing is None)
        if method.missing:
            assert f"**{method.name}**: not run" in report
    figures = [line.split("(")[1].rstrip(")") for line in report.splitlines() if line.startswith("![")]
    assert len(figures) == 7
    for name in figures:  # real pictures: PNGs of a readable size, not a blank canvas
        with Image.open(out / name) as picture:
            assert picture.format == "PNG" and min(picture.size) >= 200
            pixels = np.asarray(picture.convert("L"), dtype=np.float32)
        assert pixels.std() > 5.0 and (pixels < 128).mean() > 0.005
    assert "| Method |" in report and "hippocampus_crop" in report and "echo_cine" in report


@pytest.mark.slow  # the whole harness end to end (about a minute on 2 cores): make test-all
def test_tiny_run_rows_are_sane(tiny_run):
    _, rows = tiny_run
    crop_labels = {row["label"] for row in rows if row["case"] == "hippocampus_crop"}
    assert crop_labels == {"grey matter", "white matter"}
    assert _values(rows, "hippocampus_crop", "identity", "percent_non_positive_jacobian") == [0.0, 0.0]
    identity_dice = np.mean(_values(rows, "hippocampus_crop", "identity", "dice"))
    ssmsr_dice = np.mean(_values(rows, "hippocampus_crop", "SSMSR (1)", "dice"))
    assert 0.5 < identity_dice < ssmsr_dice <= 1.0
    assert (_values(rows, "hippocampus_crop", "SSMSR (1)", "endpoint_error_mm")[0]
            < _values(rows, "hippocampus_crop", "identity", "endpoint_error_mm")[0])
    assert _values(rows, "hippocampus_crop", "SSMSR (1)", "seconds")[0] > 0
    echo_pairs = {row["pair"] for row in rows if row["case"] == "echo_cine"}
    assert len(echo_pairs) == TINY.cine_frames - 1
    assert (np.mean(_values(rows, "echo_cine", "SSMSR (1)", "mse"))
            < np.mean(_values(rows, "echo_cine", "identity", "mse")))
    for row in rows:
        assert math.isfinite(float(row["mse"])) and 0 <= float(row["nlcc"]) <= 1


def _sphere(centre_mm, radius_mm, size=40, spacing=1.5):
    grid = sitk.Image([size] * 3, sitk.sitkUInt8)
    grid.SetSpacing([spacing] * 3)
    points = np.stack(np.meshgrid(*[np.arange(size) * spacing] * 3, indexing="ij"), axis=-1)
    inside = np.linalg.norm(points - np.array(centre_mm)[::-1], axis=-1) <= radius_mm
    image = sitk.GetImageFromArray(inside.astype(np.uint8))
    image.CopyInformation(grid)
    return image


def test_dice_and_hd95_of_shifted_spheres():
    a = _sphere((30, 30, 30), 12)
    b = _sphere((36, 30, 30), 12)  # shifted by 6 mm along x
    assert dice(sitk.GetArrayFromImage(a) > 0, sitk.GetArrayFromImage(a) > 0) == 1.0
    # Two balls of radius r whose centres are d apart overlap in pi (4r + d) (2r - d)^2 / 12: Dice 0.6328 for
    # r = 12 mm, d = 6 mm; the 1.5 mm voxels change that by less than 0.005.
    radius, distance = 12.0, 6.0
    exact = (np.pi * (4 * radius + distance) * (2 * radius - distance) ** 2 / 12) / (4 / 3 * np.pi * radius ** 3)
    assert dice(sitk.GetArrayFromImage(a) > 0, sitk.GetArrayFromImage(b) > 0) == pytest.approx(exact, abs=0.005)
    assert hausdorff95(a, a) == 0.0
    assert hausdorff95(a, b) == pytest.approx(6.0, abs=1.6)  # within a voxel (1.5 mm)


def _translated_pair(shift_mm):
    """A 3D crop of ICBM152 (LPS direction diag(-1, -1, 1)) and the same image translated by ``shift_mm``.

    moving(p) = fixed(p + shift), so the registration field is u(p) = -shift everywhere.
    """
    config = replace(TINY, crop_size=(32, 40, 32), synthetic_test_pairs=1, training_pairs=0)
    fixed = cases.hippocampus_crop(config).pairs[0].moving
    source = cases._template_source(config.crop_spacing_mm)
    moving = cases.normalised(sitk.Resample(source, fixed, sitk.TranslationTransform(3, shift_mm), sitk.sitkLinear,
                                            0.0, sitk.sitkFloat32))
    return cases.Pair("translation", fixed, moving, None), config


@pytest.mark.parametrize("method", [baselines.ANTS, baselines.ELASTIX, baselines.DEMONS], ids=lambda m: m.name)
def test_baseline_fields_recover_a_translation_in_mm_lps(method):
    if method.missing:
        pytest.skip(method.missing)
    shift = (4.0, -3.0, 2.0)  # mm, LPS
    pair, config = _translated_pair(shift)
    case = cases.Case("translation", "", "", [pair], [], "1/2,1", 3)
    config = replace(config, ants_iterations=(40, 20, 0), elastix_iterations=100, demons_iterations=(30, 20, 10))
    run = method.run(case, config)[0]
    field = sitk.GetArrayFromImage(run.fields[0])
    centre = field[6:-6, 6:-6, 6:-6].reshape(-1, 3)
    assert np.median(centre, axis=0) == pytest.approx([-s for s in shift], abs=1.0)
    metrics, _, _ = evaluate_pair(pair, run.fields[0], {}, 2)
    identity, _, _ = evaluate_pair(pair, zero_field(pair.fixed), {}, 2)
    assert metrics["mse"] < 0.7 * identity["mse"]


def test_a_preset_runs_as_a_method_of_the_harness(monkeypatch):
    """speed.py compares the presets through ``preset_method``: same fields, metrics and per-scale rows."""
    fast = PRESETS["fast"]
    monkeypatch.setitem(PRESETS, "fast", replace(fast, values={**fast.values, "pair": {**fast.values["pair"],
                                                                                       "scales": "1/2,1", "steps": 3}}))
    case = cases.hippocampus_crop(TINY)
    result = run_case(case, TINY, [preset_method("fast")], log=lambda message: None)
    parameters = result.parameters["SSMSR fast preset"]
    assert "preset='fast'" in parameters and "3 steps" in parameters
    summary = summarise(result)
    assert list(summary) == ["SSMSR fast preset (1/2)", "SSMSR fast preset (1)"]
    final = summary["SSMSR fast preset (1)"]
    assert final["seconds"][0] > 0 and 0 < final["dice"][0] <= 1
