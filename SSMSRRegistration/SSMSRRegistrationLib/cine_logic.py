"""Qt-free Slicer logic of cine tracking: a 2D+t cine in the scene, the ``track`` worker, transforms and metrics out.

The cine is either a sequence node of single-slice volumes (what Slicer's DICOM import gives for an ultrasound
cine) or a volume whose third axis is time. Its frames are written as one 2D+t NRRD in the first frame's own plane
frame (in-plane millimetres along the frame's i and j axes, see :class:`~.logic.SlicePlane`), so the worker's
2D fields come back in that frame and are rewritten, one per frame, as one-slice 3D fields on the frame's geometry
before Slicer loads them (Slicer's reader garbles 2D fields).

Results, created all at once after the worker succeeded (the scene is left as it was on error or cancel):

* a sequence of transform nodes, one per frame, with the cine's index values: frame 0 holds a zero field, frame t
  the "from parent" displacement grid of pair t (frame t-1 moving, frame t fixed: putting frame t-1 under it
  overlays it on frame t). It is added to the cine's sequence browser (a new browser when the cine has none, or
  for a time volume), so scrubbing the cine shows the matching field;
* a table node with the worker's per-pair metrics (``metrics.csv``: pair, mse_identity, mse, nlcc_identity, nlcc);
* two plot charts over the pairs: MSE and NLCC, identity and SSMSR.
"""

from __future__ import annotations

import csv
import shutil
import tempfile
from pathlib import Path

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from .engine.schedule import format_scales, parse_scales
from .logic import (
    DEFAULT_PRECISION,
    DEFAULT_STEPS_PER_SCALE,
    DEFAULT_SMOOTHNESS_WEIGHT,
    GRID_TOLERANCE,
    ProgressCallback,
    RegistrationError,
    RegistrationJob,
    SlicePlane,
    _ijkToRas,
    gridMatchesVolume,
    normalizeDevice,
    precisionProblems,
    scheduleAndDeviceProblems,
    readDisplacementFieldTransform,
)
from .presets import DEFAULT_PRESET, PRESETS

#: The default preset's cine schedule (the paper's echo schedule, the CLI's ``track`` default).
DEFAULT_TRACKING_SCALES = PRESETS[DEFAULT_PRESET].cine_scales
#: Columns of the metrics table, as in the worker's metrics.csv.
METRIC_COLUMNS = ("mse_identity", "mse", "nlcc_identity", "nlcc")


# ---------------------------------------------------------------------------------------------------------------
# Frames of a cine node


def _firstChannelArray(volumeNode) -> np.ndarray:
    """Voxels (k, j, i) of a volume node's first component, in their stored type (8-bit stays 8-bit); a copy."""
    imageData = volumeNode.GetImageData()
    columns, rows, slices = imageData.GetDimensions()
    values = numpy_support.vtk_to_numpy(imageData.GetPointData().GetScalars())
    if values.ndim == 2:
        values = values[:, 0]
    return values.reshape(slices, rows, columns).copy()


def _geometryNode(dimensions, ijkToRas: np.ndarray):
    """A volume node outside any scene carrying one frame's grid (dimensions W x H x 1 and IJK-to-RAS)."""
    node = slicer.vtkMRMLScalarVolumeNode()
    imageData = vtk.vtkImageData()
    imageData.SetDimensions(int(dimensions[0]), int(dimensions[1]), 1)
    node.SetAndObserveImageData(imageData)
    matrix = vtk.vtkMatrix4x4()
    for row in range(4):
        for column in range(4):
            matrix.SetElement(row, column, float(ijkToRas[row, column]))
    node.SetIJKToRASMatrix(matrix)
    return node


def isCineNode(node) -> bool:
    return isinstance(node, (slicer.vtkMRMLSequenceNode, slicer.vtkMRMLScalarVolumeNode))


