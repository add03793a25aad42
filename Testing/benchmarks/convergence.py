"""Convergence-based stopping: steps saved, and what it costs in accuracy, on the evaluation's real cases.

Every pair is registered with the `fast` preset's pair schedule and --steps per scale as the budget (float32
unless --precision mixed): with the full budget, and with each stopping rule of --rules (window:tolerance); the
table gives the training steps, the seconds, and the change of mean Dice, MSE and NLCC against the full budget.
Cases: the evaluation's simulated-subject hippocampus crop (48x64x48 at 2 mm, 2 subjects, known labels) and the
first consecutive pairs of pydicom's echocardiogram.

    python Testing/benchmarks/convergence.py --out /tmp/convergence --steps 600   # about 40 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from evaluation import cases as case_library
from evaluation.config import QUICK
from evaluation.echo import echo_cine
from evaluation.metrics import evaluate_pair
from SSMSRRegistrationLib import register
from SSMSRRegistrationLib.common.protocol import FOLDED_PERCENT
from SSMSRRegistrationLib.common.run_config import RunConfiguration
from SSMSRRegistrationLib.engine.metrics import REGISTER_FOLDED_KEY


def run_pair(case, pair, precision, steps, rule):
    window, tolerance = rule
    start = time.perf_counter()
    output = register(pair.fixed, pair.moving, fixed_mask=pair.mask if case.masked_registration else None,
                      initial="none", preset="fast", steps=steps, precision=precision, device="cpu",
                      stop_window=window, stop_tolerance=tolerance)
    seconds = time.perf_counter() - start
    metrics, labels, _ = evaluate_pair(pair, output.field, case.label_names, case.nlcc_radius)
    dice = float(np.mean([values["dice"] for values in labels.values()])) if labels else float("nan")
    return {"steps": sum(output.metrics["steps_trained"]), "seconds": seconds, "dice": dice, "mse": metrics["mse"],
            "nlcc": metrics["nlcc"], FOLDED_PERCENT: metrics[REGISTER_FOLDED_KEY]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for results.json")
    parser.add_argument("--rules", default="50:0.0002", help="window:tolerance, comma-separated")
    parser.add_argument("--steps", type=int, default=600, help="step budget per scale (default: 600)")
    parser.add_argument("--cases", default="echo_cine,hippocampus_crop", help="comma-separated")
    parser.add_argument("--echo-pairs", type=int, default=3, help="consecutive echo pairs (default: 3)")
    parser.add_argument("--brain-pairs", type=int, default=2, help="simulated subjects (default: 2)")
    parser.add_argument("--precision", default="float32", choices=("float32", "mixed"))
    args = parser.parse_args()
    rules = [(0, 0.0)] + [(int(w), float(t)) for w, t in (item.split(":") for item in args.rules.split(","))]
    config = replace(QUICK, training_pairs=0)
    library = {"hippocampus_crop": lambda: (case_library.hippocampus_crop(config), args.brain_pairs),
               "echo_cine": lambda: (echo_cine(config), args.echo_pairs)}
    chosen = [library[name]() for name in args.cases.split(",")]
    os.makedirs(args.out, exist_ok=True)
    preset = RunConfiguration.of("fast").resolve("pair")
    print(f"# Convergence-based stopping, fast preset pairs ({preset.scales} x {args.steps} steps, "
          f"{args.precision}), {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs", flush=True)
    rows = []
    for case, limit in chosen:
        for pair in case.pairs[:limit]:
            for rule in rules:
                row = {"case": case.name, "pair": pair.name, "window": rule[0], "tolerance": rule[1],
                       **run_pair(case, pair, args.precision, args.steps, rule)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as stream:
        json.dump(rows, stream, indent=1)
    print("\n| case | pair | rule | steps | seconds | dDice | dMSE % | dNLCC |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        full = next(r for r in rows if r["case"] == row["case"] and r["pair"] == row["pair"] and r["window"] == 0)
        rule = "full budget" if row["window"] == 0 else f"{row['window']}:{row['tolerance']:g}"
        print(f"| {row['case']} | {row['pair']} | {rule} | {row['steps']} | {row['seconds']:.0f} | "
              f"{row['dice'] - full['dice']:+.4f} | {100 * (row['mse'] / full['mse'] - 1):+.2f} | "
              f"{row['nlcc'] - full['nlcc']:+.4f} |")


if __name__ == "__main__":
    main()
