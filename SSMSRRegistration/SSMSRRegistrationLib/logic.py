"""Qt-free Slicer logic of the SSMSR module: MRML nodes in, background worker, MRML nodes out.

Coordinate systems: MRML nodes hold geometry in RAS millimetres. Files exchanged with the worker are ITK
images, whose physical frame is LPS millimetres; Slicer's storage nodes convert between the two. The worker
returns an ITK displacement field u on the fixed grid in the resampling convention (a fixed-image point p maps
to p + u(p) in the moving image), which Slicer loads as a "from parent" displacement grid: applying the
resulting transform node to the moving volume overlays it on the fixed volume.

Single-slice volumes (2D images such as ultrasound frames, stored by Slicer as volumes one slice thick) are
sent to the worker as 2D images expressed in the fixed slice's own plane frame (in-plane millimetres along the
fixed volume's i and j axes); the 2D field that comes back is rewritten as a one-slice 3D field on the fixed
volume's geometry before Slicer loads it.

Everything here runs on any ``vtkMRMLScene``: inside Slicer and on the ``slicer-core`` wheel in pytest.
"""

from __future__ import annotations

import enum
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from .engine.schedule import format_scales, parse_scales
from .presets import DEFAULT_PRESET, PRECISIONS, PRESETS
from .worker_process import WorkerProcess

#: Folder that holds the ``SSMSRRegistrationLib`` package; the worker needs it on its PYTHONPATH.
MODULE_DIRECTORY = Path(__file__).resolve().parents[1]
WORKER_MODULE = "SSMSRRegistrationLib.cli"

SCALE_PRESETS = ("1/2,1", "1/4,1/2,1", "1/8,1/4,1/2,1")
#: The default preset's (``ssmsr register``'s defaults).
DEFAULT_SCALES = PRESETS[DEFAULT_PRESET].pair_scales
DEFAULT_STEPS_PER_SCALE = PRESETS[DEFAULT_PRESET].pair_steps
DEFAULT_SMOOTHNESS_WEIGHT = 10.0
DEFAULT_PRECISION = PRESETS[DEFAULT_PRESET].precision

#: How far (mm) a moving slice or mask may lie off the fixed slice's plane and still count as the same plane.
PLANE_TOLERANCE_MM = 1e-3
#: Relative tolerance used when checking that the loaded field lies on the fixed volume's grid.
GRID_TOLERANCE = 1e-4

# LPS <-> RAS: flip the first two axes.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])

ProgressCallback = Callable[[dict], None]


class RegistrationError(RuntimeError):
    """The registration could not be started or did not produce a result; the message is meant for the user."""


class RegistrationCancelledError(RegistrationError):
    """The registration was cancelled before it finished."""


class JobState(enum.Enum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


# ---------------------------------------------------------------------------------------------------------------
# Parameters


def normalizeDevice(device: str) -> str:
    """Return the worker's device string for ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; raise ValueError otherwise."""
    device = (device or "auto").strip().lower()
    if device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", device):
        return device
    raise ValueError(f"Unknown device '{device}'; use auto, cpu, cuda or cuda:N.")


def precisionProblems(precision: str) -> list[str]:
    """A sentence for the user if ``precision`` is not one the worker accepts (empty when it is)."""
    if precision in PRECISIONS:
        return []
    return [f"Unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}."]


def scheduleAndDeviceProblems(scales: str, device: str) -> list[str]:
    """What is wrong with a scale schedule and a device name, as sentences for the user (empty when fine)."""
    problems = []
    for check, value in ((parse_scales, scales), (normalizeDevice, device)):
        try:
            check(value)
        except ValueError as error:
            problems.append(str(error))
    return problems


def inputProblems(fixedVolumeNode, movingVolumeNode, fixedMaskNode=None, segmentationNode=None, outputVolumeNode=None,
                  outputTransformNode=None, scales: str = DEFAULT_SCALES, device: str = "auto") -> list[str]:
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
    for role, node in (("fixed volume", fixedVolumeNode), ("fixed mask", fixedMaskNode)):
        if node is not None and node.GetParentTransformNode() is not None:
            problems.append(f"The {role} '{node.GetName()}' is under a transform; harden or remove the transform first.")
    for role, node in (("moving volume", movingVolumeNode), ("segmentation", segmentationNode)):
        parent = node.GetParentTransformNode() if node is not None else None
        if parent is not None and parent is not outputTransformNode:
            problems.append(f"The {role} '{node.GetName()}' is under the transform '{parent.GetName()}'; harden or "
                            "remove it first (a transform that is the output transform itself is fine).")
    problems += scheduleAndDeviceProblems(scales, device)
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


def atlasInputProblems(targetVolumeNode, atlases, topK: int = 1, fixedMaskNode=None, scales: str = DEFAULT_SCALES,
                       device: str = "auto", modelFile: str | None = None) -> list[str]:
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
        problems += [problem for problem in inputProblems(targetVolumeNode, None, fixedMaskNode, scales=scales,
                                                          device=device) if problem != "Select a moving volume."]
    return problems + modelFileProblems(modelFile)


# ---------------------------------------------------------------------------------------------------------------
# Progress


def overallFraction(event: dict) -> float:
    """Fraction (0..1) of all training steps of all scales done, from a worker "progress" event."""
    numberOfScales = max(int(event.get("num_scales", 1)), 1)
    steps = max(int(event.get("steps", 1)), 1)
    fraction = (int(event.get("scale_index", 0)) + int(event.get("step", 0)) / steps) / numberOfScales
    if "atlas_count" in event:  # one of several atlas registrations
        fraction = (int(event.get("atlas_index", 0)) + fraction) / max(int(event["atlas_count"]), 1)
    return min(max(fraction, 0.0), 1.0)


def describeProgress(event: dict) -> str:
    """One line for a worker "progress" event, e.g. ``Scale 1/2 (1 of 2), step 40/100, loss -0.4123, 12 s left``."""
    text = (f"Scale {event.get('scale', '?')} ({int(event.get('scale_index', 0)) + 1} of {event.get('num_scales', '?')}), "
            f"step {event.get('step', '?')}/{event.get('steps', '?')}")
    if "atlas_count" in event:
        text = f"Atlas {int(event.get('atlas_index', 0)) + 1} of {event['atlas_count']}: " + text[0].lower() + text[1:]
    loss = event.get("loss")
    if isinstance(loss, (int, float)) and math.isfinite(loss):
        text += f", loss {loss:.4f}"
    remaining = event.get("eta_s")
    if isinstance(remaining, (int, float)) and math.isfinite(remaining):
        text += f", {_formatDuration(remaining)} left"
    return text


def _formatDuration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


# ---------------------------------------------------------------------------------------------------------------
# Geometry helpers


def _ijkToRas(volumeNode) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(row, column) for column in range(4)] for row in range(4)])


