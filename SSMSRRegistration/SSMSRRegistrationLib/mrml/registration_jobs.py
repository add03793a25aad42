"""The jobs of a pair registration and of an atlas-based segmentation, and how their results enter the scene.

The worker returns an ITK displacement field u on the fixed grid in the resampling convention (a fixed-image
point p maps to p + u(p) in the moving image), which Slicer loads as a "from parent" displacement grid: applying
the resulting transform node to the moving volume overlays it on the fixed volume. The output transform records
its inputs as the node references Slicer's registration modules use (fixed and moving volume roles), and the run's
provenance (the worker's provenance file: settings, seed, input digests, software, machine, command) as the attribute
PROVENANCE_ATTRIBUTE.
"""

from __future__ import annotations

import os

import numpy as np
import slicer
import vtk

from .geometry import SlicePlane, gridMatchesVolume, imageDataFromArray
from .jobs import Job, RegistrationError, SceneTransaction
from .storage import PROVENANCE_ATTRIBUTE, readDisplacementFieldTransform, readProvenance, readVolumeArray


class RegistrationJob(Job):
    """A pair registration. After success: ``outputTransformNode``, ``outputVolumeNode`` (if asked for),
    ``propagatedSegmentationNode`` (if a segmentation was given) and ``metrics``."""

    def __init__(self, scene, fixedVolumeNode, movingVolumeNode, segmentationNode=None, outputTransformNode=None,
                 outputVolumeNode=None, jacobianVolumeNode=None, slicePlane: SlicePlane | None = None, **jobOptions):
        self.fixedVolumeNode = fixedVolumeNode
        self.movingVolumeNode = movingVolumeNode
        self.segmentationNode = segmentationNode
        self.outputTransformNode = outputTransformNode
        self.outputVolumeNode = outputVolumeNode
        self.jacobianVolumeNode = jacobianVolumeNode
        self.propagatedSegmentationNode = None
        self._slicePlane = slicePlane
        super().__init__(scene, **jobOptions)

    def _importResults(self) -> None:
        """Read the worker's files, then change the scene in one transaction."""
        fieldPath = self.outputs.get("field") or str(self.temporaryDirectory / "field.nrrd")
        if self._slicePlane is not None:
            sliceFieldPath = str(self.temporaryDirectory / "field-on-fixed-slice.nrrd")
            self._slicePlane.writeFieldOnFixedSlice(fieldPath, sliceFieldPath, self.fixedVolumeNode)
            fieldPath = sliceFieldPath
        gridTransform = readDisplacementFieldTransform(fieldPath)
        if not gridMatchesVolume(gridTransform, self.fixedVolumeNode):
            raise RegistrationError("the displacement field is not on the fixed volume's grid.")
        volumes = []  # (node, voxels, show with the Jacobian colours)
        for node, output, isJacobian in ((self.outputVolumeNode, "warped", False),
                                         (self.jacobianVolumeNode, "jacobian", True)):
            if node is not None:
                if not self.outputs.get(output):
                    raise RegistrationError(f"the worker did not write the {output} volume.")
                volumes.append((node, readVolumeArray(self.outputs[output]), isJacobian))

        requestedTransformNode = self.outputTransformNode
        with SceneTransaction(self.scene) as transaction:
            transaction.onUndo(lambda: setattr(self, "outputTransformNode", requestedTransformNode))
            transaction.onUndo(lambda: setattr(self, "propagatedSegmentationNode", None))
            self._commitTransform(gridTransform, transaction)
            for node, voxels, isJacobian in volumes:
                self._commitVolume(node, voxels, transaction)
                if isJacobian:
                    showJacobianColors(node)
            if self.segmentationNode is not None:
                self._propagateSegmentation()

    def _commitTransform(self, gridTransform, transaction: SceneTransaction) -> None:
        node = self.outputTransformNode
        if node is None:
            name = self.scene.GenerateUniqueName(f"{self.movingVolumeNode.GetName()} to {self.fixedVolumeNode.GetName()} (SSMSR)")
            node = self.outputTransformNode = self.scene.AddNewNodeByClass("vtkMRMLTransformNode", name)
        else:
            previousTransform = node.GetTransformFromParent()  # kept alive here; nothing else modifies it
            previousFixed = node.GetNodeReferenceID(node.GetFixedNodeReferenceRole())
            previousMoving = node.GetNodeReferenceID(node.GetMovingNodeReferenceRole())

            def restore():
                node.SetAndObserveTransformFromParent(previousTransform)
                node.SetNodeReferenceID(node.GetFixedNodeReferenceRole(), previousFixed)
                node.SetNodeReferenceID(node.GetMovingNodeReferenceRole(), previousMoving)

            transaction.onUndo(restore)
        node.SetAndObserveTransformFromParent(gridTransform)
        node.SetNodeReferenceID(node.GetFixedNodeReferenceRole(), self.fixedVolumeNode.GetID())
        node.SetNodeReferenceID(node.GetMovingNodeReferenceRole(), self.movingVolumeNode.GetID())
        previousDescription = node.GetDescription()
        transaction.onUndo(lambda: node.SetDescription(previousDescription))
        node.SetDescription(resultDescription(self.metrics))
        setProvenance(node, readProvenance(self.outputs), transaction)

    def _commitVolume(self, node, voxels: np.ndarray, transaction: SceneTransaction) -> None:
        """Put ``voxels`` (a worker output on the fixed grid) into the existing volume ``node``."""
        fixedDimensions = self.fixedVolumeNode.GetImageData().GetDimensions()
        if voxels.size != int(np.prod(fixedDimensions)):
            raise RegistrationError(f"the volume for '{node.GetName()}' is not on the fixed volume's grid.")
        previousImage = node.GetImageData()
        previousIjkToRas = vtk.vtkMatrix4x4()
        node.GetIJKToRASMatrix(previousIjkToRas)
        previousDisplay = node.GetDisplayNode()
        previousColor = previousDisplay.GetColorNodeID() if previousDisplay is not None else None
        previousWindowLevel = ((previousDisplay.GetAutoWindowLevel(), previousDisplay.GetWindow(),
                                previousDisplay.GetLevel()) if previousDisplay is not None else None)

        def restore():
            node.SetIJKToRASMatrix(previousIjkToRas)
            node.SetAndObserveImageData(previousImage)
            if previousDisplay is not None:
                previousDisplay.SetAndObserveColorNodeID(previousColor)
                automatic, window, level = previousWindowLevel
                previousDisplay.SetWindowLevel(window, level)
                previousDisplay.SetAutoWindowLevel(automatic)

        transaction.onUndo(restore)
        ijkToRas = vtk.vtkMatrix4x4()
        self.fixedVolumeNode.GetIJKToRASMatrix(ijkToRas)
        node.SetIJKToRASMatrix(ijkToRas)
        node.SetAndObserveImageData(imageDataFromArray(voxels.astype(np.float32), fixedDimensions))
        if node.GetDisplayNode() is None:
            node.CreateDefaultDisplayNodes()
        if node.GetDisplayNode() is not None:
            node.GetDisplayNode().AutoWindowLevelOn()

    def _propagateSegmentation(self) -> None:
        """Copy the segmentation, harden the copy through the output transform, and put it on the fixed geometry."""
        source = self.segmentationNode
        name = self.scene.GenerateUniqueName(f"{source.GetName()} on {self.fixedVolumeNode.GetName()}")
        propagated = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        propagated.CreateDefaultDisplayNodes()
        propagated.GetSegmentation().DeepCopy(source.GetSegmentation())
        propagated.SetAndObserveTransformNodeID(self.outputTransformNode.GetID())
        if not slicer.vtkSlicerTransformLogic.hardenTransform(propagated):
            raise RegistrationError("the segmentation could not be transformed.")
        propagated.SetReferenceImageGeometryParameterFromVolumeNode(self.fixedVolumeNode)
        self.propagatedSegmentationNode = propagated


