"""The panel's rules (``SSMSRRegistrationLib.gui.panel``, Qt-free) on real MRML nodes of the ``slicer-core`` wheel:
what keeps Apply disabled, the status line, the run configuration it holds (a preset plus the user's overrides),
versions, and the keyword arguments the logic receives."""

import time
from types import SimpleNamespace

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="the slicer-core wheel (real MRML) is needed")

from SSMSRRegistrationLib.common.protocol import progress_event  # noqa: E402
from SSMSRRegistrationLib.common.presets import DEFAULT_PRESET, PRESETS  # noqa: E402
from SSMSRRegistrationLib.common.run_config import RunConfiguration  # noqa: E402
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


@pytest.fixture
def phases(scene):
    """A sequence node "phases" of three 3D volumes of 12x10x6 voxels (a 3D+t cine)."""
    sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", "phases")
    for index in range(3):
        volume = scene_helpers.addVolumeFromArray(scene, np.random.default_rng(index).random((6, 10, 12)),
                                                  f"phase {index}")
        sequence.SetDataNodeAtValue(volume, str(index))
    return sequence


def test_a_new_panel_starts_from_the_default_preset_and_says_what_is_missing():
    values = panel.PanelValues()
    assert values.preset == DEFAULT_PRESET == "balanced" and values.smoothnessWeight == 3.0
    assert panel.currentOverrides(values) == {} and panel.reconcile(values) == {}
    assert panel.configuration(values) == RunConfiguration()
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
    assert not enabled and "NCC window (voxels) must be at least 2, got 1." in toolTip  # the panel's label
    for window in (0, 2, 9):
        values.nccWindow = window
        assert panel.applyButton(values, [], running=False)[1]


def test_the_jacobian_volume_must_not_be_an_input(pair):
    values = panel.PanelValues(fixedVolume=pair[0], movingVolume=pair[1], jacobianVolume=pair[1])
    assert "The Jacobian volume must be a volume of its own" in panel.applyButton(values, [], running=False)[2]


def apply(values, changes: dict):
    """What the widget does with the changes the panel asks for (``_setParameters``)."""
    for name, value in changes.items():
        setattr(values, name, value)
    return values


def test_the_panel_holds_a_preset_and_the_options_the_user_changed():
    values = apply(panel.PanelValues(), panel.presetChosen(panel.PanelValues(), "paper"))
    assert (values.preset, values.overrides, values.scales, values.stepsPerScale, values.smoothnessWeight) == (
        "paper", "{}", "1/2,1", 3500, 10.0)
    assert panel.reconcile(values) == {} and panel.configuration(values) == RunConfiguration.of("paper")

    values.stepsPerScale, values.device = 123, "cpu"  # edited in the panel (the wrapper writes the parameters)
    apply(values, panel.reconcile(values))
    assert values.overrides == '{"device": "cpu", "steps": 123}' and panel.reconcile(values) == {}
    assert panel.configuration(values) == RunConfiguration.of("paper", steps=123, device="cpu")

    values.cineTracking = True  # the other kind shows its preset's values; the overrides stay
    apply(values, panel.reconcile(values))
    assert (values.shownKind, values.scales, values.stepsPerScale, values.smoothnessWeight, values.device) == (
        "cine", PRESETS["paper"].value("cine", "scales"), 123, 10.0, "cpu")
    assert panel.configuration(values) == RunConfiguration.of("paper", steps=123, device="cpu")

    apply(values, panel.presetChosen(values, "fast"))  # clears the budget's overrides, keeps the device
    fastCine = RunConfiguration.of("fast").resolve("cine")
    assert (values.preset, values.scales, values.stepsPerScale, values.smoothnessWeight) == (
        "fast", fastCine.scales, fastCine.steps, fastCine.smoothness_weight)
    assert panel.configuration(values) == RunConfiguration.of("fast", device="cpu")

    values.workingSpacing = 1.5  # a pair-only option, edited while tracking: kept for pairs, not sent with a cine
    values.mixedPrecision = False
    apply(values, panel.reconcile(values))
    assert panel.configuration(values) == RunConfiguration.of("fast", device="cpu", precision="float32")
    values.cineTracking = False
    apply(values, panel.reconcile(values))
    assert (values.scales, values.stepsPerScale, values.workingSpacing, values.mixedPrecision) == (
        "1/4,1/2,1", 80, 1.5, False)
    assert panel.configuration(values) == RunConfiguration.of("fast", device="cpu", precision="float32",
                                                              spacing=1.5)

    values.device, values.workingSpacing = "auto", 0.0  # back to the preset's value: no override
    apply(values, panel.reconcile(values))
    assert panel.overridesOf(values) == {"precision": "float32"}
    assert "Changed here: Precision float32." in panel.presetDescription(values)


