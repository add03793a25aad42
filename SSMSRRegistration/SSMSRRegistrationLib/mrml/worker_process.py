"""Run the registration worker in a separate process and read its JSON-lines progress without blocking.

The worker (``python -m SSMSRRegistrationLib.cli register ... --progress jsonl``) writes one JSON object per
line on stdout and free-form messages on stderr. :class:`WorkerProcess` starts it in its own process group
(POSIX) or process group with a hidden console (Windows), reads both streams on daemon threads into one queue,
and ends the whole process tree on request. It knows nothing about MRML or Qt, so the Slicer logic can poll it
from a GUI timer and pytest can drive it directly.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

#: Seconds to wait after a polite termination request before killing the process tree outright.
TERMINATION_GRACE_SECONDS = 1.0

#: Number of stderr lines kept for error messages.
STDERR_LINES_KEPT = 200


@dataclass(frozen=True)
class WorkerMessage:
    """One item read from the worker.

    ``kind`` is ``"event"`` for a JSON object from stdout (``payload`` is the dict), ``"log"`` for a line of
    stderr or a stdout line that is not JSON (``payload`` is the text), and ``"exit"`` once the process has
    ended and both streams are drained (``payload`` is the exit code).
    """

    kind: str
    payload: object


class WorkerProcess:
    """A worker process whose output is read on background threads.

    Call :meth:`messages` regularly (for example from a GUI timer) to get what arrived since the last call;
    the last message is always ``WorkerMessage("exit", returnCode)``.
    """

    def __init__(self, command: Sequence[str], environment: dict[str, str] | None = None, workingDirectory: str | None = None):
        self.command = list(command)
        self._queue: queue.Queue[WorkerMessage] = queue.Queue()
        self.stderrTail: deque[str] = deque(maxlen=STDERR_LINES_KEPT)
        self._process = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=environment,
            cwd=workingDirectory,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            **_newProcessGroupOptions(),
        )
        self._readers = [
            threading.Thread(target=self._readStdout, name="SSMSR worker stdout", daemon=True),
            threading.Thread(target=self._readStderr, name="SSMSR worker stderr", daemon=True),
        ]
        for reader in self._readers:
            reader.start()
        threading.Thread(target=self._reportExit, name="SSMSR worker exit", daemon=True).start()

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def returnCode(self) -> int | None:
        """Exit code, or None while the process runs."""
        return self._process.poll()

    def isRunning(self) -> bool:
        return self._process.poll() is None

    def messages(self, timeoutSeconds: float = 0.0) -> list[WorkerMessage]:
        """Return the messages that arrived so far, waiting up to ``timeoutSeconds`` for the first one."""
        received = []
        try:
            received.append(self._queue.get(timeout=timeoutSeconds) if timeoutSeconds > 0 else self._queue.get_nowait())
            while True:
                received.append(self._queue.get_nowait())
        except queue.Empty:
            pass
        return received

    def terminate(self) -> None:
        """End the worker and every process it started; returns once the worker has exited.

        POSIX: SIGTERM to the process group, SIGKILL after :data:`TERMINATION_GRACE_SECONDS`.
        Windows: ``taskkill /T /F`` on the process tree.
        """
        if os.name == "nt":
            if self.isRunning():
                subprocess.run(
                    ["taskkill", "/T", "/F", "/PID", str(self.pid)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    creationflags=subprocess.CREATE_NO_WINDOW,
                    check=False,
                )
            self._process.wait()
            return
        _signalProcessGroup(self.pid, signal.SIGTERM)
        try:
            self._process.wait(timeout=TERMINATION_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            pass
        # Children may ignore SIGTERM or outlive the leader: always finish the group off.
        _signalProcessGroup(self.pid, signal.SIGKILL)
        self._process.wait()

    def _readStdout(self) -> None:
        for line in self._process.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                self._queue.put(WorkerMessage("log", line))
                continue
            if isinstance(event, dict) and "event" in event:
                self._queue.put(WorkerMessage("event", event))
            else:
                self._queue.put(WorkerMessage("log", line))

    def _readStderr(self) -> None:
        for line in self._process.stderr:
            line = line.rstrip()
            if line:
                self.stderrTail.append(line)
                self._queue.put(WorkerMessage("log", line))

    def _reportExit(self) -> None:
        returnCode = self._process.wait()
        for reader in self._readers:
            # Grandchildren that inherited the pipes could keep them open after a crash; do not wait forever.
            reader.join(timeout=2.0)
        self._queue.put(WorkerMessage("exit", returnCode))


def waitUntilGone(pid: int, timeoutSeconds: float) -> bool:
    """Return True once no process with ``pid`` exists (POSIX: also not as a zombie of ours), False on timeout."""
    deadline = time.monotonic() + timeoutSeconds
    while time.monotonic() < deadline:
        if not processExists(pid):
            return True
        time.sleep(0.02)
    return not processExists(pid)


def processExists(pid: int) -> bool:
    """Whether a live process with this id exists (zombies count as gone)."""
    if os.name == "nt":
        result = subprocess.run(
            ["tasklist", "/FI", f"PID eq {pid}", "/NH"],
            capture_output=True,
            text=True,
            creationflags=subprocess.CREATE_NO_WINDOW,
            check=False,
        )
        return str(pid) in result.stdout
    statusPath = f"/proc/{pid}/status"
    if os.path.exists("/proc"):
        try:
            with open(statusPath, encoding="ascii", errors="replace") as statusFile:
                return not any(line.startswith("State:") and "Z" in line.split()[1] for line in statusFile)
        except FileNotFoundError:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _newProcessGroupOptions() -> dict:
    """Popen options that make the worker the root of its own process tree, without a console window."""
    if os.name == "nt":
        startupInfo = subprocess.STARTUPINFO()
        startupInfo.dwFlags |= subprocess.STARTF_USESHOWWINDOW
        startupInfo.wShowWindow = 0  # SW_HIDE
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP, "startupinfo": startupInfo}
    return {"start_new_session": True}


def _signalProcessGroup(processGroupId: int, signalNumber: int) -> None:
    try:
        os.killpg(processGroupId, signalNumber)
    except ProcessLookupError:
        pass