def setProvenance(node, provenance: str | None, transaction: SceneTransaction) -> None:
    """Store ``provenance`` on ``node`` (removing a previous run's when None); undone with ``transaction``."""
    previous = node.GetAttribute(PROVENANCE_ATTRIBUTE)
    transaction.onUndo(lambda: node.SetAttribute(PROVENANCE_ATTRIBUTE, previous) if previous is not None
                       else node.RemoveAttribute(PROVENANCE_ATTRIBUTE))
    if provenance is None:
        node.RemoveAttribute(PROVENANCE_ATTRIBUTE)
    else:
        node.SetAttribute(PROVENANCE_ATTRIBUTE, provenance)


def resultDescription(metrics: dict) -> str:
    """The output transform's description: how the result was made and how much it folds."""
    parts = ["SSMSR deformable registration"]
    folded = metrics.get("percent_non_positive_jacobian")
    if isinstance(folded, (int, float)):
        parts.append(f"{folded:.3g} % of the fixed grid folded (Jacobian determinant <= 0)")
    for key, label in (("ncc_before", "local NCC before"), ("ncc_after", "after")):
        if isinstance(metrics.get(key), (int, float)):
            parts.append(f"{label} {metrics[key]:.4f}")
    return "; ".join(parts) + "."


#: Name of the colour table that shows a Jacobian determinant volume (created once per scene).
JACOBIAN_COLORS_NAME = "SSMSR Jacobian determinant"
#: The Jacobian colours cover these determinant values; their first quarter (values <= 0, folding) is red.
JACOBIAN_DISPLAY_RANGE = (-1.0, 3.0)