def _isSingleSlice(volumeNode) -> bool:
    return volumeNode.GetImageData().GetDimensions()[2] == 1


def _volumeArray(volumeNode) -> np.ndarray:
    """Voxel array of a scalar volume node, indexed (k, j, i); a copy."""
    imageData = volumeNode.GetImageData()
    columns, rows, slices = imageData.GetDimensions()
    return numpy_support.vtk_to_numpy(imageData.GetPointData().GetScalars()).reshape(slices, rows, columns).copy()


class SlicePlane:
    """The plane of a single-slice fixed volume, used as the 2D physical frame of the worker's images.

    Plane coordinates (millimetres) of a RAS point r are ``(e_i . (r - o), e_j . (r - o))`` where ``o`` is the
    fixed volume's origin and ``e_i``, ``e_j`` its unit i and j axes in RAS.
    """

    def __init__(self, fixedVolumeNode):
        ijkToRas = _ijkToRas(fixedVolumeNode)
        self.origin = ijkToRas[:3, 3]
        self.axes = ijkToRas[:3, :3] / np.linalg.norm(ijkToRas[:3, :3], axis=0)  # columns e_i, e_j, e_k (RAS)

    def imageGeometry(self, volumeNode, role: str) -> tuple[tuple, tuple, tuple]:
        """Spacing, origin and row-major 2x2 direction of ``volumeNode``'s slice in plane coordinates.

        Raises RegistrationError if the slice does not lie in the plane.
        """
        ijkToRas = _ijkToRas(volumeNode)
        spacing = np.linalg.norm(ijkToRas[:3, :2], axis=0)
        inPlaneAxes = self.axes.T @ (ijkToRas[:3, :2] / spacing)  # rows: components along e_i, e_j, e_k
        offset = self.axes.T @ (ijkToRas[:3, 3] - self.origin)
        if np.abs(inPlaneAxes[2]).max() > 1e-6 or abs(offset[2]) > PLANE_TOLERANCE_MM:
            raise RegistrationError(f"The {role} '{volumeNode.GetName()}' is a single slice that does not lie in the "
                                    "plane of the fixed slice; resample it onto the fixed slice first.")
        return tuple(spacing), tuple(offset[:2]), tuple(inPlaneAxes[:2, :2].flatten())

    def writeFieldOnFixedSlice(self, planeFieldPath: str, outputPath: str, fixedVolumeNode) -> None:
        """Turn the worker's 2D field (plane frame) into a one-slice 3D ITK field on the fixed volume's geometry.

        A plane displacement (a, b) becomes the LPS vector of a * e_i + b * e_j; the output has the fixed volume's
        LPS origin, spacing and directions, so Slicer's transform reader loads it like any 3D field. (Slicer's
        reader does not read 2D two-component fields correctly, hence this step.)
        """
        import SimpleITK as sitk

        planeField = sitk.ReadImage(str(planeFieldPath))
        fixedDimensions = fixedVolumeNode.GetImageData().GetDimensions()
        if planeField.GetDimension() != 2 or planeField.GetSize() != fixedDimensions[:2]:
            raise RegistrationError("the 2D displacement field does not have the fixed slice's size.")
        ijkToRas = _ijkToRas(fixedVolumeNode)
        spacing = np.linalg.norm(ijkToRas[:3, :3], axis=0)
        planeVectors = sitk.GetArrayFromImage(planeField).astype(np.float64)  # (rows, columns, 2)
        lpsVectors = planeVectors @ (_LPS_TO_RAS @ self.axes[:, :2]).T
        field = sitk.GetImageFromArray(lpsVectors[np.newaxis], isVector=True)
        field.SetSpacing(tuple(spacing))
        field.SetOrigin(tuple(_LPS_TO_RAS @ ijkToRas[:3, 3]))
        field.SetDirection(tuple((_LPS_TO_RAS @ self.axes).flatten()))
        sitk.WriteImage(field, str(outputPath))


def gridMatchesVolume(gridTransform, volumeNode) -> bool:
    """True if a displacement grid has the dimensions, origin, spacing and directions (RAS) of ``volumeNode``."""
    grid = gridTransform.GetDisplacementGrid()
    if grid is None or grid.GetDimensions() != volumeNode.GetImageData().GetDimensions():
        return False
    ijkToRas = _ijkToRas(volumeNode)
    spacing = np.linalg.norm(ijkToRas[:3, :3], axis=0)
    direction = gridTransform.GetGridDirectionMatrix()
    gridDirection = np.array([[direction.GetElement(row, column) for column in range(3)] for row in range(3)])
    scale = float(spacing.max())
    return bool(np.allclose(grid.GetSpacing(), spacing, rtol=GRID_TOLERANCE, atol=0)
                and np.allclose(grid.GetOrigin(), ijkToRas[:3, 3], rtol=0, atol=GRID_TOLERANCE * scale)
                and np.allclose(gridDirection, ijkToRas[:3, :3] / spacing, rtol=0, atol=GRID_TOLERANCE))


def readDisplacementFieldTransform(path: str):
    """Read an ITK displacement field file with Slicer's transform storage node.

    Returns the ``vtkOrientedGridTransform`` that maps a RAS point p (mm) to p + u(p): the "from parent"
    (resampling) transform. The storage node converts LPS vectors and geometry to RAS.
    """
    loadedNode = slicer.vtkMRMLTransformNode()
    storageNode = slicer.vtkMRMLTransformStorageNode()
    storageNode.SetFileName(str(path))
    if not storageNode.ReadData(loadedNode):
        raise RegistrationError(f"Slicer could not read the displacement field '{path}'.")
    gridTransform = loadedNode.GetTransformFromParent()
    if not isinstance(gridTransform, vtk.vtkGridTransform) or gridTransform.GetDisplacementGrid() is None:
        raise RegistrationError(f"'{path}' did not load as a displacement field.")
    return gridTransform


