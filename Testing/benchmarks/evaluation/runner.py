"""Run every method on every case of a configuration and evaluate each field the same way."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import SimpleITK as sitk
import torch

from . import cases, echo
from .baselines import ANTS, DEMONS, ELASTIX
from .cases import Case
from .config import Config
from .methods import IDENTITY, SSMSR, SSR, VOXELMORPH, Method, MethodRun
from .metrics import evaluate_pair

CASE_BUILDERS: Dict[str, Callable[[Config], Case]] = {
    "hippocampus_crop": cases.hippocampus_crop,
    "whole_brain": cases.whole_brain,
    "individual_vs_icbm": cases.individual_vs_icbm,
    "echo_cine": echo.echo_cine,
}

#: Run and table order (the paper's: classical baselines, VoxelMorph, SSR, SSMSR).
METHODS: List[Method] = [IDENTITY, ANTS, ELASTIX, DEMONS, VOXELMORPH, SSR, SSMSR]

#: CSV columns, in order.
COLUMNS = ("case", "method", "pair", "label", "dice", "hd95_mm", "mse", "nlcc", "nlcc_radius_vox",
           "endpoint_error_mm", "std_log_jacobian", "percent_non_positive_jacobian", "seconds", "peak_rss_mib",
           "peak_gpu_mib", "device", "note")


@dataclass
class Example:
    """What the figures show of one method: the first pair's field and warped moving image (and labels)."""

    field: sitk.Image
    warped: sitk.Image


@dataclass
class CaseResult:
    """rows: CSV rows (dicts keyed by COLUMNS); parameters: method family -> exact settings; skipped: method
    family -> why it did not run; examples: row name -> first-pair outputs for the figures."""

    case: Case
    rows: List[dict] = field(default_factory=list)
    parameters: Dict[str, str] = field(default_factory=dict)
    skipped: Dict[str, str] = field(default_factory=dict)
    examples: Dict[str, Example] = field(default_factory=dict)
    seconds: float = 0.0


def _rows(case: Case, run: MethodRun, index: int, metrics: dict, labels: Dict[int, dict]) -> List[dict]:
    usage = run.usage[index]
    common = {"case": case.name, "method": run.method, "pair": case.pairs[index].name,
              "nlcc_radius_vox": case.nlcc_radius, "seconds": usage.seconds, "peak_rss_mib": usage.peak_rss_mib,
              "peak_gpu_mib": usage.peak_gpu_mib, "device": run.device, "note": run.note, **metrics}
    if not labels:
        return [{**common, "label": "", "dice": math.nan, "hd95_mm": math.nan}]
    return [{**common, "label": case.label_names[label], **values} for label, values in labels.items()]


def evaluate_run(case: Case, run: MethodRun, result: CaseResult) -> None:
    """Add the rows of one method's fields to ``result`` and keep its first pair for the figures."""
    for index, pair in enumerate(case.pairs):
        metrics, labels, warped = evaluate_pair(pair, run.fields[index], case.label_names, case.nlcc_radius)
        result.rows.extend(_rows(case, run, index, metrics, labels))
        if index == 0:
            result.examples[run.method] = Example(run.fields[0], warped)


def run_case(case: Case, config: Config, methods: List[Method], log: Callable[[str], None]) -> CaseResult:
    result = CaseResult(case)
    start = time.perf_counter()
    for method in methods:
        if method.missing:
            result.skipped[method.name] = method.missing
            log(f"  {method.name}: skipped, {method.missing}")
            continue
        result.parameters[method.name] = method.parameters(case, config)
        method_start = time.perf_counter()
        for run in method.run(case, config):
            evaluate_run(case, run, result)
        log(f"  {method.name}: {time.perf_counter() - method_start:.1f} s")
    result.seconds = time.perf_counter() - start
    return result


def configure_threads(threads: int) -> None:
    """Use ``threads`` CPU threads in torch, SimpleITK and ITK (elastix; ANTs reads the environment)."""
    torch.set_num_threads(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def run_all(config: Config, methods: Optional[List[Method]] = None,
            log: Callable[[str], None] = print) -> List[CaseResult]:
    """Build each case of ``config`` and run ``methods`` (default: all) on it."""
    configure_threads(config.threads)
    results = []
    for name in config.cases:
        built_at = time.perf_counter()
        case = CASE_BUILDERS[name](config)
        log(f"{name}: {len(case.pairs)} pair(s), grid {'x'.join(map(str, case.pairs[0].fixed.GetSize()))}, "
            f"built in {time.perf_counter() - built_at:.1f} s")
        results.append(run_case(case, config, methods or METHODS, log))
    return results