def cineFrames(cineNode) -> tuple[list[np.ndarray], list, list[str]]:
    """Frames of a cine node: (2D arrays (rows, columns), per-frame geometry nodes, index values).

    Raises RegistrationError (message for the user) for anything that cannot be tracked.
    """
    if isinstance(cineNode, slicer.vtkMRMLSequenceNode):
        name = cineNode.GetName()
        count = cineNode.GetNumberOfDataNodes()
        if count < 2:
            raise RegistrationError(f"The sequence '{name}' has {count} frame(s); tracking needs at least two frames.")
        arrays, geometries, indexValues = [], [], []
        firstDimensions, firstIjkToRas = None, None
        for item in range(count):
            frame = cineNode.GetNthDataNode(item)
            if not isinstance(frame, slicer.vtkMRMLScalarVolumeNode) or frame.GetImageData() is None:
                raise RegistrationError(f"Item {item} of the sequence '{name}' is not a volume with image data; "
                                        "select a sequence of 2D images (e.g. an ultrasound cine).")
            dimensions = frame.GetImageData().GetDimensions()
            if dimensions[2] != 1:
                raise RegistrationError(f"The sequence '{name}' holds 3D volumes ({dimensions[0]}x{dimensions[1]}x"
                                        f"{dimensions[2]}); cine tracking needs 2D frames (single-slice volumes).")
            ijkToRas = _ijkToRas(frame)
            if firstDimensions is None:
                firstDimensions, firstIjkToRas = dimensions, ijkToRas
            elif dimensions != firstDimensions:
                raise RegistrationError(f"The frames of the sequence '{name}' have different sizes: frame 0 is "
                                        f"{firstDimensions[0]}x{firstDimensions[1]} but frame {item} is "
                                        f"{dimensions[0]}x{dimensions[1]}; all frames must share one grid.")
            elif not np.allclose(ijkToRas, firstIjkToRas, rtol=0,
                                 atol=GRID_TOLERANCE * max(1.0, float(np.abs(firstIjkToRas).max()))):
                raise RegistrationError(f"Frame {item} of the sequence '{name}' lies on a different grid (origin, "
                                        "spacing or orientation) than frame 0; all frames must share one grid.")
            arrays.append(_firstChannelArray(frame)[0])
            geometries.append(_geometryNode(dimensions, ijkToRas))
            indexValues.append(cineNode.GetNthIndexValue(item))
        return arrays, geometries, indexValues
    if isinstance(cineNode, slicer.vtkMRMLScalarVolumeNode):
        name = cineNode.GetName()
        if cineNode.GetImageData() is None:
            raise RegistrationError(f"The volume '{name}' has no image data.")
        dimensions = cineNode.GetImageData().GetDimensions()
        if dimensions[2] < 2:
            raise RegistrationError(f"The volume '{name}' has a single frame (its third axis, time, has one "
                                    "slice); tracking needs at least two frames.")
        stack = _firstChannelArray(cineNode)
        ijkToRas = _ijkToRas(cineNode)
        geometries = []
        for frame in range(dimensions[2]):
            frameIjkToRas = ijkToRas.copy()
            frameIjkToRas[:3, 3] += frame * ijkToRas[:3, 2]
            geometries.append(_geometryNode(dimensions, frameIjkToRas))
        return list(stack), geometries, [str(frame) for frame in range(dimensions[2])]
    raise RegistrationError("Select a sequence of 2D images or a volume whose third axis is time.")


def cineInputProblems(cineNode, maskNode=None, scales: str = DEFAULT_TRACKING_SCALES, device: str = "auto",
                      stepsPerScale: int = DEFAULT_STEPS_PER_SCALE, batchSize: int = 1) -> list[str]:
    """Everything that prevents tracking with these inputs, as sentences for the user (empty when ready)."""
    problems = []
    if cineNode is None:
        problems.append("Select a cine: a sequence of 2D images or a volume whose third axis is time.")
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
    problems += scheduleAndDeviceProblems(scales, device)
    if stepsPerScale is None or int(stepsPerScale) < 1:
        problems.append("Steps per scale must be at least 1.")
    if batchSize is None or int(batchSize) < 0:
        problems.append("The batch size must be 0 (all pairs) or more.")
    return problems


def sequenceBrowsersOf(scene, sequenceNode) -> list:
    """The sequence browser nodes of ``scene`` that synchronize ``sequenceNode``."""
    browsers = []
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSequenceBrowserNode")):
        browser = scene.GetNthNodeByClass(index, "vtkMRMLSequenceBrowserNode")
        if browser.IsSynchronizedSequenceNode(sequenceNode.GetID(), True):
            browsers.append(browser)
    return browsers


# ---------------------------------------------------------------------------------------------------------------
# Job


