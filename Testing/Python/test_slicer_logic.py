"""The Qt-free Slicer logic on a real MRML scene (``slicer-core`` wheel), with the real background worker.

Successful registrations always run the real worker (``python -m SSMSRRegistrationLib``) on real images that the
module ships (``Resources/TestData``, read with SimpleITK as in Slicer): frames of pydicom 3's echocardiogram cine
and a crop of nilearn's ICBM152 template.
``fake_worker.py`` stands in only for crashes, error reports, unloadable results and processes that resist
termination.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")
sitk = pytest.importorskip("SimpleITK")

from SSMSRRegistrationLib.testing import scenarios, scene_helpers  # noqa: E402
from SSMSRRegistrationLib.common.errors import InputError  # noqa: E402
from SSMSRRegistrationLib.common.presets import PRESETS  # noqa: E402
from SSMSRRegistrationLib.common.run_config import OPTIONS, RunConfiguration  # noqa: E402
from SSMSRRegistrationLib.common.schedule import parse_scales  # noqa: E402
from SSMSRRegistrationLib.common.protocol import overall_fraction as overallFraction  # noqa: E402
from SSMSRRegistrationLib.common.protocol import progress_event  # noqa: E402
from SSMSRRegistrationLib.logic import JobState, RegistrationError, RegistrationLogic  # noqa: E402
from SSMSRRegistrationLib.mrml.geometry import gridMatchesVolume  # noqa: E402
from SSMSRRegistrationLib.mrml.parameters import atlasInputProblems, atlasVolumeNode, inputProblems  # noqa: E402
from SSMSRRegistrationLib.mrml.progress_text import describeProgress  # noqa: E402
from SSMSRRegistrationLib.mrml.registration_jobs import PROVENANCE_ATTRIBUTE  # noqa: E402
from SSMSRRegistrationLib.mrml.storage import readDisplacementFieldTransform  # noqa: E402
from SSMSRRegistrationLib.mrml.worker_process import processExists, waitUntilGone  # noqa: E402

FAKE_WORKER = Path(__file__).with_name("fake_worker.py")
#: Short schedules keep the suite quick on two CPU cores while still moving the images clearly.
STEPS_2D = 80
STEPS_3D = 60


@pytest.fixture
def scene():
    """A real MRML scene with the Segmentations module logic attached, as in the Slicer application
    (it registers the segmentation representation converters that copying segmentations needs)."""
    mrmlScene = slicer.vtkMRMLScene()
    segmentationsLogic = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentationsLogic.SetMRMLScene(mrmlScene)
    yield mrmlScene
    del segmentationsLogic


@pytest.fixture
def logic(scene, tmp_path):
    registrationLogic = RegistrationLogic(scene, temporaryDirectoryRoot=str(tmp_path))
    yield registrationLogic
    registrationLogic.cancel()


def fakeWorkerLogic(logic: RegistrationLogic, mode: str) -> RegistrationLogic:
    logic.workerCommandPrefix = [sys.executable, str(FAKE_WORKER), mode]
    return logic


@pytest.fixture(scope="module")
def echoFrames():
    return scene_helpers.echocardiogramFrames(frameIndices=(0, 20))


def addEchoPair(scene, echoFrames, directions=scene_helpers.OBLIQUE_DIRECTIONS, origin=(12.0, -40.0, 25.0)):
    """Two real echo frames as single-slice volumes on an oblique plane with a non-zero origin."""
    (fixedFrame, movingFrame), spacingMm = echoFrames
    spacing = (spacingMm, spacingMm, 1.0)
    fixed = scene_helpers.addVolumeFromArray(scene, fixedFrame, "echo frame 0", spacing, origin, directions)
    moving = scene_helpers.addVolumeFromArray(scene, movingFrame, "echo frame 20", spacing, origin, directions)
    return fixed, moving


def addSmallVolumes(scene, shape=(8, 10, 12)):
    generator = np.random.default_rng(1)
    fixed = scene_helpers.addVolumeFromArray(scene, generator.random(shape, dtype=np.float32), "fixed", spacing=(1.0, 1.2, 1.5))
    moving = scene_helpers.addVolumeFromArray(scene, generator.random(shape, dtype=np.float32), "moving", spacing=(1.0, 1.2, 1.5))
    return fixed, moving


# ---------------------------------------------------------------------------------------------------------------
# Displacement field files -> transform nodes


def test_displacement_field_file_loads_as_from_parent_grid_on_fixed_geometry(scene, tmp_path):
    """An oblique, anisotropic ITK field (LPS, written by SimpleITK) maps RAS points exactly as ITK maps LPS ones."""
    size, spacing, originLps = (12, 10, 8), (1.5, 2.0, 3.0), (10.0, -20.0, 5.0)
    directionsLps = scene_helpers.rotationMatrix("z", 20.0) @ scene_helpers.rotationMatrix("y", 35.0)
    k, j, i = np.meshgrid(*(np.arange(n) for n in reversed(size)), indexing="ij")
    vectors = np.stack([2 * np.sin(i / 4.0), 1.5 * np.cos(j / 3.0), 0.5 * k - 1.0], axis=-1)
    field = sitk.GetImageFromArray(vectors, isVector=True)
    field.SetSpacing(spacing)
    field.SetOrigin(originLps)
    field.SetDirection(directionsLps.flatten())
    fieldPath = tmp_path / "field.nrrd"
    sitk.WriteImage(sitk.Cast(field, sitk.sitkVectorFloat32), str(fieldPath))

    lpsToRas = np.diag([-1.0, -1.0, 1.0])
    fixed = scene_helpers.addVolumeFromArray(scene, np.zeros(tuple(reversed(size)), np.float32), "fixed", spacing,
                                         lpsToRas @ originLps, lpsToRas @ directionsLps)
    gridTransform = readDisplacementFieldTransform(fieldPath)
    assert gridMatchesVolume(gridTransform, fixed)

    itkTransform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    for index in [(0, 0, 0), (3, 4, 2), (11, 9, 7), (5, 7, 1)]:
        pointLps = np.array(field.TransformIndexToPhysicalPoint(index))
        expectedRas = lpsToRas @ np.array(itkTransform.TransformPoint(tuple(pointLps)))
        actualRas = np.array(gridTransform.TransformPoint(lpsToRas @ pointLps))
        np.testing.assert_allclose(actualRas, expectedRas, atol=1e-4)

    shiftedFixed = scene_helpers.addVolumeFromArray(scene, np.zeros(tuple(reversed(size)), np.float32), "shifted", spacing,
                                                lpsToRas @ originLps + 1.0, lpsToRas @ directionsLps)
    assert not gridMatchesVolume(gridTransform, shiftedFixed)


# ---------------------------------------------------------------------------------------------------------------
# Parameters and progress text


def test_scale_schedules_are_checked():
    assert [str(scale) for scale in parse_scales("1/4, 1/2,1")] == ["1/4", "1/2", "1"]
    for text, fragment in [("", "empty"), ("1/2,x", "'x'"), ("1,1/2", "coarse to fine"), ("0,1", "outside"), ("2", "outside")]:
        with pytest.raises(ValueError, match=fragment):
            parse_scales(text)


def test_input_problems_say_what_is_missing(scene):
    fixed, moving = addSmallVolumes(scene)
    assert inputProblems(None, None) == ["Select a fixed volume.", "Select a moving volume."]
    assert inputProblems(fixed, moving) == []
    assert any("same node" in problem for problem in inputProblems(fixed, fixed))
    assert any("output volume" in problem for problem in inputProblems(fixed, moving, outputVolumeNode=moving))

    otherTransform = scene.AddNewNodeByClass("vtkMRMLTransformNode", "other")
    fixed.SetAndObserveTransformNodeID(otherTransform.GetID())
    assert any("fixed volume 'fixed' is under a transform" in problem for problem in inputProblems(fixed, moving))
    fixed.SetAndObserveTransformNodeID(None)
    moving.SetAndObserveTransformNodeID(otherTransform.GetID())
    assert any("moving volume" in problem for problem in inputProblems(fixed, moving))
    assert inputProblems(fixed, moving, outputTransformNode=otherTransform) == []


def test_progress_text_and_overall_fraction():
    event = {"event": "progress", "scale": "1/2", "scale_index": 0, "num_scales": 2, "step": 40, "steps": 100,
             "loss": -0.41234, "eta_s": 75.0}
    assert describeProgress(event) == "Scale 1/2 (1 of 2), step 40/100, loss -0.4123, 1 min 15 s left"
    # The fraction of every step of every scale, where the finest scale has fewer steps (finest_steps) too.
    assert overallFraction(progress_event("1/2", 0, 2, 40, 100, -0.4, 0, 30.0)) == pytest.approx(0.2)
    assert overallFraction(progress_event("1", 1, 2, 10, 20, -0.4, 0, 30.0, [100, 20])) == pytest.approx(110 / 120)
    assert overallFraction(progress_event("1", 1, 2, 20, 20, -0.4, 0, 30.0, [100, 20])) == pytest.approx(1.0)


def test_invalid_parameters_are_rejected_before_anything_starts(scene, logic, tmp_path):
    fixed, moving = addSmallVolumes(scene)
    before = scene_helpers.sceneSnapshot(scene)
    with pytest.raises(ValueError, match="Select a moving volume"):
        logic.registerVolumes(fixed, None)
    with pytest.raises(ValueError, match="Steps per scale must be at least 1 .0 is allowed with a model"):
        logic.registerVolumes(fixed, moving, steps=0)
    # Run options are checked by the run configuration, named by their keywords (the console's vocabulary).
    for options, message in ((dict(precision="half"), "precision must be one of mixed, float32, got 'half'."),
                             (dict(spacing=0.0), "spacing must be greater than 0, got 0.0."),
                             (dict(scales="1,1/2"), "coarse to fine"),
                             (dict(device="tpu"), "tpu"),
                             (dict(batch_size=2), "batch_size does not apply to a pair run."),
                             (dict(preset="slow"), "Unknown preset 'slow'")):
        with pytest.raises(InputError, match=re.escape(message)):
            logic.registerVolumes(fixed, moving, **options)
    with pytest.raises(InputError, match=re.escape("spacing must be greater than 0")), \
            pytest.warns(DeprecationWarning, match="workingSpacing= is deprecated; use spacing="):
        logic.registerVolumes(fixed, moving, workingSpacing=0.0)  # a former keyword, still accepted
    with pytest.raises(TypeError, match="name the same run option"), pytest.warns(DeprecationWarning):
        logic.registerVolumes(fixed, moving, stepsPerScale=5, steps=6)
    scene_helpers.assertSceneUnchanged(before, scene_helpers.sceneSnapshot(scene), "Rejected parameters")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------
# Real registrations through the background worker


@pytest.mark.slow  # the echo segmentation test below also registers a real frame on an oblique plane (make test-all)
def test_real_echocardiogram_pair_on_an_oblique_plane(scene, logic, echoFrames):
    measures = scenarios.runRealPairScenario(logic, *addEchoPair(scene, echoFrames), steps=STEPS_2D)
    print(measures)


def test_segmentation_propagation_on_a_deformed_echocardiogram(scene, logic, echoFrames):
    fixedFrame = echoFrames[0][0]
    fixed = scene_helpers.addVolumeFromArray(scene, fixedFrame, "echo frame 0", (echoFrames[1], echoFrames[1], 1.0),
                                         (5.0, 8.0, -3.0), scene_helpers.rotationMatrix("y", 30.0))
    measures = scenarios.runSegmentationPropagationScenario(
        logic, fixed, scene_helpers.echocardiogramLabels(fixedFrame), amplitudeMm=3.0, wavelengthMm=80.0,
        steps=STEPS_2D)
    print({key: value for key, value in measures.items() if key != "transformNode"})


def icbmArrays():
    """The module's shipped 2 mm crop (k, j, i) of the ICBM152 2009a T1 template (from nilearn), scaled to [0, 1],
    and its white matter (``sample_data.shipped_brain_crop``: read with SimpleITK, as in Slicer)."""
    from SSMSRRegistrationLib.imaging import sample_data

    t1Image, whiteMatterImage = sample_data.shipped_brain_crop()
    t1 = sitk.GetArrayFromImage(t1Image)
    return t1 / t1.max(), sitk.GetArrayFromImage(whiteMatterImage)


@pytest.mark.slow
def test_segmentation_propagation_on_a_deformed_3d_brain(scene, logic):
    t1, whiteMatter = icbmArrays()
    fixed = scene_helpers.addVolumeFromArray(scene, t1, "ICBM152 T1", (2.0, 2.0, 2.4), (-40.0, -60.0, -20.0),
                                         scene_helpers.OBLIQUE_DIRECTIONS)
    measures = scenarios.runSegmentationPropagationScenario(logic, fixed, whiteMatter, amplitudeMm=4.0,
                                                            wavelengthMm=70.0, steps=STEPS_3D)
    print({key: value for key, value in measures.items() if key != "transformNode"})


def test_existing_output_transform_is_filled_and_moving_volume_may_already_be_under_it(scene, logic, echoFrames):
    fixed, moving = addEchoPair(scene, echoFrames, directions=np.eye(3), origin=(0.0, 0.0, 0.0))
    outputTransform = scene.AddNewNodeByClass("vtkMRMLTransformNode", "my result")
    moving.SetAndObserveTransformNodeID(outputTransform.GetID())
    result = logic.registerVolumes(fixed, moving, outputTransformNode=outputTransform, steps=5, device="cpu")
    assert result is outputTransform
    assert outputTransform.GetTransformFromParent().GetClassName() == "vtkOrientedGridTransform"
    assert gridMatchesVolume(outputTransform.GetTransformFromParent(), fixed)
    assert scene.GetNumberOfNodesByClass("vtkMRMLTransformNode") == 1, "a new transform node was created"
    assert moving.GetParentTransformNode() is outputTransform


def test_cancel_ends_the_worker_and_leaves_the_scene_as_it_was(scene, logic, echoFrames):
    measures = scenarios.runCancelScenario(logic, *addEchoPair(scene, echoFrames))
    print(measures)


def test_worker_error_reaches_the_caller(scene, logic, echoFrames):
    message = scenarios.runWorkerErrorScenario(logic, *addEchoPair(scene, echoFrames))
    assert message.startswith("Registration failed: The fixed mask is empty")


# ---------------------------------------------------------------------------------------------------------------
# Failures of the worker (stand-in worker)


@pytest.mark.parametrize("mode, expected", [
    ("crash", "stopped by signal 11" if sys.platform != "win32" else "exit code 139"),
    ("error", "Registration failed: The fixed image is constant"),
    ("no-result", "exited without reporting a result"),
    ("bad-field", "could not be loaded"),
])
def test_worker_failures_give_a_clear_message_and_change_nothing(scene, logic, tmp_path, mode, expected):
    fixed, moving = addSmallVolumes(scene)
    outputTransform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "previous result")
    before = scene_helpers.sceneSnapshot(scene)
    with pytest.raises(RegistrationError) as raised:
        fakeWorkerLogic(logic, mode).registerVolumes(fixed, moving, outputTransformNode=outputTransform)
    assert expected in str(raised.value)
    if mode == "crash":
        assert "about to crash in the network" in str(raised.value), "the worker's last stderr lines are missing"
    scene_helpers.assertSceneUnchanged(before, scene_helpers.sceneSnapshot(scene), f"A '{mode}' worker")
    assert outputTransform.GetTransformFromParent().GetClassName() == "vtkTransform"
    assert list(tmp_path.iterdir()) == [], "temporary files left behind"
    assert logic.activeJob is None


def test_cancel_ends_the_whole_process_tree_even_when_sigterm_is_ignored(scene, logic):
    fixed, moving = addSmallVolumes(scene)
    logLines = []
    job = fakeWorkerLogic(logic, "stubborn").registerVolumes(
        fixed, moving, waitForCompletion=False,
        progressCallback=lambda event: logLines.append(event["message"]) if event["event"] == "log" else None)
    deadline = time.monotonic() + 30
    while not any(line.startswith("grandchild") for line in logLines) and time.monotonic() < deadline:
        job.poll(timeoutSeconds=0.1)
    grandchildPid = int(next(line for line in logLines if line.startswith("grandchild")).split()[1])
    assert processExists(grandchildPid)

    start = time.monotonic()
    job.cancel()
    assert waitUntilGone(job.worker.pid, 2.0) and waitUntilGone(grandchildPid, 2.0)
    assert time.monotonic() - start < 2.0
    assert job.state is JobState.CANCELLED and job.errorMessage == "Registration cancelled."


def test_only_one_registration_at_a_time(scene, logic):
    fixed, moving = addSmallVolumes(scene)
    job = fakeWorkerLogic(logic, "stubborn").registerVolumes(fixed, moving, waitForCompletion=False)
    with pytest.raises(RegistrationError, match="already running"):
        logic.registerVolumes(fixed, moving)
    job.cancel()
    assert logic.activeJob is None


def test_keep_temporary_files_keeps_the_job_folder(scene, logic, tmp_path):
    fixed, moving = addSmallVolumes(scene)
    with pytest.raises(RegistrationError):
        fakeWorkerLogic(logic, "error").registerVolumes(fixed, moving, keepTemporaryFiles=True)
    (jobFolder,) = tmp_path.iterdir()
    assert sorted(path.name for path in jobFolder.iterdir()) == ["fixed.nrrd", "job.json", "moving.nrrd"]
    written = sitk.ReadImage(str(jobFolder / "fixed.nrrd"))
    np.testing.assert_allclose(sitk.GetArrayFromImage(written), scene_helpers.arrayFromVolume(fixed))
    np.testing.assert_allclose(written.GetSpacing(), (1.0, 1.2, 1.5))


# ---------------------------------------------------------------------------------------------------------------
# Atlas selection and pretrained models


@pytest.mark.slow  # the segment command's tests rank and propagate; registerVolumes' Slicer path is tested above (make test-all)
def test_atlas_segmentation_picks_the_matching_atlas_and_propagates_its_segments(scene, logic):
    frames, spacingMm = scene_helpers.echocardiogramFrames(frameIndices=(0, 10, 20))
    reference = scene_helpers.addVolumeFromArray(scene, frames[0], "echo frame 0", (spacingMm, spacingMm, 1.0),
                                             (5.0, 8.0, -3.0), scene_helpers.rotationMatrix("y", 30.0))
    others = [(frame, scene_helpers.echocardiogramLabels(frame)) for frame in frames[1:]]
    measures = scenarios.runAtlasSegmentationScenario(logic, reference, scene_helpers.echocardiogramLabels(frames[0]), others,
                                                      amplitudeMm=3.0, wavelengthMm=80.0, steps=STEPS_2D)
    print({key: value for key, value in measures.items() if key != "segmentationNode"})


def test_atlas_inputs_are_checked_before_anything_starts(scene, logic, tmp_path):
    fixed, moving = addSmallVolumes(scene)
    segmentation = scene_helpers.addSegmentationFromLabels(scene, (scene_helpers.arrayFromVolume(moving) > 0.5).astype(np.uint8),
                                                       moving, "atlas")
    orphan = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "orphan")
    assert atlasVolumeNode(segmentation) is moving and atlasVolumeNode(orphan) is None
    assert atlasInputProblems(fixed, [(moving, segmentation)]) == []
    assert any("no source volume" in problem for problem in atlasInputProblems(fixed, [(None, orphan)]))
    assert any("between 1 and the 1" in problem for problem in atlasInputProblems(fixed, [(moving, segmentation)], topK=2))
    assert any("Check one or more" in problem for problem in atlasInputProblems(fixed, []))
    assert any("model file" in problem for problem in atlasInputProblems(fixed, [(moving, segmentation)],
                                                                        modelFile=str(tmp_path / "none.pt")))
    before = scene_helpers.sceneSnapshot(scene)
    with pytest.raises(ValueError, match="no source volume"):
        logic.segmentWithAtlases(fixed, [orphan])
    with pytest.raises(ValueError, match="model file"):
        logic.registerVolumes(fixed, moving, modelFile=str(tmp_path / "none.pt"))
    scene_helpers.assertSceneUnchanged(before, scene_helpers.sceneSnapshot(scene), "Rejected atlas parameters")
    assert list(tmp_path.iterdir()) == []


def test_model_file_reaches_the_worker_and_zero_steps_is_inference(scene, logic, tmp_path):
    """A model passed to the logic is used by the worker: its schedule error comes back; with it, 0 steps works."""
    fixed, moving = addSmallVolumes(scene, shape=(16, 20, 24))
    modelPath = str(tmp_path / "model.pt")
    trainTinyModel(modelPath, ndim=3, scales="1/2,1")
    with pytest.raises(RegistrationError, match="trained for the scales 1/2,1"):
        logic.registerVolumes(fixed, moving, scales="1/4,1/2,1", modelFile=modelPath, steps=1, device="cpu")
    transform = logic.registerVolumes(fixed, moving, scales="1/2,1", modelFile=modelPath, steps=0, device="cpu",
                                      alignFirst="none")
    assert gridMatchesVolume(transform.GetTransformFromParent(), fixed)


def test_precision_and_working_spacing_reach_the_worker(scene, logic):
    """On a CPU without native bfloat16 the worker reports float32 either way: the job file is what shows that
    the choice reaches the worker. The volumes' 1 x 1.2 x 1.5 mm voxels are registered on an isotropic grid: 1 mm
    by default, 1.5 mm when asked for; the worker's plan reaches the job's log."""
    fixed, moving = addSmallVolumes(scene, shape=(16, 20, 24))
    for precision, spacing in (("float32", None), ("mixed", 1.5)):
        events = []
        job = logic.registerVolumes(fixed, moving, scales="1", steps=2, precision=precision, device="cpu",
                                    alignFirst="none", spacing=spacing,
                                    progressCallback=events.append, waitForCompletion=False)
        assert job.wait() is JobState.SUCCEEDED, job.errorMessage
        overrides = job.workerJob["configuration"]["overrides"]
        assert overrides["precision"] == precision and overrides.get("spacing") == spacing
        assert job.parameters["resolved"]["precision"] == precision
        started = [event for event in events if event.get("event") == "started"]
        assert [event["precision"] for event in started] in (["float32"], ["bfloat16 mixed"])
        assert precision == "mixed" or started[0]["precision"] == "float32"
        assert started[0]["working_grid"]["spacing_mm"] == (spacing or 1.0)
        assert any("Plan: working grid" in line for line in job.log)


def test_the_result_records_its_inputs_as_registration_references_and_its_folding(scene, logic):
    """Slicer's registration roles (remapped on scene import, unlike attributes holding node IDs); the
    transform's description and the optional Jacobian volume report the folding; the run's provenance (the worker's
    record: settings, seed, inputs, software, machine) is stored on the transform."""
    fixed, moving = addSmallVolumes(scene, shape=(16, 20, 24))
    jacobian = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "jacobian")
    transform = logic.registerVolumes(fixed, moving, jacobianVolumeNode=jacobian, alignFirst="none", scales="1/2,1",
                                      steps=20,
                                      device="cpu")
    assert transform.GetNodeReference(transform.GetFixedNodeReferenceRole()) is fixed
    assert transform.GetNodeReference(transform.GetMovingNodeReferenceRole()) is moving
    assert "% of the fixed grid folded (Jacobian determinant <= 0)" in transform.GetDescription()
    assert transform.GetAttribute("SSMSR.FixedVolumeID") is None
    provenance = json.loads(transform.GetAttribute(PROVENANCE_ATTRIBUTE))
    assert provenance["kind"] == "register" and provenance["seed"] == 0
    assert provenance["settings"]["scales"] == ["1/2", "1"] and provenance["settings"]["steps_per_scale"] == 20
    assert provenance["options"]["initial"] == "none" and provenance["machine"]["device"] == "cpu"
    assert len(provenance["inputs"]["fixed"]["sha256"]) == 64 and provenance["outputs"]["field"]["sha256"]
    determinants = scene_helpers.arrayFromVolume(jacobian)
    assert determinants.shape == scene_helpers.arrayFromVolume(fixed).shape
    assert np.isfinite(determinants).all() and 0.5 < np.median(determinants) < 1.5
    assert scene_helpers.ijkToRasArray(jacobian) == pytest.approx(scene_helpers.ijkToRasArray(fixed))
    colors = jacobian.GetDisplayNode().GetColorNode()
    assert colors.GetName() == "SSMSR Jacobian determinant"
    red = [0.0] * 4
    colors.GetColor(10, red)  # a determinant below 0
    assert red[:3] == [1.0, 0.0, 0.0]


def trainTinyModel(path: str, ndim: int, scales: str) -> None:
    """A small complete model file (a few steps on random volumes), written with the training code."""
    import torch

    from SSMSRRegistrationLib.engine.pretraining import TensorPairs, TrainingSettings, train_networks
    from SSMSRRegistrationLib.workflows.models import SavedModel, save_model

    generator = torch.Generator().manual_seed(0)
    shape = (16, 20, 24) if ndim == 3 else (32, 32)
    pairs = [(torch.rand(shape, generator=generator), torch.rand(shape, generator=generator)) for _ in range(2)]
    settings = TrainingSettings(scales=parse_scales(scales), steps_per_scale=2, checkpoint_every=0)
    state = train_networks(TensorPairs(pairs), None, settings)
    save_model(SavedModel(ndim=ndim, scales=settings.scales, encoder_channels=settings.encoder_channels,
                          decoder_channels=settings.decoder_channels, smoothness_weight=settings.smoothness_weight,
                          ncc_window=settings.window_for(ndim), networks=state.networks,
                          training={"steps_per_scale": 2}), path)


def test_an_initial_transform_node_is_the_pre_alignment_and_the_result_includes_it(scene, logic):
    """The moving brain lies 12 mm to the right of the fixed one: a linear transform node that overlays it (as from
    General Registration) is used by the worker, and the output transform alone maps fixed points onto moving ones."""
    array, _ = icbmArrays()
    fixed = scene_helpers.addVolumeFromArray(scene, array, "fixed", spacing=(2.0, 2.0, 2.0))
    moving = scene_helpers.addVolumeFromArray(scene, array, "moving", spacing=(2.0, 2.0, 2.0), origin=(12.0, 0.0, 0.0))
    initial = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "initial")
    toParent = vtk.vtkMatrix4x4()
    toParent.SetElement(0, 3, -12.0)  # moving volume under it: overlays the fixed one
    initial.SetMatrixTransformToParent(toParent)
    job = logic.registerVolumes(fixed, moving, initialTransformNode=initial, scales="1/2,1", steps=5,
                                device="cpu", waitForCompletion=False)
    assert job.wait() is JobState.SUCCEEDED, job.errorMessage
    assert job.workerJob["arguments"]["initial"].endswith("initial.tfm")
    fromParent = job.outputTransformNode.GetTransformFromParent()
    centre = scene_helpers.ijkToRasArray(fixed) @ np.array([16.0, 20.0, 16.0, 1.0])
    assert np.linalg.norm(np.array(fromParent.TransformPoint(centre[:3])) - (centre[:3] + (12.0, 0.0, 0.0))) < 1.0
    assert initial.GetMatrixTransformToParent().GetElement(0, 3) == -12.0  # the input node is untouched
    with pytest.raises(ValueError, match="Unknown pre-alignment 'similarity'"):
        logic.registerVolumes(fixed, moving, alignFirst="similarity")


def standInLogic(logic: RegistrationLogic) -> RegistrationLogic:
    """The logic with a worker that exits at once: the job file it was given stays until the job is polled."""
    logic.workerCommandPrefix = [sys.executable, "-c", "raise SystemExit(0)"]
    return logic


def jobFileOf(job) -> dict:
    """The job file of a job just started (the command ends with ``job JOB.json``); it is what ``workerJob`` says."""
    assert job.command[-2] == "job"
    written = json.loads(Path(job.command[-1]).read_text(encoding="utf-8"))
    assert written == job.workerJob
    return written


def test_the_job_file_holds_the_panels_preset_and_exactly_its_overrides(scene, logic):
    """The panel holds a preset and the options the user changed; the logic writes exactly that into the job file,
    and the worker resolves it to the preset's values for the kind of run, including what the panel does not show
    (learning rate, MSE weight). Every preset, pairs and cines."""
    from SSMSRRegistrationLib.gui import panel

    fixed, moving = addSmallVolumes(scene)
    standInLogic(logic)
    for name, preset in PRESETS.items():
        for kind in ("pair", "cine"):
            values = panel.PanelValues(fixedVolume=fixed, movingVolume=moving, cine=fixed, cineTracking=kind == "cine")
            for parameter, value in {**panel.reconcile(values), **panel.presetChosen(values, name)}.items():
                setattr(values, parameter, value)
            values.stepsPerScale, values.device = 7, "cpu"  # two edits in the panel
            method, args, kwargs = panel.logicCall(values, [])
            job = getattr(logic, method)(*args, waitForCompletion=False, **kwargs)
            written = jobFileOf(job)
            assert written["command"] == ("track" if kind == "cine" else "register")
            assert written["configuration"]["preset"] == name
            assert written["configuration"]["overrides"] == {"steps": 7, "device": "cpu"}
            assert not set(written["arguments"]) & set(OPTIONS), "run options belong in the configuration"
            resolved = RunConfiguration.from_json(written["configuration"]).resolve(kind)
            assert resolved.learning_rate == preset.value(kind, "learning_rate")
            assert resolved.mse_weight == preset.value(kind, "mse_weight")
            assert (resolved.scales, resolved.steps) == (preset.value(kind, "scales"), 7)
            assert job.parameters["configuration"] == written["configuration"]
            job.wait(timeoutSeconds=30)
            assert logic.activeJob is None


def test_the_workers_job_reader_accepts_the_job_files_the_logic_writes(scene, logic):
    """``interfaces.cli.read_job`` (what ``python -m SSMSRRegistrationLib job`` runs) reads the register, segment and
    track job files without error, with the inputs, outputs and run configuration the logic gave."""
    from SSMSRRegistrationLib.interfaces import cli
    fixed, moving = addSmallVolumes(scene)
    mask = scene_helpers.addVolumeFromArray(scene, np.ones((8, 10, 12), np.uint8), "mask", spacing=(1.0, 1.2, 1.5))
    warped = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "warped")
    jacobian = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "jacobian")
    atlas = scene_helpers.addSegmentationFromLabels(scene, (scene_helpers.arrayFromVolume(moving) > 0.5)
                                                    .astype(np.uint8), moving, "atlas")
    stack = scene_helpers.addVolumeFromArray(scene, np.random.default_rng(2).random((3, 16, 20), dtype=np.float32),
                                             "cine")
    standInLogic(logic)
    starts = {
        "register": lambda: logic.registerVolumes(fixed, moving, fixedMaskNode=mask, outputVolumeNode=warped,
                                                  jacobianVolumeNode=jacobian, alignFirst="rigid", preset="fast",
                                                  spacing=1.5, seed=3, waitForCompletion=False),
        "segment": lambda: logic.segmentWithAtlases(fixed, [atlas], fixedMaskNode=mask, steps=4,
                                                    waitForCompletion=False),
        "track": lambda: logic.trackSequence(stack, configuration=RunConfiguration.of("paper", batch_size=0),
                                             steps=9, waitForCompletion=False),
    }
    for command, start in starts.items():
        job = start()
        written = jobFileOf(job)
        parsed = cli.read_job(job.command[-1])
        assert parsed.command == command and parsed.progress == "jsonl"
        assert parsed.config == RunConfiguration.from_json(written["configuration"])
        assert os.path.isfile(getattr(parsed, {"register": "fixed", "segment": "target", "track": "cine"}[command]))
        if command == "register":
            assert (parsed.initial, parsed.fixed_mask.endswith("mask.nrrd"), parsed.warped.endswith("warped.nrrd"),
                    parsed.jacobian.endswith("jacobian.nrrd")) == ("rigid", True, True, True)
            assert parsed.config == RunConfiguration.of("fast", spacing=1.5, seed=3)
        elif command == "segment":
            assert parsed.top_k == 1 and len(parsed.atlas) == 1 and all(map(os.path.isfile, parsed.atlas[0]))
            assert parsed.config == RunConfiguration.of(steps=4)
        else:
            assert parsed.no_figures is True and parsed.mask == "auto"
            assert parsed.config == RunConfiguration.of("paper", batch_size=0, steps=9)
        job.wait(timeoutSeconds=30)
