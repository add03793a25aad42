"""Registration scenarios shared by the pytest suite (``slicer-core``, no application) and the Slicer self-test.

Each ``run...Scenario`` function builds its nodes in the given scene, drives a :class:`RegistrationLogic`
through the real worker process, checks the outcome with ``assert`` statements that say what went wrong, and
returns the measured numbers. Needs numpy, VTK, MRML, SimpleITK (to read the worker's field file on its own)
and, for the echocardiogram, pydicom with a JPEG decoder (Pillow).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from .logic import JobState, RegistrationCancelledError, RegistrationError, RegistrationLogic
from .worker_process import waitUntilGone


def rotationMatrix(axis: str, degrees: float) -> np.ndarray:
    """3x3 rotation about the RAS ``axis`` ("x", "y" or "z")."""
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return {"x": np.array([[1.0, 0, 0], [0, c, -s], [0, s, c]]),
            "y": np.array([[c, 0, s], [0, 1.0, 0], [-s, 0, c]]),
            "z": np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])}[axis]


#: Unit i, j, k axes (RAS columns) of a plane tilted out of every anatomical plane, to exercise geometry handling.
OBLIQUE_DIRECTIONS = rotationMatrix("z", 25.0) @ rotationMatrix("x", -60.0)


# ---------------------------------------------------------------------------------------------------------------
# Test images


def echocardiogramFrames(frameIndices=(0, 20), shrinkFactor: int = 2) -> tuple[list[np.ndarray], float]:
    """Frames of pydicom's bundled echocardiogram cine (first channel, 240 x 320 pixels), as used in the paper.

    Each frame is averaged over ``shrinkFactor`` x ``shrinkFactor`` pixel blocks (to keep tests short) and scaled to
    [0, 1]. Returns the float32 arrays, indexed (row, column), and the pixel spacing in millimetres.
    """
    import SimpleITK as sitk

    from .sample_data import echo_frames

    frames = [sitk.BinShrink(frame, [shrinkFactor, shrinkFactor]) for frame in echo_frames(frameIndices)]
    arrays = [sitk.GetArrayFromImage(frame).astype(np.float32) / 255.0 for frame in frames]
    return arrays, float(frames[0].GetSpacing()[0])


def smoothArray(array: np.ndarray, sigmaVoxels: float) -> np.ndarray:
    """Gaussian smoothing along every axis (separable, zero padding), float64."""
    radius = max(int(3 * sigmaVoxels), 1)
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (offsets / sigmaVoxels) ** 2)
    kernel /= kernel.sum()
    smoothed = np.asarray(array, dtype=np.float64)
    for axis in range(smoothed.ndim):
        if smoothed.shape[axis] > 1:
            smoothed = np.apply_along_axis(lambda line: np.convolve(line, kernel, mode="same"), axis, smoothed)
    return smoothed


def echocardiogramLabels(frame: np.ndarray) -> np.ndarray:
    """Bright tissue (myocardium, valves, pericardium) of an echo frame: the brightest 15 % after smoothing, uint8."""
    smoothed = smoothArray(frame, 1.5)
    return (smoothed > np.percentile(smoothed, 85)).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# Nodes from arrays and back


def addVolumeFromArray(scene, array: np.ndarray, name: str, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                       directions=np.eye(3), labelmap: bool = False):
    """Add a scalar (or label map) volume node for ``array`` indexed (k, j, i), or (j, i) for a single slice.

    ``spacing`` (mm), ``origin`` (RAS mm) and ``directions`` (3x3, unit i, j, k axes as RAS columns) set IJK-to-RAS.
    """
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[np.newaxis]
    className = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    node = scene.AddNewNodeByClass(className, name)
    imageData = vtk.vtkImageData()
    imageData.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    imageData.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.ascontiguousarray(array).ravel(), deep=True))
    node.SetAndObserveImageData(imageData)
    ijkToRas = vtk.vtkMatrix4x4()
    for row in range(3):
        for column in range(3):
            ijkToRas.SetElement(row, column, directions[row][column] * spacing[column])
        ijkToRas.SetElement(row, 3, origin[row])
    node.SetIJKToRASMatrix(ijkToRas)
    return node


def arrayFromVolume(volumeNode) -> np.ndarray:
    """Voxels of a volume node as a (k, j, i) array (a copy)."""
    imageData = volumeNode.GetImageData()
    columns, rows, slices = imageData.GetDimensions()
    return numpy_support.vtk_to_numpy(imageData.GetPointData().GetScalars()).reshape(slices, rows, columns).copy()


def ijkToRasArray(volumeNode) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(row, column) for column in range(4)] for row in range(4)])


def addSegmentationFromLabels(scene, labelArray: np.ndarray, referenceVolumeNode, name: str):
    """Add a segmentation node with one segment per non-zero label of ``labelArray`` (on the reference grid)."""
    labelmapNode = addVolumeFromArray(scene, labelArray.astype(np.int16), name + " labels", labelmap=True)
    labelmapNode.CopyOrientation(referenceVolumeNode)
    segmentationNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolumeNode)
    if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmapNode, segmentationNode):
        raise RuntimeError("Importing the label map into a segmentation failed.")
    scene.RemoveNode(labelmapNode)
    return segmentationNode


def labelArrayFromSegmentation(segmentationNode, referenceVolumeNode) -> np.ndarray:
    """All segments of ``segmentationNode`` as one label array (k, j, i) on the reference volume's grid."""
    scene = segmentationNode.GetScene()
    labelmapNode = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "export")
    try:
        segmentIds = vtk.vtkStringArray()
        segmentationNode.GetSegmentation().GetSegmentIDs(segmentIds)
        if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                segmentationNode, segmentIds, labelmapNode, referenceVolumeNode):
            raise RuntimeError("Exporting the segmentation to a label map failed.")
        return arrayFromVolume(labelmapNode)
    finally:
        if labelmapNode.GetDisplayNode() is not None:
            scene.RemoveNode(labelmapNode.GetDisplayNode())
        scene.RemoveNode(labelmapNode)


