"""The module's Slicer-side logic: its parameter node, PyTorch set-up, and a QTimer that drives background jobs.

A job started from the panel completes here (``panel_runs.BackgroundRuns``), with the parameter node it started from,
whether or not the panel is shown: leaving the module only disconnects the panel's widgets.
"""

import shutil

import qt
import slicer
from slicer.i18n import tr as _
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic

from ..logic import JobState, RegistrationLogic
from .panel_runs import BackgroundRuns
from .parameter_node import SSMSRRegistrationParameterNode
from .pytorch_setup import setupPyTorch

#: Milliseconds between two looks at the worker's output while a job runs.
POLL_INTERVAL_MS = 100


def pythonSlicerExecutable() -> str:
    """Slicer's command-line Python interpreter (PythonSlicer), which runs the worker.

    Found as Slicer's own ``_executePythonModule`` finds it inside the application (v5.6.2, v5.10.0:
    Base/Python/slicer/util.py): the launcher puts PythonSlicer on the PATH, ``shutil.which("PythonSlicer")``
    finds it, and its absence is an error (``sys.executable`` is the Slicer application itself, not a Python that
    runs ``-m``). Outside Slicer (pytest) the Qt-free ``RegistrationLogic`` is given an interpreter explicitly.
    """
    path = shutil.which("PythonSlicer")
    if not path:
        raise RuntimeError(_("PythonSlicer executable not found on the PATH: SSMSR Registration runs its "
                             "computation with Slicer's PythonSlicer. Start Slicer through its launcher, or "
                             "reinstall Slicer."))
    return path


class SSMSRRegistrationLogic(ScriptedLoadableModuleLogic):
    """The registration itself is ``self.registration``, a Qt-free ``SSMSRRegistrationLib.logic.RegistrationLogic``
    on ``slicer.mrmlScene``. From the Python console::

        logic = slicer.util.getModuleLogic("SSMSRRegistration")
        transformNode = logic.registerVolumes(fixedVolumeNode, movingVolumeNode, steps=500, device="cpu")
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.registration = RegistrationLogic(slicer.mrmlScene, pythonExecutable=pythonSlicerExecutable(),
                                              temporaryDirectoryRoot=slicer.app.temporaryPath)
        self.runs = BackgroundRuns(self.registration)
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(POLL_INTERVAL_MS)
        self._pollTimer.connect("timeout()", self._pollBackgroundJob)
        sequences = getattr(slicer.modules, "sequences", None)
        if sequences is not None:  # creates the proxy (glyph display) of a new transform sequence at once
            self.registration.sequencesLogic = sequences.logic()

    def getParameterNode(self):
        return SSMSRRegistrationParameterNode(super().getParameterNode())

    @property
    def activeJob(self):
        return self.registration.activeJob

    @property
    def isRunning(self) -> bool:
        return self.registration.activeJob is not None

    @staticmethod
    def setupPyTorch(askConfirmation: bool = True) -> bool:
        return setupPyTorch(askConfirmation)

    def run(self, methodName: str, *args, completionCallback=None, waitForCompletion=True, **kwargs):
        """Call ``RegistrationLogic.<methodName>`` (registerVolumes, segmentWithAtlases or trackSequence). With
        ``waitForCompletion=False`` the job runs in the background, driven by a QTimer, and
        ``completionCallback(job)`` is called when it ends."""
        if waitForCompletion:
            return getattr(self.registration, methodName)(*args, waitForCompletion=True, **kwargs)
        job = self.runs.start(methodName, *args, completions=(completionCallback,), **kwargs)
        self._pollTimer.start()
        return job

    def runFromPanel(self, parameterNode, atlases: list, progressCallback=None, completionCallback=None):
        """Start, in the background, the run that ``parameterNode`` (the module's parameter node) asks for. When it
        ends, its outputs are selected in that parameter node and shown (``panel_runs.PanelRun``), the views are fitted
        or a cine's plots laid out, and then ``completionCallback(job, run)`` (the panel's own display) is called.
        Returns (job, run)."""
        job, run = self.runs.startFromPanel(parameterNode, atlases, progressCallback=progressCallback,
                                            completions=(lambda ended: self._showResults(ended, run),
                                                         (lambda ended: completionCallback(ended, run))
                                                         if completionCallback is not None else None))
        self._pollTimer.start()
        return job, run

    def registerVolumes(self, *args, **kwargs):
        """See ``RegistrationLogic.registerVolumes`` and :meth:`run`."""
        return self.run("registerVolumes", *args, **kwargs)

    def segmentWithAtlases(self, *args, **kwargs):
        """See ``RegistrationLogic.segmentWithAtlases`` and :meth:`run`."""
        return self.run("segmentWithAtlases", *args, **kwargs)

    def trackSequence(self, *args, **kwargs):
        """See ``RegistrationLogic.trackSequence`` and :meth:`run`."""
        return self.run("trackSequence", *args, **kwargs)

    def cancel(self) -> None:
        """Cancel the running job (the process tree ends within about two seconds)."""
        self.runs.cancel()
        self._pollBackgroundJob()

    def _pollBackgroundJob(self) -> None:
        if not self.runs.poll():
            self._pollTimer.stop()

    @staticmethod
    def _showResults(job, run) -> None:
        """What needs the application once a run from the panel succeeded (the parameter node and the slice
        layers are already set by ``run``): fit the slice views to the overlay, or lay out a cine's table and plot."""
        if job.state is not JobState.SUCCEEDED:
            return
        layoutManager = slicer.app.layoutManager()
        if layoutManager is None:
            return
        if run.mode == "pair" and job.outputVolumeNode is not None:
            # setSliceViewerLayers(fit=True) at v5.6.2 (Base/Python/slicer/util.py) fits each slice logic to all.
            sliceLogics = layoutManager.mrmlSliceLogics()
            for index in range(sliceLogics.GetNumberOfItems()):
                sliceLogic = sliceLogics.GetItemAsObject(index)
                if sliceLogic:
                    sliceLogic.FitSliceToAll()
        elif run.mode == "cine":
            # The metrics table and the NLCC chart (the MSE chart is in the scene too) in a plot + table layout.
            layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpPlotTableView)
            applicationLogic = slicer.app.applicationLogic()
            applicationLogic.GetSelectionNode().SetActiveTableID(job.metricsTableNode.GetID())
            applicationLogic.PropagateTableSelection()
            slicer.modules.plots.logic().ShowChartInLayout(job.chartNodes["nlcc"])
