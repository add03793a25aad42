"""The module's Slicer-side logic: its parameter node, PyTorch set-up, and a QTimer that drives background jobs."""

import shutil
import sys

import qt
import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic

from ..logic import RegistrationLogic
from .parameter_node import SSMSRRegistrationParameterNode
from .pytorch_setup import setupPyTorch

#: Milliseconds between two looks at the worker's output while a job runs.
POLL_INTERVAL_MS = 100


def pythonSlicerExecutable() -> str:
    """Slicer's command-line Python interpreter (PythonSlicer), which runs the worker."""
    return shutil.which("PythonSlicer") or sys.executable


class SSMSRRegistrationLogic(ScriptedLoadableModuleLogic):
    """The registration itself is ``self.registration``, a Qt-free ``SSMSRRegistrationLib.logic.RegistrationLogic``
    on ``slicer.mrmlScene``. From the Python console::

        logic = slicer.util.getModuleLogic("SSMSRRegistration")
        transformNode = logic.registerVolumes(fixedVolumeNode, movingVolumeNode, stepsPerScale=500)
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.registration = RegistrationLogic(slicer.mrmlScene, pythonExecutable=pythonSlicerExecutable(),
                                              temporaryDirectoryRoot=slicer.app.temporaryPath)
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(POLL_INTERVAL_MS)
        self._pollTimer.connect("timeout()", self._pollBackgroundJob)
        self._backgroundJob = None
        self._completionCallback = None
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
        result = getattr(self.registration, methodName)(*args, waitForCompletion=waitForCompletion, **kwargs)
        if not waitForCompletion:
            self._backgroundJob = result
            self._completionCallback = completionCallback
            self._pollTimer.start()
        return result

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
        self.registration.cancel()
        self._pollBackgroundJob()

    def _pollBackgroundJob(self) -> None:
        job = self._backgroundJob
        if job is None:
            self._pollTimer.stop()
            return
        job.poll()
        if job.isDone:
            self._pollTimer.stop()
            self._backgroundJob = None
            callback, self._completionCallback = self._completionCallback, None
            if callback is not None:
                callback(job)
