"""A segmentation drawn on the reference frame of a tracked cine, propagated to every frame: a new sequence of
segmentation nodes in the tracking's browser (see ``cine`` for the transforms it goes through). Qt-free."""

from __future__ import annotations

import slicer
import vtk

from .cine import (CINE_REFERENCE_ROLE, REFERENCE_FRAME_ATTRIBUTE, frameGeometryNode, newSequenceLike,
                   sequenceBrowsersOf, synchronizeWithBrowser)
from .geometry import ijkToRas
from .jobs import RegistrationError, SceneTransaction


def propagationProblems(cineNode, reference, segmentationNode) -> list[str]:
    """Sentences for the user when a tracking of ``cineNode`` with ``reference`` (None: consecutive pairs) cannot
    propagate ``segmentationNode`` (None: nothing to propagate) afterwards, as :func:`propagateSegmentation` would
    refuse it once the worker has run: it needs a reference frame (the frame the segmentation is drawn on), a
    sequence node, and at least one segment."""
    if segmentationNode is None:
        return []
    name = segmentationNode.GetName()
    problems = []
    if reference is None:
        problems.append(f"The segmentation '{name}' is propagated from the frame it is drawn on: choose that frame as "
                        "the reference frame, or select no segmentation.")
    if cineNode is not None and not isinstance(cineNode, slicer.vtkMRMLSequenceNode):
        problems.append(f"A segmentation is propagated through a sequence node; '{cineNode.GetName()}' is a volume "
                        "whose third axis is time.")
    if segmentationNode.GetSegmentation().GetNumberOfSegments() == 0:
        problems.append(f"The segmentation '{name}' has no segment.")
    return problems


def propagateSegmentation(scene, segmentationNode, transformSequenceNode, sequencesLogic=None):
    """A new sequence of segmentation nodes, one per frame (the transforms' index values), in the transforms'
    browser: ``segmentationNode``, drawn on the reference frame R of a tracking with a reference frame, warped onto
    each frame. Returns the new sequence node; ``segmentationNode`` is not modified.

    Frame t's transform maps a point p of frame t to p + u_t(p) in frame R, so frame t's segmentation is frame R's
    resampled through it: what hardening a copy under frame t's transform does (binary labelmap, nearest
    neighbour). Each result is then resampled onto frame t's grid (the Segment Editor's "specify geometry"), which
    also becomes its reference geometry. Frame R's is the copy itself. Raises RegistrationError (the scene unchanged)
    when the inputs do not fit.
    """
    cineNode = transformSequenceNode.GetNodeReference(CINE_REFERENCE_ROLE) if transformSequenceNode else None
    reference = transformSequenceNode.GetAttribute(REFERENCE_FRAME_ATTRIBUTE) if transformSequenceNode else None
    if not isinstance(segmentationNode, slicer.vtkMRMLSegmentationNode) \
            or segmentationNode.GetSegmentation().GetNumberOfSegments() == 0:
        raise RegistrationError("Select a segmentation with at least one segment, drawn on the reference frame.")
    if not isinstance(cineNode, slicer.vtkMRMLSequenceNode) \
            or cineNode.GetNumberOfDataNodes() != transformSequenceNode.GetNumberOfDataNodes():
        raise RegistrationError("Select a transform sequence made by SSMSR tracking of a sequence node (its cine is "
                                "missing, or is a volume whose third axis is time).")
    if reference is None:
        raise RegistrationError(f"The transforms '{transformSequenceNode.GetName()}' register consecutive frames; "
                                "track with a reference frame (reference=R, R the frame the segmentation is drawn "
                                "on) to propagate a segmentation.")
    parent = segmentationNode.GetParentTransformNode()
    browsers = sequenceBrowsersOf(scene, transformSequenceNode)
    if parent is not None and not any(parent is browser.GetProxyNode(transformSequenceNode) for browser in browsers):
        raise RegistrationError(f"The segmentation '{segmentationNode.GetName()}' is under the transform "
                                f"'{parent.GetName()}'; harden or remove it first.")
    labelmapName = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    with SceneTransaction(scene) as transaction:
        sequence = newSequenceLike(scene, f"{segmentationNode.GetName()} propagated (SSMSR)", transformSequenceNode)
        for frame in range(transformSequenceNode.GetNumberOfDataNodes()):
            copy = slicer.vtkMRMLSegmentationNode()
            copy.SetName(f"{segmentationNode.GetName()} frame {frame}")
            segmentation = copy.GetSegmentation()
            segmentation.DeepCopy(segmentationNode.GetSegmentation())
            if segmentation.GetSourceRepresentationName() != labelmapName:
                segmentation.CreateRepresentation(labelmapName)
                segmentation.SetSourceRepresentationName(labelmapName)
            if frame != int(reference):
                # What vtkSlicerTransformLogic::hardenTransform does: apply the transform to world (a general
                # transform: the inverse of the "from parent" grid); the labelmap is resampled through the grid
                # itself, the field is not inverted.
                toWorld = vtk.vtkGeneralTransform()
                toWorld.Concatenate(transformSequenceNode.GetNthDataNode(frame).GetTransformFromParent().GetInverse())
                copy.ApplyTransform(toWorld)
            frameNode = cineNode.GetNthDataNode(frame)
            geometry = frameGeometryNode(frameNode.GetImageData().GetDimensions(), ijkToRas(frameNode))
            resampler = slicer.vtkSlicerSegmentationGeometryLogic()
            resampler.SetInputSegmentationNode(copy)
            resampler.SetSourceGeometryNode(geometry)
            error = resampler.CalculateOutputGeometry()
            if error:
                raise RegistrationError(f"the segmentation could not be resampled onto frame {frame}: {error}")
            resampler.ResampleLabelmapsInSegmentationNode()
            copy.SetReferenceImageGeometryParameterFromVolumeNode(geometry)
            if sequence.SetDataNodeAtValue(copy, transformSequenceNode.GetNthIndexValue(frame)) is None:
                raise RegistrationError(f"the segmentation of frame {frame} could not be added to the sequence.")
        sequence.SetNodeReferenceID(CINE_REFERENCE_ROLE, cineNode.GetID())
        synchronizeWithBrowser(scene, sequence, transformSequenceNode, transaction, sequencesLogic)
    return sequence
