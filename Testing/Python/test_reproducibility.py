"""Reproducible runs: the same command twice gives byte-identical fields (with the default pre-alignment, whose ITK
metric used to add its threads' sums in a varying order), every output carries its provenance, and
``ssmsr rerun`` reproduces a run from its provenance file alone. Real images from registry packages, real
``ssmsr`` processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SSMSRRegistrationLib.imaging import sample_data
from SSMSRRegistrationLib.imaging.alignment import align
from SSMSRRegistrationLib.interfaces.cli import EXIT_INPUT, main
from SSMSRRegistrationLib.workflows.provenance import file_digest, read_sidecar, sidecar_path

from test_alignment import misaligned, rotation

MODULE_DIRECTORY = Path(__file__).resolve().parents[2] / "SSMSRRegistration"

#: A short schedule: enough to train (and so to amplify any difference in the pre-alignment), quick on a CPU. These
#: tests compare runs byte for byte, so neither the image size nor the steps bound what they check.
SHORT = ["--scales", "1/2,1", "--steps", "10", "--progress", "none", "--threads", "2"]


def ssmsr(*arguments, cwd=None) -> subprocess.CompletedProcess:
    """``python -m SSMSRRegistrationLib ARGUMENTS`` in a new process (as a user runs ``ssmsr``)."""
    path = os.pathsep.join([str(MODULE_DIRECTORY), os.environ.get("PYTHONPATH", "")])
    environment = {**os.environ, "PYTHONPATH": path}
    return subprocess.run([sys.executable, "-m", "SSMSRRegistrationLib", *map(str, arguments)], cwd=cwd,
                          env=environment, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def brain_files(tmp_path_factory):
    """The ICBM152 T1 (a 3 mm crop, 26x32x26 voxels) as fixed image, and the same moved by 12 degrees, 17 mm and +7 % scale as the
    moving image, written as NIfTI: the default pre-alignment (affine) has to find that motion."""
    folder = tmp_path_factory.mktemp("brain")
    t1 = sample_data.crop_and_shrink(sample_data.brain_t1(), [58, 70, 66], [80, 96, 80], 3)
    moving = misaligned(t1, rotation((1, 2, 1), 12.0), (12.0, -8.0, 9.0), 1.07)
    sitk.WriteImage(t1, str(folder / "fixed.nii.gz"))
    sitk.WriteImage(moving, str(folder / "moving.nii.gz"))
    return folder / "fixed.nii.gz", folder / "moving.nii.gz"


@pytest.fixture(scope="module")
def registered_twice(brain_files, tmp_path_factory):
    """The same ``ssmsr register`` (default pre-alignment) run twice, each in its own process and folder."""
    fixed, moving = brain_files
    folders = []
    for run in range(2):
        folder = tmp_path_factory.mktemp(f"run{run}")
        completed = ssmsr("register", fixed, moving, "-o", folder / "field.nii.gz", "--warped",
                          folder / "warped.nii.gz", "--affine-output", folder / "affine.tfm", *SHORT)
        assert completed.returncode == 0, completed.stderr
        folders.append(folder)
    return folders


def test_the_pre_alignment_is_bit_identical_whatever_the_itk_thread_count(brain_files):
    fixed, moving = (sitk.ReadImage(str(path), sitk.sitkFloat32) for path in brain_files)
    parameters = []
    for threads in (1, 2, 2, 4):
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
        try:
            parameters.append(align(fixed, moving, "affine").GetParameters())
        finally:
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(os.cpu_count() or 1)
    assert all(values == parameters[0] for values in parameters[1:])


def test_the_same_register_command_twice_gives_byte_identical_outputs(registered_twice):
    first, second = registered_twice
    for name in ("field.nii.gz", "warped.nii.gz", "affine.tfm"):
        assert file_digest(str(first / name)) == file_digest(str(second / name)), name
    # Not identical by accident: the run did align and deform.
    field = sitk.GetArrayFromImage(sitk.ReadImage(str(first / "field.nii.gz")))
    assert np.abs(field).max() > 5.0


def test_the_provenance_names_the_configuration_inputs_software_machine_and_command(registered_twice, brain_files):
    record = read_sidecar(sidecar_path(str(registered_twice[0] / "field.nii.gz")))
    assert record["kind"] == "register" and record["seed"] == 0
    assert record["settings"]["scales"] == ["1/2", "1"] and record["settings"]["steps_per_scale"] == 10
    assert record["settings"]["smoothness_weight"] > 0 and record["settings"]["learning_rate"] > 0
    assert record["options"]["initial"] == "affine" and len(record["options"]["pre_alignment"]) == 12
    assert record["inputs"]["fixed"] == {"path": str(brain_files[0]), "sha256": file_digest(str(brain_files[0]))}
    assert record["inputs"]["fixed_mask"] is None
    assert {"ssmsr", "torch", "numpy", "SimpleITK", "python"} <= set(record["software"])
    assert record["machine"]["device"] == "cpu" and record["machine"]["torch_threads"] == 2
    assert record["machine"]["cpu"]
    assert record["outputs"]["field"]["sha256"] == file_digest(str(registered_twice[0] / "field.nii.gz"))
    assert "ssmsr register" in record["command"]["command_line"]
    assert record["command"]["arguments"]["threads"] == 2


def test_a_rerun_from_the_provenance_file_alone_reproduces_every_output(registered_twice, tmp_path):
    sidecar = sidecar_path(str(registered_twice[0] / "field.nii.gz"))
    completed = ssmsr("rerun", sidecar, "-o", tmp_path / "again", "--progress", "none", cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr
    for name in ("field.nii.gz", "warped.nii.gz", "affine.tfm"):
        assert file_digest(str(tmp_path / "again" / name)) == file_digest(str(registered_twice[0] / name)), name


def test_a_rerun_refuses_changed_inputs_and_reports_different_outputs(registered_twice, brain_files, tmp_path,
                                                                      capsys):
    record = read_sidecar(sidecar_path(str(registered_twice[0] / "field.nii.gz")))
    changed = json.loads(json.dumps(record))
    changed["inputs"]["moving"]["sha256"] = "0" * 64
    (tmp_path / "changed.provenance.json").write_text(json.dumps(changed))
    arguments = ["rerun", str(tmp_path / "changed.provenance.json"), "-o", str(tmp_path / "a"), "--progress", "none"]
    assert main(arguments) == EXIT_INPUT
    assert "changed since the recorded run" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()

    other = json.loads(json.dumps(record))
    other["command"]["configuration"]["overrides"]["seed"] = 1  # another seed: these digests are not reproduced
    (tmp_path / "other.provenance.json").write_text(json.dumps(other))
    completed = ssmsr("rerun", tmp_path / "other.provenance.json", "-o", tmp_path / "b", "--progress", "none")
    assert completed.returncode == 4 and "differs from the recorded run: field" in completed.stderr


def test_the_same_track_command_twice_gives_byte_identical_fields_and_can_be_rerun(tmp_path):
    frames = [sitk.BinShrink(frame, [4, 4]) for frame in sample_data.echo_frames([0, 3, 6, 9])]
    cine = sitk.JoinSeries(frames)
    sitk.WriteImage(cine, str(tmp_path / "cine.nii.gz"))
    options = ["--scales", "1/2,1", "--steps", "10", "--batch", "2", "--no-figures", "--progress", "none",
               "--threads", "2"]
    for run in ("a", "b"):
        completed = ssmsr("track", tmp_path / "cine.nii.gz", "-o", tmp_path / run, *options)
        assert completed.returncode == 0, completed.stderr
    fields = sorted(name for name in os.listdir(tmp_path / "a") if name.startswith("field"))
    assert len(fields) == 4  # three pairs and the stack
    for name in fields + ["metrics.csv", "mask.nii.gz"]:
        assert file_digest(str(tmp_path / "a" / name)) == file_digest(str(tmp_path / "b" / name)), name
    record = read_sidecar(str(tmp_path / "a" / "provenance.json"))
    assert record["kind"] == "track" and record["settings"]["batch_size"] == 2
    assert set(fields) <= set(record["outputs"])
    completed = ssmsr("rerun", tmp_path / "a" / "provenance.json", "-o", tmp_path / "c", "--progress", "none")
    assert completed.returncode == 0, completed.stderr
    assert file_digest(str(tmp_path / "c" / "fields.nii.gz")) == file_digest(str(tmp_path / "a" / "fields.nii.gz"))


def test_a_sidecar_that_is_not_one_is_refused_clearly(tmp_path, capsys):
    (tmp_path / "x.json").write_text(json.dumps({"hello": 1}))
    assert main(["rerun", str(tmp_path / "x.json"), "-o", str(tmp_path / "out"), "--progress", "none"]) == EXIT_INPUT
    assert "not an SSMSR provenance file" in capsys.readouterr().err
    assert main(["rerun", str(tmp_path / "missing.json"), "-o", str(tmp_path / "out"), "--progress", "none"]) == EXIT_INPUT
    assert "Cannot read the provenance file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
