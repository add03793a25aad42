"""The ssmsr command: JSON-lines protocol, cancel, and clear errors on bad input with no partial output."""

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SSMSRRegistrationLib.workflows import register as api
from SSMSRRegistrationLib.interfaces.cli import EXIT_CANCELLED, EXIT_INPUT, EXIT_OUT_OF_MEMORY, main
from SSMSRRegistrationLib.engine.multiscale import RegistrationSettings, register_tensors
from SSMSRRegistrationLib.common.schedule import format_scale
from SSMSRRegistrationLib.common.errors import InputError
from SSMSRRegistrationLib.common.presets import DEFAULT_PRESET, PRESETS
from realimages import brain_slice

MODULE_DIRECTORY = str(Path(__file__).resolve().parents[2] / "SSMSRRegistration")


def write(path, array, spacing=None):
    image = sitk.GetImageFromArray(array)
    if spacing:
        image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return str(path)


@pytest.fixture()
def pair(tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    image = brain_slice()
    fixed = write(inputs / "fixed.nii.gz", image)
    moving = write(inputs / "moving.nii.gz", np.roll(image, 2, axis=1))
    out = tmp_path / "out"
    out.mkdir()
    return inputs, fixed, moving, out


def fingerprint(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir())}


def worker(*args):
    env = dict(os.environ, PYTHONPATH=MODULE_DIRECTORY + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "SSMSRRegistrationLib", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def test_jsonl_run_reports_progress_and_writes_outputs(pair):
    _, fixed, moving, out = pair
    process = worker("register", fixed, moving, "-o", str(out / "field.nrrd"), "--warped", str(out / "w.nii.gz"),
                     "--scales", "1/2,1", "--steps", "10", "--device", "cpu", "--progress", "jsonl")
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    events = [json.loads(line) for line in stdout.splitlines()]
    assert events[0]["event"] == "started" and events[0]["scales"] == ["1/2", "1"]
    assert {e["event"] for e in events[1:-1]} == {"progress"}
    assert events[-1]["event"] == "finished"
    assert events[-1]["outputs"]["field"] == str(out / "field.nrrd")
    assert sitk.ReadImage(events[-1]["outputs"]["field"]).GetNumberOfComponentsPerPixel() == 2
    assert sorted(fingerprint(out)) == ["field.nrrd", "field.provenance.json", "w.nii.gz"]


def test_sigterm_cancels_without_output(pair):
    inputs, fixed, moving, out = pair
    before = fingerprint(inputs)
    process = worker("register", fixed, moving, "-o", str(out / "field.nii.gz"), "--steps", "100000",
                     "--device", "cpu", "--progress", "jsonl")
    for line in process.stdout:
        if json.loads(line)["event"] == "progress":
            break
    process.send_signal(signal.SIGTERM)
    stdout, _ = process.communicate(timeout=30)
    assert process.returncode == EXIT_CANCELLED
    assert json.loads(stdout.splitlines()[-1]) == {"event": "error", "message": "Registration cancelled; no output "
                                                   "was written.", "kind": "cancelled"}
    assert fingerprint(out) == {}
    assert fingerprint(inputs) == before


def bad_inputs(inputs: Path):
    """(name, extra arguments, expected message) for each kind of bad input; files are made in ``inputs``."""
    image = brain_slice()
    rgb = sitk.Compose([sitk.GetImageFromArray(image)] * 3)
    sitk.WriteImage(rgb, str(inputs / "rgb.nii.gz"))
    sitk.WriteImage(sitk.JoinSeries([sitk.GetImageFromArray(np.stack([image] * 3))] * 2), str(inputs / "4d.nii.gz"))
    (inputs / "text.nii.gz").write_text("not an image")
    nan = image.copy()
    nan[10, 10] = np.nan
    write(inputs / "nan.nrrd", nan)  # ITK's NIfTI reader turns NaN into 0; NRRD keeps it
    write(inputs / "constant.nii.gz", np.full_like(image, 3.0))
    write(inputs / "volume.nii.gz", np.stack([image] * 12))
    write(inputs / "empty_mask.nii.gz", np.zeros(image.shape, np.uint8))
    return [
        ("missing file", ["MOVING=" + str(inputs / "absent.nii.gz")], "does not exist"),
        ("unreadable file", ["MOVING=" + str(inputs / "text.nii.gz")], "Cannot read the moving image"),
        ("2D vs 3D", ["MOVING=" + str(inputs / "volume.nii.gz")], "same dimension"),
        ("colour image", ["MOVING=" + str(inputs / "rgb.nii.gz")], "3 components per voxel"),
        ("4D image", ["FIXED=" + str(inputs / "4d.nii.gz")], "4D"),
        ("constant image", ["MOVING=" + str(inputs / "constant.nii.gz")], "constant"),
        ("NaN voxels", ["MOVING=" + str(inputs / "nan.nrrd")], "NaN"),
        ("empty mask", ["--fixed-mask", str(inputs / "empty_mask.nii.gz")], "mask is empty"),
        ("impossible schedule", ["--scales", "1/32,1"], "every axis needs at least"),
        ("decreasing schedule", ["--scales", "1,1/2"], "increase"),
        ("labels without input", ["--warped-labels", "OUT/l.nii.gz"], "needs --moving-labels"),
        ("output over an input", ["-o", "FIXED_PATH"], "is also an input"),
        ("missing output folder", ["-o", "OUT/absent/field.nii.gz"], "does not exist"),
        ("unknown device", ["--device", "tpu"], "Unknown device"),
        ("unknown option", ["--bogus"], "unrecognized arguments"),
    ]


def test_bad_inputs_give_clear_errors_and_leave_everything_untouched(pair, capsys):
    inputs, fixed, moving, out = pair
    cases = bad_inputs(inputs)
    before = fingerprint(inputs)
    for name, extra, message in cases:
        paths = {"FIXED": fixed, "MOVING": moving}
        options = []
        for item in extra:
            if item.startswith(("FIXED=", "MOVING=")):
                key, value = item.split("=", 1)
                paths[key] = value
            else:
                options.append(item.replace("OUT/", str(out) + "/").replace("FIXED_PATH", fixed))
        output = [] if "-o" in options else ["-o", str(out / "field.nii.gz")]
        code = main(["register", paths["FIXED"], paths["MOVING"], *output, "--steps", "2", "--device", "cpu",
                     "--progress", "jsonl", *options])
        captured = capsys.readouterr()
        events = [json.loads(line) for line in captured.out.splitlines()]
        assert code == EXIT_INPUT, name
        assert events[-1]["event"] == "error" and events[-1]["kind"] == "input", name
        assert message in events[-1]["message"], (name, events[-1]["message"])
        assert message in captured.err, name
        assert fingerprint(out) == {}, name
    assert fingerprint(inputs) == before


def test_out_of_gpu_memory_is_reported_with_a_suggestion(pair, capsys, monkeypatch):
    _, fixed, moving, out = pair

    def exhausted(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(api, "register_tensors", exhausted)
    code = main(["register", fixed, moving, "-o", str(out / "field.nii.gz"), "--device", "cpu", "--progress", "jsonl"])
    event = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert code == EXIT_OUT_OF_MEMORY
    assert event["kind"] == "out_of_memory" and "--device cpu" in event["message"]
    assert fingerprint(out) == {}


def test_default_progress_is_a_bar_and_outputs_get_normal_permissions(pair, capsys):
    _, fixed, moving, out = pair
    umask = os.umask(0o022)
    try:
        code = main(["register", fixed, moving, "-o", str(out / "field.nii.gz"), "--scales", "1", "--steps", "2",
                     "--device", "cpu"])
    finally:
        os.umask(umask)
    captured = capsys.readouterr()
    assert code == 0
    assert captured.out == ""
    assert "ssmsr: registering on cpu" in captured.err and "step 2/2" in captured.err
    assert (out / "field.nii.gz").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("options, scales, steps, mixed", [
    ([], ["1/4", "1/2", "1"], 300, True),  # the default preset: balanced
    (["--preset", "fast"], ["1/4", "1/2", "1"], 80, True),
    (["--preset", "paper"], ["1/2", "1"], 3500, True),
    (["--preset", "fast", "--scales", "1", "--steps", "7", "--precision", "float32"], ["1"], 7, False),
    (["--mse-weight", "50", "--lr", "2e-3", "--lambda", "4"], ["1/4", "1/2", "1"], 300, True),
])
def test_presets_choose_schedule_steps_and_precision_unless_given(pair, capsys, monkeypatch, options, scales, steps,
                                                                  mixed):
    _, fixed, moving, out = pair
    chosen = []

    def shortened(fixed_tensor, moving_tensor, settings, **kwargs):  # the real engine, one step per scale
        chosen.append(settings)
        settings = RegistrationSettings(**{**vars(settings), "steps_per_scale": 1})
        return register_tensors(fixed_tensor, moving_tensor, settings, **kwargs)

    monkeypatch.setattr(api, "register_tensors", shortened)
    code = main(["register", fixed, moving, "-o", str(out / "field.nii.gz"), "--device", "cpu", "--progress", "none",
                 *options])
    assert code == 0, capsys.readouterr().err
    assert [format_scale(s) for s in chosen[0].scales] == scales
    assert (chosen[0].steps_per_scale, chosen[0].mixed_precision) == (steps, mixed)
    given = dict(zip(options[::2], options[1::2]))
    preset = PRESETS[given.get("--preset", DEFAULT_PRESET)]
    assert (chosen[0].smoothness_weight, chosen[0].learning_rate, chosen[0].mse_weight) == (
        float(given.get("--lambda", preset.value("pair", "smoothness_weight"))),
        float(given.get("--lr", preset.value("pair", "learning_rate"))),
        float(given.get("--mse-weight", preset.value("pair", "mse_weight"))))


def test_unknown_preset_or_precision_is_refused(pair, capsys):
    _, fixed, moving, out = pair
    for option in (["--preset", "slow"], ["--precision", "half"]):
        code = main(["register", fixed, moving, "-o", str(out / "field.nii.gz"), "--progress", "jsonl", *option])
        event = json.loads(capsys.readouterr().out.splitlines()[-1])
        assert code == EXIT_INPUT and option[1] in event["message"]
    with pytest.raises(InputError, match="Unknown preset 'slow'; preset must be one of balanced, paper, fast"):
        api.register(fixed, moving, preset="slow")
    assert fingerprint(out) == {}


def test_final_loss_is_reported_when_the_steps_come_from_a_preset(pair, capsys, monkeypatch):
    _, fixed, moving, out = pair

    def shortened(fixed_tensor, moving_tensor, settings, **kwargs):  # the real engine, two steps per scale
        return register_tensors(fixed_tensor, moving_tensor, RegistrationSettings(**{**vars(settings),
                                                                                    "steps_per_scale": 2}), **kwargs)

    monkeypatch.setattr(api, "register_tensors", shortened)
    code = main(["register", fixed, moving, "-o", str(out / "field.nii.gz"), "--preset", "fast", "--device", "cpu",
                 "--progress", "jsonl"])
    finished = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert code == 0 and finished["event"] == "finished"
    assert isinstance(finished["metrics"]["final_loss"], float) and math.isfinite(finished["metrics"]["final_loss"])


def test_usage_errors_name_the_right_help_command(capsys):
    assert main(["register", "--progress", "none"]) == EXIT_INPUT
    assert "(see `ssmsr register --help`)" in capsys.readouterr().err
    assert main(["bogus"]) == EXIT_INPUT
    message = capsys.readouterr().err
    assert "(see `ssmsr --help`)" in message and "ssmsr ssmsr" not in message


def test_the_jacobian_output_is_the_determinant_of_the_written_field(tmp_path):
    """--jacobian writes det(I + du/dp) on the fixed grid: on an axis-aligned grid it is SimpleITK's
    DisplacementFieldJacobianDeterminant of the written field; on an oblique grid the same computed in the grid's
    axes (that filter ignores the direction cosines), which matches the determinant of a known linear field."""
    from SSMSRRegistrationLib.imaging.fields import jacobian_determinant_image, read_field

    image = brain_slice()
    for name, direction in (("aligned", (1.0, 0.0, 0.0, 1.0)), ("oblique", (0.8, -0.6, 0.6, 0.8))):
        fixed_image = sitk.GetImageFromArray(image)
        fixed_image.SetSpacing((0.9, 1.3))
        fixed_image.SetDirection(direction)
        moving_image = sitk.GetImageFromArray(np.roll(image, 3, axis=1))
        moving_image.CopyInformation(fixed_image)
        fixed, moving = str(tmp_path / f"{name}-fixed.nrrd"), str(tmp_path / f"{name}-moving.nrrd")
        sitk.WriteImage(fixed_image, fixed)
        sitk.WriteImage(moving_image, moving)
        field_path, jacobian_path = str(tmp_path / f"{name}-field.nrrd"), str(tmp_path / f"{name}-jacobian.nrrd")
        assert main(["register", fixed, moving, "-o", field_path, "--jacobian", jacobian_path, "--scales", "1/2,1",
                     "--steps", "30", "--device", "cpu", "--progress", "none"]) == 0
        written = sitk.ReadImage(jacobian_path)
        field = read_field(field_path)
        assert written.GetSize() == fixed_image.GetSize() and written.GetDirection() == pytest.approx(direction)
        determinant = sitk.GetArrayFromImage(written)
        assert determinant.std() > 1e-3  # the field is not a translation
        np.testing.assert_allclose(determinant, sitk.GetArrayFromImage(jacobian_determinant_image(field)), atol=1e-5)
        if name == "aligned":
            itk = sitk.DisplacementFieldJacobianDeterminant(sitk.Cast(field, sitk.sitkVectorFloat64))
            np.testing.assert_allclose(determinant, sitk.GetArrayFromImage(itk), atol=1e-4)
    # A known linear field u(p) = A p on an oblique, anisotropic 3D grid: det(I + A) everywhere inside the grid
    # (the filter's differences at the border voxels are one-sided with a zero neighbour).
    matrix = np.array([[0.1, 0.05, 0.0], [0.0, -0.08, 0.02], [0.03, 0.0, 0.05]])
    grid = sitk.Image([12, 14, 10], sitk.sitkFloat32)
    grid.SetSpacing((1.0, 1.5, 2.0))
    grid.SetDirection((0.8, -0.6, 0.0, 0.6, 0.8, 0.0, 0.0, 0.0, 1.0))
    grid.SetOrigin((3.0, -4.0, 5.0))
    indices = np.stack(np.meshgrid(*[np.arange(n) for n in grid.GetSize()[::-1]], indexing="ij"), -1)[..., ::-1]
    points = indices @ (np.array(grid.GetDirection()).reshape(3, 3) @ np.diag(grid.GetSpacing())).T + grid.GetOrigin()
    linear = sitk.GetImageFromArray(points @ matrix.T, isVector=True)
    linear.CopyInformation(grid)
    inner = sitk.GetArrayFromImage(jacobian_determinant_image(linear))[1:-1, 1:-1, 1:-1]
    assert inner == pytest.approx(np.linalg.det(np.eye(3) + matrix), abs=1e-5)
