"""Qt-free Slicer logic of cine tracking: a 2D+t or 3D+t cine in the scene, the ``track`` worker, transforms and
metrics out, and a segmentation propagated to every frame.

The cine is a sequence node of single-slice volumes (what Slicer's DICOM import gives for an ultrasound cine), a
sequence node of 3D scalar volumes on one grid (4D CT or MR phases, 3D echo), or a volume whose third axis is time.
2D frames are written as one 2D+t NRRD in the first frame's own plane frame (in-plane millimetres along the frame's i
and j axes, see :class:`~.geometry.SlicePlane`), so the worker's 2D fields come back in that frame and are rewritten,
one per frame, as one-slice 3D fields on the frame's geometry before Slicer loads them (Slicer's reader garbles 2D
fields). 3D frames are written as one 4D NRRD (x, y, z, time) on the frames' grid in LPS; the worker's 3D fields
(field_NNNN.nii.gz: mm, LPS, on the frame grid) are loaded as they are.

Pairs: consecutive (frame t-1 moving onto frame t fixed), or with ``reference`` R the reference frame onto every
other frame t. Results, created all at once after the worker succeeded (the scene is left as it was on error or
cancel):

* a sequence of transform nodes, one per frame, with the cine's index values: frame t holds the "from parent"
  displacement grid of the pair whose fixed frame is t (putting that pair's moving frame under it overlays it on
  frame t); the frame that is no pair's fixed frame (frame 0, or the reference frame) holds a zero field. It is
  added to the cine's sequence browser (a new browser when the cine has none, or for a time volume), so scrubbing
  the cine shows the matching field; with a reference frame it records it (REFERENCE_FRAME_ATTRIBUTE);
* a table node with the worker's per-pair metrics (``metrics.csv``: pair = fixed frame, mse_identity, mse,
  nlcc_identity, nlcc, folded_percent);
* two plot charts over the pairs: MSE and NLCC, identity and SSMSR.

With a reference frame, ``propagation.propagateSegmentation`` turns a segmentation drawn on that frame into a sequence
of segmentation nodes, one per frame, in the same browser.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from ..common.protocol import GRID_TOLERANCE, PAIR_METRIC_NAMES, Started
from .geometry import SlicePlane, gridMatchesVolume, ijkToRas, lpsGeometry
from .jobs import Job, RegistrationError, SceneTransaction
from .parameters import cineInputProblems
from .storage import PROVENANCE_ATTRIBUTE, readDisplacementFieldTransform, readProvenance

#: Node reference role, on the transform sequence, of the cine it was computed from.
CINE_REFERENCE_ROLE = "SSMSR.Cine"
#: Attribute of a transform sequence tracked with a reference frame: that frame's number (absent: consecutive pairs).
REFERENCE_FRAME_ATTRIBUTE = "SSMSR.ReferenceFrame"


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


def frameGeometryNode(dimensions, frameIjkToRas: np.ndarray):
    """A volume node outside any scene carrying one frame's grid (``dimensions`` (i, j, k) and IJK-to-RAS)."""
    node = slicer.vtkMRMLScalarVolumeNode()
    imageData = vtk.vtkImageData()
    imageData.SetDimensions(*[int(n) for n in dimensions])
    node.SetAndObserveImageData(imageData)
    matrix = vtk.vtkMatrix4x4()
    for row in range(4):
        for column in range(4):
            matrix.SetElement(row, column, float(frameIjkToRas[row, column]))
    node.SetIJKToRASMatrix(matrix)
    return node