def test_an_invalid_run_option_is_named_by_its_label_and_keeps_apply_disabled(pair):
    values = panel.PanelValues(fixedVolume=pair[0], movingVolume=pair[1], scales="1,1/2")
    text, enabled, toolTip = panel.applyButton(values, [], running=False)
    assert not enabled and "coarse to fine" in toolTip
    values.scales, values.smoothnessWeight = "1/2,1", -1.0
    assert "Smoothness weight must be at least 0, got -1.0." in panel.applyButton(values, [], running=False)[2]
    values.smoothnessWeight, values.stepsPerScale = 3.0, 0
    assert "0 steps per scale (no test-time training) needs a pretrained model." in panel.problems(values, [])
    values.stepsPerScale, values.device = 10, "tpu"
    assert any(problem.startswith("Device ") for problem in panel.problems(values, []))
    values.device, values.overrides = "auto", "not JSON"  # a damaged scene: the widgets' values count
    assert panel.problems(values, []) == [] and panel.configuration(values) == RunConfiguration.of(
        scales="1/2,1", steps=10)


def test_the_status_line_of_a_registration_never_speaks_of_frame_pairs():
    """Every registration's "started" event carries "pairs" (1): the former panel showed "Tracking 1 frame pairs"."""
    started = {"event": "started", "device": "cpu", "scales": ["1/2", "1"], "steps_per_scale": 10, "pairs": 1}
    assert panel.eventStatus(started, "pair") == "Registering on cpu..."
    planned = dict(started, plan="working grid 40x48x40 at 2 mm, NCC window 5 voxels (10 mm)")
    assert panel.eventStatus(planned, "pair") == "Registering on cpu: working grid 40x48x40 at 2 mm, NCC window 5 " \
                                                 "voxels (10 mm)..."
    assert panel.eventStatus(dict(started, pairs=29), "cine") == "Tracking 29 frame pairs on cpu..."
    progress = progress_event("1", 1, 2, 5, 10, -0.5, 0, 45.0)  # as the worker writes it
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
    assert kwargs["modelFile"] is None
    # The run options travel as the configuration alone: the preset and what the user changed (the NCC window and
    # the working spacing at 0 are automatic, the preset's, so no override).
    assert kwargs["configuration"] == RunConfiguration.of(DEFAULT_PRESET, precision="float32")
    assert not set(kwargs) & {"scales", "steps", "stepsPerScale", "precision", "nccWindow", "workingSpacing"}
    # Every keyword is one the logic's method accepts (it raises TypeError otherwise).
    logic = RegistrationLogic(scene)
    logic.workerCommandPrefix = ["python3", "-c", "raise SystemExit(0)"]
    job = logic.registerVolumes(*args, waitForCompletion=False, **kwargs)
    job.wait(timeoutSeconds=30)
    # What reached the worker: the job file holds the panel's configuration and the jacobian output it asked for (the
    # stand-in worker then exits without a result, so the job fails and the scene is left as it was).
    assert RunConfiguration.from_json(job.workerJob["configuration"]) == kwargs["configuration"]
    assert job.workerJob["command"] == "register" and job.workerJob["arguments"]["jacobian"].endswith(".nrrd")
    assert job.state is JobState.FAILED and transform.GetTransformFromParent() is None
    values.cineTracking, values.cine, values.batchSize = True, pair[0], 3
    method, args, kwargs = panel.logicCall(values, [])
    assert method == "trackSequence" and args == (pair[0],) and "modelFile" not in kwargs
    assert kwargs["configuration"] == RunConfiguration.of(DEFAULT_PRESET, precision="float32", batch_size=3)


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


