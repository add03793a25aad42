"""results.csv (one row per case x method x pair x label) and report.md (tables like the paper's)."""

from __future__ import annotations

import csv
import math
from collections import OrderedDict
from typing import Dict, List, Sequence, Tuple

import numpy as np

from .config import Config
from .runner import COLUMNS, CaseResult

#: Metrics that have one value per pair (repeated on each label row of that pair).
PAIR_METRICS = ("mse", "nlcc", "endpoint_error_mm", "std_log_jacobian", "percent_non_positive_jacobian",
                "seconds", "peak_rss_mib", "peak_gpu_mib")

Statistic = Tuple[float, float, int]  # mean, standard deviation (ddof 0), number of values


def _statistic(values: Sequence[float]) -> Statistic:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan, math.nan, 0
    return float(np.mean(finite)), float(np.std(finite)), len(finite)


def summarise(result: CaseResult) -> "OrderedDict[str, Dict[str, Statistic]]":
    """Per method (table order): each pair metric, "dice"/"hd95_mm" (mean over labels per pair), and
    "dice:<label>"/"hd95_mm:<label>", as (mean, std, n) over the pairs."""
    grouped: "OrderedDict[str, Dict[str, List[dict]]]" = OrderedDict()
    for row in result.rows:
        grouped.setdefault(row["method"], OrderedDict()).setdefault(row["pair"], []).append(row)
    summary: "OrderedDict[str, Dict[str, Statistic]]" = OrderedDict()
    for method, pairs in grouped.items():
        stats: Dict[str, Statistic] = {}
        for metric in PAIR_METRICS:
            stats[metric] = _statistic([rows[0][metric] for rows in pairs.values()])
        for metric in ("dice", "hd95_mm"):
            stats[metric] = _statistic([float(np.nanmean([r[metric] for r in rows]))
                                        if any(not math.isnan(r[metric]) for r in rows) else math.nan
                                        for rows in pairs.values()])
            for label in result.case.label_names.values():
                stats[f"{metric}:{label}"] = _statistic([r[metric] for rows in pairs.values() for r in rows
                                                         if r["label"] == label])
        summary[method] = stats
    return summary


