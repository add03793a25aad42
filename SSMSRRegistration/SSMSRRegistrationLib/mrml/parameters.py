"""The checks of a run's nodes and inputs that say, in sentences for the user, what prevents it.

Used by the logic before it starts a worker and by the panel to explain a disabled Apply button. The run options
(schedule, steps, precision, smoothness weight, NCC window, working spacing, device, ...) are not checked here: a
``common.run_config.RunConfiguration`` checks them when it is built, once for every interface.
"""

from __future__ import annotations

import os

import slicer

from ..common.run_config import RunConfiguration

#: Schedules offered next to the free-text schedule.
SCALE_PRESETS = ("1/2,1", "1/4,1/2,1", "1/8,1/4,1/2,1")
#: What a run of each kind uses when nothing is given: the default preset's values (``ssmsr register``'s and
#: ``ssmsr track``'s defaults).
DEFAULT_PAIR_RUN = RunConfiguration().resolve("pair")
DEFAULT_CINE_RUN = RunConfiguration().resolve("cine")
#: Pre-alignments the worker runs before the deformable stage ("auto": affine for 3D volumes, none for 2D).
ALIGNMENTS = ("auto", "none", "rigid", "affine")


def stepProblems(steps: int | None, modelFile: str | None = None, cine: bool = False) -> list[str]:
    """A sentence if the (resolved) steps are too few: at least 1, or 0 with a model (inference only; a cine
    always trains)."""
    if steps is not None and int(steps) >= (0 if modelFile and not cine else 1):
        return []
    if cine:
        return ["Tracking needs at least 1 training step."]
    return ["Steps per scale must be at least 1 (0 is allowed with a model: inference only)."]


def alignmentProblems(alignFirst: str, initialTransformNode=None, outputTransformNode=None) -> list[str]:
    """What is wrong with the pre-alignment choice and the optional initial transform node."""
    problems = []
    if alignFirst not in ALIGNMENTS:
        problems.append(f"Unknown pre-alignment {alignFirst!r}; choose one of: {', '.join(ALIGNMENTS)}.")
    if initialTransformNode is not None:
        if not initialTransformNode.IsLinear():
            problems.append(f"The initial transform '{initialTransformNode.GetName()}' is not linear; give a rigid or "
                            "affine transform (e.g. from General Registration).")
        if initialTransformNode is outputTransformNode:
            problems.append("The initial transform must not be the output transform; create a new output transform.")
    return problems


def inputProblems(fixedVolumeNode, movingVolumeNode, fixedMaskNode=None, segmentationNode=None, outputVolumeNode=None,
                  outputTransformNode=None, jacobianVolumeNode=None) -> list[str]:
    """Everything that prevents a registration with these inputs, as sentences for the user (empty when ready)."""
    problems = []
    if fixedVolumeNode is None:
        problems.append("Select a fixed volume.")
    if movingVolumeNode is None:
        problems.append("Select a moving volume.")
    for role, node in (("fixed volume", fixedVolumeNode), ("moving volume", movingVolumeNode), ("fixed mask", fixedMaskNode)):
        if node is not None and node.GetImageData() is None:
            problems.append(f"The {role} '{node.GetName()}' has no image data.")
        elif node is not None and node.GetImageData().GetNumberOfScalarComponents() != 1:
            problems.append(f"The {role} '{node.GetName()}' is a colour or vector volume; convert it to a scalar "
                            "volume first (Volumes module, Convert).")
    if fixedVolumeNode is not None and fixedVolumeNode is movingVolumeNode:
        problems.append("Fixed and moving volumes are the same node; select two different volumes.")
    if outputVolumeNode is not None and outputVolumeNode in (fixedVolumeNode, movingVolumeNode, fixedMaskNode):
        problems.append("The output volume must not be one of the inputs; create a new volume for it.")
    if jacobianVolumeNode is not None and jacobianVolumeNode in (fixedVolumeNode, movingVolumeNode, fixedMaskNode,
                                                                 outputVolumeNode):
        problems.append("The Jacobian volume must be a volume of its own; create a new volume for it.")
    for role, node in (("fixed volume", fixedVolumeNode), ("fixed mask", fixedMaskNode)):
        if node is not None and node.GetParentTransformNode() is not None:
            problems.append(f"The {role} '{node.GetName()}' is under a transform; harden or remove the transform first.")
    for role, node in (("moving volume", movingVolumeNode), ("segmentation", segmentationNode)):
        parent = node.GetParentTransformNode() if node is not None else None
        if parent is not None and parent is not outputTransformNode:
            problems.append(f"The {role} '{node.GetName()}' is under the transform '{parent.GetName()}'; harden or "
                            "remove it first (a transform that is the output transform itself is fine).")
    return problems