def jacobianColorNode(scene):
    """The scene's colour table for Jacobian determinants (created on first use): values <= 0 red, 0..1 blue to
    white (compression), 1 white, 1..3 white to orange (expansion), over JACOBIAN_DISPLAY_RANGE."""
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode")):
        node = scene.GetNthNodeByClass(index, "vtkMRMLColorTableNode")
        if node.GetName() == JACOBIAN_COLORS_NAME:
            return node
    colors = slicer.vtkMRMLColorTableNode()
    colors.SetName(JACOBIAN_COLORS_NAME)
    colors.SetTypeToUser()
    colors.SetNumberOfColors(256)
    low, high = JACOBIAN_DISPLAY_RANGE
    for index in range(256):
        value = low + (high - low) * index / 255.0
        if value <= 0:
            rgb = (1.0, 0.0, 0.0)
        elif value < 1:
            rgb = (value, value, 1.0)
        else:
            fraction = min((value - 1.0) / (high - 1.0), 1.0)
            rgb = (1.0, 1.0 - 0.45 * fraction, 1.0 - fraction)
        colors.SetColor(index, f"J {value:.2f}", *rgb, 1.0)
    scene.AddNode(colors)
    return colors


def showJacobianColors(volumeNode) -> None:
    """Display a Jacobian determinant volume with ``jacobianColorNode`` over JACOBIAN_DISPLAY_RANGE."""
    displayNode = volumeNode.GetDisplayNode()
    if displayNode is None:
        return
    displayNode.SetAndObserveColorNodeID(jacobianColorNode(volumeNode.GetScene()).GetID())
    low, high = JACOBIAN_DISPLAY_RANGE
    displayNode.AutoWindowLevelOff()
    displayNode.SetWindowLevel(high - low, (high + low) / 2)


