"""Point files: CSV whose header names the coordinate convention (columns L,P,S for LPS or R,A,S for RAS; 2D: L,P or
R,A; other columns carried through) and Slicer markups JSON (.mrk.json). Points are read into LPS millimetres and
written back in the file's own convention, with everything else of the file kept.

Markups field names as in Slicer's ``Modules/Loadable/Markups/Resources/Schema/markups-schema-v1.0.3.json`` (the
same at v5.6.2) and ``vtkMRMLMarkupsJsonStorageNode.cxx``: a missing ``coordinateSystem`` means LPS; a position of
"" (with ``positionStatus`` "undefined") is an unset point.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, List

import numpy as np

from ..common.errors import InputError
from .atomic import write_atomically

#: Markups whose geometry is their control points alone (an ROI or a plane also stores a centre, axes and a size).
POINT_MARKUPS = ("Fiducial", "Line", "Angle", "Curve", "ClosedCurve")
CONVENTIONS = {"LPS": ("L", "P", "S"), "RAS": ("R", "A", "S")}


@dataclass
class PointFile:
    """Points read from a CSV or Slicer markups file, with what is needed to write them back moved.

    points: (N, ndim) physical points in LPS; convention: "LPS" or "RAS" (CSV; markups: per markup);
    ``content``: the parsed file (CSV rows, or the markups JSON) and ``slots`` where each point came from."""

    kind: str
    points: np.ndarray
    content: Any
    slots: List[Any]
    convention: str = "LPS"


def is_markups_path(path: str) -> bool:
    return os.fspath(path).lower().endswith(".json")


def read_points(path: str, ndim: int) -> PointFile:
    """Read a point file (CSV with an L,P,S or R,A,S header, or a Slicer .mrk.json) for an ``ndim``-D transform."""
    if not os.path.isfile(path):
        raise InputError(f"The point file {path!r} does not exist.")
    try:
        with open(path, encoding="utf-8-sig", newline="") as stream:
            text = stream.read()
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"Cannot read the point file {path!r} ({error}).") from None
    return _read_markups(text, path, ndim) if is_markups_path(path) else _read_csv(text, path, ndim)


def _read_csv(text: str, path: str, ndim: int) -> PointFile:
    rows = [row for row in csv.reader(io.StringIO(text)) if row]
    if not rows:
        raise InputError(f"The point file {path!r} is empty; it needs a header row with columns L,P,S or R,A,S.")
    header = [name.strip() for name in rows[0]]
    upper = [name.upper() for name in header]
    conventions = [name for name, axes in CONVENTIONS.items() if {axes[0], axes[1]} & set(upper)]
    if len(conventions) != 1:
        raise InputError(f"The header of {path!r} ({','.join(header)}) must state the coordinate convention: "
                         "columns L,P,S for LPS or R,A,S for RAS (2D: L,P or R,A), not both.")
    convention = conventions[0]
    axes = CONVENTIONS[convention][:ndim]
    missing = [axis for axis in axes if upper.count(axis) != 1]
    if missing:
        raise InputError(f"The point file {path!r} needs exactly one column each of {','.join(axes)} for a "
                         f"{ndim}D transform ({convention}); its header is {','.join(header)}.")
    columns = [upper.index(axis) for axis in axes]
    points = np.zeros((len(rows) - 1, ndim))
    for number, row in enumerate(rows[1:]):
        if len(row) != len(header):
            raise InputError(f"Row {number + 2} of {path!r} has {len(row)} fields; the header has {len(header)}.")
        try:
            points[number] = [float(row[column]) for column in columns]
        except ValueError:
            raise InputError(f"Row {number + 2} of {path!r} has a coordinate that is not a number: "
                             f"{','.join(row[column] for column in columns)}.") from None
    flip = _ras_flip(ndim) if convention == "RAS" else np.ones(ndim)
    return PointFile("csv", points * flip, rows, columns, convention)


def _ras_flip(ndim: int) -> np.ndarray:
    """RAS <-> LPS: the first two axes change sign."""
    return np.array([-1.0, -1.0, 1.0][:ndim])


def _read_markups(text: str, path: str, ndim: int) -> PointFile:
    # Field names as in Slicer's markups schema (Modules/Loadable/Markups/Resources/Schema/markups-schema-v1.0.3.json,
    # unchanged from v5.6.2 on) and its reader vtkMRMLMarkupsJsonStorageNode: "markups" is a list of markups with a
    # "type", a "coordinateSystem" ("LPS", the default when absent, or "RAS"), optional "coordinateUnits" ("mm") and
    # "controlPoints", each with a "position" of 3 numbers, or "" when its "positionStatus" is not "defined".
    try:
        content = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"{path!r} is not a Slicer markups file (not JSON: {error.msg}).") from None
    if not isinstance(content, dict) or not isinstance(content.get("markups"), list):
        raise InputError(f"{path!r} is not a Slicer markups file (no \"markups\" list).")
    points, slots = [], []
    for number, markup in enumerate(content["markups"]):
        kind = markup.get("type") if isinstance(markup, dict) else None
        if kind not in POINT_MARKUPS:
            raise InputError(f"Markup {number + 1} of {path!r} is of type {kind!r}; points, lines, angles and curves "
                             f"({', '.join(POINT_MARKUPS)}) can be mapped, not ROIs or planes.")
        system = markup.get("coordinateSystem", "LPS") or "LPS"
        units = markup.get("coordinateUnits", "mm")
        if system not in CONVENTIONS or (units[0] if isinstance(units, list) and units else units) != "mm":
            raise InputError(f"Markup {number + 1} of {path!r} uses coordinates {system!r} in {units!r}; LPS or RAS "
                             "in millimetres are supported.")
        for index, control in enumerate(markup.get("controlPoints") or []):
            position = control.get("position") if isinstance(control, dict) else None
            if position == "" or position is None:
                continue  # an undefined position (Slicer writes "")
            if (not isinstance(position, list) or len(position) != 3
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in position)):
                raise InputError(f"Control point {index + 1} of markup {number + 1} of {path!r} has no 3-number "
                                 "position.")
            lps = np.array(position, dtype=np.float64) * (_ras_flip(3) if system == "RAS" else 1.0)
            points.append(lps[:ndim])
            slots.append((number, index, system, lps))
    return PointFile("markups", np.array(points, dtype=np.float64).reshape(-1, ndim), content, slots)


def write_points(point_file: PointFile, moved_lps: np.ndarray, path: str) -> str:
    """Write ``point_file`` with its points replaced by ``moved_lps`` (same convention and content), atomically.
    NaN points are written as "nan" in a CSV, and as undefined control points (position "", positionStatus
    "undefined", as Slicer writes them) in markups."""
    ndim = point_file.points.shape[1]
    if point_file.kind == "csv":
        flip = _ras_flip(ndim) if point_file.convention == "RAS" else np.ones(ndim)
        rows = [list(row) for row in point_file.content]
        for row, point in zip(rows[1:], moved_lps * flip):
            for column, value in zip(point_file.slots, point):
                row[column] = repr(float(value))
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(rows)
        text = buffer.getvalue()
    else:
        content = copy.deepcopy(point_file.content)
        for (number, index, system, lps), point in zip(point_file.slots, moved_lps):
            control = content["markups"][number]["controlPoints"][index]
            if not np.isfinite(point).all():
                control["position"], control["positionStatus"] = "", "undefined"
                continue
            moved = lps.copy()
            moved[:ndim] = point
            control["position"] = (moved * (_ras_flip(3) if system == "RAS" else 1.0)).tolist()
        text = json.dumps(content, indent=4, ensure_ascii=False, allow_nan=False) + "\n"

    def write(temporary: str) -> None:
        with open(temporary, "w", encoding="utf-8", newline="") as stream:
            stream.write(text)

    return write_atomically(path, write)


def read_cine_landmarks(path: str, ndim: int, frames: int) -> Dict[int, Dict[str, np.ndarray]]:
    """Landmarks of a cine's frames from a CSV whose header names the coordinate convention (L,P,S or R,A,S; 2D:
    L,P or R,A), a ``frame`` column (0 to ``frames`` - 1) and, optionally, a ``label`` column: a landmark is the same
    structure in every frame where its label appears (without labels, the k-th row of each frame). Returns {frame:
    {label: (ndim,) point, LPS mm}}."""
    point_file = read_points(path, ndim)
    if point_file.kind != "csv":
        raise InputError(f"The landmarks {path!r} must be a CSV with a 'frame' column (a markups file holds no frame).")
    header = [name.strip().lower() for name in point_file.content[0]]
    if header.count("frame") != 1:
        raise InputError(f"The landmarks {path!r} need one 'frame' column (the frame, from 0, of each point); its "
                         f"header is {','.join(point_file.content[0])}.")
    frame_column = header.index("frame")
    label_column = header.index("label") if "label" in header else None
    landmarks: Dict[int, Dict[str, np.ndarray]] = {}
    for number, (row, point) in enumerate(zip(point_file.content[1:], point_file.points)):
        text = row[frame_column].strip()
        if not text.isdigit() or int(text) >= frames:
            raise InputError(f"Row {number + 2} of {path!r} gives frame {text!r}; the cine's frames are 0 to "
                             f"{frames - 1}.")
        points = landmarks.setdefault(int(text), {})
        label = row[label_column].strip() if label_column is not None else str(len(points))
        if label in points:
            raise InputError(f"Row {number + 2} of {path!r} gives landmark {label!r} of frame {text} a second time.")
        points[label] = point
    if not landmarks:
        raise InputError(f"The landmarks {path!r} hold no point.")
    return landmarks
