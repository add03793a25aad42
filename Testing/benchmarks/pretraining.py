"""Pretraining benefit: steps of test-time training to reach a given NCC, from scratch vs from a pretrained model.

Real images: axial slices of nilearn's ICBM152 T1 template (every 6th level from 50 to 134, 2 or 4 mm pixels),
each deformed by a smooth random field (Gaussian-filtered noise, peak 3 pixels), make the collection; held-out
pairs are slices at other levels under other deformations. A model is pretrained with ``training.train`` (files
on disk, as ``ssmsr train``), then each held-out pair is registered with budgets of test-time training steps per
scale, from scratch and from the model; the target is the NCC that scratch reaches with the largest budget.

    python Testing/benchmarks/pretraining.py --pixel-mm 4 --steps 300 --threads 1
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "SSMSRRegistration"))

from SSMSRRegistrationLib.imaging import sample_data
from SSMSRRegistrationLib.engine.multiscale import RegistrationSettings, register_tensors, similarity
from SSMSRRegistrationLib.engine.spatial import gaussian_blur, warp
from SSMSRRegistrationLib.workflows.train import train

TRAINING_LEVELS = range(50, 140, 6)
HELD_OUT_LEVELS = (63, 87, 111)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pixel-mm", type=int, choices=(2, 4), default=4)
    parser.add_argument("--steps", type=int, default=300, help="pretraining steps per scale")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--scales", default="1/2,1")
    parser.add_argument("--budgets", default="0,5,10,20,40,80,160", help="test-time steps per scale to try")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    step = args.pixel_mm
    volume = sitk.GetArrayFromImage(sample_data.brain_t1())

    def brain(level):
        image = volume[level, 20:212:step, 10:186:step].astype(np.float32)
        return (image - image.min()) / (image.max() - image.min())

    def deformed(image, seed):
        noise = torch.randn((1, 2) + image.shape, generator=torch.Generator().manual_seed(seed))
        field = gaussian_blur(noise, [10.0 / step, 10.0 / step] if step == 2 else [5.0, 5.0])
        field = field * (3.0 / field.abs().max())
        return warp(torch.from_numpy(image)[None, None], field)[0, 0].numpy()

    with tempfile.TemporaryDirectory() as folder:
        rows = []
        for index, level in enumerate(TRAINING_LEVELS):
            for name, array in (("fixed", brain(level)), ("moving", deformed(brain(level), 100 + index))):
                image = sitk.GetImageFromArray(array)
                image.SetSpacing((float(step), float(step)))
                sitk.WriteImage(image, os.path.join(folder, f"{name}{level}.nii.gz"))
            rows.append((f"fixed{level}.nii.gz", f"moving{level}.nii.gz"))
        with open(os.path.join(folder, "pairs.csv"), "w", newline="", encoding="utf-8") as stream:
            csv.writer(stream).writerows(rows)
        start = time.perf_counter()
        result = train(os.path.join(folder, "pairs.csv"), os.path.join(folder, "model.pt"), scales=args.scales,
                       steps=args.steps, batch_size=args.batch, validation_every=max(args.steps // 5, 1),
                       device="cpu")
        training_seconds = time.perf_counter() - start
    model = result.model
    print(f"pretrained {model.describe()} in {training_seconds:.1f} s; validation loss per scale "
          f"{result.summary['validation_loss_per_scale']}")

    budgets = [int(b) for b in args.budgets.split(",")]
    report = {"pixel_mm": step, "pretraining_steps": args.steps, "batch": args.batch, "scales": args.scales,
              "training_seconds": training_seconds, "pairs": []}
    for number, level in enumerate(HELD_OUT_LEVELS):
        fixed = torch.from_numpy(brain(level))[None, None]
        moving = torch.from_numpy(deformed(brain(level), 900 + number))[None, None]
        identity = similarity(fixed, moving, None, 6)["ncc"]
        curves = {}
        for name, networks in (("scratch", None), ("pretrained", model.networks)):
            curves[name] = {}
            for budget in budgets:
                if budget == 0 and networks is None:
                    curves[name][0] = identity
                    continue
                settings = RegistrationSettings(scales=model.scales, steps_per_scale=budget)
                field = register_tensors(fixed, moving, settings, initial_networks=networks, device="cpu").displacement
                curves[name][budget] = similarity(fixed, moving, field, 6)["ncc"]
        target = curves["scratch"][budgets[-1]]
        reach = {name: next((b for b in budgets if curve[b] >= target), None) for name, curve in curves.items()}
        print(f"level {level}: identity NCC {identity:.4f}, target (scratch at {budgets[-1]}) {target:.4f}; "
              f"steps per scale to reach it: scratch {reach['scratch']}, pretrained {reach['pretrained']}")
        for name, curve in curves.items():
            print(f"  {name:>10}: " + "  ".join(f"{b}:{v:.4f}" for b, v in curve.items()))
        report["pairs"].append({"level": level, "identity": identity, "target": target, "steps_to_target": reach,
                                "ncc": curves})
    if args.json:
        with open(args.json, "w", encoding="utf-8") as stream:
            json.dump(report, stream, indent=1)


if __name__ == "__main__":
    main()
