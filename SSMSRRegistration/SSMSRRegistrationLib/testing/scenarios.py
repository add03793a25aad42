"""Registration scenarios shared by the pytest suite (``slicer-core``, no application) and the Slicer self-test.

Each ``run...Scenario`` function builds its nodes in the given scene, drives a :class:`RegistrationLogic`
through the real worker process, checks the outcome with ``assert`` statements that say what went wrong, and
returns the measured numbers. Needs numpy, VTK, MRML and SimpleITK (to read the worker's field file on its own,
and the echocardiogram frames that the module ships in ``Resources/TestData``): what Slicer itself ships.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import numpy as np

from ..mrml.jobs import JobState, RegistrationCancelledError, RegistrationError
from ..mrml.logic import RegistrationLogic
from ..mrml.worker_process import waitUntilGone
from .scene_helpers import (addKnownDisplacementTransform, addSegmentationFromLabels, addVolumeFromArray,
                            arrayFromVolume, assertSceneUnchanged, diceCoefficient, ijkToRasArray,
                            labelArrayFromSegmentation, nodeFingerprint, normalizedCrossCorrelation,
                            resampleThroughTransform, sceneSnapshot, transformFieldMismatchMm)


# ---------------------------------------------------------------------------------------------------------------
# Scenarios


def runLeavingNoTemporaryFiles(logic: RegistrationLogic, run):
    """Return ``run()``, run with the logic's job folders under a fresh root; assert nothing is left there."""
    jobFolderRoot = tempfile.mkdtemp(prefix="SSMSR-scenario-")
    previousRoot, logic.temporaryDirectoryRoot = logic.temporaryDirectoryRoot, jobFolderRoot
    try:
        result = run()
        leftovers = os.listdir(jobFolderRoot)
    finally:
        logic.temporaryDirectoryRoot = previousRoot
        shutil.rmtree(jobFolderRoot, ignore_errors=True)
    assert not leftovers, f"temporary files left behind: {leftovers}"
    return result


def runRealPairScenario(logic: RegistrationLogic, fixedVolumeNode, movingVolumeNode, steps: int,
                        scales: str = "1/2,1", device: str = "cpu") -> dict:
    """Register two real images through the background worker and check the transform node and warped volume.

    Checks: the transform node maps points exactly as the worker's field file says (and the field is not zero);
    the moving volume resampled through the transform node matches the fixed volume better than before; the
    worker's warped output agrees with that resampling; the input nodes are unchanged. Returns the measures.
    """
    scene = logic.scene
    inputsBefore = {node.GetID(): nodeFingerprint(node) for node in (fixedVolumeNode, movingVolumeNode)}
    outputVolumeNode = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "warped")
    events = []
    job = logic.registerVolumes(fixedVolumeNode, movingVolumeNode, outputVolumeNode=outputVolumeNode, scales=scales,
                                steps=steps, device=device, waitForCompletion=False,
                                progressCallback=events.append, keepTemporaryFiles=True)
    try:
        job.wait()
        assert job.state is JobState.SUCCEEDED, f"registration did not succeed: {job.errorMessage}\n" + "\n".join(job.log)
        transformNode = job.outputTransformNode
        assert transformNode is not None and transformNode.GetScene() is scene, "no output transform node in the scene"
        mismatchMm, largestDisplacementMm = transformFieldMismatchMm(transformNode, job.temporaryDirectory / "field.nrrd", fixedVolumeNode)
    finally:
        shutil.rmtree(job.temporaryDirectory, ignore_errors=True)
    assert mismatchMm < 1e-3, f"transform node differs from the field file by up to {mismatchMm:.4g} mm"
    assert largestDisplacementMm > 0.1, f"the field is (nearly) zero: largest displacement {largestDisplacementMm:.3g} mm"

    progressEvents = [event for event in events if event.get("event") == "progress"]
    assert events[0].get("event") == "started", f"first event was {events[0]}"
    assert progressEvents and events[-1].get("event") == "finished", "progress events or the finished event are missing"

    fixedArray = arrayFromVolume(fixedVolumeNode)
    nccBefore = normalizedCrossCorrelation(resampleThroughTransform(movingVolumeNode, None, fixedVolumeNode), fixedArray)
    resampledMoving = resampleThroughTransform(movingVolumeNode, transformNode, fixedVolumeNode)
    nccAfter = normalizedCrossCorrelation(resampledMoving, fixedArray)
    assert 1.0 - nccAfter < 0.9 * (1.0 - nccBefore), (
        f"NCC with the fixed volume did not improve by at least a tenth of the gap to 1: {nccBefore:.4f} -> {nccAfter:.4f}")

    warpedArray = arrayFromVolume(outputVolumeNode)
    assert np.allclose(ijkToRasArray(outputVolumeNode), ijkToRasArray(fixedVolumeNode)), "warped volume is not on the fixed grid"
    warpedAgreement = normalizedCrossCorrelation(warpedArray, resampledMoving)
    assert warpedAgreement > 0.98, f"worker's warped volume and Slicer's resampling disagree (NCC {warpedAgreement:.4f})"

    for node in (fixedVolumeNode, movingVolumeNode):
        assert nodeFingerprint(node) == inputsBefore[node.GetID()], f"input node '{node.GetName()}' was modified"
    return {"nccBefore": nccBefore, "nccAfter": nccAfter, "fieldMismatchMm": mismatchMm,
            "largestDisplacementMm": largestDisplacementMm, "warpedAgreement": warpedAgreement,
            "progressEvents": len(progressEvents), "seconds": time.monotonic() - job.startTime}


