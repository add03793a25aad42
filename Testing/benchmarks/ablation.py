"""Ablation of SSMSR's settings on the evaluation's real cases, with the classical baselines in the same run.

Each variant is ``register`` with the `fast` preset's pair schedule and steps (float32) plus one change; every pair
is registered by every variant and by ANTs SyN (paper settings), elastix and demons (the harness's baselines,
where installed). Metrics as the evaluation harness computes them (MSE and NLCC inside the case's mask, Dice of the
labels, % folded).

    python Testing/benchmarks/ablation.py --cases echo_cine --pairs 3 --variants "lambda 10,lambda 3,lambda 1"
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

from evaluation import cases as case_library  # noqa: E402
from evaluation.baselines import ANTS, DEMONS, ELASTIX  # noqa: E402
from evaluation.config import QUICK  # noqa: E402
from evaluation.echo import echo_cine  # noqa: E402
from evaluation.measure import cpu_name  # noqa: E402
from evaluation.metrics import evaluate_pair  # noqa: E402
from SSMSRRegistrationLib import register  # noqa: E402

#: The variants: register() keyword arguments on top of the fast preset in float32.
VARIANTS: Dict[str, dict] = {
    "lambda 10": {"smoothness_weight": 10.0},
    "lambda 3": {"smoothness_weight": 3.0},
    "lambda 1": {"smoothness_weight": 1.0},
    "window x1.5": {"ncc_window_scale": 1.5},
    "lr 3e-3": {"learning_rate": 3e-3},
}


def pair_metrics(case, pair, field) -> dict:
    metrics, labels, _ = evaluate_pair(pair, field, case.label_names, case.nlcc_radius)
    dice = float(np.mean([values["dice"] for values in labels.values()])) if labels else float("nan")
    return {"mse": metrics["mse"], "nlcc": metrics["nlcc"], "dice": dice,
            "folded_percent": metrics["percent_non_positive_jacobian"]}


def run_variant(case, pair, options: dict) -> dict:
    options = dict(options)
    scale = options.pop("ncc_window_scale", None)
    if scale is not None:
        options["ncc_window"] = int(round((5 if case.dimension == 3 else 6) * scale))
    start = time.perf_counter()
    output = register(pair.fixed, pair.moving, fixed_mask=pair.mask if case.masked_registration else None,
                      initial="none", preset="fast", precision="float32", device="cpu", **options)
    return {"seconds": time.perf_counter() - start, **pair_metrics(case, pair, output.field)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="echo_cine", help="echo_cine, hippocampus_crop (comma-separated)")
    parser.add_argument("--pairs", type=int, default=3, help="pairs per case (default: 3)")
    parser.add_argument("--variants", default="lambda 10,lambda 3,lambda 1", help=f"from: {', '.join(VARIANTS)}")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    config = replace(QUICK, training_pairs=0, synthetic_test_pairs=args.pairs, device="cpu")
    builders = {"echo_cine": echo_cine, "hippocampus_crop": case_library.hippocampus_crop}
    print(f"# Ablation, fast preset schedule in float32, {cpu_name()}, {os.cpu_count()} CPUs, "
          f"{time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    rows: List[dict] = []
    for name in args.cases.split(","):
        case = builders[name](config)
        case = replace(case, pairs=case.pairs[:args.pairs])
        for variant in args.variants.split(","):
            for pair in case.pairs:
                rows.append({"case": name, "method": f"SSMSR {variant}", "pair": pair.name,
                             **run_variant(case, pair, VARIANTS[variant])})
                print(json.dumps(rows[-1]), flush=True)
        for baseline in (ANTS, ELASTIX, DEMONS):
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


if __name__ == "__main__":
    main()
