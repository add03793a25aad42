"""The Slicer logic's facade: ``RegistrationLogic`` registers, segments with atlases and tracks cines on any
``vtkMRMLScene`` (inside Slicer and on the ``slicer-core`` wheel in pytest), one background job at a time.

Coordinate systems: MRML nodes hold geometry in RAS millimetres; files exchanged with the worker are ITK images in
LPS millimetres, converted by Slicer's storage nodes. Single-slice volumes (2D images such as ultrasound frames) are
sent to the worker as 2D images in the fixed slice's own plane frame (``geometry.SlicePlane``); the frames of a
3D+t cine as one 4D image (x, y, z, time) in LPS.

Run options: each method takes a ``configuration`` (``common.run_config.RunConfiguration``: a preset plus
overrides), another ``preset``, and run options as keywords named as in the Python API (``scales``, ``steps``,
``precision``, ``smoothness_weight``, ``ncc_window``, ``spacing``, ``device``, ``seed``, ``batch_size``, ...; see
``common.run_config.RUN_OPTIONS``), combined by ``run_config.combined``; what is not given is the preset's value for
the kind of run. The worker receives the configuration itself, in its job file (``worker_command.writeJob``).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..common.errors import InputError
from ..common.protocol import ProgressCallback
from ..common.run_config import ResolvedRun, RunConfiguration, combined, takes_run_options
from .cine import CineTrackingJob, cineFrames, isVolumeSequence, referenceProblems, trackingInputProblems, writeCine
from .geometry import SlicePlane, isSingleSlice
from .jobs import Job, JobState, RegistrationCancelledError, RegistrationError
from .parameters import (alignmentProblems, atlasInputProblems, atlasVolumeNode, inputProblems, modelFileProblems,
                         stepProblems)
from .propagation import propagateSegmentation
from .registration_jobs import AtlasSegmentationJob, RegistrationJob
from .storage import writeAtlasLabels, writeInitialTransform, writeVolume
from .worker_command import defaultWorkerPrefix, jobDocument, workerEnvironment, writeJob

#: The logic's former keyword names of run options (camelCase, before the run configuration), still accepted so that
#: existing scripts keep working; each gives a DeprecationWarning and stands for the option named here.
DEPRECATED_OPTION_NAMES = {"stepsPerScale": "steps", "smoothnessWeight": "smoothness_weight",
                           "nccWindow": "ncc_window", "workingSpacing": "spacing", "batchSize": "batch_size"}


def runOptions(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with the deprecated names (``DEPRECATED_OPTION_NAMES``) replaced by the options' names; a former
    ``nccWindow=0`` meant the default window, as None does now. TypeError when a value is given under both names."""
    renamed = dict(options)
    for old, new in DEPRECATED_OPTION_NAMES.items():
        if old not in renamed:
            continue
        warnings.warn(f"the keyword {old}= is deprecated; use {new}=", DeprecationWarning, stacklevel=_callerLevel())
        value = renamed.pop(old)
        if new in renamed:
            raise TypeError(f"{old}= and {new}= name the same run option; give {new}= only")
        renamed[new] = None if old == "nccWindow" and value == 0 else value
    return renamed