def runSegmentationPropagationScenario(logic: RegistrationLogic, fixedVolumeNode, fixedLabels: np.ndarray,
                                       amplitudeMm: float, wavelengthMm: float, steps: int,
                                       scales: str = "1/2,1", device: str = "cpu") -> dict:
    """Deform a real image and its labels by a known smooth field, register back, and propagate the labels.

    The moving volume and its segmentation are the fixed ones resampled through a known displacement field.
    Checks (blocking mode): a new, hardened segmentation is created whose Dice with the fixed labels is higher than
    the moving segmentation's; the moving segmentation is unchanged; the job's temporary folder is removed.
    Returns the measures.
    """
    scene = logic.scene
    knownTransformNode = addKnownDisplacementTransform(scene, fixedVolumeNode, amplitudeMm, wavelengthMm)
    movingArray = resampleThroughTransform(fixedVolumeNode, knownTransformNode, fixedVolumeNode)
    labelVolumeNode = addVolumeFromArray(scene, fixedLabels.astype(np.int16), "fixed labels", labelmap=True)
    labelVolumeNode.CopyOrientation(fixedVolumeNode)
    movingLabels = resampleThroughTransform(labelVolumeNode, knownTransformNode, fixedVolumeNode, "nearest").astype(np.uint8)
    scene.RemoveNode(labelVolumeNode)
    scene.RemoveNode(knownTransformNode)

    movingVolumeNode = addVolumeFromArray(scene, movingArray, "deformed moving")
    movingVolumeNode.CopyOrientation(fixedVolumeNode)
    segmentationNode = addSegmentationFromLabels(scene, movingLabels, movingVolumeNode, "moving segmentation")
    segmentationBefore = nodeFingerprint(segmentationNode)

    transformNode = runLeavingNoTemporaryFiles(logic, lambda: logic.registerVolumes(
        fixedVolumeNode, movingVolumeNode, segmentationNode=segmentationNode, scales=scales,
        steps=steps, device=device))
    propagated = scene.GetNodesByClass("vtkMRMLSegmentationNode")
    propagatedNodes = [propagated.GetItemAsObject(index) for index in range(propagated.GetNumberOfItems())
                       if propagated.GetItemAsObject(index) is not segmentationNode]
    assert len(propagatedNodes) == 1, f"expected one propagated segmentation, found {len(propagatedNodes)}"
    propagatedNode = propagatedNodes[0]
    assert propagatedNode.GetParentTransformNode() is None, "the propagated segmentation is not hardened"
    assert nodeFingerprint(segmentationNode) == segmentationBefore, "the moving segmentation was modified"
    assert segmentationNode.GetParentTransformNode() is None, "the moving segmentation was put under a transform"

    fixedLabelsOnGrid = (np.asarray(fixedLabels).reshape(arrayFromVolume(fixedVolumeNode).shape) != 0)
    diceBefore = diceCoefficient(labelArrayFromSegmentation(segmentationNode, fixedVolumeNode), fixedLabelsOnGrid)
    diceAfter = diceCoefficient(labelArrayFromSegmentation(propagatedNode, fixedVolumeNode), fixedLabelsOnGrid)
    assert diceAfter > diceBefore + 0.05, f"Dice with the fixed labels did not rise enough: {diceBefore:.3f} -> {diceAfter:.3f}"
    return {"diceBefore": diceBefore, "diceAfter": diceAfter, "transformNode": transformNode}


