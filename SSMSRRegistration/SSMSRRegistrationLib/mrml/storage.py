"""Files exchanged with the worker, read and written through Slicer's storage nodes (which convert RAS <-> LPS).

3D volumes go out as NRRD through the volume storage node; single slices as 2D images in the fixed slice's plane
frame (see ``geometry.SlicePlane``). Displacement fields come back through the transform storage node.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import slicer
import vtk

from .geometry import SlicePlane, imageDataFromArray, isSingleSlice, volumeArray
from .jobs import RegistrationError


def readDisplacementFieldTransform(path: str):
    """Read an ITK displacement field file with Slicer's transform storage node.

    Returns the ``vtkOrientedGridTransform`` that maps a RAS point p (mm) to p + u(p): the "from parent"
    (resampling) transform. The storage node converts LPS vectors and geometry to RAS. Slicer's reader interpolates
    the grid cubically (as the slicer-core wheel reports); it is set to linear here, as ITK, SimpleITK and ANTs
    apply a displacement field, so that the node maps points exactly as the field file does.
    """
    loadedNode = slicer.vtkMRMLTransformNode()
    storageNode = slicer.vtkMRMLTransformStorageNode()
    storageNode.SetFileName(str(path))
    if not storageNode.ReadData(loadedNode):
        raise RegistrationError(f"Slicer could not read the displacement field '{path}'.")
    gridTransform = loadedNode.GetTransformFromParent()
    if not isinstance(gridTransform, vtk.vtkGridTransform) or gridTransform.GetDisplacementGrid() is None:
        raise RegistrationError(f"'{path}' did not load as a displacement field.")
    gridTransform.SetInterpolationModeToLinear()
    return gridTransform


def readVolumeArray(path: str) -> np.ndarray:
    """Voxel array (k, j, i) of an image file read with Slicer's volume storage node."""
    loadedNode = slicer.vtkMRMLScalarVolumeNode()
    storageNode = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storageNode.SetFileName(str(path))
    if not storageNode.ReadData(loadedNode):
        raise RegistrationError(f"Slicer could not read the image '{path}'.")
    return volumeArray(loadedNode)


def writeVolume(volumeNode, path: Path, slicePlane: SlicePlane | None, role: str) -> str:
    """Write a volume node's voxels (ignoring parent transforms) for the worker; return the path.

    3D volumes: NRRD in LPS through Slicer's volume storage node. Single slices: a 2D image in the fixed
    slice's plane frame (see :class:`SlicePlane`).
    """
    if slicePlane is None:
        if isSingleSlice(volumeNode):
            raise RegistrationError(f"The {role} '{volumeNode.GetName()}' is a single slice but the fixed volume "
                                    "is 3D; both must be 2D or both 3D.")
        storageNode = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storageNode.SetFileName(str(path))
        storageNode.SetUseCompression(False)
        if not storageNode.WriteData(volumeNode):
            raise RegistrationError(f"Could not write the {role} '{volumeNode.GetName()}' to {path}.")
        return str(path)
    if not isSingleSlice(volumeNode):
        raise RegistrationError(f"The {role} '{volumeNode.GetName()}' is 3D but the fixed volume is a single "
                                "slice; both must be 2D or both 3D.")
    import SimpleITK as sitk  # bundled with Slicer; only needed for 2D images

    spacing, origin, direction = slicePlane.imageGeometry(volumeNode, role)
    image = sitk.GetImageFromArray(volumeArray(volumeNode)[0])
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    sitk.WriteImage(image, str(path))
    return str(path)


def writeAtlasLabels(scene, segmentationNode, volumeNode, segmentNames: list[str], path: Path,
                     slicePlane: SlicePlane | None) -> str:
    """Write an atlas segmentation as one label map on its volume's grid, label k+1 for ``segmentNames[k]``."""
    labels = np.zeros(volumeArray(volumeNode).shape, np.uint16 if len(segmentNames) > 255 else np.uint8)
    segmentation = segmentationNode.GetSegmentation()
    exportNode = slicer.vtkMRMLLabelMapVolumeNode()
    scene.AddNode(exportNode)
    try:
        for index in range(segmentation.GetNumberOfSegments()):
            segmentIds = vtk.vtkStringArray()
            segmentIds.InsertNextValue(segmentation.GetNthSegmentID(index))
            if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                    segmentationNode, segmentIds, exportNode, volumeNode):
                raise RegistrationError(f"Could not export the segmentation '{segmentationNode.GetName()}' onto "
                                        f"its volume '{volumeNode.GetName()}'.")
            inside = volumeArray(exportNode) != 0
            if inside.shape != labels.shape:
                raise RegistrationError(f"The segmentation '{segmentationNode.GetName()}' did not export onto the "
                                        f"grid of '{volumeNode.GetName()}'.")
            labels[inside] = segmentNames.index(segmentation.GetNthSegment(index).GetName()) + 1
    finally:
        if exportNode.GetDisplayNode() is not None:
            scene.RemoveNode(exportNode.GetDisplayNode())
        scene.RemoveNode(exportNode)
    labelNode = slicer.vtkMRMLLabelMapVolumeNode()
    labelNode.SetAndObserveImageData(imageDataFromArray(labels, volumeNode.GetImageData().GetDimensions()))
    ijkToRas = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(ijkToRas)
    labelNode.SetIJKToRASMatrix(ijkToRas)
    labelNode.SetName(f"{segmentationNode.GetName()} labels")
    return writeVolume(labelNode, path, slicePlane, f"labels of the atlas '{segmentationNode.GetName()}'")


def writeInitialTransform(transformNode, path: Path, slicePlane: SlicePlane | None) -> str:
    """Write a linear transform node as an ITK transform file for the worker's ``--initial``; return the path.

    Slicer's transform storage node writes the resampling transform (a fixed-image LPS point to the moving-image
    point), which is what the worker expects. Single slices are registered in their plane frame, where a 3D
    transform has no meaning, so a single-slice registration does not take one.
    """
    if slicePlane is not None:
        raise RegistrationError("An initial transform is only supported for 3D volumes; harden it on the moving "
                                "slice instead.")
    storageNode = slicer.vtkMRMLTransformStorageNode()
    storageNode.SetFileName(str(path))
    if not storageNode.WriteData(transformNode):
        raise RegistrationError(f"Could not write the initial transform '{transformNode.GetName()}' to {path}.")
    return str(path)


#: Attribute of a result node holding the JSON provenance record of the run that made it.
PROVENANCE_ATTRIBUTE = "SSMSR.Provenance"


def readProvenance(outputs: dict) -> str | None:
    """The text of the worker's provenance file (its ``finished`` outputs name it), or None when there is none."""
    path = outputs.get("provenance")
    if not path or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as stream:
        return stream.read()
