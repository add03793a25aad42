"""Ablation of SSMSR's settings on the evaluation's real cases, with the classical baselines in the same run.

Each variant is ``register`` with a preset's pair schedule and steps (``--preset``, default fast; float32) plus
the changes the variant names, or for a cine (the echo case) ``track`` on the evaluated frames with the preset's cine
budget plus those changes, as the product tracks an echocardiogram (``--cine-as pairs``: ``register`` on each pair
instead); every pair is registered by every variant and by the baselines (``--baselines``:
ANTs SyN, elastix and demons with the full evaluation's settings, the paper's for ANTs and elastix, where
installed). Metrics as the evaluation harness computes them (MSE and NLCC inside the case's mask, Dice of the
labels, % folded).

    python Testing/benchmarks/ablation.py --cases echo_cine --pairs 14 --variants "mse 0,mse 300,mse 1000"

Variants "seed 0" .. "seed 9" rerun the preset with another seed: the table then ends with the spread over the seeds
(the run-to-run spread that accuracy tests' margins come from).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from typing import Dict, List

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from evaluation import cases as case_library
from evaluation.baselines import ANTS, DEMONS, ELASTIX
from evaluation.config import FULL
from evaluation.echo import echo_cine
from evaluation.methods import cine_of, mask_stack
from evaluation.metrics import evaluate_pair
from SSMSRRegistrationLib import register, track
from SSMSRRegistrationLib.common.protocol import FOLDED_PERCENT
from SSMSRRegistrationLib.engine.metrics import REGISTER_FOLDED_KEY
from SSMSRRegistrationLib.workflows.provenance import cpu_model

#: One change each: register() keyword arguments on top of the preset in float32; a variant joins them with "+"
#: ("lambda 3+lr 3e-3").
CHANGES: Dict[str, dict] = {
    "preset": {},  # the preset as it is
    "lambda 10": {"smoothness_weight": 10.0},
    "lambda 3": {"smoothness_weight": 3.0},
    "lambda 1": {"smoothness_weight": 1.0},
    "window x1.5": {"ncc_window_scale": 1.5},
    "window x0.67": {"ncc_window_scale": 2 / 3},
    "lr 3e-3": {"learning_rate": 3e-3},
    "lr 1e-3": {"learning_rate": 1e-3},
    "mse 0": {"mse_weight": 0.0},
    "mse 300": {"mse_weight": 300.0},
    "mse 1000": {"mse_weight": 1000.0},
    "steps 200": {"steps": 200},
    "steps 300": {"steps": 300},
    "steps 1000": {"steps": 1000},
    "stop 50": {"stop_window": 50, "stop_tolerance": 2e-4},
    **{f"seed {seed}": {"seed": seed} for seed in range(10)},
}
BASELINES = {"ants": ANTS, "elastix": ELASTIX, "demons": DEMONS}


def variant_options(variant: str) -> dict:
    """register() keyword arguments of a variant: its changes joined by "+"."""
    options: dict = {}
    for change in variant.split("+"):
        if change.strip() not in CHANGES:
            raise SystemExit(f"unknown change {change!r}; choose from: {', '.join(CHANGES)}")
        options.update(CHANGES[change.strip()])
    return options


def pair_metrics(case, pair, field) -> dict:
    metrics, labels, _ = evaluate_pair(pair, field, case.label_names, case.nlcc_radius)
    dice = float(np.mean([values["dice"] for values in labels.values()])) if labels else float("nan")
    return {"mse": metrics["mse"], "nlcc": metrics["nlcc"], "dice": dice,
            FOLDED_PERCENT: metrics[REGISTER_FOLDED_KEY]}


def with_window(case, options: dict) -> dict:
    """``options`` with a window scale turned into the NCC window in voxels."""
    options = dict(options)
    scale = options.pop("ncc_window_scale", None)
    if scale is not None:
        options["ncc_window"] = int(round((5 if case.dimension == 3 else 6) * scale))
    return options


def run_variant(case, pair, preset: str, options: dict) -> dict:
    options = with_window(case, options)
    start = time.perf_counter()
    output = register(pair.fixed, pair.moving, fixed_mask=pair.mask if case.masked_registration else None,
                      initial="none", preset=preset, precision="float32", device="cpu", **options)
    return {"seconds": time.perf_counter() - start, **pair_metrics(case, pair, output.field)}


def track_variant(case, preset: str, options: dict) -> List[dict]:
    """One ``track`` of the case's evaluated frames; per pair its metrics and the sequence's seconds per pair."""
    options = with_window(case, options)
    if "stop_window" in options:
        raise SystemExit("convergence-based stopping is for pairs only; use --cine-as pairs")
    start = time.perf_counter()
    result = track(cine_of(case), mask=mask_stack(case), preset=preset, precision="float32", device="cpu",
                   **options)
    seconds = (time.perf_counter() - start) / len(case.pairs)
    return [{"seconds": seconds, **pair_metrics(case, pair, result.field(number))}
            for number, pair in enumerate(case.pairs, start=1)]


def echo_cine_held_out(config):
    """The echo cine's other pairs (frames 15..29 in the full configuration: the pairs the evaluation keeps for
    training VoxelMorph), a second echo case that the cine settings were not chosen on."""
    case = echo_cine(config)
    return replace(case, name="echo_cine_held_out", pairs=case.training, training=[])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="echo_cine",
                        help="echo_cine, echo_cine_held_out, hippocampus_crop, individual_vs_icbm (comma-separated)")
    parser.add_argument("--pairs", type=int, default=3, help="pairs per case (default: 3; 0: all)")
    parser.add_argument("--preset", default="fast", help="the preset the variants change (default: fast)")
    parser.add_argument("--variants", default="lambda 10,lambda 3,lambda 1",
                        help=f"comma-separated; each one change or several joined by '+', from: {', '.join(CHANGES)}")
    parser.add_argument("--cine-as", choices=("track", "pairs"), default="track",
                        help="a cine's variants: track the evaluated frames (default) or register each pair")
    parser.add_argument("--baselines", default=",".join(BASELINES), help=f"from: {', '.join(BASELINES)} (or none)")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    config = replace(FULL, training_pairs=0, synthetic_test_pairs=args.pairs or FULL.synthetic_test_pairs,
                     device="cpu")
    variants = {variant: variant_options(variant) for variant in args.variants.split(",")}
    baselines = [BASELINES[name] for name in args.baselines.split(",") if name and name != "none"]
    builders = {"echo_cine": echo_cine, "echo_cine_held_out": echo_cine_held_out,
                "hippocampus_crop": case_library.hippocampus_crop,
                "individual_vs_icbm": case_library.individual_vs_icbm}
    print(f"# Ablation, {args.preset} preset in float32, {cpu_model()}, {os.cpu_count()} CPUs, "
          f"{time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    rows: List[dict] = []
    for name in args.cases.split(","):
        case = builders[name](config)
        case = replace(case, pairs=case.pairs[:args.pairs or None])
        tracked = case.sequence and args.cine_as == "track"
        for variant, options in variants.items():
            method = f"SSMSR {'track ' if tracked else ''}{variant}"
            results = (track_variant(case, args.preset, options) if tracked
                       else [run_variant(case, pair, args.preset, options) for pair in case.pairs])
            for pair, result in zip(case.pairs, results):
                rows.append({"case": name, "method": method, "pair": pair.name, **result})
                print(json.dumps(rows[-1]), flush=True)
        for baseline in baselines:
            if baseline.missing:
                print(f"{baseline.name}: skipped, {baseline.missing}")
                continue
            run = baseline.run(case, config)[0]
            for pair, field, usage in zip(case.pairs, run.fields, run.usage):
                rows.append({"case": name, "method": baseline.name, "pair": pair.name, "seconds": usage.seconds,
                             **pair_metrics(case, pair, field)})
                print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as stream:
            json.dump(rows, stream, indent=1)
    print("\n| case | method | MSE (1e-3) | NLCC | Dice (%) | % folded | s per pair |")
    print("|---|---|---|---|---|---|---|")
    for case in dict.fromkeys(row["case"] for row in rows):
        for method in dict.fromkeys(row["method"] for row in rows if row["case"] == case):
            chosen = [row for row in rows if row["case"] == case and row["method"] == method]
            mean = lambda key: float(np.mean([row[key] for row in chosen]))  # noqa: E731
            print(f"| {case} | {method} | {1000 * mean('mse'):.4f} | {mean('nlcc'):.4f} | {100 * mean('dice'):.2f} | "
                  f"{mean('folded_percent'):.3f} | {mean('seconds'):.1f} |")
    print_seed_spread(rows)


def print_seed_spread(rows: List[dict]) -> None:
    """Per case, the mean, standard deviation and range over the "seed N" variants of their pair-mean metrics."""
    seeded = [row for row in rows if row["method"].split()[-2:-1] == ["seed"]]
    if not seeded:
        return
    print("\n| case | seeds | MSE (1e-3) mean +- sd [min, max] | NLCC | Dice (%) | % folded |")
    print("|---|---|---|---|---|---|")
    scales = {"mse": 1000, "nlcc": 1, "dice": 100, "folded_percent": 1}
    for case in dict.fromkeys(row["case"] for row in seeded):
        methods = list(dict.fromkeys(row["method"] for row in seeded if row["case"] == case))
        cells = []
        for key, scale in scales.items():
            values = np.array([scale * np.mean([row[key] for row in seeded if row["case"] == case
                                                and row["method"] == method]) for method in methods])
            cells.append(f"{values.mean():.4f} +- {values.std(ddof=1) if len(values) > 1 else 0:.4f} "
                         f"[{values.min():.4f}, {values.max():.4f}]")
        print(f"| {case} | {len(methods)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