def runCancelScenario(logic: RegistrationLogic, fixedVolumeNode, movingVolumeNode, device: str = "cpu") -> dict:
    """Start a long registration, cancel it at its first progress report, and check that nothing is left.

    Checks: the worker process is gone within two seconds of the cancel request; no node was added or changed;
    the temporary folder is removed; blocking mode raises RegistrationCancelledError when cancelled from the
    progress callback. Returns the measured cancel time.
    """
    scene = logic.scene
    before = sceneSnapshot(scene)
    job = logic.registerVolumes(fixedVolumeNode, movingVolumeNode, outputVolumeNode=None, steps=100000,
                                device=device, waitForCompletion=False)
    deadline = time.monotonic() + 120
    while job.lastProgressEvent is None and not job.isDone and time.monotonic() < deadline:
        job.poll(timeoutSeconds=0.1)
    assert job.lastProgressEvent is not None, f"no progress before timeout: {job.errorMessage}\n" + "\n".join(job.log)
    cancelStart = time.monotonic()
    job.cancel()
    gone = waitUntilGone(job.worker.pid, timeoutSeconds=2.0)
    cancelSeconds = time.monotonic() - cancelStart
    assert gone and cancelSeconds < 2.0, f"worker still running {cancelSeconds:.2f} s after cancel"
    assert job.state is JobState.CANCELLED and logic.activeJob is None
    assert not job.temporaryDirectory.exists(), "temporary folder left behind after cancel"
    assertSceneUnchanged(before, sceneSnapshot(scene), "A cancelled registration")

    def cancelAtFirstProgress(event):
        if event.get("event") == "progress":
            logic.cancel()

    try:
        logic.registerVolumes(fixedVolumeNode, movingVolumeNode, steps=100000, device=device,
                              progressCallback=cancelAtFirstProgress)
        raise AssertionError("blocking registerVolumes returned although it was cancelled")
    except RegistrationCancelledError:
        pass
    assertSceneUnchanged(before, sceneSnapshot(scene), "A cancelled blocking registration")
    return {"cancelSeconds": cancelSeconds}


def runWorkerErrorScenario(logic: RegistrationLogic, fixedVolumeNode, movingVolumeNode, device: str = "cpu") -> str:
    """Give the real worker an empty fixed mask: it must report an error that reaches the caller, scene untouched."""
    scene = logic.scene
    emptyMaskNode = addVolumeFromArray(scene, np.zeros(arrayFromVolume(fixedVolumeNode).shape, np.uint8), "empty mask", labelmap=True)
    emptyMaskNode.CopyOrientation(fixedVolumeNode)
    before = sceneSnapshot(scene)
    try:
        logic.registerVolumes(fixedVolumeNode, movingVolumeNode, fixedMaskNode=emptyMaskNode, steps=5, device=device)
        raise AssertionError("registration with an empty mask succeeded")
    except RegistrationCancelledError:
        raise
    except RegistrationError as error:
        message = str(error)
    assert "mask is empty" in message, f"the worker's error did not reach the caller: {message}"
    assertSceneUnchanged(before, sceneSnapshot(scene), "A failed registration")
    scene.RemoveNode(emptyMaskNode)
    return message