def test_a_sequence_of_3d_volumes_shows_the_presets_values_for_3d_cines(scene, phases):
    """The worker trains a sequence of volumes with the preset's 3D+t values (``volume_cine``), not the echo cines':
    the panel shows those, and switching between a 2D and a 3D cine keeps the user's overrides."""
    values = panel.PanelValues(cineTracking=True, cine=phases)
    apply(values, panel.reconcile(values))
    volumeCine, cine = (RunConfiguration().resolve(kind) for kind in ("volume_cine", "cine"))
    assert volumeCine.scales != cine.scales or volumeCine.steps != cine.steps  # else this test shows nothing
    assert (values.shownKind, values.scales, values.stepsPerScale, values.smoothnessWeight) == (
        "volume_cine", volumeCine.scales, volumeCine.steps, volumeCine.smoothness_weight)

    values.device = "cpu"
    apply(values, panel.reconcile(values))
    frames = scene_helpers.addVolumeFromArray(scene, np.random.default_rng(9).random((4, 10, 12)), "2D+t")
    values.cine = frames  # a volume whose third axis is time: a 2D+t cine
    apply(values, panel.reconcile(values))
    assert (values.shownKind, values.scales, values.stepsPerScale, values.device) == (
        "cine", cine.scales, cine.steps, "cpu")
    assert panel.configuration(values) == RunConfiguration.of(DEFAULT_PRESET, device="cpu")


def test_a_reference_frame_and_a_segmentation_on_it_reach_the_logic_or_say_what_is_wrong(scene, phases, tmp_path):
    """The reference frame must be a frame of the cine; a segmentation to propagate needs a reference frame (the
    frame it is drawn on), a sequence node and a segment; the logic receives the frame, and its job file holds it."""
    values = panel.PanelValues(cineTracking=True, cine=phases)
    assert values.referenceFrame == -1 and panel.logicCall(values, [])[2]["reference"] is None
    values.referenceFrame = 3
    text, enabled, toolTip = panel.applyButton(values, [], running=False)
    assert not enabled and toolTip == "The reference frame 3 is not a frame of 'phases' (frames 0 to 2)."
    values.referenceFrame = 2
    assert panel.applyButton(values, [], running=False)[1]

    empty = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "empty")
    values.segmentation = empty
    assert panel.problems(values, []) == ["The segmentation 'empty' has no segment."]
    labels = (np.arange(6 * 10 * 12).reshape(6, 10, 12) % 7 == 0).astype(np.uint8)
    drawn = scene_helpers.addSegmentationFromLabels(scene, labels, phases.GetNthDataNode(2), "drawn")
    values.segmentation, values.referenceFrame = drawn, -1
    assert panel.problems(values, []) == [
        "The segmentation 'drawn' is propagated from the frame it is drawn on: choose that frame as the reference "
        "frame, or select no segmentation."]
    timeVolume = scene_helpers.addVolumeFromArray(scene, np.random.default_rng(9).random((4, 10, 12)), "2D+t")
    values.cine, values.referenceFrame = timeVolume, 1
    assert panel.problems(values, []) == [
        "A segmentation is propagated through a sequence node; '2D+t' is a volume whose third axis is time."]

    values.cine, values.referenceFrame = phases, 2
    method, args, kwargs = panel.logicCall(values, [])
    assert (method, args, kwargs["reference"]) == ("trackSequence", (phases,), 2)
    logic = RegistrationLogic(scene, temporaryDirectoryRoot=str(tmp_path))
    logic.workerCommandPrefix = ["python3", "-c", "raise SystemExit(0)"]
    job = logic.trackSequence(*args, waitForCompletion=False, **kwargs)
    job.wait(timeoutSeconds=30)
    assert job.workerJob["command"] == "track" and job.workerJob["arguments"]["reference"] == 2