def resampleThroughTransform(movingVolumeNode, transformNode, referenceVolumeNode, interpolation: str = "linear") -> np.ndarray:
    """Moving voxels sampled at T(p) for every reference voxel centre p, where T is the transform node's
    "from parent" (resampling) transform in RAS; ``interpolation`` is "linear" or "nearest". Returns (k, j, i).

    This is what putting the moving volume under the transform node shows on the reference grid.
    """
    rasToMovingIjk = vtk.vtkMatrix4x4()
    movingVolumeNode.GetRASToIJKMatrix(rasToMovingIjk)
    referenceIjkToRas = vtk.vtkMatrix4x4()
    referenceVolumeNode.GetIJKToRASMatrix(referenceIjkToRas)
    referenceIjkToMovingIjk = vtk.vtkGeneralTransform()
    referenceIjkToMovingIjk.PostMultiply()
    referenceIjkToMovingIjk.Concatenate(referenceIjkToRas)
    if transformNode is not None:
        referenceIjkToMovingIjk.Concatenate(transformNode.GetTransformFromParent())
    referenceIjkToMovingIjk.Concatenate(rasToMovingIjk)

    reslice = vtk.vtkImageReslice()
    reslice.SetInputData(movingVolumeNode.GetImageData())
    reslice.SetResliceTransform(referenceIjkToMovingIjk)
    reslice.SetOutputExtent(referenceVolumeNode.GetImageData().GetExtent())
    reslice.SetOutputOrigin(0, 0, 0)
    reslice.SetOutputSpacing(1, 1, 1)
    reslice.SetOutputScalarType(vtk.VTK_FLOAT)
    reslice.SetBackgroundLevel(0)
    if interpolation == "nearest":
        reslice.SetInterpolationModeToNearestNeighbor()
    else:
        reslice.SetInterpolationModeToLinear()
    reslice.Update()
    columns, rows, slices = referenceVolumeNode.GetImageData().GetDimensions()
    return numpy_support.vtk_to_numpy(reslice.GetOutput().GetPointData().GetScalars()).reshape(slices, rows, columns).copy()