def write_csv(results: List[CaseResult], path: str) -> None:
    with open(path, "w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=COLUMNS)
        writer.writeheader()
        for result in results:
            for row in result.rows:
                writer.writerow({key: (f"{value:.6g}" if isinstance(value, float) else value)
                                 for key, value in row.items()})


def _format(statistic: Statistic, scale: float = 1.0, digits: int = 2) -> str:
    mean, std, count = statistic
    if count == 0:
        return "-"
    text = f"{mean * scale:.{digits}f}"
    return f"{text} ± {std * scale:.{digits}f}" if count > 1 else text


def _table(header: Sequence[str], rows: List[Sequence[str]]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def case_table(result: CaseResult) -> List[str]:
    """The case's table: labelled cases like the paper's Table I (+ HD95, folding, time), the cine like Table II."""
    summary = summarise(result)
    labels = list(result.case.label_names.values())
    has_truth = result.case.pairs[0].true_field is not None
    header = ["Method"]
    if labels:
        header += [f"Dice {label} (%)" for label in labels] + ["Dice mean (%) ↑", "HD95 (mm) ↓"]
    if has_truth:
        header.append("EPE (mm) ↓")
    header += ["MSE (1e-3) ↓", f"NLCC r={result.case.nlcc_radius} (1e-1) ↑", "std log\\|J\\| ↓", "% J≤0 ↓",
               "s / pair", "peak RSS (MiB)"]
    rows = []
    for method, stats in summary.items():
        row = [method]
        if labels:
            row += [_format(stats[f"dice:{label}"], 100) for label in labels]
            row += [_format(stats["dice"], 100), _format(stats["hd95_mm"])]
        if has_truth:
            row.append(_format(stats["endpoint_error_mm"]))
        row += [_format(stats["mse"], 1e3, 3), _format(stats["nlcc"], 10, 3), _format(stats["std_log_jacobian"], 1, 3),
                _format(stats["percent_non_positive_jacobian"], 1, 3), _format(stats["seconds"], 1, 1),
                _format(stats["peak_rss_mib"], 1, 0)]
        rows.append(row)
    return _table(header, rows)


def headline_table(results: List[CaseResult]) -> List[str]:
    """One line per case and method: mean Dice and HD95 (labelled cases) or MSE and NLCC (cine), folding, time."""
    rows = []
    for result in results:
        labelled = bool(result.case.label_names)
        for method, stats in summarise(result).items():
            accuracy = ([_format(stats["dice"], 100), _format(stats["hd95_mm"])] if labelled else
                        [f"MSE {_format(stats['mse'], 1e3, 3)}", f"NLCC {_format(stats['nlcc'], 10, 3)}"])
            rows.append([result.case.name, method, *accuracy,
                         _format(stats["percent_non_positive_jacobian"], 1, 3), _format(stats["seconds"], 1, 1)])
    return _table(["case", "method", "Dice mean (%) / MSE (1e-3)", "HD95 (mm) / NLCC (1e-1)", "% J≤0", "s / pair"],
                  rows)


def report_lines(results: List[CaseResult], config: Config, provenance: Dict[str, str],
                 figures: Dict[str, List[str]], figure_prefix: str = "") -> List[str]:
    """The Markdown report. ``provenance``: command, date, device, versions, wall time."""
    lines = [f"# SSMSR evaluation ({config.name} configuration)", ""]
    lines += [f"- **{key}**: {value}" for key, value in provenance.items()]
    lines += ["", "## Metrics", "",
              "- Every method's result is converted to an ITK displacement field on the fixed grid (mm, LPS, "
              "resampling direction); the moving image (linear) and the moving labels (nearest neighbour) are "
              "resampled through it with SimpleITK, so all methods are measured by one code path.",
              "- **Dice** per label and their mean; **HD95**: the larger of the two directed 95th percentiles of "
              "surface-to-surface Euclidean distances in mm (surface: label voxels with a face neighbour outside).",
              "- **EPE**: mean |u - u_true| (mm) inside the mask, where the true field is known (simulated subjects).",
              "- **std log|J|** over voxels with J > 0 and **% J≤0**: Jacobian determinant of p -> p + u(p) by "
              "central differences (one-sided at the border), over the whole fixed grid.",
              "- **MSE** and **NLCC** (mean squared local NCC of the paper's Eq. 2, window 2r+1) on the [0, 1] "
              "intensities, inside the case's mask.",
              "- **s / pair**: wall time of the registration call (for SSMSR (s) rows other than the last scale: "
              "training time up to the end of that scale; on the cine, the sequence's time / pairs); **peak RSS**: "
              "peak resident memory above the level at the call's start, sampled every 20 ms (not measured "
              "separately for intermediate scales). The VoxelMorph-equivalent's training time is in its note.",
              "- mean ± standard deviation over the pairs of a case (no ± with a single pair).", ""]
    for result in results:
        case = result.case
        lines += [f"## {case.title} (`{case.name}`)", "", case.description, ""]
        if case.label_names:
            lines.append(f"- Labels: {case.label_source}.")
        lines += [f"- Mask for MSE/NLCC: {case.mask_source}.", f"- Case run time: {result.seconds:.0f} s.", ""]
        lines += case_table(result) + [""]
        notes = {row["method"]: row["note"] for row in result.rows if row["note"]}
        lines += [f"- {method}: {note}." for method, note in notes.items()]
        lines += ["", "Parameters:", ""]
        lines += [f"- **{method}**: `{text}`" if method == "ANTs SyN" else f"- **{method}**: {text}"
                  for method, text in result.parameters.items()]
        lines += [f"- **{method}**: not run: {why}." for method, why in result.skipped.items()]
        lines += [""] + [f"![{name}]({figure_prefix}{name})" for name in figures.get(case.name, [])] + [""]
    lines += ["## Summary", "", *headline_table(results), ""]
    lines += [f"![summary]({figure_prefix}{name})" for name in figures.get("summary", [])]
    return lines + [""]


def write_report(path: str, lines: List[str]) -> None:
    with open(path, "w", encoding="utf-8") as stream:
        stream.write("\n".join(lines))
