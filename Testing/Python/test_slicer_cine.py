"""Cine tracking in the Qt-free Slicer logic, on a real MRML scene (``slicer-core`` wheel) with the real ``track``
worker on four frames of the echocardiogram cine that the module ships (from pydicom 3, shrunk 2x), short schedule."""

from __future__ import annotations

import csv
import json
import time

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
sitk = pytest.importorskip("SimpleITK")
vtk = pytest.importorskip("vtk")

from vtk.util import numpy_support  # noqa: E402

from SSMSRRegistrationLib.testing import scene_helpers  # noqa: E402
from SSMSRRegistrationLib.mrml.cine import CineTrackingJob  # noqa: E402
from SSMSRRegistrationLib.mrml.parameters import cineInputProblems  # noqa: E402
from SSMSRRegistrationLib.mrml.storage import PROVENANCE_ATTRIBUTE  # noqa: E402
from SSMSRRegistrationLib.logic import JobState, RegistrationLogic  # noqa: E402
from SSMSRRegistrationLib.mrml.worker_process import processExists, waitUntilGone  # noqa: E402

FRAMES = 4
ORIGIN = np.array([12.0, -40.0, 25.0])
INDEX_VALUES = [f"{0.04 * frame:.2f}" for frame in range(FRAMES)]


def newScene():
    scene = slicer.vtkMRMLScene()
    sequencesLogic = slicer.vtkSlicerSequencesLogic()
    sequencesLogic.SetMRMLScene(scene)
    return scene, sequencesLogic


def addCineSequence(scene, frames, spacingMm, name="echo cine"):
    """A sequence of single-slice volumes on an oblique plane (as Slicer's DICOM import gives), with a browser."""
    sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", name)
    sequence.SetIndexName("time")
    sequence.SetIndexUnit("s")
    for frame, indexValue in zip(frames, INDEX_VALUES):
        node = slicer.vtkMRMLScalarVolumeNode()
        imageData = vtk.vtkImageData()
        imageData.SetDimensions(frame.shape[1], frame.shape[0], 1)
        imageData.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.ascontiguousarray(frame).ravel(), deep=True))
        node.SetAndObserveImageData(imageData)
        matrix = vtk.vtkMatrix4x4()
        for row in range(3):
            for column in range(3):
                matrix.SetElement(row, column, scene_helpers.OBLIQUE_DIRECTIONS[row][column] * (spacingMm, spacingMm, 1.0)[column])
            matrix.SetElement(row, 3, ORIGIN[row])
        node.SetIJKToRASMatrix(matrix)
        sequence.SetDataNodeAtValue(node, indexValue)
    browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", name + " browser")
    browser.SetAndObserveMasterSequenceNodeID(sequence.GetID())
    return sequence, browser


@pytest.fixture(scope="module")
def echo():
    return scene_helpers.echocardiogramFrames(frameIndices=tuple(range(FRAMES)))


@pytest.fixture(scope="module")
def tracked(echo, tmp_path_factory):
    """One real tracking run, kept for the tests below (temporary files kept to compare with the worker's files)."""
    scene, sequencesLogic = newScene()
    logic = RegistrationLogic(scene, temporaryDirectoryRoot=str(tmp_path_factory.mktemp("cine")))
    logic.sequencesLogic = sequencesLogic
    sequence, browser = addCineSequence(scene, *echo)
    events = []
    job = logic.trackSequence(sequence, scales="1/2,1", steps=20, batch_size=2, device="cpu", seed=0,
                              waitForCompletion=False, keepTemporaryFiles=True, progressCallback=events.append)
    assert isinstance(job, CineTrackingJob)
    assert job.workerJob["command"] == "track" and job.workerJob["arguments"]["no_figures"] is True
    assert job.workerJob["configuration"]["overrides"] == {"scales": "1/2,1", "steps": 20, "batch_size": 2,
                                                           "device": "cpu", "seed": 0}
    assert job.wait(timeoutSeconds=300) is JobState.SUCCEEDED, job.errorMessage + "\n" + "\n".join(job.log)
    yield {"scene": scene, "logic": logic, "sequence": sequence, "browser": browser, "job": job, "events": events,
           "folder": job.temporaryDirectory / "tracking"}
    del sequencesLogic