def _readVolumeArray(path: str) -> np.ndarray:
    """Voxel array (k, j, i) of an image file read with Slicer's volume storage node."""
    loadedNode = slicer.vtkMRMLScalarVolumeNode()
    storageNode = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storageNode.SetFileName(str(path))
    if not storageNode.ReadData(loadedNode):
        raise RegistrationError(f"Slicer could not read the image '{path}'.")
    return _volumeArray(loadedNode)


# ---------------------------------------------------------------------------------------------------------------
# Registration job


class RegistrationJob:
    """One registration: the worker process, its temporary folder, and the nodes that receive the results.

    Call :meth:`poll` regularly (Slicer: from a QTimer) or :meth:`wait`; results enter the scene only after the
    worker has succeeded, and all at once: on error or cancel the scene is left as it was.

    After completion: ``state``, ``errorMessage``, ``outputTransformNode``, ``outputVolumeNode``,
    ``propagatedSegmentationNode`` and ``metrics`` (the worker's metrics dict) describe the outcome.
    """

    def __init__(self, logic: RegistrationLogic, inputs: dict, parameters: dict, temporaryDirectory: Path,
                 slicePlane: SlicePlane | None, workerCommand: list[str], progressCallback: ProgressCallback | None,
                 keepTemporaryFiles: bool):
        self._logic = logic
        self.scene = logic.scene
        self.fixedVolumeNode = inputs["fixed"]
        self.movingVolumeNode = inputs["moving"]
        self.segmentationNode = inputs["segmentation"]
        self.outputTransformNode = inputs["outputTransform"]
        self.outputVolumeNode = inputs["outputVolume"]
        self.parameters = parameters
        self.temporaryDirectory = temporaryDirectory
        self.keepTemporaryFiles = keepTemporaryFiles
        self.progressCallback = progressCallback
        self.propagatedSegmentationNode = None
        self.state = JobState.RUNNING
        self.errorMessage = ""
        self.metrics: dict = {}
        self.log: list[str] = []
        self.lastProgressEvent: dict | None = None
        self._slicePlane = slicePlane
        self._workerError: str | None = None
        self._finishedEvent: dict | None = None
        self.startTime = time.monotonic()
        self._log("Starting: " + " ".join(workerCommand))
        try:
            self.worker = WorkerProcess(workerCommand, environment=logic.workerEnvironment(), workingDirectory=str(temporaryDirectory))
        except OSError as error:
            self._removeTemporaryDirectory()
            raise RegistrationError(f"Could not start the registration worker ({workerCommand[0]}): {error}") from error

    @property
    def isDone(self) -> bool:
        return self.state is not JobState.RUNNING

    def poll(self, timeoutSeconds: float = 0.0) -> bool:
        """Handle what the worker sent since the last call (waiting up to ``timeoutSeconds``); True when done."""
        for message in self.worker.messages(timeoutSeconds):
            if self.isDone:
                break
            if message.kind == "event":
                self._handleEvent(message.payload)
            elif message.kind == "log":
                self._log(message.payload)
                self._notify({"event": "log", "message": message.payload})
            elif message.kind == "exit":
                self._complete(message.payload)
        return self.isDone

    def wait(self, timeoutSeconds: float | None = None) -> JobState:
        """Poll until the job is done (or ``timeoutSeconds`` passed); return the state."""
        deadline = None if timeoutSeconds is None else time.monotonic() + timeoutSeconds
        while not self.poll(timeoutSeconds=0.1):
            if deadline is not None and time.monotonic() > deadline:
                break
        return self.state

    def cancel(self) -> None:
        """End the worker and its process tree (within about two seconds) and discard everything it produced."""
        if self.isDone:
            return
        self.worker.terminate()
        self._log("Cancelled by the user.")
        self._end(JobState.CANCELLED, "Registration cancelled.")

    def _notify(self, event: dict) -> None:
        if self.progressCallback is not None:
            self.progressCallback(event)

    def _log(self, text: str) -> None:
        self.log.append(text)

    def _handleEvent(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "started":
            self._log(f"Worker started on {event.get('device')}: scales {', '.join(map(str, event.get('scales', [])))}, "
                      f"{event.get('steps_per_scale')} steps per scale, {event.get('precision', 'float32')} precision.")
        elif kind == "progress":
            self.lastProgressEvent = event
        elif kind == "error":
            self._workerError = str(event.get("message", "unknown error"))
            self._log("Worker error: " + self._workerError)
        elif kind == "finished":
            self._finishedEvent = event
            self.metrics = dict(event.get("metrics") or {})
            self._log("Worker finished. " + ", ".join(f"{key} = {value}" for key, value in self.metrics.items()))
        self._notify(event)

    def _complete(self, returnCode: int) -> None:
        if returnCode != 0 or self._finishedEvent is None:
            self._end(JobState.FAILED, self._failureMessage(returnCode))
            return
        try:
            self._importResults()
        except Exception as error:  # any failure while importing must leave the scene unchanged and reach the user
            self._end(JobState.FAILED, f"The registration finished but its result could not be loaded: {error}")
            return
        self._log(f"Done in {time.monotonic() - self.startTime:.1f} s.")
        self._end(JobState.SUCCEEDED, "")

    def _failureMessage(self, returnCode: int) -> str:
        if self._workerError:
            return f"Registration failed: {self._workerError}"
        if returnCode == 0:
            return "The registration worker exited without reporting a result."
        if returnCode < 0:
            reason = f"was stopped by signal {-returnCode}"
        else:
            reason = f"stopped unexpectedly (exit code {returnCode})"
        details = "\n".join(list(self.worker.stderrTail)[-10:])
        message = f"The registration worker {reason}."
        return message + (f" Its last messages:\n{details}" if details else " It printed no message.")

    def _end(self, state: JobState, errorMessage: str) -> None:
        self.state = state
        self.errorMessage = errorMessage
        if errorMessage:
            self._log(errorMessage)
        self._removeTemporaryDirectory()
        self._logic._jobEnded(self)

    def _removeTemporaryDirectory(self) -> None:
        if self.keepTemporaryFiles:
            self._log(f"Temporary files kept in {self.temporaryDirectory}")
        else:
            shutil.rmtree(self.temporaryDirectory, ignore_errors=True)

    # Results -----------------------------------------------------------------------------------------------

    def _importResults(self) -> None:
        """Read the worker's files, then change the scene in one go, undoing every change if a step fails."""
        outputs = self._finishedEvent.get("outputs") or {}
        fieldPath = outputs.get("field") or str(self.temporaryDirectory / "field.nrrd")
        if self._slicePlane is not None:
            sliceFieldPath = str(self.temporaryDirectory / "field-on-fixed-slice.nrrd")
            self._slicePlane.writeFieldOnFixedSlice(fieldPath, sliceFieldPath, self.fixedVolumeNode)
            fieldPath = sliceFieldPath
        gridTransform = readDisplacementFieldTransform(fieldPath)
        if not gridMatchesVolume(gridTransform, self.fixedVolumeNode):
            raise RegistrationError("the displacement field is not on the fixed volume's grid.")
        warpedArray = None
        if self.outputVolumeNode is not None:
            if not outputs.get("warped"):
                raise RegistrationError("the worker did not write the warped volume.")
            warpedArray = _readVolumeArray(outputs["warped"])

        undoSteps: list[Callable[[], None]] = []
        try:
            self._commitTransform(gridTransform, undoSteps)
            if warpedArray is not None:
                self._commitWarpedVolume(warpedArray, undoSteps)
            if self.segmentationNode is not None:
                self._propagateSegmentation(undoSteps)
        except BaseException:
            for undo in reversed(undoSteps):
                undo()
            raise

    def _commitTransform(self, gridTransform, undoSteps: list) -> None:
        if self.outputTransformNode is None:
            name = self.scene.GenerateUniqueName(f"{self.movingVolumeNode.GetName()} to {self.fixedVolumeNode.GetName()} (SSMSR)")
            node = self.scene.AddNewNodeByClass("vtkMRMLTransformNode", name)
            undoSteps.append(lambda: self.scene.RemoveNode(node))
            self.outputTransformNode = node
            undoSteps.append(lambda: setattr(self, "outputTransformNode", None))
        else:
            node = self.outputTransformNode
            previousTransform = node.GetTransformFromParent()  # kept alive here; nothing else modifies it
            undoSteps.append(lambda: node.SetAndObserveTransformFromParent(previousTransform))
        node.SetAndObserveTransformFromParent(gridTransform)
        node.SetAttribute("SSMSR.FixedVolumeID", self.fixedVolumeNode.GetID())
        node.SetAttribute("SSMSR.MovingVolumeID", self.movingVolumeNode.GetID())

    def _commitWarpedVolume(self, warpedArray: np.ndarray, undoSteps: list) -> None:
        fixedDimensions = self.fixedVolumeNode.GetImageData().GetDimensions()
        if warpedArray.size != int(np.prod(fixedDimensions)):
            raise RegistrationError("the warped volume is not on the fixed volume's grid.")
        node = self.outputVolumeNode
        previousImage = node.GetImageData()
        previousIjkToRas = vtk.vtkMatrix4x4()
        node.GetIJKToRASMatrix(previousIjkToRas)

        def restore():
            node.SetIJKToRASMatrix(previousIjkToRas)
            node.SetAndObserveImageData(previousImage)

        undoSteps.append(restore)
        imageData = vtk.vtkImageData()
        imageData.SetDimensions(fixedDimensions)
        scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(warpedArray, dtype=np.float32).ravel(), deep=True)
        imageData.GetPointData().SetScalars(scalars)
        ijkToRas = vtk.vtkMatrix4x4()
        self.fixedVolumeNode.GetIJKToRASMatrix(ijkToRas)
        node.SetIJKToRASMatrix(ijkToRas)
        node.SetAndObserveImageData(imageData)
        if node.GetDisplayNode() is None:
            node.CreateDefaultDisplayNodes()
            displayNode = node.GetDisplayNode()
            undoSteps.append(lambda: self.scene.RemoveNode(displayNode))
        if node.GetDisplayNode() is not None:
            node.GetDisplayNode().AutoWindowLevelOn()

    def _propagateSegmentation(self, undoSteps: list) -> None:
        """Copy the segmentation, harden the copy through the output transform, and put it on the fixed geometry."""
        source = self.segmentationNode
        name = self.scene.GenerateUniqueName(f"{source.GetName()} on {self.fixedVolumeNode.GetName()}")
        propagated = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        undoSteps.append(lambda: self.scene.RemoveNode(propagated))
        propagated.CreateDefaultDisplayNodes()
        displayNode = propagated.GetDisplayNode()
        if displayNode is not None:
            undoSteps.append(lambda: self.scene.RemoveNode(displayNode))
        propagated.GetSegmentation().DeepCopy(source.GetSegmentation())
        propagated.SetAndObserveTransformNodeID(self.outputTransformNode.GetID())
        if not slicer.vtkSlicerTransformLogic.hardenTransform(propagated):
            raise RegistrationError("the segmentation could not be transformed.")
        propagated.SetReferenceImageGeometryParameterFromVolumeNode(self.fixedVolumeNode)
        self.propagatedSegmentationNode = propagated
        undoSteps.append(lambda: setattr(self, "propagatedSegmentationNode", None))


