"""The panel's background runs, without Qt: a job started from the parameter node (``panel.logicCall``), polled
from the module logic's timer, and completed with the parameter node it started from, whether or not the panel is
shown. The tests drive it on real MRML nodes (``slicer-core``) and real worker processes."""

from __future__ import annotations

from ..mrml.jobs import JobState, RegistrationError
from .panel import completionStatus, logicCall, mode


def showInSliceViews(scene, background, foreground, foregroundOpacity: float) -> None:
    """Show ``foreground`` over ``background`` in every slice view of ``scene``: what
    ``slicer.util.setSliceViewerLayers(background=..., foreground=..., foregroundOpacity=...)`` does (v5.6.2,
    Base/Python/slicer/util.py: it sets the volume IDs and the opacity of each vtkMRMLSliceCompositeNode of
    ``slicer.mrmlScene``), on any scene and without the application; fitting the views is left to the caller."""
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        compositeNode = scene.GetNthNodeByClass(index, "vtkMRMLSliceCompositeNode")
        compositeNode.SetBackgroundVolumeID(background.GetID())
        compositeNode.SetForegroundVolumeID(foreground.GetID())
        compositeNode.SetForegroundOpacity(foregroundOpacity)


#: Opacity of the warped moving volume shown over the fixed volume when a pair registration ends.
OVERLAY_OPACITY = 0.5


class PanelRun:
    """A run the panel started, and how it ends: :meth:`complete` selects the job's outputs in the parameter node
    the run started from and shows them in the slice views, or, for a cine tracked with a reference frame,
    propagates the segmentation drawn on that frame to every frame; whether or not the panel is shown (the user may
    have opened another module, which only disconnects the panel's widgets from the parameter node).

    ``propagate``: ``RegistrationLogic.propagateSegmentation`` (segmentation, transform sequence) -> sequence node.
    """

    def __init__(self, parameterNode, mode: str, propagate=None):
        self.parameterNode = parameterNode
        self.mode = mode
        self.propagate = propagate
        #: The status line once the job has ended ("" while it runs).
        self.status = ""
        #: A cine run's segmentation to propagate, as the parameter node held it at the start (None: none).
        self.segmentation = parameterNode.segmentation if mode == "cine" and parameterNode is not None else None
        #: The sequence of propagated segmentations, one per frame, once the run has ended (None: none).
        self.propagatedSequence = None

    def _parameterNodeInScene(self) -> bool:
        """False once the MRML node under the parameter node wrapper has left the scene (scene closed)."""
        node = getattr(self.parameterNode, "parameterNode", None)  # the wrapper's vtkMRMLScriptedModuleNode
        return node is None or node.GetScene() is not None

    def complete(self, job) -> None:
        self.status = completionStatus(job)
        if job.state is not JobState.SUCCEEDED:
            return
        if self.mode == "cine":
            self._propagateSegmentation(job)
        if self.mode != "pair":
            return
        if self.parameterNode is not None and self._parameterNodeInScene():
            self.parameterNode.outputTransform = job.outputTransformNode
        if job.outputVolumeNode is not None:
            showInSliceViews(job.scene, job.fixedVolumeNode, job.outputVolumeNode, OVERLAY_OPACITY)


    def _propagateSegmentation(self, job) -> None:
        """Propagate ``segmentation`` through the job's transforms; a refusal is told in the status line (the
        tracking's results stay)."""
        if self.segmentation is None or self.propagate is None:
            return
        name = self.segmentation.GetName()
        if self.segmentation.GetScene() is None:
            self.status += f" The segmentation '{name}' was removed from the scene during the run; nothing propagated."
            return
        try:
            self.propagatedSequence = self.propagate(self.segmentation, job.transformSequenceNode)
        except RegistrationError as error:
            self.status += f" The segmentation '{name}' was not propagated: {error}"
            return
        self.status += (f" The segmentation '{name}' was propagated to every frame: "
                        f"'{self.propagatedSequence.GetName()}', in the same browser.")


class BackgroundRuns:
    """The module's background job (one at a time) on a ``RegistrationLogic``: started here, driven by
    :meth:`poll` (in Slicer from the module logic's QTimer), and completed by the callbacks given at its start,
    in order, once it ends. Qt-free: the tests drive it on real MRML."""

    def __init__(self, registration):
        self.registration = registration
        self.job = None
        self._completions: list = []

    @property
    def isRunning(self) -> bool:
        return self.registration.activeJob is not None

    def start(self, methodName: str, *args, completions: tuple = (), **kwargs):
        """``registration.<methodName>(*args, waitForCompletion=False, **kwargs)``; ``completions``: callables of
        the job (None entries are skipped), called in order when it ends."""
        job = getattr(self.registration, methodName)(*args, waitForCompletion=False, **kwargs)
        self.job, self._completions = job, [completion for completion in completions if completion is not None]
        return job

    def startFromPanel(self, parameterNode, atlases: list, progressCallback=None,
                       completions: tuple = ()) -> tuple:
        """Start the run the parameter node asks for (``logicCall``); return (job, its :class:`PanelRun`), which
        completes first, before ``completions``."""
        run = PanelRun(parameterNode, mode(parameterNode), self.registration.propagateSegmentation)
        method, args, kwargs = logicCall(parameterNode, atlases)
        job = self.start(method, *args, progressCallback=progressCallback, completions=(run.complete, *completions),
                         **kwargs)
        return job, run

    def poll(self) -> bool:
        """Handle the job's new output; complete it if it has ended. True while a job is still running."""
        job = self.job
        if job is None:
            return False
        job.poll()
        if not job.isDone:
            return True
        self.job, completions, self._completions = None, self._completions, []
        for completion in completions:
            completion(job)
        return False

    def cancel(self) -> None:
        """Cancel the running job (the process tree ends within about two seconds) and complete it."""
        self.registration.cancel()
        self.poll()
