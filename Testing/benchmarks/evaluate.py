"""Evaluate SSMSR side by side with its ablations and with ANTs, elastix and demons on real images.

    python Testing/benchmarks/evaluate.py [--quick | --tiny] --out DIR [--device auto] [--threads N]

Writes DIR/results.csv (one row per case x method x pair x label), DIR/report.md (tables, parameters,
device, date, command) and DIR/*.png. Without --quick/--tiny it runs the full configuration (the paper's
steps and iterations; meant for a GPU machine, days on a CPU). --quick took 20.7 minutes on 2 CPU cores
shared with other jobs (see RESULTS.md); --tiny takes about 30 s and only checks that everything runs (the
test suite uses it).
ANTs (antspyx) and elastix (itk-elastix) are optional: pip install .[bench]; without them their rows are absent
and the report says why.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import time
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "SSMSRRegistration"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

from evaluation.config import ALL_CASES, PRESETS, Config
from evaluation.figures import write_figures
from evaluation.report import report_lines, write_csv, write_report
from evaluation.runner import CaseResult, run_all
from SSMSRRegistrationLib.engine.multiscale import resolve_device
from SSMSRRegistrationLib.workflows.provenance import cpu_model

PACKAGES = ("torch", "SimpleITK", "numpy", "antspyx", "itk-elastix", "nilearn", "nibabel", "pydicom")


def _versions() -> str:
    found = []
    for package in PACKAGES:
        try:
            found.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            found.append(f"{package} not installed")
    return ", ".join(found)


def provenance(config: Config, command: str, seconds: float, load_at_start: str) -> Dict[str, str]:
    device = resolve_device(config.device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none (SSMSR ran on the CPU)"
    return {"command": f"`{command}`", "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": f"{cpu_model()}, {os.cpu_count()} logical CPUs, {config.threads} threads used; "
                       f"{platform.system()} {platform.release()}, Python {platform.python_version()}",
            "GPU": gpu, "packages": _versions(), "total wall time": f"{seconds / 60:.1f} min",
            "load average (1, 5, 15 min) at start / end": f"{load_at_start} / {_load()}",
            "configuration": ", ".join(f"{key}={value}" for key, value in config.as_dict().items())}


def _load() -> str:
    """The system's load averages: other processes sharing the CPUs slow every timing down."""
    return ", ".join(f"{value:.1f}" for value in os.getloadavg())


def evaluate(config: Config, out: str, command: str, log=print) -> List[CaseResult]:
    """Run ``config``, write results.csv, report.md and the figures into ``out`` (created)."""
    os.makedirs(out, exist_ok=True)
    start, load_at_start = time.perf_counter(), _load()
    results = run_all(config, log=log)
    write_csv(results, os.path.join(out, "results.csv"))
    figures = write_figures(results, out)
    lines = report_lines(results, config, provenance(config, command, time.perf_counter() - start, load_at_start),
                         figures)
    write_report(os.path.join(out, "report.md"), lines)
    log(f"wrote {out}/results.csv, report.md and {sum(len(v) for v in figures.values())} figures "
        f"in {(time.perf_counter() - start) / 60:.1f} min")
    return results


def parse_arguments(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="about 20 minutes on a 2-core CPU")
    size.add_argument("--tiny", action="store_true", help="seconds; checks the plumbing (the test uses it)")
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--device", default="auto", help="torch device for SSMSR: auto, cpu, cuda, cuda:N")
    parser.add_argument("--threads", type=int, help="CPU threads for every method (default: all cores)")
    parser.add_argument("--cases", help=f"comma-separated subset of {','.join(ALL_CASES)}")
    return parser.parse_args(argv)


def config_from(arguments: argparse.Namespace) -> Config:
    config = PRESETS["quick" if arguments.quick else "tiny" if arguments.tiny else "full"]
    changes = {"device": arguments.device}
    if arguments.threads:
        changes["threads"] = arguments.threads
    if arguments.cases:
        chosen = tuple(name.strip() for name in arguments.cases.split(","))
        unknown = sorted(set(chosen) - set(ALL_CASES))
        if unknown:
            raise SystemExit(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(ALL_CASES)}")
        changes["cases"] = chosen
    return replace(config, **changes)


def main(argv: Optional[List[str]] = None) -> None:
    arguments = parse_arguments(argv)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0]] + (argv if argv is not None else sys.argv[1:]))
    evaluate(config_from(arguments), arguments.out, command)


if __name__ == "__main__":
    main()
