"""Qt-free Slicer logic of cine tracking: a 2D+t cine in the scene, the ``track`` worker, transforms and metrics out.

The cine is either a sequence node of single-slice volumes (what Slicer's DICOM import gives for an ultrasound
cine) or a volume whose third axis is time. Its frames are written as one 2D+t NRRD in the first frame's own plane
frame (in-plane millimetres along the frame's i and j axes, see :class:`~.geometry.SlicePlane`), so the worker's
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
from pathlib import Path

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from ..common.protocol import GRID_TOLERANCE, PAIR_METRIC_NAMES, Started
from .geometry import SlicePlane, gridMatchesVolume, ijkToRas
from .jobs import Job, RegistrationError, SceneTransaction
from .storage import PROVENANCE_ATTRIBUTE, readDisplacementFieldTransform, readProvenance

#: Node reference role, on the transform sequence, of the cine it was computed from.
CINE_REFERENCE_ROLE = "SSMSR.Cine"


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


def _geometryNode(dimensions, frameIjkToRas: np.ndarray):
    """A volume node outside any scene carrying one frame's grid (dimensions W x H x 1 and IJK-to-RAS)."""
    node = slicer.vtkMRMLScalarVolumeNode()
    imageData = vtk.vtkImageData()
    imageData.SetDimensions(int(dimensions[0]), int(dimensions[1]), 1)
    node.SetAndObserveImageData(imageData)
    matrix = vtk.vtkMatrix4x4()
    for row in range(4):
        for column in range(4):
            matrix.SetElement(row, column, float(frameIjkToRas[row, column]))
    node.SetIJKToRASMatrix(matrix)
    return node


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
            matrix = ijkToRas(frame)
            if firstDimensions is None:
                firstDimensions, firstIjkToRas = dimensions, matrix
            elif dimensions != firstDimensions:
                raise RegistrationError(f"The frames of the sequence '{name}' have different sizes: frame 0 is "
                                        f"{firstDimensions[0]}x{firstDimensions[1]} but frame {item} is "
                                        f"{dimensions[0]}x{dimensions[1]}; all frames must share one grid.")
            elif not np.allclose(matrix, firstIjkToRas, rtol=0,
                                 atol=GRID_TOLERANCE * max(1.0, float(np.abs(firstIjkToRas).max()))):
                raise RegistrationError(f"Frame {item} of the sequence '{name}' lies on a different grid (origin, "
                                        "spacing or orientation) than frame 0; all frames must share one grid.")
            arrays.append(_firstChannelArray(frame)[0])
            geometries.append(_geometryNode(dimensions, matrix))
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
        matrix = ijkToRas(cineNode)
        geometries = []
        for frame in range(dimensions[2]):
            frameIjkToRas = matrix.copy()
            frameIjkToRas[:3, 3] += frame * matrix[:3, 2]
            geometries.append(_geometryNode(dimensions, frameIjkToRas))
        return list(stack), geometries, [str(frame) for frame in range(dimensions[2])]
    raise RegistrationError("Select a sequence of 2D images or a volume whose third axis is time.")


def sequenceBrowsersOf(scene, sequenceNode) -> list:
    """The sequence browser nodes of ``scene`` that synchronize ``sequenceNode``."""
    browsers = []
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSequenceBrowserNode")):
        browser = scene.GetNthNodeByClass(index, "vtkMRMLSequenceBrowserNode")
        # IsSynchronizedSequenceNodeID: the string-ID form; IsSynchronizedSequenceNode(const char*) is marked
        # "Deprecated. Use IsSynchronizedSequenceNodeID instead." at v5.6.2
        # (Modules/Loadable/Sequences/MRML/vtkMRMLSequenceBrowserNode.h), same arguments and meaning.
        if browser.IsSynchronizedSequenceNodeID(sequenceNode.GetID(), True):
            browsers.append(browser)
    return browsers