def _gridDifference(dimensions, matrix: np.ndarray, firstDimensions, firstMatrix: np.ndarray) -> str:
    """What differs between two grids (dimensions (i, j, k), IJK-to-RAS (4, 4)) as a phrase; "" when they match."""
    if tuple(dimensions) != tuple(firstDimensions):
        return f"its size is {'x'.join(map(str, dimensions))} voxels, not {'x'.join(map(str, firstDimensions))}"
    spacing, firstSpacing = (np.linalg.norm(m[:3, :3], axis=0) for m in (matrix, firstMatrix))
    differences = []
    if not np.allclose(spacing, firstSpacing, rtol=GRID_TOLERANCE, atol=0):
        differences.append(f"its spacing is {np.round(spacing, 4).tolist()} mm, not {np.round(firstSpacing, 4).tolist()}")
    if not np.allclose(matrix[:3, :3] / spacing, firstMatrix[:3, :3] / firstSpacing, rtol=0, atol=GRID_TOLERANCE):
        differences.append("it is oriented differently")
    shift = float(np.linalg.norm(matrix[:3, 3] - firstMatrix[:3, 3]))
    if shift > GRID_TOLERANCE * max(1.0, float(firstSpacing.max())):
        differences.append(f"its origin is {shift:.3g} mm away")
    return ", ".join(differences)


def _sequenceFrames(cineNode) -> tuple[list[np.ndarray], list, list[str]]:
    """Frames of a sequence node of single-slice volumes or of 3D volumes, all on frame 0's grid (see
    :func:`cineFrames`)."""
    name = cineNode.GetName()
    count = cineNode.GetNumberOfDataNodes()
    if count < 2:
        raise RegistrationError(f"The sequence '{name}' has {count} frame(s); tracking needs at least two frames.")
    arrays, geometries, indexValues = [], [], []
    for item in range(count):
        frame = cineNode.GetNthDataNode(item)
        if not isinstance(frame, slicer.vtkMRMLScalarVolumeNode) or frame.GetImageData() is None:
            raise RegistrationError(f"Item {item} of the sequence '{name}' is not a volume with image data; "
                                    "select a sequence of 2D images (e.g. an ultrasound cine) or of 3D volumes.")
        dimensions, matrix = frame.GetImageData().GetDimensions(), ijkToRas(frame)
        first = geometries[0] if geometries else None
        difference = first and _gridDifference(dimensions, matrix, first.GetImageData().GetDimensions(), ijkToRas(first))
        if difference:
            raise RegistrationError(f"Frame {item} of the sequence '{name}' is not on frame 0's grid: {difference}. "
                                    "All frames must share one grid (size, spacing, orientation and origin); resample "
                                    "them onto frame 0 first (e.g. Resample Scalar/Vector/DWI Volume with frame 0 as "
                                    "the reference volume).")
        voxels = _firstChannelArray(frame)
        arrays.append(voxels[0] if dimensions[2] == 1 else voxels)
        geometries.append(frameGeometryNode(dimensions, matrix))
        indexValues.append(cineNode.GetNthIndexValue(item))
    return arrays, geometries, indexValues


def cineFrames(cineNode) -> tuple[list[np.ndarray], list, list[str]]:
    """Frames of a cine node: (arrays (rows, columns) of 2D frames or (slices, rows, columns) of 3D frames,
    per-frame geometry nodes, index values).

    Raises RegistrationError (message for the user) for anything that cannot be tracked.
    """
    if isinstance(cineNode, slicer.vtkMRMLSequenceNode):
        return _sequenceFrames(cineNode)
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
            geometries.append(frameGeometryNode(dimensions[:2] + (1,), frameIjkToRas))
        return list(stack), geometries, [str(frame) for frame in range(dimensions[2])]
    raise RegistrationError("Select a sequence of 2D images or of 3D volumes, or a volume whose third axis is time.")


def isVolumeSequence(cineNode) -> bool:
    """True for a sequence node whose first frame is a 3D volume (more than one slice): a 3D+t cine."""
    if not isinstance(cineNode, slicer.vtkMRMLSequenceNode) or cineNode.GetNumberOfDataNodes() == 0:
        return False
    first = cineNode.GetNthDataNode(0)
    return (isinstance(first, slicer.vtkMRMLScalarVolumeNode) and first.GetImageData() is not None
            and first.GetImageData().GetDimensions()[2] > 1)


