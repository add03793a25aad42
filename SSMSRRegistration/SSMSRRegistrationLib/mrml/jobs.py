"""A background job: the worker process, its temporary folder, its events, and the one way results enter the scene.

A job is driven by :meth:`Job.poll` (Slicer: from a QTimer) or :meth:`Job.wait`. Results are imported only after
the worker has succeeded, inside a :class:`SceneTransaction`: if any step fails, every node the import added is
removed and every change to an existing node is undone, so on error or cancel the scene is left as it was.
"""

from __future__ import annotations

import enum
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from ..common.protocol import Error, Finished, Progress, ProgressCallback, Started, parse_event
from .worker_process import WorkerProcess


class RegistrationError(RuntimeError):
    """The registration could not be started or did not produce a result; the message is meant for the user."""


class RegistrationCancelledError(RegistrationError):
    """The registration was cancelled before it finished."""


class JobState(enum.Enum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class SceneTransaction:
    """Scene changes that stand or fall together (a context manager).

    On an exception inside the ``with`` block, the undo steps registered with :meth:`onUndo` run (newest first),
    then every node added to the scene since the block began is removed; the exception goes on.
    """

    def __init__(self, scene):
        self.scene = scene
        self._undoSteps: list[Callable[[], None]] = []
        self._nodesBefore: set[str] = set()

    def onUndo(self, step: Callable[[], None]) -> None:
        """Run ``step`` if the transaction fails (for changes to nodes that existed before it)."""
        self._undoSteps.append(step)

    def __enter__(self) -> SceneTransaction:
        self._nodesBefore = {self.scene.GetNthNode(index).GetID() for index in range(self.scene.GetNumberOfNodes())}
        return self

    def __exit__(self, excType, exc, traceback) -> bool:
        if excType is None:
            return False
        for undo in reversed(self._undoSteps):
            undo()
        for index in reversed(range(self.scene.GetNumberOfNodes())):
            node = self.scene.GetNthNode(index)
            if node is not None and node.GetID() not in self._nodesBefore:
                self.scene.RemoveNode(node)
        return False


class Job:
    """One run of the worker. Subclasses import the results (:meth:`_importResults`) and may describe events.

    ``parameters``: what the job was asked for (the logic's: its run configuration as in the job file, what that
    resolves to, and the other settings); ``workerJob``: the contents of the worker's job file, if it has one.
    After completion: ``state``, ``errorMessage``, ``metrics`` (the worker's metrics dict) and ``log`` (lines)
    describe the outcome. ``onEnded(job)`` is called once when the job ends, whatever the outcome.
    """

    #: What the job does, for messages ("Registration failed: ...").
    activity = "Registration"

    def __init__(self, scene, command: list[str], environment: dict[str, str], temporaryDirectory: Path,
                 parameters: dict, progressCallback: ProgressCallback | None = None, keepTemporaryFiles: bool = False,
                 onEnded: Callable[[Job], None] | None = None, workerJob: dict | None = None):
        self.scene = scene
        self.parameters = parameters
        self.workerJob = workerJob
        self.temporaryDirectory = temporaryDirectory
        self.keepTemporaryFiles = keepTemporaryFiles
        self.progressCallback = progressCallback
        self.onEnded = onEnded
        self.state = JobState.RUNNING
        self.errorMessage = ""
        self.metrics: dict = {}
        self.log: list[str] = []
        self.lastProgressEvent: dict | None = None
        self.command = list(command)
        self._workerError: str | None = None
        self._finishedEvent: dict | None = None
        self.startTime = time.monotonic()
        self._log("Starting: " + " ".join(command))
        configuration = parameters.get("configuration")
        if configuration:
            given = ", ".join(f"{name} {value}" for name, value in (configuration.get("overrides") or {}).items())
            self._log(f"Run configuration: preset {configuration.get('preset')}"
                      + (f", with {given}" if given else ", no overrides"))
        if parameters.get("resolved"):
            self._log("Run settings: " + ", ".join(f"{name} {'automatic' if value is None else value}"
                                                   for name, value in parameters["resolved"].items()))
        try:
            self.worker = WorkerProcess(command, environment=environment, workingDirectory=str(temporaryDirectory))
        except OSError as error:
            self._removeTemporaryDirectory()
            raise RegistrationError(f"Could not start the registration worker ({command[0]}): {error}") from error

    @property
    def isDone(self) -> bool:
        return self.state is not JobState.RUNNING

    @property
    def outputs(self) -> dict:
        """The "outputs" of the worker's finished event (file paths by name)."""
        return (self._finishedEvent or {}).get("outputs") or {}

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
        self._end(JobState.CANCELLED, f"{self.activity} cancelled.")

    def _notify(self, event: dict) -> None:
        if self.progressCallback is not None:
            self.progressCallback(event)

    def _log(self, text: str) -> None:
        self.log.append(text)

    def _describeStarted(self, event: Started) -> str:
        return (f"Worker started on {event.device}: scales {', '.join(map(str, event.scales))}, "
                f"{event.steps_text()}, {event.extra.get('precision', 'float32')} precision"
                f"{event.half_field_text()}." + (f" Plan: {event.extra['plan']}." if event.extra.get("plan") else ""))

    def _handleEvent(self, data: dict) -> None:
        try:
            event = parse_event(data)
        except ValueError as error:  # a worker of another version, or a bug: say so, and go on
            self._log(f"Ignored a malformed worker event ({error}): {data}")
            return
        if isinstance(event, Started):
            self._log(self._describeStarted(event))
        elif isinstance(event, Progress):
            self.lastProgressEvent = data
        elif isinstance(event, Error):
            self._workerError = event.message or "unknown error"
            self._log("Worker error: " + self._workerError)
        elif isinstance(event, Finished):
            self._finishedEvent = data
            self.metrics = dict(event.metrics or {})
            self._log("Worker finished. " + ", ".join(f"{key} = {value}" for key, value in self.metrics.items()))
        self._notify(data)

    def _complete(self, returnCode: int) -> None:
        if returnCode != 0 or self._finishedEvent is None:
            self._end(JobState.FAILED, self._failureMessage(returnCode))
            return
        try:
            self._importResults()
        except Exception as error:  # any failure while importing must leave the scene unchanged and reach the user
            self._end(JobState.FAILED, f"The {self.activity.lower()} finished but its result could not be loaded: "
                                       f"{error}")
            return
        self._log(f"Done in {time.monotonic() - self.startTime:.1f} s.")
        self._end(JobState.SUCCEEDED, "")

    def _importResults(self) -> None:
        raise NotImplementedError

    def _failureMessage(self, returnCode: int) -> str:
        if self._workerError:
            return f"{self.activity} failed: {self._workerError}"
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
        if self.onEnded is not None:
            self.onEnded(self)

    def _removeTemporaryDirectory(self) -> None:
        if self.keepTemporaryFiles:
            self._log(f"Temporary files kept in {self.temporaryDirectory}")
        else:
            shutil.rmtree(self.temporaryDirectory, ignore_errors=True)
