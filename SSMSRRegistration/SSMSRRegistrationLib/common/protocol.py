"""The worker's JSON-lines protocol: event names, their fields, and the few shared constants both sides need.

Every ``ssmsr`` command run with ``--progress jsonl`` writes one JSON object per line on stdout; the engine and
the workflows emit the same dicts to their ``progress`` callbacks. The Slicer logic reads them. Events:

    started     {"device", "scales": ["1/2", "1"], "steps_per_scale", "image_size": [x, y(, z)], "pairs",
                 "batch_size", "precision"}; ``train`` adds "validation_pairs" and "resumed_at" (steps already done)
                ``register`` adds its working grid: "working_grid" {"size", "spacing_mm", "resampled"},
                "ncc_window_voxels", "ncc_window_mm", "memory_estimate_bytes", "available_memory_bytes",
                "estimated_seconds" (CPU, else null), "note" (why the grid was coarsened) and "plan" (one line)
    progress    {"scale", "scale_index", "num_scales", "step", "steps", "loss", "fraction", "elapsed_s", "eta_s"};
                "converged": true on the last event of a scale that stopped before its budget;
                inside ``segment`` also "atlas_index", "atlas_count" (and "fraction" over all registrations)
    validation  {"scale", "scale_index", "step", "loss"}                                   (``train``)
    checkpoint  {"path", "complete", "scale_index", "step"}                                (``train``)
    ranking     {"ranking": [{"rank", "atlas", "labels", "nlcc", "registered"}, ...]}       (``segment``)
    atlas       {"rank", "index", "count", "atlas", "nlcc"}, before each atlas registration (``segment``)
    finished    {"outputs": {name: path or null}, "metrics": {...}}
    error       {"message", "kind": one of ERROR_KINDS}

Standard library only: imported by the engine, the command line and the Slicer logic alike.
"""

from __future__ import annotations

import math
import re
from typing import Callable, Dict, Sequence

STARTED, PROGRESS, VALIDATION, CHECKPOINT = "started", "progress", "validation", "checkpoint"
RANKING, ATLAS, FINISHED, ERROR = "ranking", "atlas", "finished", "error"

#: Values of an error event's "kind" (the command's exit code follows from it, see ``interfaces.cli``).
ERROR_KINDS = ("input", "cancelled", "out_of_memory", "internal")

#: A receiver of protocol events (dicts with an "event" key).
ProgressCallback = Callable[[dict], None]

#: Default interval between progress reports (and cancel checks), seconds of wall time.
REPORT_SECONDS = 0.2

#: The one name of each quality measure (``engine.metrics``): mean squared difference, mean squared local NCC,
#: percentage of the grid where the field folds (Jacobian determinant <= 0); IDENTITY_SUFFIX marks a measure taken
#: before the registration (the images as given).
MSE, NLCC, FOLDED_PERCENT, IDENTITY_SUFFIX = "mse", "nlcc", "folded_percent", "_identity"

#: Per-pair metrics of a cine tracking, in the order of ``metrics.csv``'s columns after ``pair``,
#: ``moving_frame`` and ``fixed_frame``: MSE and NLCC without (identity) and with the registration, and the
#: percentage of the frame's pixels where the field folds (Jacobian determinant <= 0).
PAIR_METRIC_NAMES = (MSE + IDENTITY_SUFFIX, MSE, NLCC + IDENTITY_SUFFIX, NLCC, FOLDED_PERCENT)

#: Relative tolerance when two image grids (spacing, origin, direction) are compared, on either side.
GRID_TOLERANCE = 1e-4

#: Device names the worker accepts.
DEVICE_HELP = "auto, cpu, cuda or cuda:N"


def check_device_name(name: str) -> str:
    """The normalised device name ('auto', 'cpu', 'cuda' or 'cuda:N'), or ValueError saying what is accepted."""
    name = (name or "auto").strip().lower()
    if name in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", name):
        return name
    raise ValueError(f"Unknown device {name!r}; use {DEVICE_HELP}.")


def started_event(device: str, scales: Sequence[str], steps_per_scale: int, image_size: Sequence[int], pairs: int,
                  batch_size: int, **extra) -> dict:
    """A "started" event; ``image_size`` in (x, y[, z]) order."""
    return {"event": STARTED, "device": str(device), "scales": list(scales), "steps_per_scale": int(steps_per_scale),
            "image_size": [int(n) for n in image_size], "pairs": int(pairs), "batch_size": int(batch_size), **extra}


def progress_event(scale: str, scale_index: int, num_scales: int, step: int, steps: int, loss: float,
                   done_before: int, elapsed_s: float) -> dict:
    """A "progress" event after ``step`` of ``steps`` at scale ``scale_index``; ``done_before``: steps that were
    already done when the run (re)started, so the time left is extrapolated from the steps of this run only."""
    total = max(1, steps * num_scales)
    finished = scale_index * steps + step
    rate = elapsed_s / max(finished - done_before, 1)
    return {"event": PROGRESS, "scale": scale, "scale_index": scale_index, "num_scales": num_scales, "step": step,
            "steps": steps, "loss": float(loss), "fraction": finished / total, "elapsed_s": elapsed_s,
            "eta_s": rate * (total - finished)}


def json_safe(value):
    """``value`` as plain JSON (for ``json.dumps(..., allow_nan=False)``): NaN and infinities become null, numpy
    (and other array-library) scalars Python numbers, tuples lists, dict keys strings."""
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if not isinstance(value, (str, bytes)) and getattr(value, "shape", None) == () and hasattr(value, "item"):
        value = value.item()  # a numpy scalar (numpy is not imported here: the Slicer side imports this module)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def finished_event(outputs: Dict[str, object], metrics: Dict[str, object]) -> dict:
    return {"event": FINISHED, "outputs": outputs, "metrics": metrics}


def error_event(message: str, kind: str) -> dict:
    if kind not in ERROR_KINDS:
        raise ValueError(f"unknown error kind {kind!r}")
    return {"event": ERROR, "message": message, "kind": kind}


def overall_fraction(event: dict) -> float:
    """Fraction (0..1) of all training steps of all scales (and of all atlases) done, from a "progress" event."""
    number_of_scales = max(int(event.get("num_scales", 1)), 1)
    steps = max(int(event.get("steps", 1)), 1)
    fraction = (int(event.get("scale_index", 0)) + int(event.get("step", 0)) / steps) / number_of_scales
    if "atlas_count" in event:  # one of several atlas registrations
        fraction = (int(event.get("atlas_index", 0)) + fraction) / max(int(event["atlas_count"]), 1)
    return min(max(fraction, 0.0), 1.0)


#: The worker's job file (``ssmsr job JOB.json``, written by the Slicer logic): its format name and version, and the
#: commands a job may run with the kind of run (``common.run_config``) of each.
JOB_FORMAT, JOB_FORMAT_VERSION = "ssmsr-job", 1
JOB_COMMANDS = {"register": "pair", "track": "cine", "segment": "pair"}