def trackingInputProblems(cineNode, maskNode=None) -> list[str]:
    """Everything that prevents tracking with these nodes, as sentences for the user (empty when ready): those of
    ``parameters.cineInputProblems``; for a 3D+t cine, the mask must be a volume on the frames' grid."""
    if not isVolumeSequence(cineNode):
        return cineInputProblems(cineNode, maskNode)
    problems = cineInputProblems(cineNode)
    if maskNode is not None:
        first = cineNode.GetNthDataNode(0)
        if maskNode.GetImageData() is None:
            problems.append(f"The mask '{maskNode.GetName()}' has no image data.")
        else:
            difference = _gridDifference(maskNode.GetImageData().GetDimensions(), ijkToRas(maskNode),
                                         first.GetImageData().GetDimensions(), ijkToRas(first))
            if difference:
                problems.append(f"The mask '{maskNode.GetName()}' is not on the frames' grid: {difference}; "
                                "resample it onto a frame of the sequence first.")
    return problems


def referenceProblems(reference, frames: int) -> list[str]:
    """A sentence if ``reference`` (None: consecutive pairs) is not a frame number of a cine of ``frames`` frames."""
    if reference is None or (isinstance(reference, (int, np.integer)) and not isinstance(reference, bool)
                             and 0 <= reference < frames):
        return []
    return [f"reference must be a frame number from 0 to {frames - 1} (the frame registered onto every other), or "
            f"None for consecutive pairs; got {reference!r}."]


def frameCount(cineNode) -> int:
    """The frames of a cine node: a sequence's items, the slices of a volume whose third axis is time (0 for
    anything else, or a volume without image data)."""
    if isinstance(cineNode, slicer.vtkMRMLSequenceNode):
        return cineNode.GetNumberOfDataNodes()
    if isinstance(cineNode, slicer.vtkMRMLScalarVolumeNode) and cineNode.GetImageData() is not None:
        return cineNode.GetImageData().GetDimensions()[2]
    return 0


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


def writeCine(arrays: list[np.ndarray], slicePlane: SlicePlane | None, firstFrameNode, path: Path) -> str:
    """Write the frames as one image whose last axis is time; return the path. 2D frames (``slicePlane`` given):
    (x, y, time) in the first frame's plane frame; 3D frames (``slicePlane`` None): (x, y, z, time) on the first
    frame's grid, LPS."""
    import SimpleITK as sitk  # bundled with Slicer

    if slicePlane is None:
        spacing, origin, direction = lpsGeometry(firstFrameNode)
    else:
        spacing, origin, direction = slicePlane.imageGeometry(firstFrameNode, "first frame")
    dimension = len(spacing)
    stackDirection = np.eye(dimension + 1)
    stackDirection[:dimension, :dimension] = np.reshape(direction, (dimension, dimension))
    cine = sitk.GetImageFromArray(np.stack(arrays), isVector=False)  # (T[, K], J, I) -> x, y[, z], time
    cine.SetSpacing(tuple(spacing) + (1.0,))
    cine.SetOrigin(tuple(origin) + (0.0,))
    cine.SetDirection(tuple(stackDirection.flatten()))
    sitk.WriteImage(cine, str(path))
    return str(path)


def newSequenceLike(scene, name: str, indexSource):
    """A new sequence node in ``scene`` with the index name, unit and type of the sequence ``indexSource`` ("frame"
    when it is not a sequence)."""
    sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", scene.GenerateUniqueName(name))
    if isinstance(indexSource, slicer.vtkMRMLSequenceNode):
        sequence.SetIndexName(indexSource.GetIndexName())
        sequence.SetIndexUnit(indexSource.GetIndexUnit())
        sequence.SetIndexType(indexSource.GetIndexType())
        sequence.SetNumericIndexValueTolerance(indexSource.GetNumericIndexValueTolerance())
    else:
        sequence.SetIndexName("frame")
        sequence.SetIndexUnit("")
    return sequence