def addKnownDisplacementTransform(scene, referenceVolumeNode, amplitudeMm: float, wavelengthMm: float):
    """A transform node with a smooth "from parent" displacement grid on the reference geometry (RAS, mm).

    u(p) = amplitude * (sin(2 pi y'/L), sin(2 pi x'/L), 0) in the reference's own axes, where x', y' are the
    reference-frame coordinates of p; it stays within the slice plane of single-slice references.
    """
    ijkToRas = ijkToRasArray(referenceVolumeNode)
    spacing = np.linalg.norm(ijkToRas[:3, :3], axis=0)
    axes = ijkToRas[:3, :3] / spacing
    columns, rows, slices = referenceVolumeNode.GetImageData().GetDimensions()
    k, j, i = np.meshgrid(np.arange(slices), np.arange(rows), np.arange(columns), indexing="ij")
    x, y = i * spacing[0], j * spacing[1]
    along = np.stack([amplitudeMm * np.sin(2 * np.pi * y / wavelengthMm),
                      amplitudeMm * np.sin(2 * np.pi * x / wavelengthMm),
                      np.zeros_like(x, dtype=np.float64)], axis=-1)
    vectors = along @ axes.T  # (k, j, i, 3) RAS millimetres

    grid = vtk.vtkImageData()
    grid.SetDimensions(columns, rows, slices)
    grid.SetOrigin(*ijkToRas[:3, 3])
    grid.SetSpacing(*spacing)
    grid.GetPointData().SetScalars(numpy_support.numpy_to_vtk(vectors.reshape(-1, 3).astype(np.float64), deep=True))
    direction = vtk.vtkMatrix4x4()
    for row in range(3):
        for column in range(3):
            direction.SetElement(row, column, axes[row, column])
    gridTransform = slicer.vtkOrientedGridTransform()
    gridTransform.SetDisplacementGridData(grid)
    gridTransform.SetGridDirectionMatrix(direction)
    gridTransform.SetInterpolationModeToLinear()
    transformNode = scene.AddNewNodeByClass("vtkMRMLTransformNode", "known deformation")
    transformNode.SetAndObserveTransformFromParent(gridTransform)
    return transformNode


# ---------------------------------------------------------------------------------------------------------------
# Measures


def normalizedCrossCorrelation(a: np.ndarray, b: np.ndarray) -> float:
    """Global normalised cross-correlation of two arrays of the same shape."""
    a = np.asarray(a, dtype=np.float64).ravel() - np.mean(a)
    b = np.asarray(b, dtype=np.float64).ravel() - np.mean(b)
    return float(a @ b / np.sqrt((a @ a) * (b @ b) + 1e-12))