def modelFileProblems(modelFile: str | None) -> list[str]:
    """Problems with an optional pretrained model file (checked for existence only: the GUI does not load PyTorch)."""
    if not modelFile:
        return []
    if not os.path.isfile(modelFile):
        return [f"The model file '{modelFile}' does not exist; choose a file written by `ssmsr train`, or none to "
                "train from scratch."]
    return []


def atlasVolumeNode(segmentationNode):
    """The volume an atlas segmentation was drawn on: its reference geometry ("source") volume, or None."""
    if segmentationNode is None:
        return None
    node = segmentationNode.GetNodeReference(segmentationNode.GetReferenceImageGeometryReferenceRole())
    return node if isinstance(node, slicer.vtkMRMLScalarVolumeNode) else None


def atlasInputProblems(targetVolumeNode, atlases, topK: int = 1, fixedMaskNode=None,
                       modelFile: str | None = None) -> list[str]:
    """Everything that prevents an atlas-based segmentation, as sentences for the user (empty when ready).

    ``atlases`` is a list of (atlas volume node, atlas segmentation node) pairs; a None volume means the
    segmentation has no source volume.
    """
    problems = []
    if targetVolumeNode is None:
        problems.append("Select the volume to segment (the fixed volume).")
    if not atlases:
        problems.append("Check one or more atlas segmentations.")
    for volumeNode, segmentationNode in atlases:
        if volumeNode is None:
            problems.append(f"The atlas segmentation '{segmentationNode.GetName()}' has no source volume; select its "
                            "volume as source geometry in the Segment Editor (or create it from the volume).")
            continue
        if volumeNode is targetVolumeNode:
            problems.append(f"The atlas '{segmentationNode.GetName()}' is drawn on the volume to segment itself.")
        if segmentationNode.GetSegmentation().GetNumberOfSegments() == 0:
            problems.append(f"The atlas segmentation '{segmentationNode.GetName()}' has no segments.")
        for role, node in (("atlas volume", volumeNode), ("atlas segmentation", segmentationNode)):
            if node.GetParentTransformNode() is not None:
                problems.append(f"The {role} '{node.GetName()}' is under a transform; harden or remove it first.")
        if volumeNode.GetImageData() is None:
            problems.append(f"The atlas volume '{volumeNode.GetName()}' has no image data.")
    if atlases and not 1 <= int(topK) <= len(atlases):
        problems.append(f"The number of atlases to register ({topK}) must be between 1 and the {len(atlases)} "
                        "checked atlases.")
    if targetVolumeNode is not None:
        problems += [problem for problem in inputProblems(targetVolumeNode, None, fixedMaskNode)
                     if problem != "Select a moving volume."]
    return problems + modelFileProblems(modelFile)


def isCineNode(node) -> bool:
    return isinstance(node, (slicer.vtkMRMLSequenceNode, slicer.vtkMRMLScalarVolumeNode))


def cineInputProblems(cineNode, maskNode=None) -> list[str]:
    """Everything that prevents tracking with these inputs, as sentences for the user (empty when ready)."""
    problems = []
    if cineNode is None:
        problems.append("Select a cine: a sequence of 2D images or of 3D volumes, or a volume whose third axis is time.")
    elif not isCineNode(cineNode):
        problems.append(f"'{cineNode.GetName()}' is neither a sequence of 2D images nor a volume.")
    elif isinstance(cineNode, slicer.vtkMRMLSequenceNode):
        if cineNode.GetNumberOfDataNodes() < 2:
            problems.append(f"The sequence '{cineNode.GetName()}' has {cineNode.GetNumberOfDataNodes()} frame(s); "
                            "tracking needs at least two frames.")
    elif cineNode.GetImageData() is None:
        problems.append(f"The volume '{cineNode.GetName()}' has no image data.")
    elif cineNode.GetImageData().GetDimensions()[2] < 2:
        problems.append(f"The volume '{cineNode.GetName()}' has a single frame; tracking needs at least two frames.")
    elif cineNode.GetParentTransformNode() is not None:
        problems.append(f"The volume '{cineNode.GetName()}' is under a transform; harden or remove it first.")
    if maskNode is not None:
        if maskNode.GetImageData() is None:
            problems.append(f"The mask '{maskNode.GetName()}' has no image data.")
        elif maskNode.GetImageData().GetDimensions()[2] != 1:
            problems.append(f"The mask '{maskNode.GetName()}' must be a single slice on the frames' grid.")
    return problems
