"""The panel's rules (``SSMSRRegistrationLib.gui.panel``, Qt-free) on real MRML nodes of the ``slicer-core`` wheel:
what keeps Apply disabled, the status line, presets, versions, and the keyword arguments the logic receives."""

import time
from types import SimpleNamespace

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="the slicer-core wheel (real MRML) is needed")

from SSMSRRegistrationLib.gui import panel  # noqa: E402
from SSMSRRegistrationLib.logic import JobState, RegistrationLogic  # noqa: E402
from SSMSRRegistrationLib.testing import scene_helpers  # noqa: E402


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


@pytest.fixture
def pair(scene):
    fixed = scene_helpers.addVolumeFromArray(scene, np.random.default_rng(0).random((1, 40, 48)), "fixed")
    moving = scene_helpers.addVolumeFromArray(scene, np.random.default_rng(1).random((1, 40, 48)), "moving")
    return fixed, moving


def test_a_new_panel_starts_from_the_default_preset_and_says_what_is_missing():
    values = panel.PanelValues()
    assert panel.matchingPresetName(values) == "balanced" and values.smoothnessWeight == 3.0
    text, enabled, toolTip = panel.applyButton(values, [], running=False)
    assert (text, enabled) == ("Apply", False)
    assert "Select a fixed volume." in toolTip and "Select a moving volume." in toolTip


def test_apply_is_enabled_for_a_pair_and_turns_into_cancel_while_running(pair):
    values = panel.PanelValues(fixedVolume=pair[0], movingVolume=pair[1])
    assert panel.applyButton(values, [], running=False) == (
        "Apply", True, "Register the moving volume to the fixed volume in the background.")
    assert panel.applyButton(values, [], running=True)[:2] == ("Cancel", True)


def test_an_ncc_window_the_worker_refuses_keeps_apply_disabled(pair):
    """A window of 1 voxel used to pass the panel and fail in the worker (which needs at least 2)."""
    values = panel.PanelValues(fixedVolume=pair[0], movingVolume=pair[1], nccWindow=1)
    text, enabled, toolTip = panel.applyButton(values, [], running=False)
    assert not enabled and "NCC window must be at least 2" in toolTip
    for window in (0, 2, 9):
        values.nccWindow = window
        assert panel.applyButton(values, [], running=False)[1]


def test_the_jacobian_volume_must_not_be_an_input(pair):
    values = panel.PanelValues(fixedVolume=pair[0], movingVolume=pair[1], jacobianVolume=pair[1])
    assert "The Jacobian volume must be a volume of its own" in panel.applyButton(values, [], running=False)[2]


def test_presets_fill_the_budget_and_follow_the_mode():
    values = panel.PanelValues()
    for name, setting in panel.presetValues("paper", cineTracking=False).items():
        setattr(values, name, setting)
    assert (values.scales, values.stepsPerScale, values.mixedPrecision) == ("1/2,1", 3500, True)
    assert panel.matchingPresetName(values) == "paper"
    values.cineTracking = True
    assert panel.presetAfterModeChange(values, cineTracking=True) == {
        "scales": "1/8,1/4,1/2,1", "stepsPerScale": 3500, "mixedPrecision": True, "smoothnessWeight": 10.0}
    values.smoothnessWeight = 3.0  # a preset's smoothness weight is part of its budget
    assert panel.matchingPresetName(values) == ""
    values.smoothnessWeight = 10.0
    values.stepsPerScale = 123
    assert panel.matchingPresetName(values) == "" and panel.presetAfterModeChange(values, cineTracking=False) is None


def test_the_status_line_of_a_registration_never_speaks_of_frame_pairs():
    """Every registration's "started" event carries "pairs" (1): the former panel showed "Tracking 1 frame pairs"."""
    started = {"event": "started", "device": "cpu", "scales": ["1/2", "1"], "steps_per_scale": 10, "pairs": 1}
    assert panel.eventStatus(started, "pair") == "Registering on cpu..."
    planned = dict(started, plan="working grid 40x48x40 at 2 mm, NCC window 5 voxels (10 mm)")
    assert panel.eventStatus(planned, "pair") == "Registering on cpu: working grid 40x48x40 at 2 mm, NCC window 5 " \
                                                 "voxels (10 mm)..."
    assert panel.eventStatus(dict(started, pairs=29), "cine") == "Tracking 29 frame pairs on cpu..."
    progress = {"event": "progress", "scale": "1", "scale_index": 1, "num_scales": 2, "step": 5, "steps": 10,
                "loss": -0.5, "eta_s": 3.0}
    assert panel.eventStatus(progress, "pair").startswith("Scale 1 (2 of 2), step 5/10, loss -0.5000")
    assert panel.progressPercent(progress) == 75 and panel.progressPercent(started) is None
    assert panel.eventStatus({"event": "log", "message": "x"}, "pair") is None


def test_a_start_that_fails_says_why_instead_of_starting():
    assert panel.failedStartStatus(ValueError("Select a fixed volume.")) == "Not started: Select a fixed volume."


def test_the_logic_receives_the_panels_parameters(pair, scene):
    transform = scene.AddNewNodeByClass("vtkMRMLTransformNode")
    jacobian = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    values = panel.PanelValues(fixedVolume=pair[0], movingVolume=pair[1], outputTransform=transform,
                               jacobianVolume=jacobian, mixedPrecision=False, nccWindow=0, modelFile="")
    method, args, kwargs = panel.logicCall(values, [])
    assert method == "registerVolumes" and args == (pair[0], pair[1])
    assert kwargs["outputTransformNode"] is transform and kwargs["jacobianVolumeNode"] is jacobian
    assert kwargs["precision"] == "float32" and kwargs["nccWindow"] is None and kwargs["modelFile"] is None
    assert kwargs["workingSpacing"] is None  # 0 in the panel: automatic
    assert (kwargs["scales"], kwargs["stepsPerScale"]) == (panel.GUI_PRESET.pair_scales, panel.GUI_PRESET.pair_steps)
    # Every keyword is one the logic's method accepts (it raises TypeError otherwise).
    logic = RegistrationLogic(scene)
    logic.workerCommandPrefix = ["python3", "-c", "raise SystemExit(0)"]
    job = logic.registerVolumes(*args, waitForCompletion=False, **kwargs)
    job.wait(timeoutSeconds=30)
    assert job.state is JobState.FAILED  # the stand-in worker reports nothing; the call itself was accepted
    values.cineTracking, values.cine = True, pair[0]
    method, args, kwargs = panel.logicCall(values, [])
    assert method == "trackSequence" and args == (pair[0],) and "modelFile" not in kwargs


def test_the_completion_status_reports_folding():
    job = SimpleNamespace(state=JobState.SUCCEEDED, startTime=time.monotonic(), outputTransformNode=SimpleNamespace(
        GetName=lambda: "moving to fixed (SSMSR)"), metrics={"percent_non_positive_jacobian": 0.125})
    status = panel.completionStatus(job)
    assert "0.125 % of voxels folded" in status and "'moving to fixed (SSMSR)'" in status
    assert panel.completionStatus(SimpleNamespace(state=JobState.CANCELLED)).startswith("Cancelled")


def test_versions():
    assert panel.versionProblem(5, 6) is None and panel.versionProblem(6, 0) is None
    assert "needs 3D Slicer 5.6 or newer; this is Slicer 5.4" in panel.versionProblem(5, 4)
    assert panel.versionAtLeast("2.13.0+cpu", panel.MINIMUM_TORCH)
    assert panel.versionAtLeast("2.4.0", "2.4") and not panel.versionAtLeast("2.3.1", "2.4")
