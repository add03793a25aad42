"""The one place where the Slicer logic tells the worker what to run: a job file (``python -m SSMSRRegistrationLib
job JOB.json``) holding the command, its arguments and the run configuration.

The job file's format is the worker's (``interfaces.cli.read_job``): ``{"format": "ssmsr-job", "format_version": 1,
"command": "register" | "track" | "segment", "arguments": {argparse dest of that command: value},
"configuration": RunConfiguration.to_json()}``. The run options travel only in "configuration" (a preset and the
overrides the caller gave); the worker resolves them for the kind of run, so nothing is spelled twice here.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ..common.protocol import JOB_COMMANDS, JOB_FORMAT, JOB_FORMAT_VERSION
from ..common.run_config import RunConfiguration

#: Folder that holds the ``SSMSRRegistrationLib`` package; the worker needs it on its PYTHONPATH.
MODULE_DIRECTORY = Path(__file__).resolve().parents[2]
#: The worker: the package's ``__main__`` (the ``ssmsr`` command).
WORKER_MODULE = "SSMSRRegistrationLib"


def workerEnvironment() -> dict[str, str]:
    """Environment of the worker: this process's, with the module folder first on PYTHONPATH and unbuffered output."""
    environment = dict(os.environ)
    paths = [str(MODULE_DIRECTORY)] + [path for path in environment.get("PYTHONPATH", "").split(os.pathsep) if path]
    environment["PYTHONPATH"] = os.pathsep.join(paths)
    environment["PYTHONUNBUFFERED"] = "1"
    environment["PYTHONIOENCODING"] = "utf-8"
    return environment


def defaultWorkerPrefix(pythonExecutable: str | None = None) -> list[str]:
    """``[python, "-m", WORKER_MODULE]`` with Slicer's (or this) Python."""
    return [pythonExecutable or sys.executable, "-m", WORKER_MODULE]


def jobDocument(command: str, arguments: dict, configuration: RunConfiguration) -> dict:
    """The contents of a job file: ``command`` with its ``arguments`` (the command's argparse destinations, e.g.
    "fixed", "output", "fixed_mask", "no_figures"; None values are left out) and the run ``configuration``."""
    if command not in JOB_COMMANDS:
        raise ValueError(f"unknown worker command {command!r}; one of {', '.join(JOB_COMMANDS)}")
    return {"format": JOB_FORMAT, "format_version": JOB_FORMAT_VERSION, "command": command,
            "arguments": {name: value for name, value in arguments.items() if value is not None},
            "configuration": configuration.to_json()}


def writeJob(path, command: str, arguments: dict, configuration: RunConfiguration,
             prefix: list[str] | None = None) -> list[str]:
    """Write the job file ``path`` (see :func:`jobDocument`) and return the command that runs it:
    ``prefix + ["job", path]``, ``prefix`` being ``[python, "-m", "SSMSRRegistrationLib"]`` by default."""
    path = str(Path(path).resolve())
    with open(path, "w", encoding="utf-8") as stream:
        json.dump(jobDocument(command, arguments, configuration), stream, indent=1, sort_keys=True)
        stream.write("\n")
    return list(prefix or defaultWorkerPrefix()) + ["job", path]


def readJob(path) -> dict:
    """The contents of a job file written by :func:`writeJob` (for the log and for tests)."""
    with open(path, encoding="utf-8") as stream:
        return json.load(stream)