def test_transform_sequence_has_one_item_per_frame_in_the_cines_browser(tracked):
    job, sequence, browser = tracked["job"], tracked["sequence"], tracked["browser"]
    transforms = job.transformSequenceNode
    assert transforms is not None and transforms.GetScene() is tracked["scene"]
    assert transforms.GetNumberOfDataNodes() == FRAMES
    assert [transforms.GetNthIndexValue(item) for item in range(FRAMES)] == INDEX_VALUES
    assert transforms.GetIndexName() == "time" and transforms.GetIndexUnit() == "s"
    assert job.browserNode is browser and browser.IsSynchronizedSequenceNodeID(transforms.GetID(), True)
    assert browser.GetMasterSequenceNode() is sequence
    proxy = browser.GetProxyNode(transforms)
    assert isinstance(proxy, slicer.vtkMRMLTransformNode)
    assert proxy.GetDisplayNode().GetVisualizationMode() == slicer.vtkMRMLTransformDisplayNode.VIS_MODE_GLYPH
    kinds = [event.get("event") for event in tracked["events"]]
    assert "started" in kinds and "progress" in kinds and "finished" in kinds
    assert tracked["logic"].activeJob is None
    provenance = json.loads(transforms.GetAttribute(PROVENANCE_ATTRIBUTE))  # the worker's record of the run
    assert provenance["kind"] == "track" and provenance["settings"]["steps_per_scale"] > 0
    assert "field_0001.nii.gz" in provenance["outputs"]


def test_each_transform_maps_points_as_its_field_file_says(tracked, echo):
    """Frame t's transform (RAS, from parent) equals SimpleITK's DisplacementFieldTransform of field_t (2D, plane
    coordinates of the frames) at 300 random points of the frame; frame 0 is the identity."""
    job, (frames, spacingMm) = tracked["job"], echo
    rows, columns = frames[0].shape
    axes = scene_helpers.OBLIQUE_DIRECTIONS  # unit i, j, k axes (RAS columns)
    generator = np.random.default_rng(0)
    # Points inside the grid, away from the border where ITK and VTK extrapolate differently.
    plane = np.stack([generator.uniform(1, columns - 2, 300), generator.uniform(1, rows - 2, 300)], axis=1) * spacingMm
    ras = ORIGIN + plane @ axes[:, :2].T
    largest = 0.0
    for frame in range(FRAMES):
        gridTransform = job.transformSequenceNode.GetNthDataNode(frame).GetTransformFromParent()
        assert isinstance(gridTransform, vtk.vtkGridTransform)
        actual = np.array([gridTransform.TransformPoint(point) for point in ras])
        if frame == 0:
            np.testing.assert_allclose(actual, ras, atol=1e-6)
            continue
        field = sitk.ReadImage(str(tracked["folder"] / f"field_{frame:04d}.nii.gz"))
        assert field.GetDimension() == 2 and field.GetSize() == (columns, rows)
        itkTransform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
        mapped = np.array([itkTransform.TransformPoint(tuple(point)) for point in plane])
        expected = ORIGIN + mapped @ axes[:, :2].T
        np.testing.assert_allclose(actual, expected, atol=1e-3)
        largest = max(largest, float(np.abs(mapped - plane).max()))
    assert largest > 0.05, "the fields are all but zero: the test would not see a wrong mapping"


