"""The Slicer logic's facade: ``RegistrationLogic`` registers, segments with atlases and tracks cines on any
``vtkMRMLScene`` (inside Slicer and on the ``slicer-core`` wheel in pytest), one background job at a time.

Coordinate systems: MRML nodes hold geometry in RAS millimetres; files exchanged with the worker are ITK images in
LPS millimetres, converted by Slicer's storage nodes. Single-slice volumes (2D images such as ultrasound frames) are
sent to the worker as 2D images in the fixed slice's own plane frame (``geometry.SlicePlane``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..common.protocol import ProgressCallback
from .cine import CineTrackingJob, cineFrames, writeCine
from .geometry import SlicePlane, isSingleSlice
from .jobs import Job, JobState, RegistrationCancelledError, RegistrationError
from .parameters import (DEFAULT_PRECISION, DEFAULT_SCALES, DEFAULT_SMOOTHNESS_WEIGHT, DEFAULT_STEPS_PER_SCALE,
                         DEFAULT_TRACKING_SCALES, alignmentProblems, atlasInputProblems, atlasVolumeNode,
                         cineInputProblems,
                         inputProblems, modelFileProblems, nccWindowProblems, precisionProblems, stepProblems,
                         workingSpacingProblems)
from .registration_jobs import AtlasSegmentationJob, RegistrationJob
from .storage import writeAtlasLabels, writeInitialTransform, writeVolume
from .worker_command import defaultWorkerPrefix, workerCommand, workerEnvironment


class RegistrationLogic:
    """Register two volume nodes of ``scene`` with the SSMSR worker; usable from the Python console.

    ``pythonExecutable`` runs the worker (Slicer: PythonSlicer; default: ``sys.executable``).
    ``temporaryDirectoryRoot`` is where each job's private folder is created (default: the system's).
    ``workerCommandPrefix`` can be replaced to run another worker with the same command line.
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

    def registerVolumes(self, fixedVolumeNode, movingVolumeNode, outputTransformNode=None, fixedMaskNode=None,
                        segmentationNode=None, outputVolumeNode=None, jacobianVolumeNode=None,
                        initialTransformNode=None, alignFirst: str = "auto", scales: str = DEFAULT_SCALES,
                        stepsPerScale: int = DEFAULT_STEPS_PER_SCALE, precision: str = DEFAULT_PRECISION,
                        smoothnessWeight: float = DEFAULT_SMOOTHNESS_WEIGHT,
                        nccWindow: int | None = None, device: str = "auto", waitForCompletion: bool = True,
                        progressCallback: ProgressCallback | None = None, keepTemporaryFiles: bool = False,
                        seed: int | None = None, modelFile: str | None = None, workingSpacing: float | None = None):
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
        :param workingSpacing: voxel side (mm) of the isotropic grid the worker registers on; None chooses it from
            the fixed volume's finest spacing, the voxel budget and the free memory (see the log's plan line).
        """
        job = self.startRegistration(fixedVolumeNode, movingVolumeNode, outputTransformNode=outputTransformNode,
                                     fixedMaskNode=fixedMaskNode, segmentationNode=segmentationNode,
                                     outputVolumeNode=outputVolumeNode, jacobianVolumeNode=jacobianVolumeNode,
                                     initialTransformNode=initialTransformNode, alignFirst=alignFirst, scales=scales, stepsPerScale=stepsPerScale,
                                     precision=precision, smoothnessWeight=smoothnessWeight, nccWindow=nccWindow,
                                     device=device, progressCallback=progressCallback,
                                     keepTemporaryFiles=keepTemporaryFiles, seed=seed, modelFile=modelFile,
                                     workingSpacing=workingSpacing)
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
                                 precision=precision, batchSize=batchSize, smoothnessWeight=smoothnessWeight,
                                 nccWindow=nccWindow, device=device, progressCallback=progressCallback,
                                 keepTemporaryFiles=keepTemporaryFiles, seed=seed)
        return self._finish(job, waitForCompletion, lambda: job.transformSequenceNode)

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
                                          smoothnessWeight=smoothnessWeight, nccWindow=nccWindow, device=device,
                                          modelFile=modelFile, progressCallback=progressCallback,
                                          keepTemporaryFiles=keepTemporaryFiles, seed=seed)
        return self._finish(job, waitForCompletion, lambda: job.outputSegmentationNode)

    def cancel(self) -> None:
        """Cancel the running job, if any."""
        if self.activeJob is not None:
            self.activeJob.cancel()

    # Starting jobs -----------------------------------------------------------------------------------------

    def startRegistration(self, fixedVolumeNode, movingVolumeNode, outputTransformNode=None, fixedMaskNode=None,
                          segmentationNode=None, outputVolumeNode=None, jacobianVolumeNode=None,
                          initialTransformNode=None, alignFirst: str = "auto", scales: str = DEFAULT_SCALES,
                          stepsPerScale: int = DEFAULT_STEPS_PER_SCALE, precision: str = DEFAULT_PRECISION,
                          smoothnessWeight: float = DEFAULT_SMOOTHNESS_WEIGHT, nccWindow: int | None = None,
                          device: str = "auto", progressCallback: ProgressCallback | None = None,
                          keepTemporaryFiles: bool = False, seed: int | None = None,
                          modelFile: str | None = None, workingSpacing: float | None = None) -> RegistrationJob:
        """Write the inputs, start the worker and return the running job (see :meth:`registerVolumes`)."""
        self._checkIdle()
        self._refuse(inputProblems(fixedVolumeNode, movingVolumeNode, fixedMaskNode, segmentationNode, outputVolumeNode,
                                   outputTransformNode, scales, device, jacobianVolumeNode) + modelFileProblems(modelFile)
                     + alignmentProblems(alignFirst, initialTransformNode, outputTransformNode)
                     + stepProblems(stepsPerScale, modelFile) + precisionProblems(precision)
                     + nccWindowProblems(nccWindow) + workingSpacingProblems(workingSpacing))
        parameters = {"scales": scales, "stepsPerScale": int(stepsPerScale), "precision": precision,
                      "smoothnessWeight": float(smoothnessWeight), "nccWindow": nccWindow, "device": device,
                      "seed": seed, "modelFile": modelFile or None, "alignFirst": alignFirst,
                      "workingSpacing": workingSpacing,
                      "initialTransform": initialTransformNode.GetName() if initialTransformNode is not None else None}

        def prepare(folder: Path) -> dict:
            slicePlane = SlicePlane(fixedVolumeNode) if isSingleSlice(fixedVolumeNode) else None
            fixedPath = writeVolume(fixedVolumeNode, folder / "fixed.nrrd", slicePlane, "fixed volume")
            movingPath = writeVolume(movingVolumeNode, folder / "moving.nrrd", slicePlane, "moving volume")
            options = self._maskOption("--fixed-mask", fixedMaskNode, folder, slicePlane)
            options += ["--initial", writeInitialTransform(initialTransformNode, folder / "initial.tfm", slicePlane)
                        if initialTransformNode is not None else alignFirst]
            if outputVolumeNode is not None:
                options += ["--warped", str(folder / "warped.nrrd")]
            if jacobianVolumeNode is not None:
                options += ["--jacobian", str(folder / "jacobian.nrrd")]
            if workingSpacing is not None:
                options += ["--spacing", repr(float(workingSpacing))]
            command = self._command("register", [fixedPath, movingPath], folder / "field.nrrd", parameters, options)
            return dict(command=command, slicePlane=slicePlane)

        return self._start(RegistrationJob, prepare, parameters, progressCallback, keepTemporaryFiles,
                           fixedVolumeNode=fixedVolumeNode, movingVolumeNode=movingVolumeNode,
                           segmentationNode=segmentationNode, outputTransformNode=outputTransformNode,
                           outputVolumeNode=outputVolumeNode, jacobianVolumeNode=jacobianVolumeNode)

    def startAtlasSegmentation(self, targetVolumeNode, atlases, topK: int = 1, fixedMaskNode=None,
                               scales: str = DEFAULT_SCALES, stepsPerScale: int = DEFAULT_STEPS_PER_SCALE,
                               precision: str = DEFAULT_PRECISION,
                               smoothnessWeight: float = DEFAULT_SMOOTHNESS_WEIGHT, nccWindow: int | None = None,
                               device: str = "auto", modelFile: str | None = None,
                               progressCallback: ProgressCallback | None = None, keepTemporaryFiles: bool = False,
                               seed: int | None = None) -> AtlasSegmentationJob:
        """Write the target and atlases, start the worker and return the running job (see :meth:`segmentWithAtlases`)."""
        self._checkIdle()
        pairs = [tuple(item) if isinstance(item, (tuple, list)) else (atlasVolumeNode(item), item) for item in atlases or []]
        self._refuse(atlasInputProblems(targetVolumeNode, pairs, topK, fixedMaskNode, scales, device, modelFile)
                     + stepProblems(stepsPerScale, modelFile) + precisionProblems(precision)
                     + nccWindowProblems(nccWindow))
        parameters = {"topK": int(topK), "scales": scales, "stepsPerScale": int(stepsPerScale), "precision": precision,
                      "smoothnessWeight": float(smoothnessWeight), "nccWindow": nccWindow, "device": device,
                      "seed": seed, "modelFile": modelFile or None}
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
            options = ["--top-k", str(int(topK))]
            for number, (volumeNode, segmentationNode) in enumerate(pairs):
                imagePath = writeVolume(volumeNode, folder / f"atlas{number}.nrrd", slicePlane,
                                        f"atlas volume '{volumeNode.GetName()}'")
                labelsPath = writeAtlasLabels(self.scene, segmentationNode, volumeNode, segmentNames,
                                              folder / f"atlas{number}-labels.nrrd", slicePlane)
                options += ["--atlas", imagePath, labelsPath]
                atlasFiles[os.path.normcase(os.path.abspath(imagePath))] = segmentationNode
            options += self._maskOption("--fixed-mask", fixedMaskNode, folder, slicePlane)
            return dict(command=self._command("segment", [targetPath], folder / "labels.nrrd", parameters, options))

        return self._start(AtlasSegmentationJob, prepare, parameters, progressCallback, keepTemporaryFiles,
                           targetVolumeNode=targetVolumeNode, atlases=pairs, segmentNames=segmentNames,
                           segmentColors=segmentColors, atlasFiles=atlasFiles)

    def startTracking(self, cineNode, maskNode=None, scales: str | None = None,
                      stepsPerScale: int = DEFAULT_STEPS_PER_SCALE, precision: str = DEFAULT_PRECISION,
                      batchSize: int = 1, smoothnessWeight: float = DEFAULT_SMOOTHNESS_WEIGHT,
                      nccWindow: int | None = None, device: str = "auto",
                      progressCallback: ProgressCallback | None = None, keepTemporaryFiles: bool = False,
                      seed: int | None = None) -> CineTrackingJob:
        """Write the cine, start the ``track`` worker and return the running job (see :meth:`trackSequence`)."""
        self._checkIdle()
        scales = scales or DEFAULT_TRACKING_SCALES
        self._refuse(cineInputProblems(cineNode, maskNode, scales, device, stepsPerScale, batchSize)
                     + precisionProblems(precision) + nccWindowProblems(nccWindow))
        arrays, geometries, indexValues = cineFrames(cineNode)
        parameters = {"scales": scales, "stepsPerScale": int(stepsPerScale), "precision": precision,
                      "batchSize": int(batchSize), "smoothnessWeight": float(smoothnessWeight),
                      "nccWindow": nccWindow, "device": device, "seed": seed}
        slicePlane = SlicePlane(geometries[0])

        def prepare(folder: Path) -> dict:
            cinePath = writeCine(arrays, slicePlane, geometries[0], folder / "cine.nrrd")
            options = ["--no-figures", "--batch", str(int(batchSize))]
            options += self._maskOption("--mask", maskNode, folder, slicePlane)
            return dict(command=self._command("track", [cinePath], folder / "tracking", parameters, options))

        return self._start(CineTrackingJob, prepare, parameters, progressCallback, keepTemporaryFiles,
                           cineNode=cineNode, geometries=geometries, indexValues=indexValues, slicePlane=slicePlane,
                           sequencesLogic=self.sequencesLogic)

    # Helpers -----------------------------------------------------------------------------------------------

    def _checkIdle(self) -> None:
        if self.activeJob is not None:
            raise RegistrationError("A registration is already running; cancel it or wait for it to finish.")

    @staticmethod
    def _refuse(problems: list[str]) -> None:
        if problems:
            raise ValueError(" ".join(problems))

    def _command(self, subcommand: str, arguments: list[str], output: Path, parameters: dict,
                 options: list[str]) -> list[str]:
        return workerCommand(self.workerCommandPrefix, subcommand, arguments, str(output),
                             scales=parameters["scales"], stepsPerScale=parameters["stepsPerScale"],
                             precision=parameters["precision"], smoothnessWeight=parameters["smoothnessWeight"],
                             device=parameters["device"], nccWindow=parameters["nccWindow"], seed=parameters["seed"],
                             modelFile=parameters.get("modelFile"), options=options)

    @staticmethod
    def _maskOption(option: str, maskNode, folder: Path, slicePlane: SlicePlane | None) -> list[str]:
        if maskNode is None:
            return []
        return [option, writeVolume(maskNode, folder / "mask.nrrd", slicePlane, "mask")]

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