class CineTrackingJob(RegistrationJob):
    """A cine tracking run of the ``track`` worker (see the module docstring for what enters the scene).

    After success: ``transformSequenceNode``, ``browserNode``, ``metricsTableNode``, ``chartNodes`` ({"mse",
    "nlcc"}), ``pairMetrics`` (rows of metrics.csv as dicts) and ``metrics`` (the worker's summary).
    """

    def __init__(self, logic, cineNode, geometries: list, indexValues: list[str], parameters: dict,
                 temporaryDirectory: Path, slicePlane: SlicePlane, workerCommand: list[str],
                 progressCallback: ProgressCallback | None, keepTemporaryFiles: bool, sequencesLogic=None):
        self.cineNode = cineNode
        self.geometries = geometries
        self.indexValues = indexValues
        self.sequencesLogic = sequencesLogic
        self.transformSequenceNode = None
        self.browserNode = None
        self.metricsTableNode = None
        self.chartNodes: dict = {}
        self.pairMetrics: list[dict] = []
        inputs = {"fixed": None, "moving": None, "segmentation": None, "outputTransform": None, "outputVolume": None}
        super().__init__(logic, inputs, parameters, temporaryDirectory, slicePlane, workerCommand, progressCallback,
                         keepTemporaryFiles)

    def _handleEvent(self, event: dict) -> None:
        if event.get("event") == "started":
            size = event.get("image_size") or ["?", "?"]
            self._log(f"Tracking {event.get('pairs')} frame pairs of {size[0]}x{size[1]} pixels, "
                      f"{event.get('batch_size')} per step.")
        super()._handleEvent(event)

    def _failureMessage(self, returnCode: int) -> str:
        return super()._failureMessage(returnCode).replace("Registration failed", "Tracking failed", 1)

    def _importResults(self) -> None:
        outputs = self._finishedEvent.get("outputs") or {}
        folder = Path(outputs.get("folder") or self.temporaryDirectory / "tracking")
        frames = len(self.geometries)
        gridTransforms = [self._loadField(self._zeroFieldPath(), 0)]
        for pair in range(1, frames):
            gridTransforms.append(self._loadField(folder / f"field_{pair:04d}.nii.gz", pair))
        with open(outputs.get("metrics") or folder / "metrics.csv", newline="", encoding="utf-8") as stream:
            rows = list(csv.DictReader(stream))
        if [int(row["pair"]) for row in rows] != list(range(1, frames)):
            raise RegistrationError(f"metrics.csv does not list the pairs 1..{frames - 1}.")
        self.pairMetrics = [{"pair": int(row["pair"]), **{name: float(row[name]) for name in METRIC_COLUMNS}}
                            for row in rows]

        scene = self.scene
        nodesBefore = {scene.GetNthNode(index).GetID() for index in range(scene.GetNumberOfNodes())}
        browser = None
        try:
            self._commitTransformSequence(gridTransforms)
            browser = self._commitBrowser()
            self._commitTable()
            self._commitCharts()
        except BaseException:
            if browser is not None and self.transformSequenceNode is not None:
                browser.RemoveSynchronizedSequenceNode(self.transformSequenceNode.GetID())
            for index in reversed(range(scene.GetNumberOfNodes())):
                node = scene.GetNthNode(index)
                if node is not None and node.GetID() not in nodesBefore:
                    scene.RemoveNode(node)
            self.transformSequenceNode = self.browserNode = self.metricsTableNode = None
            self.chartNodes = {}
            raise

    def _zeroFieldPath(self) -> Path:
        """A zero 2D field on the frame grid in plane coordinates (frame 0 has no predecessor)."""
        import SimpleITK as sitk

        columns, rows, _ = self.geometries[0].GetImageData().GetDimensions()
        spacing, origin, direction = self._slicePlane.imageGeometry(self.geometries[0], "first frame")
        field = sitk.GetImageFromArray(np.zeros((rows, columns, 2)), isVector=True)
        field.SetSpacing(spacing)
        field.SetOrigin(origin)
        field.SetDirection(direction)
        path = self.temporaryDirectory / "zero-field.nrrd"
        sitk.WriteImage(field, str(path))
        return path

    def _loadField(self, planeFieldPath: Path, frame: int):
        if not Path(planeFieldPath).is_file():
            raise RegistrationError(f"the worker did not write {Path(planeFieldPath).name}.")
        slicePath = self.temporaryDirectory / f"frame-field-{frame:04d}.nrrd"
        self._slicePlane.writeFieldOnFixedSlice(str(planeFieldPath), str(slicePath), self.geometries[frame])
        gridTransform = readDisplacementFieldTransform(str(slicePath))
        if not gridMatchesVolume(gridTransform, self.geometries[frame]):
            raise RegistrationError(f"the displacement field of frame {frame} is not on the frame's grid.")
        return gridTransform

    def _commitTransformSequence(self, gridTransforms: list) -> None:
        scene = self.scene
        sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode",
                                           scene.GenerateUniqueName(f"{self.cineNode.GetName()} tracking (SSMSR)"))
        self.transformSequenceNode = sequence
        if isinstance(self.cineNode, slicer.vtkMRMLSequenceNode):
            sequence.SetIndexName(self.cineNode.GetIndexName())
            sequence.SetIndexUnit(self.cineNode.GetIndexUnit())
            sequence.SetIndexType(self.cineNode.GetIndexType())
            sequence.SetNumericIndexValueTolerance(self.cineNode.GetNumericIndexValueTolerance())
        else:
            sequence.SetIndexName("frame")
            sequence.SetIndexUnit("")
        for frame, (gridTransform, indexValue) in enumerate(zip(gridTransforms, self.indexValues)):
            transformNode = slicer.vtkMRMLTransformNode()
            transformNode.SetName(f"frame {frame}")
            transformNode.SetAndObserveTransformFromParent(gridTransform)
            if sequence.SetDataNodeAtValue(transformNode, str(indexValue)) is None:
                raise RegistrationError(f"the transform of frame {frame} could not be added to the sequence.")
        sequence.SetAttribute("SSMSR.CineNodeID", self.cineNode.GetID())

    def _commitBrowser(self):
        """Synchronize the transform sequence with the cine's browser (a new one if the cine has none)."""
        scene = self.scene
        browsers = sequenceBrowsersOf(scene, self.cineNode) if isinstance(self.cineNode, slicer.vtkMRMLSequenceNode) else []
        if browsers:
            browser = browsers[0]
        else:
            browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode",
                                              scene.GenerateUniqueName(f"{self.cineNode.GetName()} browser"))
            if isinstance(self.cineNode, slicer.vtkMRMLSequenceNode):
                browser.SetAndObserveMasterSequenceNodeID(self.cineNode.GetID())
            else:
                browser.SetAndObserveMasterSequenceNodeID(self.transformSequenceNode.GetID())
        if not browser.IsSynchronizedSequenceNode(self.transformSequenceNode.GetID(), True):
            browser.AddSynchronizedSequenceNode(self.transformSequenceNode)
        self.browserNode = browser
        if self.sequencesLogic is not None:
            self.sequencesLogic.UpdateProxyNodesFromSequences(browser)
        proxy = browser.GetProxyNode(self.transformSequenceNode)
        if proxy is not None and hasattr(proxy, "CreateDefaultDisplayNodes"):
            proxy.CreateDefaultDisplayNodes()
            displayNode = proxy.GetDisplayNode()
            if isinstance(displayNode, slicer.vtkMRMLTransformDisplayNode):
                displayNode.SetVisualizationMode(slicer.vtkMRMLTransformDisplayNode.VIS_MODE_GLYPH)
        return browser

    def _commitTable(self) -> None:
        scene = self.scene
        table = scene.AddNewNodeByClass("vtkMRMLTableNode",
                                        scene.GenerateUniqueName(f"{self.cineNode.GetName()} tracking metrics"))
        pairs = vtk.vtkIntArray()
        pairs.SetName("pair")
        for row in self.pairMetrics:
            pairs.InsertNextValue(row["pair"])
        table.AddColumn(pairs)
        for name in METRIC_COLUMNS:
            column = vtk.vtkDoubleArray()
            column.SetName(name)
            for row in self.pairMetrics:
                column.InsertNextValue(row[name])
            table.AddColumn(column)
        table.SetUseColumnTitleAsColumnHeader(True)
        self.metricsTableNode = table

    def _commitCharts(self) -> None:
        scene = self.scene
        colors = {"identity": (0.6, 0.6, 0.6), "ssmsr": (0.85, 0.2, 0.1)}
        for metric, title in (("mse", "MSE"), ("nlcc", "NLCC")):
            chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode",
                                            scene.GenerateUniqueName(f"{self.cineNode.GetName()} tracking {title}"))
            chart.SetTitle(f"{title} per frame pair (inside the mask)")
            chart.SetXAxisTitle("pair (frame t-1 onto frame t)")
            chart.SetYAxisTitle(title)
            for column, label, color in ((f"{metric}_identity", f"{title} identity", colors["identity"]),
                                         (metric, f"{title} SSMSR", colors["ssmsr"])):
                series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", scene.GenerateUniqueName(label))
                series.SetAndObserveTableNodeID(self.metricsTableNode.GetID())
                series.SetXColumnName("pair")
                series.SetYColumnName(column)
                series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
                series.SetColor(*color)
                chart.AddAndObservePlotSeriesNodeID(series.GetID())
            self.chartNodes[metric] = chart