def writeCine(arrays: list[np.ndarray], slicePlane: SlicePlane, firstFrameNode, path: Path) -> str:
    """Write the frames as one 2D+t image (x, y, time) in the first frame's plane frame; return the path."""
    import SimpleITK as sitk  # bundled with Slicer

    spacing, origin, direction = slicePlane.imageGeometry(firstFrameNode, "first frame")
    cine = sitk.GetImageFromArray(np.stack(arrays))  # (T, H, W) -> x, y, time
    cine.SetSpacing(tuple(spacing) + (1.0,))
    cine.SetOrigin(tuple(origin) + (0.0,))
    cine.SetDirection((direction[0], direction[1], 0.0, direction[2], direction[3], 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(cine, str(path))
    return str(path)


# ---------------------------------------------------------------------------------------------------------------
# Job


class CineTrackingJob(Job):
    """A cine tracking run of the ``track`` worker (see the module docstring for what enters the scene).

    After success: ``transformSequenceNode``, ``browserNode``, ``metricsTableNode``, ``chartNodes`` ({"mse",
    "nlcc"}), ``pairMetrics`` (rows of metrics.csv as dicts) and ``metrics`` (the worker's summary).
    """

    activity = "Tracking"

    def __init__(self, scene, cineNode, geometries: list, indexValues: list[str], slicePlane: SlicePlane,
                 sequencesLogic=None, **jobOptions):
        self.cineNode = cineNode
        self.geometries = geometries
        self.indexValues = indexValues
        self.sequencesLogic = sequencesLogic
        self.transformSequenceNode = None
        self.browserNode = None
        self.metricsTableNode = None
        self.chartNodes: dict = {}
        self.pairMetrics: list[dict] = []
        self._slicePlane = slicePlane
        super().__init__(scene, **jobOptions)

    def _describeStarted(self, event: Started) -> str:
        size = event.image_size or ["?", "?"]
        return (f"Tracking {event.pairs} frame pairs of {size[0]}x{size[1]} pixels, {event.batch_size} "
                f"per step, on {event.device}: scales {', '.join(map(str, event.scales))}, "
                f"{event.steps_per_scale} steps per scale, {event.extra.get('precision', 'float32')} precision.")

    def _importResults(self) -> None:
        outputs = self.outputs
        folder = Path(outputs.get("folder") or self.temporaryDirectory / "tracking")
        frames = len(self.geometries)
        gridTransforms = [self._loadField(self._zeroFieldPath(), 0)]
        for pair in range(1, frames):
            gridTransforms.append(self._loadField(folder / f"field_{pair:04d}.nii.gz", pair))
        with open(outputs.get("metrics") or folder / "metrics.csv", newline="", encoding="utf-8") as stream:
            rows = list(csv.DictReader(stream))
        if [int(row["pair"]) for row in rows] != list(range(1, frames)):
            raise RegistrationError(f"metrics.csv does not list the pairs 1..{frames - 1}.")
        self.pairMetrics = [{"pair": int(row["pair"]), **{name: float(row[name]) for name in PAIR_METRIC_NAMES}}
                            for row in rows]

        with SceneTransaction(self.scene) as transaction:
            transaction.onUndo(self._forgetResults)
            self._commitTransformSequence(gridTransforms)
            self._commitBrowser(transaction)
            self._commitTable()
            self._commitCharts()

    def _forgetResults(self) -> None:
        self.transformSequenceNode = self.browserNode = self.metricsTableNode = None
        self.chartNodes = {}

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
        sequence.SetNodeReferenceID(CINE_REFERENCE_ROLE, self.cineNode.GetID())
        provenance = readProvenance(self.outputs)
        if provenance is not None:
            sequence.SetAttribute(PROVENANCE_ATTRIBUTE, provenance)

    def _commitBrowser(self, transaction: SceneTransaction):
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
        if not browser.IsSynchronizedSequenceNodeID(self.transformSequenceNode.GetID(), True):
            sequenceId = self.transformSequenceNode.GetID()
            transaction.onUndo(lambda: browser.RemoveSynchronizedSequenceNode(sequenceId))
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
        for name in PAIR_METRIC_NAMES:
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