def diceCoefficient(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of the non-zero voxels of two arrays of the same shape."""
    a, b = np.asarray(a) != 0, np.asarray(b) != 0
    return float(2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1))


def nodeFingerprint(node) -> tuple:
    """What a node holds, as comparable values: class, name, parent transform, and a digest of its data."""
    parent = node.GetParentTransformNode() if hasattr(node, "GetParentTransformNode") else None
    digest = hashlib.sha256()
    if isinstance(node, slicer.vtkMRMLVolumeNode) and node.GetImageData() is not None:
        digest.update(arrayFromVolume(node).tobytes())
        digest.update(ijkToRasArray(node).tobytes())
    elif isinstance(node, slicer.vtkMRMLSegmentationNode):
        segmentation = node.GetSegmentation()
        for index in range(segmentation.GetNumberOfSegments()):
            segment = segmentation.GetNthSegment(index)
            digest.update(segment.GetName().encode())
            labelmap = segment.GetRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
            if labelmap is not None and labelmap.GetPointData().GetScalars() is not None:
                digest.update(numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars()).tobytes())
                digest.update(np.array(labelmap.GetExtent()).tobytes())
    elif isinstance(node, slicer.vtkMRMLTransformNode):
        transform = node.GetTransformFromParent()
        digest.update((transform.GetClassName() if transform is not None else "none").encode())
        if isinstance(transform, vtk.vtkGridTransform) and transform.GetDisplacementGrid() is not None:
            digest.update(numpy_support.vtk_to_numpy(transform.GetDisplacementGrid().GetPointData().GetScalars()).tobytes())
        elif isinstance(transform, vtk.vtkLinearTransform):
            digest.update(np.array([transform.GetMatrix().GetElement(r, c) for r in range(4) for c in range(4)]).tobytes())
    return (node.GetClassName(), node.GetName(), parent.GetID() if parent is not None else None, digest.hexdigest())


def sceneSnapshot(scene) -> dict:
    """Fingerprint of every node in the scene, by node ID."""
    return {scene.GetNthNode(index).GetID(): nodeFingerprint(scene.GetNthNode(index)) for index in range(scene.GetNumberOfNodes())}


def assertSceneUnchanged(before: dict, after: dict, what: str) -> None:
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(nodeId for nodeId in set(before) & set(after) if before[nodeId] != after[nodeId])
    assert not (added or removed or changed), f"{what} changed the scene: added {added}, removed {removed}, changed {changed}"


def transformFieldMismatchMm(transformNode, fieldPath: str, fixedVolumeNode, numberOfPoints: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Compare the transform node with the worker's field file at fixed voxel centres.

    The file (read with SimpleITK) is an ITK displacement field: at fixed voxel (i, j[, k]) the vector u (LPS mm,
    or in-plane millimetres along the fixed slice's i and j axes for a 2D field) says that the fixed point p maps to
    p + u. Returns (largest distance in mm between that and the transform node's "from parent" mapping of p,
    largest |u| in mm) over up to ``numberOfPoints`` random voxels.
    """
    import SimpleITK as sitk

    field = sitk.GetArrayFromImage(sitk.ReadImage(str(fieldPath))).astype(np.float64)  # (..., components)
    ijkToRas = ijkToRasArray(fixedVolumeNode)
    axes = ijkToRas[:3, :3] / np.linalg.norm(ijkToRas[:3, :3], axis=0)
    columns, rows, slices = fixedVolumeNode.GetImageData().GetDimensions()
    if field.ndim == 3:  # 2D field (rows, columns, 2) in the fixed slice's plane frame
        assert slices == 1 and field.shape[:2] == (rows, columns), f"2D field of shape {field.shape} does not fit the fixed grid"
        field = field[np.newaxis]
        toRas = axes[:, :2]
    else:
        assert field.shape[:3] == (slices, rows, columns), f"field of shape {field.shape} does not fit the fixed grid"
        toRas = np.diag([-1.0, -1.0, 1.0])
    generator = np.random.default_rng(seed)
    count = min(numberOfPoints, slices * rows * columns)
    picks = generator.choice(slices * rows * columns, size=count, replace=False)
    fromParent = transformNode.GetTransformFromParent()
    worst = 0.0
    for k, j, i in zip(*np.unravel_index(picks, (slices, rows, columns))):
        point = ijkToRas @ np.array([i, j, k, 1.0])
        expected = point[:3] + toRas @ field[k, j, i]
        actual = np.array(fromParent.TransformPoint(point[:3]))
        worst = max(worst, float(np.linalg.norm(actual - expected)))
    return worst, float(np.linalg.norm(field, axis=-1).max())


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


def runRealPairScenario(logic: RegistrationLogic, fixedVolumeNode, movingVolumeNode, stepsPerScale: int,
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
                                stepsPerScale=stepsPerScale, device=device, waitForCompletion=False,
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
                                       amplitudeMm: float, wavelengthMm: float, stepsPerScale: int,
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
        stepsPerScale=stepsPerScale, device=device))
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
    job = logic.registerVolumes(fixedVolumeNode, movingVolumeNode, outputVolumeNode=None, stepsPerScale=100000,
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
        logic.registerVolumes(fixedVolumeNode, movingVolumeNode, stepsPerScale=100000, device=device,
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
        logic.registerVolumes(fixedVolumeNode, movingVolumeNode, fixedMaskNode=emptyMaskNode, stepsPerScale=5, device=device)
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
                                 otherAtlases: list, amplitudeMm: float, wavelengthMm: float, stepsPerScale: int,
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
        targetVolumeNode, atlases, topK=topK, scales=scales, stepsPerScale=stepsPerScale, device=device,
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