class AtlasSegmentationJob(RegistrationJob):
    """An atlas-based segmentation: the worker ranks the atlases by NLCC with the target, registers the best
    (``topK``) onto it and fuses their labels; the result becomes a new segmentation node on the target.

    After success: ``outputSegmentationNode`` (segments named and coloured as in the atlases) and ``ranking``
    (the worker's ranking, best first, with ``atlasName``: the atlas segmentation node's name).
    """

    def __init__(self, logic: RegistrationLogic, targetVolumeNode, atlases: list, segmentNames: list[str],
                 segmentColors: list[tuple], atlasFiles: dict, parameters: dict, temporaryDirectory: Path,
                 slicePlane: SlicePlane | None, workerCommand: list[str], progressCallback: ProgressCallback | None,
                 keepTemporaryFiles: bool):
        self.atlases = atlases
        self.segmentNames = segmentNames
        self.segmentColors = segmentColors
        self.atlasFiles = atlasFiles  # worker's atlas image path -> atlas segmentation node
        self.outputSegmentationNode = None
        self.ranking: list[dict] = []
        inputs = {"fixed": targetVolumeNode, "moving": None, "segmentation": None, "outputTransform": None,
                  "outputVolume": None}
        super().__init__(logic, inputs, parameters, temporaryDirectory, slicePlane, workerCommand, progressCallback,
                         keepTemporaryFiles)

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
        outputs = self._finishedEvent.get("outputs") or {}
        labelsPath = outputs.get("labels") or str(self.temporaryDirectory / "labels.nrrd")
        labels = _readVolumeArray(labelsPath)
        targetDimensions = self.fixedVolumeNode.GetImageData().GetDimensions()
        if labels.size != int(np.prod(targetDimensions)):
            raise RegistrationError("the propagated label map is not on the target volume's grid.")
        labels = labels.reshape(tuple(reversed(targetDimensions))).astype(np.int32)
        if labels.min() < 0 or labels.max() > len(self.segmentNames):
            raise RegistrationError(f"the propagated label map holds labels outside 0..{len(self.segmentNames)}.")
        self.ranking = []
        for entry in (self._finishedEvent.get("metrics") or {}).get("ranking", []):
            self.ranking.append({**entry, "atlasName": self.atlasName(entry.get("atlas"))})

        undoSteps: list[Callable[[], None]] = []
        try:
            self._commitSegmentation(labels, undoSteps)
        except BaseException:
            for undo in reversed(undoSteps):
                undo()
            raise
        self._logic._lastAtlasRanking = list(self.ranking)
        self._log("Atlas ranking (NLCC with the target): " + "; ".join(
            f"{entry['rank']}. {entry['atlasName']} {entry['nlcc']:.4f}" + (" (registered)" if entry["registered"] else "")
            for entry in self.ranking))

    def _commitSegmentation(self, labels: np.ndarray, undoSteps: list) -> None:
        """Add a segmentation node on the target geometry with one segment per atlas segment name present."""
        scene = self.scene
        name = scene.GenerateUniqueName(f"{self.fixedVolumeNode.GetName()} segmentation (SSMSR atlas)")
        segmentationNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        undoSteps.append(lambda: scene.RemoveNode(segmentationNode))
        segmentationNode.CreateDefaultDisplayNodes()
        displayNode = segmentationNode.GetDisplayNode()
        if displayNode is not None:
            undoSteps.append(lambda: scene.RemoveNode(displayNode))
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(self.fixedVolumeNode)
        labelmapNode = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", scene.GenerateUniqueName("SSMSR labels"))
        try:
            imageData = vtk.vtkImageData()
            imageData.SetDimensions(self.fixedVolumeNode.GetImageData().GetDimensions())
            imageData.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.ascontiguousarray(labels).ravel(), deep=True))
            labelmapNode.SetAndObserveImageData(imageData)
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
        self.outputSegmentationNode = segmentationNode
        undoSteps.append(lambda: setattr(self, "outputSegmentationNode", None))