# ---------------------------------------------------------------------------------------------------------------
# Starting a tracking job (called by RegistrationLogic.startTracking)


def startTracking(logic, cineNode, maskNode=None, scales: str = DEFAULT_TRACKING_SCALES,
                  stepsPerScale: int = DEFAULT_STEPS_PER_SCALE, precision: str = DEFAULT_PRECISION,
                  batchSize: int = 1,
                  smoothnessWeight: float = DEFAULT_SMOOTHNESS_WEIGHT, nccWindow: int | None = None,
                  device: str = "auto", progressCallback: ProgressCallback | None = None,
                  keepTemporaryFiles: bool = False, seed: int | None = None) -> CineTrackingJob:
    if logic.activeJob is not None:
        raise RegistrationError("A registration is already running; cancel it or wait for it to finish.")
    problems = cineInputProblems(cineNode, maskNode, scales, device, stepsPerScale, batchSize)
    problems += precisionProblems(precision)
    if nccWindow is not None and int(nccWindow) < 1:
        problems.append("The NCC window must be at least 1 pixel.")
    if problems:
        raise ValueError(" ".join(problems))
    arrays, geometries, indexValues = cineFrames(cineNode)

    import SimpleITK as sitk  # bundled with Slicer

    temporaryDirectory = Path(tempfile.mkdtemp(prefix="SSMSR-", dir=logic.temporaryDirectoryRoot))
    try:
        slicePlane = SlicePlane(geometries[0])
        spacing, origin, direction = slicePlane.imageGeometry(geometries[0], "first frame")
        cine = sitk.GetImageFromArray(np.stack(arrays))  # (T, H, W) -> x, y, time
        cine.SetSpacing(tuple(spacing) + (1.0,))
        cine.SetOrigin(tuple(origin) + (0.0,))
        cine.SetDirection((direction[0], direction[1], 0.0, direction[2], direction[3], 0.0, 0.0, 0.0, 1.0))
        cinePath = temporaryDirectory / "cine.nrrd"
        sitk.WriteImage(cine, str(cinePath))
        command = logic.workerCommandPrefix + ["track", str(cinePath), "-o", str(temporaryDirectory / "tracking"),
                                               "--progress", "jsonl", "--no-figures",
                                               "--scales", format_scales(parse_scales(scales)),
                                               "--steps", str(int(stepsPerScale)), "--precision", precision,
                                               "--batch", str(int(batchSize)),
                                               "--lambda", repr(float(smoothnessWeight)),
                                               "--device", normalizeDevice(device)]
        if nccWindow is not None:
            command += ["--window", str(int(nccWindow))]
        if seed is not None:
            command += ["--seed", str(int(seed))]
        if maskNode is not None:
            command += ["--mask", logic._writeVolume(maskNode, temporaryDirectory / "mask.nrrd", slicePlane, "mask")]
    except BaseException:
        shutil.rmtree(temporaryDirectory, ignore_errors=True)
        raise
    parameters = {"scales": scales, "stepsPerScale": int(stepsPerScale), "precision": precision,
                  "batchSize": int(batchSize),
                  "smoothnessWeight": float(smoothnessWeight), "nccWindow": nccWindow, "device": device, "seed": seed}
    job = CineTrackingJob(logic, cineNode, geometries, indexValues, parameters, temporaryDirectory, slicePlane, command,
                          progressCallback, keepTemporaryFiles, sequencesLogic=getattr(logic, "sequencesLogic", None))
    logic.activeJob = job
    return job