def runAtlasSegmentationScenario(logic: RegistrationLogic, referenceVolumeNode, referenceLabels: np.ndarray,
                                 otherAtlases: list, amplitudeMm: float, wavelengthMm: float, steps: int,
                                 topK: int = 1, scales: str = "1/2,1", device: str = "cpu", modelFile: str | None = None,
                                 segmentName: str = "tissue") -> dict:
    """Segment a deformed copy of a real image with several atlases, one of which is the undeformed image.

    The target volume is ``referenceVolumeNode`` resampled through a known smooth displacement; its true labels are
    ``referenceLabels`` resampled the same way. The atlases are the reference image with its labels (the right
    answer, put in the middle of the list) and ``otherAtlases`` ((array, labels) on the reference geometry), each a
    volume with a segmentation drawn on it whose segment is named ``segmentName``.
    Checks: the matching atlas ranks first; a new segmentation node with the atlases' segment name and colour is
    created on the target; its Dice with the true labels beats the unregistered matching atlas's; the atlas nodes
    are unchanged and the temporary folder is removed. Returns the measures.
    """
    scene = logic.scene
    knownTransformNode = addKnownDisplacementTransform(scene, referenceVolumeNode, amplitudeMm, wavelengthMm)
    targetArray = resampleThroughTransform(referenceVolumeNode, knownTransformNode, referenceVolumeNode)
    labelVolumeNode = addVolumeFromArray(scene, referenceLabels.astype(np.int16), "reference labels", labelmap=True)
    labelVolumeNode.CopyOrientation(referenceVolumeNode)
    trueLabels = resampleThroughTransform(labelVolumeNode, knownTransformNode, referenceVolumeNode, "nearest") != 0
    scene.RemoveNode(labelVolumeNode)
    scene.RemoveNode(knownTransformNode)
    targetVolumeNode = addVolumeFromArray(scene, targetArray, "target")
    targetVolumeNode.CopyOrientation(referenceVolumeNode)

    def addAtlas(volumeNode, labels, name):
        segmentationNode = addSegmentationFromLabels(scene, labels, volumeNode, name)
        segment = segmentationNode.GetSegmentation().GetNthSegment(0)
        segment.SetName(segmentName)
        segment.SetColor(0.9, 0.3, 0.1)
        return segmentationNode

    atlases = []
    for number, (array, labels) in enumerate(otherAtlases):
        volumeNode = addVolumeFromArray(scene, array, f"other atlas {number}")
        volumeNode.CopyOrientation(referenceVolumeNode)
        atlases.append(addAtlas(volumeNode, labels, f"other atlas {number} segmentation"))
    matchingAtlas = addAtlas(referenceVolumeNode, referenceLabels, "matching atlas segmentation")
    atlases.insert(len(atlases) // 2, matchingAtlas)
    atlasesBefore = {node.GetID(): nodeFingerprint(node) for node in atlases}

    segmentationNode = runLeavingNoTemporaryFiles(logic, lambda: logic.segmentWithAtlases(
        targetVolumeNode, atlases, topK=topK, scales=scales, steps=steps, device=device,
        modelFile=modelFile))
    ranking = logic.lastAtlasRanking
    assert [entry["atlasName"] for entry in ranking][0] == matchingAtlas.GetName(), f"wrong atlas ranked first: {ranking}"
    assert [entry["registered"] for entry in ranking] == [rank < topK for rank in range(len(atlases))]
    assert segmentationNode is not None and segmentationNode.GetScene() is scene, "no segmentation node was created"
    segmentation = segmentationNode.GetSegmentation()
    names = [segmentation.GetNthSegment(index).GetName() for index in range(segmentation.GetNumberOfSegments())]
    assert names == [segmentName], f"segments of the result: {names}"
    assert np.allclose(segmentation.GetNthSegment(0).GetColor(), (0.9, 0.3, 0.1)), "the atlas colour was not kept"
    for node in atlases:
        assert nodeFingerprint(node) == atlasesBefore[node.GetID()], f"atlas '{node.GetName()}' was modified"

    diceBefore = diceCoefficient(labelArrayFromSegmentation(matchingAtlas, targetVolumeNode), trueLabels)
    diceAfter = diceCoefficient(labelArrayFromSegmentation(segmentationNode, targetVolumeNode), trueLabels)
    assert diceAfter > diceBefore + 0.03, f"Dice with the true labels did not rise enough: {diceBefore:.3f} -> {diceAfter:.3f}"
    return {"diceBefore": diceBefore, "diceAfter": diceAfter, "ranking": ranking, "segmentationNode": segmentationNode}