def _callerLevel() -> int:
    """The ``stacklevel`` of a warning that names the first caller outside this file."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename == __file__:
        frame, level = frame.f_back, level + 1
    return level


def resolvedConfiguration(kind: str, configuration: RunConfiguration | None, preset: str | None,
                          options: dict[str, Any]) -> tuple[RunConfiguration | None, ResolvedRun | None, list[str]]:
    """(configuration, what it resolves to for ``kind`` runs, []) or (None, None, [what is wrong]).

    The logic is the console's API: a problem names the option by its keyword (``steps must be at least 0, got
    -1.``), not by the panel's label (the panel checks its own values first, worded with its labels:
    ``gui.panel.problems``)."""
    try:
        config = combined(configuration, preset, **runOptions(options))
        return config, config.resolve(kind), []
    except InputError as error:
        return None, None, [error.worded(lambda name: name)]


class RegistrationLogic:
    """Register two volume nodes of ``scene`` with the SSMSR worker; usable from the Python console.

    ``pythonExecutable`` runs the worker (Slicer: PythonSlicer; default: ``sys.executable``).
    ``temporaryDirectoryRoot`` is where each job's private folder is created (default: the system's).
    ``workerCommandPrefix`` can be replaced to run another worker with the same job file (``[..., "job", JOB]``).
    """

    def __init__(self, scene, pythonExecutable: str | None = None, temporaryDirectoryRoot: str | None = None):
        self.scene = scene
        self.temporaryDirectoryRoot = temporaryDirectoryRoot
        self.workerCommandPrefix = defaultWorkerPrefix(pythonExecutable)
        self.activeJob: Job | None = None
        #: The ranking of the last successful atlas segmentation, best first (see ``AtlasSegmentationJob``).
        self.lastAtlasRanking: list[dict] = []
        #: Optional ``vtkSlicerSequencesLogic`` of the scene: cine tracking asks it to create the proxy node of the
        #: new transform sequence at once (in Slicer: ``slicer.modules.sequences.logic()``).
        self.sequencesLogic = None

    @staticmethod
    def workerEnvironment() -> dict[str, str]:
        """Environment of the worker (see ``worker_command.workerEnvironment``)."""
        return workerEnvironment()

    @takes_run_options("pair")
    def registerVolumes(self, fixedVolumeNode, movingVolumeNode, outputTransformNode=None, fixedMaskNode=None,
                        segmentationNode=None, outputVolumeNode=None, jacobianVolumeNode=None,
                        initialTransformNode=None, alignFirst: str = "auto", modelFile: str | None = None,
                        configuration: RunConfiguration | None = None, preset: str | None = None,
                        waitForCompletion: bool = True, progressCallback: ProgressCallback | None = None,
                        keepTemporaryFiles: bool = False, **options):
        """Deformably register ``movingVolumeNode`` onto ``fixedVolumeNode``.

        The result is a transform node holding a "from parent" displacement grid on the fixed volume's geometry
        (RAS millimetres): put the moving volume under it to overlay it on the fixed volume.

        :param outputTransformNode: receives the result; None creates a new transform node on success.
        :param fixedMaskNode: optional volume on the fixed grid; the similarity is computed where it is non-zero.
        :param segmentationNode: optional segmentation of the moving volume; a copy hardened through the result is
            created on the fixed volume (the original is left untouched).
        :param outputVolumeNode: optional scalar volume that receives the moving volume warped onto the fixed grid.
        :param jacobianVolumeNode: optional scalar volume that receives the Jacobian determinant of the result on the
            fixed grid, shown with a colour table in which values <= 0 (folding) are red.
        :param initialTransformNode: optional linear transform that overlays the moving volume on the fixed one
            (e.g. from General Registration); used as the pre-alignment instead of ``alignFirst``.
        :param alignFirst: "auto" (affine for 3D volumes, none for single slices), "none", "rigid" or "affine": the
            pre-alignment the worker computes. The result includes it: the output transform alone overlays the moving
            volume on the fixed one.
        :param modelFile: a model written by ``ssmsr train``: test-time training starts from its weights (its schedule
            must be the run's; its scales, smoothness weight and window are the defaults then, as for ``ssmsr
            register --model``); None or "" trains from scratch. With a model, ``steps=0`` is inference only.
        :param configuration: the run configuration (``common.run_config.RunConfiguration``: a preset and
            overrides; None: the default preset); ``preset`` replaces its preset, the run options given as keywords
            (below) add to its overrides.
        :param waitForCompletion: True blocks and returns the transform node (raises RegistrationError on failure,
            RegistrationCancelledError if cancelled); False returns the running :class:`RegistrationJob` at once,
            to be driven by ``job.poll()``.
        :param progressCallback: called with each worker event dict ("started", "progress", "finished", "error",
            and "log" carrying a stderr line in "message").
        :param keepTemporaryFiles: keep the job's temporary folder (its path is in the job's log), for debugging.

        Invalid inputs or run options raise ``common.errors.InputError`` (a ValueError) saying every problem (a run
        option named by its keyword) before anything starts. The former camelCase keywords (``stepsPerScale``,
        ``smoothnessWeight``, ``nccWindow``, ``workingSpacing``) are still accepted, deprecated
        (``DEPRECATED_OPTION_NAMES``), so that existing scripts keep working.
        """
        job = self.startRegistration(fixedVolumeNode, movingVolumeNode, outputTransformNode=outputTransformNode,
                                     fixedMaskNode=fixedMaskNode, segmentationNode=segmentationNode,
                                     outputVolumeNode=outputVolumeNode, jacobianVolumeNode=jacobianVolumeNode,
                                     initialTransformNode=initialTransformNode, alignFirst=alignFirst,
                                     modelFile=modelFile, configuration=configuration, preset=preset,
                                     progressCallback=progressCallback, keepTemporaryFiles=keepTemporaryFiles,
                                     **options)
        return self._finish(job, waitForCompletion, lambda: job.outputTransformNode)

    @takes_run_options("cine")
    def trackSequence(self, cineNode, maskNode=None, configuration: RunConfiguration | None = None,
                      preset: str | None = None, waitForCompletion: bool = True,
                      progressCallback: ProgressCallback | None = None, keepTemporaryFiles: bool = False,
                      reference: int | None = None, **options):
        """Track the motion through a 2D+t or 3D+t cine (``ssmsr track`` in the background); see ``mrml.cine``.

        :param cineNode: a sequence node of single-slice volumes (e.g. an ultrasound cine from DICOM), a sequence node
            of 3D scalar volumes on one grid (4D CT or MR phases), or a scalar volume whose third axis is time. Colour
            frames are reduced to their first channel.
        :param maskNode: optional volume on the frames' grid (non-zero inside; a single slice for 2D frames); None:
            the paper's automatic mask.
        :param reference: None: consecutive pairs (frame t-1 onto frame t); a frame number R (from 0): frame R onto
            every other frame, so that frame t's transform maps frame t onto frame R (see
            :meth:`propagateSegmentation`).

        The run options are those of a cine (the preset's cine values: e.g. its schedule ``1/8,1/4,1/2,1``, steps for
        the whole sequence, ``batch_size`` frame pairs per step, 0: all); other parameters as for
        :meth:`registerVolumes` (deprecated: ``batchSize``). Blocking: returns the new sequence of transform nodes
        (one per frame, in the cine's sequence browser); non-blocking: the running ``CineTrackingJob``, whose
        ``transformSequenceNode``, ``browserNode``, ``metricsTableNode`` and ``chartNodes`` hold the results.
        """
        job = self.startTracking(cineNode, maskNode=maskNode, configuration=configuration, preset=preset,
                                 progressCallback=progressCallback, keepTemporaryFiles=keepTemporaryFiles,
                                 reference=reference, **options)
        return self._finish(job, waitForCompletion, lambda: job.transformSequenceNode)

    def propagateSegmentation(self, segmentationNode, transformSequenceNode):
        """Propagate a segmentation drawn on the reference frame R of a tracking made with ``reference=R`` to every
        frame: returns a new sequence of segmentation nodes (one per frame, the cine's index values) synchronised
        in the tracking's browser, so that scrubbing shows each frame's segmentation. ``segmentationNode`` is left
        as it is. Raises RegistrationError (the scene unchanged) for a consecutive tracking or other unfit inputs;
        see ``mrml.propagation.propagateSegmentation``."""
        return propagateSegmentation(self.scene, segmentationNode, transformSequenceNode, self.sequencesLogic)

    @takes_run_options("pair")
    def segmentWithAtlases(self, targetVolumeNode, atlases, topK: int = 1, fixedMaskNode=None,
                           modelFile: str | None = None, configuration: RunConfiguration | None = None,
                           preset: str | None = None, waitForCompletion: bool = True,
                           progressCallback: ProgressCallback | None = None, keepTemporaryFiles: bool = False,
                           **options):
        """Segment ``targetVolumeNode`` with the most similar atlas(es) (``ssmsr segment`` in the background).

        The atlases are ranked by NLCC with the target (each brought onto the target grid by world coordinates); the
        best ``topK`` are registered onto the target and their segmentations warped and fused by majority vote
        (ties go to the best-ranked atlas). Segments are matched across atlases by name.

        :param atlases: atlas segmentation nodes (each drawn on its source volume, see :func:`atlasVolumeNode`), or
            (volume node, segmentation node) pairs.
        :param fixedMaskNode: optional mask on the target restricting the ranking and the registrations' similarity.
        :param modelFile: optional model written by ``ssmsr train`` to start each registration from.

        Other parameters and the run options as for :meth:`registerVolumes`. Blocking: returns the new segmentation
        node (the ranking is in ``lastAtlasRanking``); non-blocking: returns the running
        :class:`AtlasSegmentationJob`.
        """
        job = self.startAtlasSegmentation(targetVolumeNode, atlases, topK=topK, fixedMaskNode=fixedMaskNode,
                                          modelFile=modelFile, configuration=configuration, preset=preset,
                                          progressCallback=progressCallback, keepTemporaryFiles=keepTemporaryFiles,
                                          **options)
        return self._finish(job, waitForCompletion, lambda: job.outputSegmentationNode)

    def cancel(self) -> None:
        """Cancel the running job, if any."""
        if self.activeJob is not None:
            self.activeJob.cancel()

    # Starting jobs -----------------------------------------------------------------------------------------

    @takes_run_options("pair")
    def startRegistration(self, fixedVolumeNode, movingVolumeNode, outputTransformNode=None, fixedMaskNode=None,
                          segmentationNode=None, outputVolumeNode=None, jacobianVolumeNode=None,
                          initialTransformNode=None, alignFirst: str = "auto", modelFile: str | None = None,
                          configuration: RunConfiguration | None = None, preset: str | None = None,
                          progressCallback: ProgressCallback | None = None, keepTemporaryFiles: bool = False,
                          **options) -> RegistrationJob:
        """Write the inputs and the job file, start the worker and return the running job (see
        :meth:`registerVolumes`)."""
        self._checkIdle()
        config, run, problems = resolvedConfiguration("pair", configuration, preset, options)
        self._refuse(inputProblems(fixedVolumeNode, movingVolumeNode, fixedMaskNode, segmentationNode,
                                   outputVolumeNode, outputTransformNode, jacobianVolumeNode)
                     + modelFileProblems(modelFile)
                     + alignmentProblems(alignFirst, initialTransformNode, outputTransformNode)
                     + problems + (stepProblems(run.steps, modelFile) if run is not None else []))
        parameters = self._parameters(config, run, modelFile=modelFile or None, alignFirst=alignFirst,
                                      initialTransform=initialTransformNode.GetName()
                                      if initialTransformNode is not None else None)

        def prepare(folder: Path) -> dict:
            slicePlane = SlicePlane(fixedVolumeNode) if isSingleSlice(fixedVolumeNode) else None
            arguments = {
                "fixed": writeVolume(fixedVolumeNode, folder / "fixed.nrrd", slicePlane, "fixed volume"),
                "moving": writeVolume(movingVolumeNode, folder / "moving.nrrd", slicePlane, "moving volume"),
                "output": str(folder / "field.nrrd"),
                "fixed_mask": self._mask(fixedMaskNode, folder, slicePlane),
                "initial": writeInitialTransform(initialTransformNode, folder / "initial.tfm", slicePlane)
                if initialTransformNode is not None else alignFirst,
                "warped": str(folder / "warped.nrrd") if outputVolumeNode is not None else None,
                "jacobian": str(folder / "jacobian.nrrd") if jacobianVolumeNode is not None else None,
                "model": self._model(modelFile)}
            return dict(self._job(folder, "register", arguments, config), slicePlane=slicePlane)

        return self._start(RegistrationJob, prepare, parameters, progressCallback, keepTemporaryFiles,
                           fixedVolumeNode=fixedVolumeNode, movingVolumeNode=movingVolumeNode,
                           segmentationNode=segmentationNode, outputTransformNode=outputTransformNode,
                           outputVolumeNode=outputVolumeNode, jacobianVolumeNode=jacobianVolumeNode)

    @takes_run_options("pair")
    def startAtlasSegmentation(self, targetVolumeNode, atlases, topK: int = 1, fixedMaskNode=None,
                               modelFile: str | None = None, configuration: RunConfiguration | None = None,
                               preset: str | None = None, progressCallback: ProgressCallback | None = None,
                               keepTemporaryFiles: bool = False, **options) -> AtlasSegmentationJob:
        """Write the target, the atlases and the job file, start the worker and return the running job (see
        :meth:`segmentWithAtlases`)."""
        self._checkIdle()
        pairs = [tuple(item) if isinstance(item, (tuple, list)) else (atlasVolumeNode(item), item) for item in atlases or []]
        config, run, problems = resolvedConfiguration("pair", configuration, preset, options)
        self._refuse(atlasInputProblems(targetVolumeNode, pairs, topK, fixedMaskNode, modelFile)
                     + problems + (stepProblems(run.steps, modelFile) if run is not None else []))
        parameters = self._parameters(config, run, topK=int(topK), modelFile=modelFile or None)
        # One label value per segment name, in order of first appearance; colours from the first atlas that has it.
        segmentNames, segmentColors = [], []
        for _, segmentationNode in pairs:
            segmentation = segmentationNode.GetSegmentation()
            for index in range(segmentation.GetNumberOfSegments()):
                segment = segmentation.GetNthSegment(index)
                if segment.GetName() not in segmentNames:
                    segmentNames.append(segment.GetName())
                    segmentColors.append(tuple(segment.GetColor()))
        atlasFiles = {}

        def prepare(folder: Path) -> dict:
            slicePlane = SlicePlane(targetVolumeNode) if isSingleSlice(targetVolumeNode) else None
            targetPath = writeVolume(targetVolumeNode, folder / "target.nrrd", slicePlane, "volume to segment")
            atlasPaths = []
            for number, (volumeNode, segmentationNode) in enumerate(pairs):
                imagePath = writeVolume(volumeNode, folder / f"atlas{number}.nrrd", slicePlane,
                                        f"atlas volume '{volumeNode.GetName()}'")
                labelsPath = writeAtlasLabels(self.scene, segmentationNode, volumeNode, segmentNames,
                                              folder / f"atlas{number}-labels.nrrd", slicePlane)
                atlasPaths.append([imagePath, labelsPath])
                atlasFiles[os.path.normcase(os.path.abspath(imagePath))] = segmentationNode
            arguments = {"target": targetPath, "atlas": atlasPaths, "output": str(folder / "labels.nrrd"),
                         "top_k": int(topK), "fixed_mask": self._mask(fixedMaskNode, folder, slicePlane),
                         "model": self._model(modelFile)}
            return self._job(folder, "segment", arguments, config)

        return self._start(AtlasSegmentationJob, prepare, parameters, progressCallback, keepTemporaryFiles,
                           targetVolumeNode=targetVolumeNode, atlases=pairs, segmentNames=segmentNames,
                           segmentColors=segmentColors, atlasFiles=atlasFiles)

    @takes_run_options("cine")
    def startTracking(self, cineNode, maskNode=None, configuration: RunConfiguration | None = None,
                      preset: str | None = None, progressCallback: ProgressCallback | None = None,
                      keepTemporaryFiles: bool = False, reference: int | None = None,
                      **options) -> CineTrackingJob:
        """Write the cine and the job file, start the ``track`` worker and return the running job (see
        :meth:`trackSequence`)."""
        self._checkIdle()
        kind = "volume_cine" if isVolumeSequence(cineNode) else "cine"
        config, run, problems = resolvedConfiguration(kind, configuration, preset, options)
        self._refuse(trackingInputProblems(cineNode, maskNode) + problems
                     + (stepProblems(run.steps, cine=True) if run is not None else []))
        arrays, geometries, indexValues = cineFrames(cineNode)
        self._refuse(referenceProblems(reference, len(arrays)))
        parameters = self._parameters(config, run, reference=reference)
        slicePlane = SlicePlane(geometries[0]) if arrays[0].ndim == 2 else None  # None: 3D frames

        def prepare(folder: Path) -> dict:
            arguments = {"cine": writeCine(arrays, slicePlane, geometries[0], folder / "cine.nrrd"),
                         "output": str(folder / "tracking"), "no_figures": True, "reference": reference,
                         "mask": self._mask(maskNode, folder, slicePlane)}
            return self._job(folder, "track", arguments, config)

        return self._start(CineTrackingJob, prepare, parameters, progressCallback, keepTemporaryFiles,
                           cineNode=cineNode, geometries=geometries, indexValues=indexValues, slicePlane=slicePlane,
                           reference=reference, sequencesLogic=self.sequencesLogic)

    # Helpers -----------------------------------------------------------------------------------------------

    def _checkIdle(self) -> None:
        if self.activeJob is not None:
            raise RegistrationError("A registration is already running; cancel it or wait for it to finish.")

    @staticmethod
    def _refuse(problems: list[str]) -> None:
        if problems:
            raise InputError(" ".join(problems))

    @staticmethod
    def _parameters(config: RunConfiguration, run: ResolvedRun, **inputs) -> dict:
        """The job's ``parameters``: its run configuration (as in the job file), what it resolves to, and the
        settings that are not run options (``inputs``)."""
        return {"configuration": config.to_json(), "resolved": run.as_dict(), **inputs}

    def _job(self, folder: Path, command: str, arguments: dict, config: RunConfiguration) -> dict:
        """Write the job file of ``command`` into ``folder``; the job's ``command`` and ``workerJob``."""
        return dict(command=writeJob(folder / "job.json", command, arguments, config, self.workerCommandPrefix),
                    workerJob=jobDocument(command, arguments, config))

    @staticmethod
    def _mask(maskNode, folder: Path, slicePlane: SlicePlane | None) -> str | None:
        return None if maskNode is None else writeVolume(maskNode, folder / "mask.nrrd", slicePlane, "mask")

    @staticmethod
    def _model(modelFile: str | None) -> str | None:
        return str(Path(modelFile).resolve()) if modelFile else None

    def _start(self, jobClass, prepare: Callable[[Path], dict], parameters: dict,
               progressCallback: ProgressCallback | None, keepTemporaryFiles: bool, **jobInputs) -> Job:
        """Create the job's private folder, ``prepare(folder)`` its inputs and command, start the worker."""
        temporaryDirectory = Path(tempfile.mkdtemp(prefix="SSMSR-", dir=self.temporaryDirectoryRoot))
        try:
            prepared = prepare(temporaryDirectory)
        except BaseException:
            shutil.rmtree(temporaryDirectory, ignore_errors=True)
            raise
        job = jobClass(self.scene, environment=self.workerEnvironment(), temporaryDirectory=temporaryDirectory,
                       parameters=parameters, progressCallback=progressCallback,
                       keepTemporaryFiles=keepTemporaryFiles, onEnded=self._jobEnded, **prepared, **jobInputs)
        self.activeJob = job
        return job

    def _jobEnded(self, job: Job) -> None:
        if self.activeJob is job:
            self.activeJob = None
        if isinstance(job, AtlasSegmentationJob) and job.state is JobState.SUCCEEDED:
            self.lastAtlasRanking = list(job.ranking)

    def _finish(self, job: Job, waitForCompletion: bool, result: Callable[[], object]):
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