def test_metrics_table_matches_metrics_csv_and_charts_plot_it(tracked):
    job = tracked["job"]
    with open(tracked["folder"] / "metrics.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == FRAMES - 1
    table = job.metricsTableNode.GetTable()
    names = [table.GetColumnName(index) for index in range(table.GetNumberOfColumns())]
    assert names == ["pair", "mse_identity", "mse", "nlcc_identity", "nlcc", "folded_percent"]
    assert table.GetNumberOfRows() == FRAMES - 1
    for index, row in enumerate(rows):
        assert table.GetValue(index, 0).ToInt() == int(row["pair"])
        for column, name in enumerate(names[1:], start=1):
            assert table.GetValue(index, column).ToDouble() == pytest.approx(float(row[name]), rel=1e-9)
    assert set(job.chartNodes) == {"mse", "nlcc"}
    for metric, chart in job.chartNodes.items():
        series = [chart.GetNthPlotSeriesNode(index) for index in range(chart.GetNumberOfPlotSeriesNodes())]
        assert sorted(s.GetYColumnName() for s in series) == sorted([metric, f"{metric}_identity"])
        assert all(s.GetTableNode() is job.metricsTableNode and s.GetXColumnName() == "pair" for s in series)


def test_cancel_leaves_the_scene_unchanged_and_ends_the_worker(echo, tmp_path):
    scene, sequencesLogic = newScene()
    logic = RegistrationLogic(scene, temporaryDirectoryRoot=str(tmp_path))
    logic.sequencesLogic = sequencesLogic
    sequence, _ = addCineSequence(scene, *echo)
    before = scene_helpers.sceneSnapshot(scene)
    job = logic.trackSequence(sequence, scales="1/2,1", steps=100000, device="cpu", waitForCompletion=False)
    deadline = time.monotonic() + 120
    while job.lastProgressEvent is None and not job.isDone and time.monotonic() < deadline:
        job.poll(timeoutSeconds=0.1)
    assert job.lastProgressEvent is not None, job.errorMessage + "\n" + "\n".join(job.log)
    logic.cancel()
    assert waitUntilGone(job.worker.pid, timeoutSeconds=2.0) and not processExists(job.worker.pid)
    assert job.state is JobState.CANCELLED and logic.activeJob is None
    assert not job.temporaryDirectory.exists()
    scene_helpers.assertSceneUnchanged(before, scene_helpers.sceneSnapshot(scene), "A cancelled tracking")
    assert job.transformSequenceNode is None and job.metricsTableNode is None


def test_single_frame_sequence_gives_a_clear_error(echo, tmp_path):
    scene, _ = newScene()
    logic = RegistrationLogic(scene, temporaryDirectoryRoot=str(tmp_path))
    frames, spacingMm = echo
    sequence, _ = addCineSequence(scene, frames[:1], spacingMm)
    before = scene_helpers.sceneSnapshot(scene)
    problems = cineInputProblems(sequence)
    assert problems and "at least two frames" in problems[0]
    with pytest.raises(ValueError, match="has 1 frame.*at least two frames"):
        logic.trackSequence(sequence, scales="1/2,1", steps=20, device="cpu")
    assert logic.activeJob is None and not any(tmp_path.iterdir())
    scene_helpers.assertSceneUnchanged(before, scene_helpers.sceneSnapshot(scene), "A refused tracking")
    assert "Select a cine" in cineInputProblems(None)[0]


def test_volume_whose_third_axis_is_time_is_tracked_into_a_new_browser(echo, tmp_path):
    scene, sequencesLogic = newScene()
    logic = RegistrationLogic(scene, temporaryDirectoryRoot=str(tmp_path))
    logic.sequencesLogic = sequencesLogic
    frames, spacingMm = echo
    single = scene_helpers.addVolumeFromArray(scene, frames[0], "one frame", (spacingMm, spacingMm, 1.0))
    assert any("single frame" in problem for problem in cineInputProblems(single))
    stack = scene_helpers.addVolumeFromArray(scene, np.stack(frames), "stack", (spacingMm, spacingMm, 2.0), ORIGIN,
                                         scene_helpers.OBLIQUE_DIRECTIONS)
    assert cineInputProblems(stack) == []
    transforms = logic.trackSequence(stack, scales="1/2,1", steps=5, device="cpu")
    assert transforms.GetNumberOfDataNodes() == FRAMES
    browsers = [scene.GetNthNodeByClass(index, "vtkMRMLSequenceBrowserNode")
                for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSequenceBrowserNode"))]
    assert len(browsers) == 1 and browsers[0].GetMasterSequenceNode() is transforms
    for frame in range(FRAMES):  # frame t's field lies on slice t of the volume
        grid = transforms.GetNthDataNode(frame).GetTransformFromParent().GetDisplacementGrid()
        expectedOrigin = ORIGIN + frame * 2.0 * scene_helpers.OBLIQUE_DIRECTIONS[:, 2]
        np.testing.assert_allclose(grid.GetOrigin(), expectedOrigin, atol=1e-4)
        assert grid.GetDimensions() == (frames[0].shape[1], frames[0].shape[0], 1)
    del sequencesLogic