# ---------------------------------------------------------------------------------------------------------------
# Logic


class RegistrationLogic:
    """Register two volume nodes of ``scene`` with the SSMSR worker; usable from the Python console.

    ``pythonExecutable`` runs the worker (Slicer: PythonSlicer; default: ``sys.executable``).
    ``temporaryDirectoryRoot`` is where each job's private folder is created (default: the system's).
    ``workerCommandPrefix`` can be replaced to run another worker with the same command line.
    """

    def __init__(self, scene, pythonExecutable: str | None = None, temporaryDirectoryRoot: str | None = None):
        self.scene = scene
        self.pythonExecutable = pythonExecutable or sys.executable
        self.temporaryDirectoryRoot = temporaryDirectoryRoot
        self.workerCommandPrefix = [self.pythonExecutable, "-m", WORKER_MODULE]
        self.activeJob: RegistrationJob | None = None
        #: Optional ``vtkSlicerSequencesLogic`` of the scene: cine tracking asks it to create the proxy node of the
        #: new transform sequence at once (in Slicer: ``slicer.modules.sequences.logic()``).
        self.sequencesLogic = None

    def workerEnvironment(self) -> dict[str, str]:
        """Environment of the worker: this process's, with the module folder first on PYTHONPATH and unbuffered output."""
        environment = dict(os.environ)
        paths = [str(MODULE_DIRECTORY)] + [path for path in environment.get("PYTHONPATH", "").split(os.pathsep) if path]
        environment["PYTHONPATH"] = os.pathsep.join(paths)
        environment["PYTHONUNBUFFERED"] = "1"
        environment["PYTHONIOENCODING"] = "utf-8"
        return environment

    def registerVolumes(self, fixedVolumeNode, movingVolumeNode, outputTransformNode=None, fixedMaskNode=None,
                        segmentationNode=None, outputVolumeNode=None, scales: str = DEFAULT_SCALES,
                        stepsPerScale: int = DEFAULT_STEPS_PER_SCALE, precision: str = DEFAULT_PRECISION,
                        smoothnessWeight: float = DEFAULT_SMOOTHNESS_WEIGHT,
                        nccWindow: int | None = None, device: str = "auto", waitForCompletion: bool = True,
                        progressCallback: ProgressCallback | None = None, keepTemporaryFiles: bool = False,
                        seed: int | None = None, modelFile: str | None = None):
        """Deformably register ``movingVolumeNode`` onto ``fixedVolumeNode``.

        The result is a transform node holding a "from parent" displacement grid on the fixed volume's geometry
        (RAS millimetres): put the moving volume under it to overlay it on the fixed volume.

        :param outputTransformNode: receives the result; None creates a new transform node on success.
        :param fixedMaskNode: optional volume on the fixed grid; the similarity is computed where it is non-zero.
        :param segmentationNode: optional segmentation of the moving volume; a copy hardened through the result is
            created on the fixed volume (the original is left untouched).
        :param outputVolumeNode: optional scalar volume that receives the moving volume warped onto the fixed grid.
        :param scales: coarse-to-fine schedule, e.g. "1/4,1/2,1".
        :param stepsPerScale: test-time training steps at each scale.
        :param precision: "mixed" (bfloat16 convolutions where the device supports them) or "float32" (reference).
        :param smoothnessWeight: weight (lambda) of the displacement-gradient penalty.
        :param nccWindow: local NCC window in voxels; None uses the engine's default (5 in 3D, 6 in 2D).
        :param device: "auto", "cpu", "cuda" or "cuda:N".
        :param waitForCompletion: True blocks and returns the transform node (raises RegistrationError on failure,
            RegistrationCancelledError if cancelled); False returns the running :class:`RegistrationJob` at once,
            to be driven by ``job.poll()``.
        :param progressCallback: called with each worker event dict ("started", "progress", "finished", "error",
            and "log" carrying a stderr line in "message").
        :param keepTemporaryFiles: keep the job's temporary folder (its path is in the job's log), for debugging.
        :param seed: random seed of the worker; None uses the engine's default.
        :param modelFile: a model written by ``ssmsr train``: test-time training starts from its weights (its schedule
            must be ``scales``); None or "" trains from scratch.
        """
        job = self.startRegistration(fixedVolumeNode, movingVolumeNode, outputTransformNode=outputTransformNode,
                                     fixedMaskNode=fixedMaskNode, segmentationNode=segmentationNode,
                                     outputVolumeNode=outputVolumeNode, scales=scales, stepsPerScale=stepsPerScale,
                                     precision=precision,
                                     smoothnessWeight=smoothnessWeight, nccWindow=nccWindow, device=device,
                                     progressCallback=progressCallback, keepTemporaryFiles=keepTemporaryFiles, seed=seed,
                                     modelFile=modelFile)
        return self._finish(job, waitForCompletion, lambda: job.outputTransformNode)

    def trackSequence(self, cineNode, maskNode=None, scales: str | None = None,
                      stepsPerScale: int = DEFAULT_STEPS_PER_SCALE, precision: str = DEFAULT_PRECISION,
                      batchSize: int = 1,
                      smoothnessWeight: float = DEFAULT_SMOOTHNESS_WEIGHT, nccWindow: int | None = None,
                      device: str = "auto", waitForCompletion: bool = True,
                      progressCallback: ProgressCallback | None = None, keepTemporaryFiles: bool = False,
                      seed: int | None = None):
        """Track the motion through a 2D+t cine (``ssmsr track`` in the background); see ``cine_logic``.

        :param cineNode: a sequence node of single-slice volumes (e.g. an ultrasound cine from DICOM) or a scalar
            volume whose third axis is time. Colour frames are reduced to their first channel.
        :param maskNode: optional single-slice volume on the frames' grid (non-zero inside); None: the paper's
            automatic mask.
        :param scales: coarse-to-fine schedule; None: the paper's echo schedule "1/8,1/4,1/2,1".
        :param batchSize: frame pairs per training step (0: all pairs).

        Other parameters as for :meth:`registerVolumes`. Blocking: returns the new sequence of transform nodes (one
        per frame, in the cine's sequence browser); non-blocking: the running ``CineTrackingJob``, whose
        ``transformSequenceNode``, ``browserNode``, ``metricsTableNode`` and ``chartNodes`` hold the results.
        """
        job = self.startTracking(cineNode, maskNode=maskNode, scales=scales, stepsPerScale=stepsPerScale,
                                 precision=precision,
                                 batchSize=batchSize, smoothnessWeight=smoothnessWeight, nccWindow=nccWindow,
                                 device=device, progressCallback=progressCallback,
                                 keepTemporaryFiles=keepTemporaryFiles, seed=seed)
        return self._finish(job, waitForCompletion, lambda: job.transformSequenceNode)

    def startTracking(self, cineNode, maskNode=None, scales: str | None = None, **kwargs):
        """Write the cine, start the ``track`` worker and return the running job (see :meth:`trackSequence`)."""
        from .cine_logic import DEFAULT_TRACKING_SCALES, startTracking

        return startTracking(self, cineNode, maskNode=maskNode, scales=scales or DEFAULT_TRACKING_SCALES, **kwargs)

    def _finish(self, job: RegistrationJob, waitForCompletion: bool, result: Callable[[], object]):
        """Return the running job, or wait for it and return ``result()`` (raising on failure or cancel)."""
        if not waitForCompletion:
            return job
        try:
            job.wait()
        except BaseException:
            job.cancel()  # e.g. KeyboardInterrupt in the console: do not leave the worker running
            raise
        if job.state is JobState.CANCELLED:
            raise RegistrationCancelledError(job.errorMessage)
        if job.state is not JobState.SUCCEEDED:
            raise RegistrationError(job.errorMessage)
        return result()

    def startRegistration(self, fixedVolumeNode, movingVolumeNode, outputTransformNode=None, fixedMaskNode=None,
                          segmentationNode=None, outputVolumeNode=None, scales: str = DEFAULT_SCALES,
                          stepsPerScale: int = DEFAULT_STEPS_PER_SCALE, precision: str = DEFAULT_PRECISION,
                          smoothnessWeight: float = DEFAULT_SMOOTHNESS_WEIGHT,
                          nccWindow: int | None = None, device: str = "auto", progressCallback: ProgressCallback | None = None,
                          keepTemporaryFiles: bool = False, seed: int | None = None,
                          modelFile: str | None = None) -> RegistrationJob:
        """Write the inputs, start the worker and return the running job (see :meth:`registerVolumes`)."""
        if self.activeJob is not None:
            raise RegistrationError("A registration is already running; cancel it or wait for it to finish.")
        problems = inputProblems(fixedVolumeNode, movingVolumeNode, fixedMaskNode, segmentationNode, outputVolumeNode,
                                 outputTransformNode, scales, device) + modelFileProblems(modelFile)
        if stepsPerScale is None or int(stepsPerScale) < (0 if modelFile else 1):
            problems.append("Steps per scale must be at least 1 (0 is allowed with a model: inference only).")
        problems += precisionProblems(precision)
        if nccWindow is not None and int(nccWindow) < 1:
            problems.append("The NCC window must be at least 1 voxel.")
        if problems:
            raise ValueError(" ".join(problems))

        temporaryDirectory = Path(tempfile.mkdtemp(prefix="SSMSR-", dir=self.temporaryDirectoryRoot))
        try:
            slicePlane = SlicePlane(fixedVolumeNode) if _isSingleSlice(fixedVolumeNode) else None
            fixedPath = self._writeVolume(fixedVolumeNode, temporaryDirectory / "fixed.nrrd", slicePlane, "fixed volume")
            movingPath = self._writeVolume(movingVolumeNode, temporaryDirectory / "moving.nrrd", slicePlane, "moving volume")
            command = self.workerCommandPrefix + ["register", fixedPath, movingPath,
                                                  "-o", str(temporaryDirectory / "field.nrrd"), "--progress", "jsonl",
                                                  "--scales", format_scales(parse_scales(scales)),
                                                  "--steps", str(int(stepsPerScale)), "--precision", precision,
                                                  "--lambda", repr(float(smoothnessWeight)),
                                                  "--device", normalizeDevice(device)]
            command += self._optionalWorkerOptions(nccWindow, seed, modelFile, fixedMaskNode, temporaryDirectory,
                                                   slicePlane)
            if outputVolumeNode is not None:
                command += ["--warped", str(temporaryDirectory / "warped.nrrd")]
        except BaseException:
            shutil.rmtree(temporaryDirectory, ignore_errors=True)
            raise

        inputs = {"fixed": fixedVolumeNode, "moving": movingVolumeNode, "segmentation": segmentationNode,
                  "outputTransform": outputTransformNode, "outputVolume": outputVolumeNode}
        parameters = {"scales": scales, "stepsPerScale": int(stepsPerScale), "precision": precision,
                      "smoothnessWeight": float(smoothnessWeight),
                      "nccWindow": nccWindow, "device": device, "seed": seed, "modelFile": modelFile or None}
        job = RegistrationJob(self, inputs, parameters, temporaryDirectory, slicePlane, command, progressCallback, keepTemporaryFiles)
        self.activeJob = job
        return job

    def segmentWithAtlases(self, targetVolumeNode, atlases, topK: int = 1, fixedMaskNode=None, scales: str = DEFAULT_SCALES,
                           stepsPerScale: int = DEFAULT_STEPS_PER_SCALE, precision: str = DEFAULT_PRECISION,
                           smoothnessWeight: float = DEFAULT_SMOOTHNESS_WEIGHT,
                           nccWindow: int | None = None, device: str = "auto", modelFile: str | None = None,
                           waitForCompletion: bool = True, progressCallback: ProgressCallback | None = None,
                           keepTemporaryFiles: bool = False, seed: int | None = None):
        """Segment ``targetVolumeNode`` with the most similar atlas(es) (``ssmsr segment`` in the background).

        The atlases are ranked by NLCC with the target (each brought onto the target grid by world coordinates); the
        best ``topK`` are registered onto the target and their segmentations warped and fused by majority vote
        (ties go to the best-ranked atlas). Segments are matched across atlases by name.

        :param atlases: atlas segmentation nodes (each drawn on its source volume, see :func:`atlasVolumeNode`), or
            (volume node, segmentation node) pairs.
        :param fixedMaskNode: optional mask on the target restricting the ranking and the registrations' similarity.
        :param modelFile: optional model written by ``ssmsr train`` to start each registration from.

        Other parameters as for :meth:`registerVolumes`. Blocking: returns the new segmentation node (the ranking is
        in ``lastAtlasRanking``); non-blocking: returns the running :class:`AtlasSegmentationJob`.
        """
        job = self.startAtlasSegmentation(targetVolumeNode, atlases, topK=topK, fixedMaskNode=fixedMaskNode,
                                          scales=scales, stepsPerScale=stepsPerScale, precision=precision,
                                          smoothnessWeight=smoothnessWeight,
                                          nccWindow=nccWindow, device=device, modelFile=modelFile,
                                          progressCallback=progressCallback, keepTemporaryFiles=keepTemporaryFiles,
                                          seed=seed)
        return self._finish(job, waitForCompletion, lambda: job.outputSegmentationNode)

    @property
    def lastAtlasRanking(self) -> list[dict]:
        """The ranking of the last successful atlas segmentation, best first (see :class:`AtlasSegmentationJob`)."""
        return list(getattr(self, "_lastAtlasRanking", []))

    def startAtlasSegmentation(self, targetVolumeNode, atlases, topK: int = 1, fixedMaskNode=None,
                               scales: str = DEFAULT_SCALES, stepsPerScale: int = DEFAULT_STEPS_PER_SCALE,
                               precision: str = DEFAULT_PRECISION,
                               smoothnessWeight: float = DEFAULT_SMOOTHNESS_WEIGHT, nccWindow: int | None = None,
                               device: str = "auto", modelFile: str | None = None,
                               progressCallback: ProgressCallback | None = None, keepTemporaryFiles: bool = False,
                               seed: int | None = None) -> AtlasSegmentationJob:
        """Write the target and atlases, start the worker and return the running job (see :meth:`segmentWithAtlases`)."""
        if self.activeJob is not None:
            raise RegistrationError("A registration is already running; cancel it or wait for it to finish.")
        pairs = [tuple(item) if isinstance(item, (tuple, list)) else (atlasVolumeNode(item), item) for item in atlases or []]
        problems = atlasInputProblems(targetVolumeNode, pairs, topK, fixedMaskNode, scales, device, modelFile)
        if stepsPerScale is None or int(stepsPerScale) < (0 if modelFile else 1):
            problems.append("Steps per scale must be at least 1 (0 is allowed with a model: inference only).")
        problems += precisionProblems(precision)
        if problems:
            raise ValueError(" ".join(problems))

        # One label value per segment name, in order of first appearance; colours from the first atlas that has it.
        segmentNames, segmentColors = [], []
        for _, segmentationNode in pairs:
            segmentation = segmentationNode.GetSegmentation()
            for index in range(segmentation.GetNumberOfSegments()):
                segment = segmentation.GetNthSegment(index)
                if segment.GetName() not in segmentNames:
                    segmentNames.append(segment.GetName())
                    segmentColors.append(tuple(segment.GetColor()))

        temporaryDirectory = Path(tempfile.mkdtemp(prefix="SSMSR-", dir=self.temporaryDirectoryRoot))
        try:
            slicePlane = SlicePlane(targetVolumeNode) if _isSingleSlice(targetVolumeNode) else None
            targetPath = self._writeVolume(targetVolumeNode, temporaryDirectory / "target.nrrd", slicePlane, "volume to segment")
            command = self.workerCommandPrefix + ["segment", targetPath, "-o", str(temporaryDirectory / "labels.nrrd"),
                                                  "--top-k", str(int(topK)), "--progress", "jsonl",
                                                  "--scales", format_scales(parse_scales(scales)),
                                                  "--steps", str(int(stepsPerScale)), "--precision", precision,
                                                  "--lambda", repr(float(smoothnessWeight)),
                                                  "--device", normalizeDevice(device)]
            atlasFiles = {}
            for number, (volumeNode, segmentationNode) in enumerate(pairs):
                imagePath = self._writeVolume(volumeNode, temporaryDirectory / f"atlas{number}.nrrd", slicePlane,
                                              f"atlas volume '{volumeNode.GetName()}'")
                labelsPath = self._writeAtlasLabels(segmentationNode, volumeNode, segmentNames,
                                                    temporaryDirectory / f"atlas{number}-labels.nrrd", slicePlane)
                command += ["--atlas", imagePath, labelsPath]
                atlasFiles[os.path.normcase(os.path.abspath(imagePath))] = segmentationNode
            command += self._optionalWorkerOptions(nccWindow, seed, modelFile, fixedMaskNode, temporaryDirectory,
                                                   slicePlane)
        except BaseException:
            shutil.rmtree(temporaryDirectory, ignore_errors=True)
            raise

        parameters = {"topK": int(topK), "scales": scales, "stepsPerScale": int(stepsPerScale),
                      "smoothnessWeight": float(smoothnessWeight), "nccWindow": nccWindow, "device": device, "seed": seed,
                      "modelFile": modelFile or None}
        job = AtlasSegmentationJob(self, targetVolumeNode, pairs, segmentNames, segmentColors, atlasFiles, parameters,
                                   temporaryDirectory, slicePlane, command, progressCallback, keepTemporaryFiles)
        self.activeJob = job
        return job

    def _writeAtlasLabels(self, segmentationNode, volumeNode, segmentNames: list[str], path: Path,
                          slicePlane: SlicePlane | None) -> str:
        """Write an atlas segmentation as one label map on its volume's grid, label k+1 for ``segmentNames[k]``."""
        labels = np.zeros(_volumeArray(volumeNode).shape, np.uint16 if len(segmentNames) > 255 else np.uint8)
        segmentation = segmentationNode.GetSegmentation()
        exportNode = slicer.vtkMRMLLabelMapVolumeNode()
        self.scene.AddNode(exportNode)
        try:
            for index in range(segmentation.GetNumberOfSegments()):
                segmentIds = vtk.vtkStringArray()
                segmentIds.InsertNextValue(segmentation.GetNthSegmentID(index))
                if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                        segmentationNode, segmentIds, exportNode, volumeNode):
                    raise RegistrationError(f"Could not export the segmentation '{segmentationNode.GetName()}' onto "
                                            f"its volume '{volumeNode.GetName()}'.")
                inside = _volumeArray(exportNode) != 0
                if inside.shape != labels.shape:
                    raise RegistrationError(f"The segmentation '{segmentationNode.GetName()}' did not export onto the "
                                            f"grid of '{volumeNode.GetName()}'.")
                labels[inside] = segmentNames.index(segmentation.GetNthSegment(index).GetName()) + 1
        finally:
            if exportNode.GetDisplayNode() is not None:
                self.scene.RemoveNode(exportNode.GetDisplayNode())
            self.scene.RemoveNode(exportNode)
        labelNode = slicer.vtkMRMLLabelMapVolumeNode()
        imageData = vtk.vtkImageData()
        imageData.SetDimensions(volumeNode.GetImageData().GetDimensions())
        imageData.GetPointData().SetScalars(numpy_support.numpy_to_vtk(labels.ravel(), deep=True))
        labelNode.SetAndObserveImageData(imageData)
        ijkToRas = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijkToRas)
        labelNode.SetIJKToRASMatrix(ijkToRas)
        labelNode.SetName(f"{segmentationNode.GetName()} labels")
        return self._writeVolume(labelNode, path, slicePlane, f"labels of the atlas '{segmentationNode.GetName()}'")

    def cancel(self) -> None:
        """Cancel the running registration, if any."""
        if self.activeJob is not None:
            self.activeJob.cancel()

    def _jobEnded(self, job: RegistrationJob) -> None:
        if self.activeJob is job:
            self.activeJob = None

    def _optionalWorkerOptions(self, nccWindow, seed, modelFile, fixedMaskNode, temporaryDirectory: Path,
                               slicePlane) -> list[str]:
        """Worker options shared by registration and atlas segmentation; writes the fixed mask if given."""
        options = []
        if nccWindow is not None:
            options += ["--window", str(int(nccWindow))]
        if seed is not None:
            options += ["--seed", str(int(seed))]
        if modelFile:
            options += ["--model", str(Path(modelFile).resolve())]
        if fixedMaskNode is not None:
            options += ["--fixed-mask", self._writeVolume(fixedMaskNode, temporaryDirectory / "fixed-mask.nrrd",
                                                          slicePlane, "fixed mask")]
        return options

    def _writeVolume(self, volumeNode, path: Path, slicePlane: SlicePlane | None, role: str) -> str:
        """Write a volume node's voxels (ignoring parent transforms) for the worker; return the path.

        3D volumes: NRRD in LPS through Slicer's volume storage node. Single slices: a 2D image in the fixed
        slice's plane frame (see :class:`SlicePlane`).
        """
        if slicePlane is None:
            if _isSingleSlice(volumeNode):
                raise RegistrationError(f"The {role} '{volumeNode.GetName()}' is a single slice but the fixed volume "
                                        "is 3D; both must be 2D or both 3D.")
            storageNode = slicer.vtkMRMLVolumeArchetypeStorageNode()
            storageNode.SetFileName(str(path))
            storageNode.SetUseCompression(False)
            if not storageNode.WriteData(volumeNode):
                raise RegistrationError(f"Could not write the {role} '{volumeNode.GetName()}' to {path}.")
            return str(path)
        if not _isSingleSlice(volumeNode):
            raise RegistrationError(f"The {role} '{volumeNode.GetName()}' is 3D but the fixed volume is a single "
                                    "slice; both must be 2D or both 3D.")
        import SimpleITK as sitk  # bundled with Slicer; only needed for 2D images

        spacing, origin, direction = slicePlane.imageGeometry(volumeNode, role)
        image = sitk.GetImageFromArray(_volumeArray(volumeNode)[0])
        image.SetSpacing(spacing)
        image.SetOrigin(origin)
        image.SetDirection(direction)
        sitk.WriteImage(image, str(path))
        return str(path)
