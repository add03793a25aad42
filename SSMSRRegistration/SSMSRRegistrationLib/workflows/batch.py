"""Cohorts without a scheduler: the jobs file of ``ssmsr batch``, one case run into its own folder, and the
results table. ``interfaces.batch`` runs ``run_case`` on Dask; nothing here knows about Dask.

JOBS.csv has a header and one row per case: ``case`` (the case id and output folder name), ``kind`` and that kind's
inputs (``KINDS``); relative paths are relative to the CSV's folder, ``atlases`` is ``IMAGE:LABELS;IMAGE:LABELS``,
a track case's ``reference`` is the frame registered onto every other (empty: consecutive pairs), blank lines and
lines starting with ``#`` are ignored. Mistakes in the file itself (columns, kinds, case names, empty cells) are
reported at once for the whole file; a missing or unreadable input file fails that case alone.

A case writes into ``OUTDIR/.CASE.partial-XXXXXXXX`` and, once everything including ``case.json`` (inputs,
options, metrics and the results row) is written, renames it to ``OUTDIR/CASE`` (``imaging.atomic.publish_folder``):
a case folder exists only when complete, and such a folder is skipped when the batch runs again.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import socket
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from ..common.errors import InputError
from ..common.protocol import FOLDED_PERCENT, json_safe
from ..common.run_config import RunConfiguration
from ..engine.metrics import REGISTER_FOLDED_KEY
from ..imaging import atomic
from ..imaging.atomic import publish_folder, write_atomically
from ..imaging.images import check_image, read_image, resample_onto, same_grid
from .register import register
from .segment import segment
from .track import track

#: kind -> (required columns, optional columns).
KINDS = {"register": (("fixed", "moving"), ("moving_labels", "fixed_labels", "fixed_mask")),
         "segment": (("target", "atlases"), ("fixed_labels", "fixed_mask")),
         "track": (("cine",), ("mask", "landmarks"))}
INPUT_COLUMNS = tuple(dict.fromkeys(column for required, optional in KINDS.values() for column in required + optional))
#: The column that is not a path: a track case's reference frame.
REFERENCE = "reference"

RECORD = "case.json"
RESULTS = "results.csv"
CASE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

#: Results columns before the per-label Dice columns (dice_LABEL, label order) and "error".
COLUMNS = ("case", "kind", "status", "seconds", "device", "final_loss", FOLDED_PERCENT, "ncc_before", "ncc_after",
           "mse_before", "mse_after", "tre_before_mm", "tre_after_mm", "dice_mean")
OK, FAILED, SKIPPED = "ok", "failed", "skipped"

#: Polled during training; True cancels the case.
StopPoll = Callable[[], bool]


@dataclass(frozen=True)
class Job:
    """One row of JOBS.csv: ``inputs`` maps its columns to absolute paths (``atlases``: (image, labels) pairs;
    ``reference``: a frame number)."""

    case: str
    kind: str
    inputs: Dict[str, Any]
    line: int


@dataclass(frozen=True)
class CaseOptions:
    """What every case runs with: the run configuration (each case takes the options of its kind), the model
    (register and segment cases) and the atlases to fuse (``top_k``, segment cases)."""

    config: RunConfiguration = RunConfiguration()
    model: Optional[str] = None
    top_k: int = 1


def _problem(jobs_csv: str, line: int, message: str) -> InputError:
    return InputError(f"{jobs_csv}, line {line}: {message}")


def _path(folder: str, value: str) -> str:
    return os.path.abspath(os.path.join(folder, os.path.expanduser(value)))


def _atlases(folder: str, value: str) -> Tuple[Tuple[str, str], ...]:
    pairs = []
    for entry in filter(None, (item.strip() for item in value.split(";"))):
        parts = entry.split(":")
        if len(parts) != 2 or not all(part.strip() for part in parts):
            raise ValueError(f"the atlas {entry!r} is not IMAGE:LABELS; write the atlases as "
                             "IMAGE:LABELS;IMAGE:LABELS (paths without ':')")
        pairs.append((_path(folder, parts[0].strip()), _path(folder, parts[1].strip())))
    if not pairs:
        raise ValueError("the column 'atlases' holds no atlas; write IMAGE:LABELS;IMAGE:LABELS")
    return tuple(pairs)


def _job(jobs_csv: str, folder: str, line: int, cells: Dict[str, str]) -> Job:
    case, kind = cells.get("case", ""), cells.get("kind", "").lower()
    if not CASE_NAME.fullmatch(case) or case.lower() == RESULTS:
        raise _problem(jobs_csv, line, f"the case {case!r} is not a usable folder name; use letters, digits, '.', "
                                       "'_' and '-', starting with a letter or digit")
    if kind not in KINDS:
        raise _problem(jobs_csv, line, f"case {case}: unknown kind {cells.get('kind', '')!r}; use one of "
                                       f"{', '.join(KINDS)}")
    required, optional = KINDS[kind]
    for column in required:
        if not cells.get(column):
            raise _problem(jobs_csv, line, f"case {case}: the column {column!r} is empty; a {kind} case needs "
                                           f"{' and '.join(required)}")
    for column in INPUT_COLUMNS:
        if cells.get(column) and column not in required + optional:
            raise _problem(jobs_csv, line, f"case {case}: a {kind} case does not use the column {column!r}; leave "
                                           "it empty")
    reference = cells.get(REFERENCE, "")
    if reference and (kind != "track" or not reference.isdigit()):
        raise _problem(jobs_csv, line, f"case {case}: the reference {reference!r} is not usable; give a track case's "
                                       "reference frame as a number from 0, or leave it empty (consecutive pairs)")
    if kind == "register" and cells.get("fixed_labels") and not cells.get("moving_labels"):
        raise _problem(jobs_csv, line, f"case {case}: fixed_labels (for Dice) needs moving_labels")
    inputs: Dict[str, Any] = {}
    for column in required + optional:
        if cells.get(column):
            try:
                inputs[column] = (_atlases(folder, cells[column]) if column == "atlases"
                                  else _path(folder, cells[column]))
            except ValueError as error:
                raise _problem(jobs_csv, line, f"case {case}: {error}") from None
    if reference:
        inputs[REFERENCE] = int(reference)
    return Job(case=case, kind=kind, inputs=inputs, line=line)


def read_jobs(jobs_csv: str) -> List[Job]:
    """The cases of a JOBS.csv (see the module docstring), or InputError saying what to fix in the file."""
    jobs_csv = os.path.abspath(os.fspath(jobs_csv))
    if not os.path.isfile(jobs_csv):
        raise InputError(f"The jobs file {jobs_csv!r} does not exist; give a CSV with the columns case, kind and "
                         "the inputs of each kind.")
    with open(jobs_csv, newline="", encoding="utf-8-sig") as stream:
        numbered = [(number, text) for number, text in enumerate(stream.read().splitlines(), start=1)
                    if text.strip() and not text.lstrip().startswith("#")]
    if not numbered:
        raise InputError(f"The jobs file {jobs_csv!r} is empty; give a header line and one line per case.")
    rows = list(csv.reader(text for _, text in numbered))
    header = [name.strip().lower() for name in rows[0]]
    known = ("case", "kind") + INPUT_COLUMNS + (REFERENCE,)
    unknown = [name for name in header if name not in known]
    missing = [name for name in ("case", "kind") if name not in header]
    if unknown or missing or len(set(header)) != len(header):
        raise _problem(jobs_csv, numbered[0][0], f"the header {','.join(header)!r} needs the columns case and kind, "
                                                 f"each once, and may hold {', '.join(INPUT_COLUMNS + (REFERENCE,))}"
                                                 + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    jobs, seen = [], set()
    folder = os.path.dirname(jobs_csv)
    for (line, _), row in zip(numbered[1:], rows[1:]):
        if len(row) != len(header):
            raise _problem(jobs_csv, line, f"{len(row)} fields, but the header has {len(header)}")
        job = _job(jobs_csv, folder, line, {name: cell.strip() for name, cell in zip(header, row)})
        if job.case in seen:
            raise _problem(jobs_csv, line, f"the case {job.case!r} appears twice; give each case its own id")
        seen.add(job.case)
        jobs.append(job)
    if not jobs:
        raise InputError(f"The jobs file {jobs_csv!r} holds no case; add one line per case under the header.")
    return jobs


def dice_scores(reference: np.ndarray, labels: np.ndarray) -> Dict[str, float]:
    """Dice overlap (0..1) per non-zero label of either map as ``dice_LABEL``, and their mean as ``dice_mean``."""
    scores = {}
    for label in np.union1d(np.unique(reference), np.unique(labels)):
        if label == 0:
            continue
        a, b = reference == label, labels == label
        name = int(label) if float(label).is_integer() else float(label)
        scores[f"dice_{name}"] = float(2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))
    scores["dice_mean"] = float(np.mean(list(scores.values()))) if scores else float("nan")
    return scores


def _dice_against(path: str, labels: sitk.Image) -> Dict[str, float]:
    """Dice of ``labels`` against the reference label map at ``path`` (brought onto its grid if needed)."""
    reference = read_image(path, "fixed labels")
    check_image(reference, "fixed labels", labels.GetDimension())
    if not same_grid(reference, labels):
        reference = resample_onto(reference, labels, labels=True)
    return dice_scores(sitk.GetArrayViewFromImage(reference), sitk.GetArrayViewFromImage(labels))


def _registration_values(metrics: Dict[str, Any]) -> Dict[str, Any]:
    return {"device": metrics["device"], "final_loss": metrics["final_loss"],
            FOLDED_PERCENT: metrics[REGISTER_FOLDED_KEY],
            **{name: metrics[name] for name in ("ncc_before", "ncc_after", "mse_before", "mse_after")}}


def _run_register(job: Job, staging: str, options: CaseOptions, should_stop: Optional[StopPoll]):
    inputs = job.inputs
    labels = inputs.get("moving_labels")
    result = register(inputs["fixed"], inputs["moving"], fixed_mask=inputs.get("fixed_mask"), moving_labels=labels,
                      model=options.model, config=options.config.only_for("pair"), should_stop=should_stop)
    files = {"field": "field.nii.gz", "warped": "warped.nii.gz", "jacobian": "jacobian.nii.gz",
             "warped_labels": "warped_labels.nii.gz" if labels else None}
    result.save(os.path.join(staging, files["field"]), warped_path=os.path.join(staging, files["warped"]),
                warped_labels_path=os.path.join(staging, files["warped_labels"]) if labels else None,
                jacobian_path=os.path.join(staging, files["jacobian"]))
    values = _registration_values(result.metrics)
    if inputs.get("fixed_labels"):
        values.update(_dice_against(inputs["fixed_labels"], result.warped_labels))
    return files, result.metrics, values


def _run_segment(job: Job, staging: str, options: CaseOptions, should_stop: Optional[StopPoll]):
    inputs = job.inputs
    result = segment(inputs["target"], list(inputs["atlases"]), top_k=options.top_k,
                     fixed_mask=inputs.get("fixed_mask"), model=options.model, config=options.config.only_for("pair"),
                     should_stop=should_stop)
    files = {"labels": "labels.nii.gz"}
    result.save(os.path.join(staging, files["labels"]))
    per_atlas = [_registration_values(metrics) for metrics in result.registrations]
    values = {name: float(np.mean([entry[name] for entry in per_atlas])) for name in per_atlas[0] if name != "device"}
    values.update({"device": per_atlas[0]["device"], FOLDED_PERCENT: max(entry[FOLDED_PERCENT] for entry in per_atlas)})
    if inputs.get("fixed_labels"):
        values.update(_dice_against(inputs["fixed_labels"], result.labels))
    return files, result.metrics, values


def _run_track(job: Job, staging: str, options: CaseOptions, should_stop: Optional[StopPoll]):
    result = track(job.inputs["cine"], mask=job.inputs.get("mask", "auto"), reference=job.inputs.get(REFERENCE),
                   landmarks=job.inputs.get("landmarks"), config=options.config.only_for("cine"),
                   should_stop=should_stop)
    files = {key: name for key, name in result.write_files(staging).items() if name}
    summary = result.summary()
    last_scale = list(result.loss_history.values())[-1]
    values = {"device": summary["device"], "final_loss": last_scale[-1] if last_scale else float("nan"),
              FOLDED_PERCENT: summary["max_folded_percent"],
              **{name: summary[name] for name in ("ncc_before", "ncc_after", "mse_before", "mse_after", "tre_before_mm",
                                                  "tre_after_mm") if name in summary}}
    return files, summary, values


RUNNERS = {"register": _run_register, "segment": _run_segment, "track": _run_track}


def case_folder(output: str, case: str) -> str:
    return os.path.join(os.path.abspath(output), case)


def finished_row(output: str, case: str) -> Optional[Dict[str, Any]]:
    """The results row stored in OUTDIR/CASE/case.json, with status "skipped"; None when the case is not done."""
    try:
        with open(os.path.join(case_folder(output, case), RECORD), encoding="utf-8") as stream:
            record = json.load(stream)
    except (OSError, ValueError):
        return None
    return {**record["row"], "status": SKIPPED} if isinstance(record, dict) and "row" in record else None


def remove_staging(output: str, cases: Sequence[str]) -> None:
    """Remove the hidden staging folders of ``cases`` left by interrupted attempts (none may be running)."""
    for case in cases:
        atomic.remove_staging(case_folder(output, case))


def failed_row(job: Job, message: str) -> Dict[str, Any]:
    return {"case": job.case, "kind": job.kind, "status": FAILED, "error": message}


def run_case(job: Job, output: str, options: CaseOptions, should_stop: Optional[StopPoll] = None) -> Dict[str, Any]:
    """Run one case into OUTDIR/CASE (see the module docstring) and return its results row.

    Bad input (InputError: a missing file, a wrong image, a bad option) gives a "failed" row that says what to do,
    and leaves no folder; any other error is raised, after removing this attempt's staging folder, so that the
    caller may retry; ``should_stop`` (polled during training) returning True cancels the case that way. A case
    already done gives its stored row as "skipped". ``seconds``: the case's wall time.
    """
    done = finished_row(output, job.case)
    if done is not None:
        return done
    folder = case_folder(output, job.case)
    if os.path.exists(folder):
        return failed_row(job, f"{folder!r} exists but is not a finished case of a batch (no {RECORD}); move it "
                               "away or remove it, then run the batch again.")
    remove_staging(output, [job.case])
    start = time.perf_counter()
    try:
        with publish_folder(folder) as staging:
            files, metrics, values = RUNNERS[job.kind](job, staging, options, should_stop)
            row = {"case": job.case, "kind": job.kind, "status": OK, "seconds": time.perf_counter() - start,
                   **values, "error": ""}
            record = {"case": job.case, "kind": job.kind, "jobs_line": job.line, "inputs": job.inputs,
                      "options": asdict(options), "files": files, "metrics": metrics, "row": row,
                      "host": socket.gethostname(), "pid": os.getpid(),
                      "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            with open(os.path.join(staging, RECORD), "w", encoding="utf-8") as stream:
                json.dump(json_safe(record), stream, indent=2)
                stream.flush()
                os.fsync(stream.fileno())
        return row
    except InputError as error:
        return failed_row(job, f"{error} (case {job.case}, line {job.line} of the jobs file)")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else ""
    return str(value)


def write_results(output: str, rows: Sequence[Dict[str, Any]]) -> str:
    """Write OUTDIR/results.csv atomically: ``COLUMNS``, one dice_LABEL column per label seen, then ``error``.

    seconds: wall time of the case; final_loss: the last training loss; folded_percent: percentage of the fixed
    grid where the field folds (Jacobian determinant <= 0); ncc/mse before and after: as in the metrics of
    ``register`` (track: NLCC and MSE of ``TrackingResult.summary``); dice: 0..1. Returns the path written.
    """
    labels = {key for row in rows for key in row if key.startswith("dice_") and key != "dice_mean"}
    order = lambda key: (0, int(key[5:]), "") if key[5:].lstrip("-").isdigit() else (1, 0, key)  # noqa: E731
    columns = list(COLUMNS) + sorted(labels, key=order) + ["error"]

    def write(path: str) -> None:
        with open(path, "w", newline="", encoding="utf-8") as stream:
            writer = csv.writer(stream)
            writer.writerow(columns)
            for row in rows:
                writer.writerow([_cell(row.get(column)) for column in columns])

    return write_atomically(os.path.join(os.path.abspath(output), RESULTS), write)
