"""The worker's JSON-lines protocol: event names, their fields, and the few shared constants both sides need.

Every ``ssmsr`` command run with ``--progress jsonl`` writes one JSON object per line on stdout; the engine and
the workflows emit the same dicts to their ``progress`` callbacks. The Slicer logic reads them. Events:

    started     {"device", "scales": ["1/2", "1"], "steps_per_scale", "image_size": [x, y(, z)], "pairs",
                 "batch_size", "precision"}; registrations add "scale_steps" (the steps of each scale),
                "scale_batches" (the pairs trained per step at each scale) and "half_field_scales" (the scales
                predicting their fields at half resolution, often none);
                ``train`` adds "validation_pairs" and "resumed_at" (steps already done)
                ``register`` adds its working grid: "working_grid" {"size", "spacing_mm", "resampled"},
                "ncc_window_voxels", "ncc_window_mm", "memory_estimate_bytes", "available_memory_bytes",
                "estimated_seconds" (CPU, else null), "note" (why the grid was coarsened) and "plan" (one line)
    progress    {"scale", "scale_index", "num_scales", "step", "steps" (of this scale), "loss", "fraction" (of all
                the steps of all scales), "elapsed_s", "eta_s"};
                "converged": true on the last event of a scale that stopped before its budget;
                inside ``segment`` also "atlas_index", "atlas_count" (and "fraction" over all registrations)
    validation  {"scale", "scale_index", "step", "loss"}                                   (``train``)
    checkpoint  {"path", "complete", "scale_index", "step"}                                (``train``)
    ranking     {"ranking": [{"rank", "atlas", "labels", "nlcc", "registered"}, ...]}       (``segment``)
    atlas       {"rank", "index", "count", "atlas", "nlcc"}, before each atlas registration (``segment``)
    finished    {"outputs": {name: path or null}, "metrics": {...}}
    error       {"message", "kind": one of ERROR_KINDS}

Each event is a class below (``Started``, ``Progress``, ...): emitters build one and send ``to_dict()`` (the
callbacks and the JSON lines carry plain dicts), readers turn a dict back into its class with ``parse_event``,
which says what is wrong with a malformed event. Fields beyond a class's own (e.g. ``register``'s working grid in
"started") are kept in its ``extra``.

Standard library only: imported by the engine, the command line and the Slicer logic alike.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, List, Mapping, Optional, Sequence

from .errors import InputError

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


@dataclass(frozen=True)
class Event:
    """A protocol event; ``extra`` holds the fields a subclass does not declare."""

    name: ClassVar[str] = ""
    extra: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        values = {item.name: getattr(self, item.name) for item in dataclasses.fields(self) if item.name != "extra"}
        return {"event": self.name, **values, **self.extra}


@dataclass(frozen=True)
class Started(Event):
    name: ClassVar[str] = STARTED
    device: str = ""
    scales: List[str] = field(default_factory=list)
    steps_per_scale: int = 0
    image_size: List[int] = field(default_factory=list)  # (x, y[, z])
    pairs: int = 1
    batch_size: int = 1

    def steps_text(self) -> str:
        return steps_text(self.to_dict())

    def half_field_text(self) -> str:
        return half_field_text(self.to_dict())

    def batch_text(self) -> str:
        return batch_text(self.to_dict())


@dataclass(frozen=True)
class Progress(Event):
    name: ClassVar[str] = PROGRESS
    scale: str = ""
    scale_index: int = 0
    num_scales: int = 1
    step: int = 0
    steps: int = 0
    loss: float = math.nan
    fraction: float = 0.0
    elapsed_s: float = 0.0
    eta_s: float = math.nan


@dataclass(frozen=True)
class Validation(Event):
    name: ClassVar[str] = VALIDATION
    scale: str = ""
    scale_index: int = 0
    step: int = 0
    loss: float = math.nan


@dataclass(frozen=True)
class Checkpoint(Event):
    name: ClassVar[str] = CHECKPOINT
    path: str = ""
    complete: bool = False
    scale_index: int = 0
    step: int = 0


@dataclass(frozen=True)
class Ranking(Event):
    name: ClassVar[str] = RANKING
    ranking: List[dict] = field(default_factory=list)


@dataclass(frozen=True)
class Atlas(Event):
    name: ClassVar[str] = ATLAS
    rank: int = 1
    index: int = 0
    count: int = 1
    atlas: str = ""
    nlcc: float = math.nan


@dataclass(frozen=True)
class Finished(Event):
    name: ClassVar[str] = FINISHED
    outputs: Dict[str, Optional[str]] = field(default_factory=dict)
    metrics: Dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Error(Event):
    name: ClassVar[str] = ERROR
    message: str = ""
    kind: str = "internal"


#: Event name -> class.
EVENT_TYPES = {kind.name: kind for kind in (Started, Progress, Validation, Checkpoint, Ranking, Atlas, Finished,
                                            Error)}
#: Fields an event of each kind must carry.
REQUIRED_FIELDS = {STARTED: ("device", "scales", "steps_per_scale"),
                   PROGRESS: ("scale_index", "num_scales", "step", "steps", "fraction"),
                   VALIDATION: ("scale_index", "step", "loss"), CHECKPOINT: ("path", "complete"),
                   RANKING: ("ranking",), ATLAS: ("index", "count", "atlas"), FINISHED: ("outputs", "metrics"),
                   ERROR: ("message", "kind")}


def parse_event(data: Mapping[str, Any]) -> Event:
    """The event a dict describes, as its class; ValueError naming the event and what is missing or unknown."""
    kind = data.get("event") if isinstance(data, Mapping) else None
    if kind not in EVENT_TYPES:
        raise ValueError(f"unknown protocol event {kind!r}; the events are {', '.join(EVENT_TYPES)}")
    missing = [name for name in REQUIRED_FIELDS[kind] if name not in data]
    if missing:
        raise ValueError(f"the {kind!r} event lacks {', '.join(missing)}")
    declared = {item.name for item in dataclasses.fields(EVENT_TYPES[kind])} - {"extra"}
    return EVENT_TYPES[kind](**{name: value for name, value in data.items() if name in declared},
                             extra={name: value for name, value in data.items()
                                    if name not in declared and name != "event"})


def scale_steps(started: Mapping[str, Any]) -> List[int]:
    """The training steps of each scale, coarse to fine, from a "started" event (``train``'s gives only
    "steps_per_scale", the same at every scale)."""
    return list(started.get("scale_steps")
                or [started.get("steps_per_scale", 0)] * max(len(started.get("scales") or []), 1))


def steps_text(started: dict) -> str:
    """"300 steps per scale", or each scale's steps where they differ ("steps 300/300/100 by scale"), from a
    "started" event."""
    steps = scale_steps(started)
    return f"{steps[0]} steps per scale" if len(set(steps)) == 1 else f"steps {'/'.join(map(str, steps))} by scale"


def batch_text(started: dict) -> str:
    """"1 pair per step", or each scale's pairs where they differ ("pairs per step 7/7/1 by scale", filled coarser
    scales), from a "started" event."""
    batches = list(started.get("scale_batches") or [started.get("batch_size", 1)])
    if len(set(batches)) == 1:
        return f"{batches[0]} pair{'' if batches[0] == 1 else 's'} per step"
    return f"pairs per step {'/'.join(map(str, batches))} by scale"


def half_field_text(started: dict) -> str:
    """", fields at half resolution at scale 1" (the scales that predict so), or "" where none does, from a "started"
    event."""
    scales = started.get("half_field_scales") or []
    return f", fields at half resolution at scale{'s' if len(scales) > 1 else ''} {','.join(scales)}" if scales else ""


def started_event(device: str, scales: Sequence[str], steps_per_scale: int, image_size: Sequence[int], pairs: int,
                  batch_size: int, **extra) -> dict:
    """A "started" event; ``image_size`` in (x, y[, z]) order."""
    return Started(device=str(device), scales=list(scales), steps_per_scale=int(steps_per_scale),
                   image_size=[int(n) for n in image_size], pairs=int(pairs), batch_size=int(batch_size),
                   extra=extra).to_dict()


def progress_event(scale: str, scale_index: int, num_scales: int, step: int, steps: int, loss: float,
                   done_before: int, elapsed_s: float, schedule: Optional[Sequence[int]] = None) -> dict:
    """A "progress" event after ``step`` of ``steps`` at scale ``scale_index``; ``done_before``: steps that were
    already done when the run (re)started, so the time left is extrapolated from the steps of this run only;
    ``schedule``: the steps of every scale where they differ (None: ``steps`` at each)."""
    schedule = list(schedule) if schedule is not None else [steps] * num_scales
    total = max(1, sum(schedule))
    finished = sum(schedule[:scale_index]) + step
    rate = elapsed_s / max(finished - done_before, 1)
    return Progress(scale=scale, scale_index=scale_index, num_scales=num_scales, step=step, steps=steps,
                    loss=float(loss), fraction=finished / total, elapsed_s=elapsed_s,
                    eta_s=rate * (total - finished)).to_dict()


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
    return Finished(outputs=dict(outputs), metrics=dict(metrics)).to_dict()


def error_event(message: str, kind: str) -> dict:
    if kind not in ERROR_KINDS:
        raise ValueError(f"unknown error kind {kind!r}")
    return Error(message=message, kind=kind).to_dict()


def overall_fraction(event: dict) -> float:
    """Fraction (0..1) of all training steps of all scales (and of all atlases) done, from a "progress" event: its
    "fraction" (``progress_event`` counts each scale's own steps; ``segment`` spreads it over the atlases)."""
    return min(max(float(event.get("fraction", 0.0)), 0.0), 1.0)


#: The worker's job file (``ssmsr job JOB.json``, written by the Slicer logic): its format name and version, and the
#: commands a job may run with the kind of run (``common.run_config``) of each.
JOB_FORMAT, JOB_FORMAT_VERSION = "ssmsr-job", 1
JOB_COMMANDS = {"register": "pair", "track": "cine", "segment": "pair"}


def read_json_document(path: str, what: str, format_name: str, version: int) -> dict:
    """The JSON object at ``path`` written in the format ``format_name`` (version ``version`` or older): a job file,
    a provenance file. InputError naming ``what`` when it cannot be read, is not JSON, is another format or is
    newer than this SSMSR."""
    try:
        with open(path, encoding="utf-8") as stream:
            document = json.load(stream)
    except OSError as error:
        raise InputError(f"Cannot read the {what} {path!r} ({error.strerror}).") from None
    except json.JSONDecodeError as error:
        raise InputError(f"The {what} {path!r} is not JSON ({error.msg}, line {error.lineno}).") from None
    if not isinstance(document, dict) or document.get("format") != format_name:
        raise InputError(f"{path!r} is not an SSMSR {what} (format {format_name!r}).")
    if int(document.get("format_version", 0)) > version:
        raise InputError(f"The {what} {path!r} was written by a newer SSMSR (format version "
                         f"{document['format_version']}); update SSMSR to read it.")
    return document