class AtlasSegmentationJob(Job):
    """An atlas-based segmentation: the worker ranks the atlases by NLCC with the target, registers the best
    (``topK``) onto it and fuses their labels; the result becomes a new segmentation node on the target.

    After success: ``outputSegmentationNode`` (segments named and coloured as in the atlases) and ``ranking``
    (the worker's ranking, best first, with ``atlasName``: the atlas segmentation node's name).
    """

    def __init__(self, scene, targetVolumeNode, atlases: list, segmentNames: list[str], segmentColors: list[tuple],
                 atlasFiles: dict, **jobOptions):
        self.fixedVolumeNode = targetVolumeNode
        self.atlases = atlases
        self.segmentNames = segmentNames
        self.segmentColors = segmentColors
        self.atlasFiles = atlasFiles  # worker's atlas image path -> atlas segmentation node
        self.outputSegmentationNode = None
        self.ranking: list[dict] = []
        super().__init__(scene, **jobOptions)

    def atlasName(self, workerPath) -> str:
        """Name of the atlas segmentation node that the worker's atlas image file ``workerPath`` came from."""
        node = self.atlasFiles.get(os.path.normcase(os.path.abspath(str(workerPath or ""))))
        return node.GetName() if node is not None else str(workerPath)

    def _handleEvent(self, event: dict) -> None:
        if event.get("event") == "atlas":
            event = {**event, "atlasName": self.atlasName(event.get("atlas"))}
            self._log(f"Registering atlas {int(event.get('index', 0)) + 1} of {event.get('count')}: "
                      f"'{event['atlasName']}' (rank {event.get('rank')}, NLCC {float(event.get('nlcc', 0)):.4f}).")
        super()._handleEvent(event)

    def _importResults(self) -> None:
        labelsPath = self.outputs.get("labels") or str(self.temporaryDirectory / "labels.nrrd")
        labels = readVolumeArray(labelsPath)
        targetDimensions = self.fixedVolumeNode.GetImageData().GetDimensions()
        if labels.size != int(np.prod(targetDimensions)):
            raise RegistrationError("the propagated label map is not on the target volume's grid.")
        labels = labels.reshape(tuple(reversed(targetDimensions))).astype(np.int32)
        if labels.min() < 0 or labels.max() > len(self.segmentNames):
            raise RegistrationError(f"the propagated label map holds labels outside 0..{len(self.segmentNames)}.")
        self.ranking = [{**entry, "atlasName": self.atlasName(entry.get("atlas"))}
                        for entry in self.metrics.get("ranking", [])]
        with SceneTransaction(self.scene) as transaction:
            transaction.onUndo(lambda: setattr(self, "outputSegmentationNode", None))
            self._commitSegmentation(labels)
            setProvenance(self.outputSegmentationNode, readProvenance(self.outputs), transaction)
        self._log("Atlas ranking (NLCC with the target): " + "; ".join(
            f"{entry['rank']}. {entry['atlasName']} {entry['nlcc']:.4f}" + (" (registered)" if entry["registered"] else "")
            for entry in self.ranking))

    def _commitSegmentation(self, labels: np.ndarray) -> None:
        """Add a segmentation node on the target geometry with one segment per atlas segment name present."""
        scene = self.scene
        name = scene.GenerateUniqueName(f"{self.fixedVolumeNode.GetName()} segmentation (SSMSR atlas)")
        segmentationNode = self.outputSegmentationNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        segmentationNode.CreateDefaultDisplayNodes()
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(self.fixedVolumeNode)
        labelmapNode = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", scene.GenerateUniqueName("SSMSR labels"))
        try:
            labelmapNode.SetAndObserveImageData(imageDataFromArray(labels, self.fixedVolumeNode.GetImageData().GetDimensions()))
            labelmapNode.CopyOrientation(self.fixedVolumeNode)
            if labels.any() and not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
                    labelmapNode, segmentationNode):
                raise RegistrationError("the propagated labels could not be imported as a segmentation.")
        finally:
            if labelmapNode.GetDisplayNode() is not None:
                scene.RemoveNode(labelmapNode.GetDisplayNode())
            scene.RemoveNode(labelmapNode)
        segmentation = segmentationNode.GetSegmentation()
        for index in range(segmentation.GetNumberOfSegments()):
            segment = segmentation.GetNthSegment(index)
            value = segment.GetLabelValue()
            if 1 <= value <= len(self.segmentNames):
                segment.SetName(self.segmentNames[value - 1])
                segment.SetColor(*self.segmentColors[value - 1])
