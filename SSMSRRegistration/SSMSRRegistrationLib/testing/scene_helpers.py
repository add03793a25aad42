"""Scene and image helpers of the scenarios (test code): real test images that the module ships, volumes
and segmentations from arrays, resampling through a transform node, similarity measures, scene fingerprints.
"""

from __future__ import annotations

import hashlib

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support


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
    """Frames of the echocardiogram cine that the module ships (``Resources/TestData``: frames of pydicom 3's
    ``examples_ybr_color.dcm``, first channel, binned 2x2 to 160 x 120 pixels), as used in the paper.

    The files are read with SimpleITK: Slicer's own pydicom (2.4) lacks the cine, so nothing here imports pydicom.
    ``shrinkFactor`` is relative to the original 320 x 240 frame (a multiple of the shipped 2); each frame is scaled
    to [0, 1]. Returns the float32 arrays, indexed (row, column), and the pixel spacing in millimetres.
    """
    import SimpleITK as sitk

    from ..imaging.sample_data import SHIPPED_ECHO_SHRINK, shipped_echo_frames

    if shrinkFactor % SHIPPED_ECHO_SHRINK:
        raise ValueError(f"shrinkFactor must be a multiple of {SHIPPED_ECHO_SHRINK} (the shipped frames' binning)")
    further = shrinkFactor // SHIPPED_ECHO_SHRINK
    frames = [sitk.BinShrink(frame, [further, further]) for frame in shipped_echo_frames(frameIndices)]
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