def synchronizeWithBrowser(scene, sequenceNode, masterSequenceNode, transaction: SceneTransaction,
                           sequencesLogic=None, browserName: str = ""):
    """Add ``sequenceNode`` to the browser of ``masterSequenceNode`` (a new browser, ``browserName``, when it has
    none) and give its proxy node display nodes; return (browser, proxy node or None without ``sequencesLogic``)."""
    browsers = sequenceBrowsersOf(scene, masterSequenceNode)
    if browsers:
        browser = browsers[0]
    else:
        browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode",
                                          scene.GenerateUniqueName(browserName or f"{masterSequenceNode.GetName()} browser"))
        browser.SetAndObserveMasterSequenceNodeID(masterSequenceNode.GetID())
    if not browser.IsSynchronizedSequenceNodeID(sequenceNode.GetID(), True):
        sequenceId = sequenceNode.GetID()
        transaction.onUndo(lambda: browser.RemoveSynchronizedSequenceNode(sequenceId))
        browser.AddSynchronizedSequenceNode(sequenceNode)
    if sequencesLogic is not None:
        sequencesLogic.UpdateProxyNodesFromSequences(browser)
    proxy = browser.GetProxyNode(sequenceNode)
    if proxy is not None and hasattr(proxy, "CreateDefaultDisplayNodes"):
        proxy.CreateDefaultDisplayNodes()
    return browser, proxy


# ---------------------------------------------------------------------------------------------------------------
# Job


