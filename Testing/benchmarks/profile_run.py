"""Where the time of one registration goes: register's stages, and the parts of its training steps (issue 24).

    python Testing/benchmarks/profile_run.py [--preset balanced] [--steps 20] [--patch N] [--json FILE]

The harness's 1 mm whole-brain pair (as ``speed.py --sections wholebrain``: the simulated subject on the ICBM152
brain's bounding box, and the template) goes through ``register`` with the default affine pre-alignment, the
preset's schedule and N steps per scale, under cProfile. Printed: the cumulative seconds of each of register's
stages (reading, the working-grid plan and its time probe, the pre-alignment, building the tensors, training,
composing and warping, the metrics) and, inside training, of the parts of the steps (U-Net forward with warp and
loss, backward, Adam) and of the work between them (the field predicted after each scale, tiled where the scale
trained on patches; resampling the pair for the next scale). Totals include cProfile's own overhead (small next to
these operations). Run it under ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` to see a CPU without
bfloat16 (docs/testing.md).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import platform
import pstats
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Dict, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "SSMSRRegistration"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from evaluation.cases import whole_brain
from evaluation.config import FULL
from SSMSRRegistrationLib.engine.unet import bfloat16_supported
from SSMSRRegistrationLib.workflows.provenance import cpu_model
from SSMSRRegistrationLib.workflows.register import register

#: (file ending, function name) -> what it is, in the order printed. Stages first, then the parts of training.
PARTS: Dict[Tuple[str, str], str] = {
    ("workflows/register.py", "_read_inputs"): "stage: reading the images",
    ("workflows/register.py", "_plan_grid"): "stage: working-grid plan (memory, time probe)",
    ("workflows/register.py", "_pre_align"): "stage: affine pre-alignment (SimpleITK)",
    ("workflows/register.py", "_build_tensors"): "stage: resampling onto the working grid, tensors",
    ("workflows/register.py", "_train"): "stage: test-time training (all scales)",
    ("workflows/register.py", "_compose_and_warp"): "stage: composing the field, warping the moving image",
    ("workflows/register.py", "_measure"): "stage: metrics (NCC, MSE, folding)",
    ("engine/multiscale.py", "training_loss"): "training: U-Net forward, warp and loss of the steps",
    ("engine/unet.py", "predict"): "  of which the U-Net forward (steps and predictions after each scale)",
    ("engine/spatial.py", "warp"): "  of which warps (all calls)",
    ("engine/losses.py", "registration_loss"): "  of which the loss (NCC and smoothness)",
    ("~", "<method 'run_backward' of 'torch._C._EngineBase' objects>"): "training: backward passes",
    ("engine/optimizer.py", "step"): "training: Adam steps",
    ("engine/patches.py", "predict_tiled"): "training: field predicted in tiles after a patched scale",
    ("engine/patches.py", "draw"): "training: drawing the patches",
    ("engine/multiscale.py", "scale_pair"): "training: resampling the pair for each scale",
}


def part_seconds(stats: pstats.Stats) -> Dict[str, Tuple[float, int]]:
    """Cumulative seconds and calls of each of PARTS found in ``stats``."""
    found: Dict[str, Tuple[float, int]] = {}
    for (filename, _, function), (_, calls, _, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
        for (ending, name), label in PARTS.items():
            if function == name and filename.replace("\\", "/").endswith(ending):
                seconds, count = found.get(label, (0.0, 0))
                found[label] = (seconds + cumulative, count + calls)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="balanced")
    parser.add_argument("--steps", type=int, default=20, help="training steps per scale (default: 20)")
    parser.add_argument("--patch", type=int, help="the training patch (default: the preset's)")
    parser.add_argument("--spacing", type=float, default=1.0, help="the pair's voxel size in mm (default: 1)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args()

    config = replace(FULL, cases=("whole_brain",), whole_brain_spacing_mm=args.spacing, synthetic_test_pairs=1,
                     training_pairs=0, device="cpu")
    pair = whole_brain(config).pairs[0]
    mixed = bfloat16_supported(torch.device("cpu"))
    print(f"# profile of one registration, {time.strftime('%Y-%m-%d %H:%M')}: {cpu_model()}, "
          f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, CPU instruction set used by torch "
          f"{torch.backends.cpu.get_cpu_capability()}, bfloat16 {'native' if mixed else 'not native (float32)'}")
    print(f"pair: {'x'.join(map(str, pair.fixed.GetSize()))} voxels at {args.spacing:g} mm; preset {args.preset}, "
          f"{args.steps} steps per scale, patch {args.patch if args.patch is not None else 'automatic'}")

    events = []
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    output = register(pair.fixed, pair.moving, preset=args.preset, steps=args.steps, patch_size=args.patch,
                      device="cpu", progress=events.append)
    profiler.disable()
    total = time.perf_counter() - start
    started = next(event for event in events if event["event"] == "started")
    print(f"plan: {started.get('plan')}")
    print(f"total {total:.1f} s under cProfile ({output.metrics['seconds']:.1f} s of training by the engine's clock)")
    found = part_seconds(pstats.Stats(profiler))
    print("\n| part | seconds | calls |\n|---|---|---|")
    for label in PARTS.values():
        seconds, calls = found.get(label, (0.0, 0))
        print(f"| {label} | {seconds:.1f} | {calls} |")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "cpu": cpu_model(), "capability": torch.backends.cpu.get_cpu_capability(), "bfloat16": mixed,
            "python": platform.python_version(), "torch": torch.__version__, "preset": args.preset,
            "steps": args.steps, "patch": args.patch, "plan": started.get("plan"), "total_seconds": total,
            "parts": {label: {"seconds": seconds, "calls": calls} for label, (seconds, calls) in found.items()}},
            indent=2))


if __name__ == "__main__":
    main()
