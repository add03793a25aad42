"""The one place where the Slicer logic spells the worker's command line (``python -m SSMSRRegistrationLib ...``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..common.presets import matching_preset
from ..common.schedule import format_scales, parse_scales
from .parameters import normalizeDevice

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


def workerCommand(prefix: list[str], subcommand: str, arguments: list[str], output: str, *, scales: str,
                  stepsPerScale: int, precision: str, smoothnessWeight: float, device: str,
                  nccWindow: int | None = None, seed: int | None = None, modelFile: str | None = None,
                  options: list[str] = ()) -> list[str]:
    """The full command of one ``register``, ``segment`` or ``track`` run with JSON-lines progress.

    ``arguments``: the subcommand's positional inputs; ``options``: its own further options (already spelled);
    ``nccWindow`` 0 or None, ``seed`` None and ``modelFile`` empty leave the worker's defaults. When the budget is a
    preset's, the command names that preset too, so that the worker also applies what the panel does not show (its
    learning rate and MSE weight); any other budget takes those from the default preset.
    """
    command = list(prefix) + [subcommand, *map(str, arguments), "-o", str(output), "--progress", "jsonl",
                              "--scales", format_scales(parse_scales(scales)), "--steps", str(int(stepsPerScale)),
                              "--precision", precision, "--lambda", repr(float(smoothnessWeight)),
                              "--device", normalizeDevice(device)]
    preset = matching_preset(scales, stepsPerScale, precision, cine=subcommand == "track",
                             smoothness_weight=smoothnessWeight)
    if preset:
        command += ["--preset", preset]
    if nccWindow:
        command += ["--window", str(int(nccWindow))]
    if seed is not None:
        command += ["--seed", str(int(seed))]
    if modelFile:
        command += ["--model", str(Path(modelFile).resolve())]
    return command + [str(option) for option in options]