class CineTrackingJob(Job):
    """A cine tracking run of the ``track`` worker (see the module docstring for what enters the scene).

    After success: ``transformSequenceNode``, ``browserNode``, ``metricsTableNode``, ``chartNodes`` ({"mse",
    "nlcc"}), ``pairMetrics`` (rows of metrics.csv as dicts) and ``metrics`` (the worker's summary).
    """

    activity = "Tracking"

    def __init__(self, scene, cineNode, geometries: list, indexValues: list[str], slicePlane: SlicePlane | None,
                 reference: int | None = None, sequencesLogic=None, **jobOptions):
        self.cineNode = cineNode
        self.geometries = geometries
        self.indexValues = indexValues
        self.reference = reference
        self.sequencesLogic = sequencesLogic
        self.transformSequenceNode = None
        self.browserNode = None
        self.metricsTableNode = None
        self.chartNodes: dict = {}
        self.pairMetrics: list[dict] = []
        self._slicePlane = slicePlane
        super().__init__(scene, **jobOptions)

    @property
    def unpairedFrame(self) -> int:
        """The frame that is no pair's fixed frame: 0 for consecutive pairs, else the reference frame."""
        return 0 if self.reference is None else self.reference

    def _describeStarted(self, event: Started) -> str:
        size = "x".join(map(str, event.image_size or ["?"]))
        unit = "voxels" if len(event.image_size or []) == 3 else "pixels"
        return (f"Tracking {event.pairs} frame pairs of {size} {unit}, {event.batch_text()}, "
                f"on {event.device}: scales {', '.join(map(str, event.scales))}, "
                f"{event.steps_text()}, {event.extra.get('precision', 'float32')} precision"
                f"{event.half_field_text()}.")

    def _importResults(self) -> None:
        outputs = self.outputs
        folder = Path(outputs.get("folder") or self.temporaryDirectory / "tracking")
        frames = len(self.geometries)
        pairs = [frame for frame in range(frames) if frame != self.unpairedFrame]
        gridTransforms = [self._loadField(self._zeroFieldPath() if frame == self.unpairedFrame
                                          else folder / f"field_{frame:04d}.nii.gz", frame) for frame in range(frames)]
        with open(outputs.get("metrics") or folder / "metrics.csv", newline="", encoding="utf-8") as stream:
            rows = list(csv.DictReader(stream))
        if [int(row["pair"]) for row in rows] != pairs:
            raise RegistrationError(f"metrics.csv does not list the pairs {pairs}.")
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
        """A zero field for the unpaired frame: 2D in plane coordinates (``_loadField`` puts it on the frame's slice),
        or 3D on the frame's grid in LPS."""
        import SimpleITK as sitk

        geometry = self.geometries[self.unpairedFrame]
        columns, rows, slices = geometry.GetImageData().GetDimensions()
        if self._slicePlane is None:
            spacing, origin, direction = lpsGeometry(geometry)
            shape = (slices, rows, columns, 3)
        else:
            spacing, origin, direction = self._slicePlane.imageGeometry(self.geometries[0], "first frame")
            shape = (rows, columns, 2)
        field = sitk.GetImageFromArray(np.zeros(shape), isVector=True)
        field.SetSpacing(spacing)
        field.SetOrigin(origin)
        field.SetDirection(direction)
        path = self.temporaryDirectory / "zero-field.nrrd"
        sitk.WriteImage(field, str(path))
        return path

    def _loadField(self, fieldPath: Path, frame: int):
        """The grid transform of the worker's field of ``frame`` (2D fields first rewritten on the frame's slice)."""
        if not Path(fieldPath).is_file():
            raise RegistrationError(f"the worker did not write {Path(fieldPath).name}.")
        if self._slicePlane is not None:
            slicePath = self.temporaryDirectory / f"frame-field-{frame:04d}.nrrd"
            self._slicePlane.writeFieldOnFixedSlice(str(fieldPath), str(slicePath), self.geometries[frame])
            fieldPath = slicePath
        gridTransform = readDisplacementFieldTransform(str(fieldPath))
        if not gridMatchesVolume(gridTransform, self.geometries[frame]):
            raise RegistrationError(f"the displacement field of frame {frame} is not on the frame's grid.")
        return gridTransform

    def _commitTransformSequence(self, gridTransforms: list) -> None:
        sequence = newSequenceLike(self.scene, f"{self.cineNode.GetName()} tracking (SSMSR)", self.cineNode)
        self.transformSequenceNode = sequence
        for frame, (gridTransform, indexValue) in enumerate(zip(gridTransforms, self.indexValues)):
            transformNode = slicer.vtkMRMLTransformNode()
            transformNode.SetName(f"frame {frame}")
            transformNode.SetAndObserveTransformFromParent(gridTransform)
            if sequence.SetDataNodeAtValue(transformNode, str(indexValue)) is None:
                raise RegistrationError(f"the transform of frame {frame} could not be added to the sequence.")
        sequence.SetNodeReferenceID(CINE_REFERENCE_ROLE, self.cineNode.GetID())
        if self.reference is not None:
            sequence.SetAttribute(REFERENCE_FRAME_ATTRIBUTE, str(self.reference))
        provenance = readProvenance(self.outputs)
        if provenance is not None:
            sequence.SetAttribute(PROVENANCE_ATTRIBUTE, provenance)

    def _commitBrowser(self, transaction: SceneTransaction) -> None:
        """Synchronize the transform sequence with the cine's browser (a new one if the cine has none)."""
        isSequence = isinstance(self.cineNode, slicer.vtkMRMLSequenceNode)
        self.browserNode, proxy = synchronizeWithBrowser(
            self.scene, self.transformSequenceNode, self.cineNode if isSequence else self.transformSequenceNode,
            transaction, self.sequencesLogic, browserName=f"{self.cineNode.GetName()} browser")
        if proxy is not None and isinstance(proxy.GetDisplayNode(), slicer.vtkMRMLTransformDisplayNode):
            proxy.GetDisplayNode().SetVisualizationMode(slicer.vtkMRMLTransformDisplayNode.VIS_MODE_GLYPH)

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
        pairText = ("pair (frame t-1 onto frame t)" if self.reference is None
                    else f"pair (frame {self.reference} onto frame t)")
        for metric, title in (("mse", "MSE"), ("nlcc", "NLCC")):
            chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode",
                                            scene.GenerateUniqueName(f"{self.cineNode.GetName()} tracking {title}"))
            chart.SetTitle(f"{title} per frame pair (inside the mask)")
            chart.SetXAxisTitle(pairText)
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
# Segmentation propagated to every frame
