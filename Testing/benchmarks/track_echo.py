"""Benchmark: track pydicom's 30-frame echocardiogram and print time per sequence and MSE/NLCC vs identity.

    python Testing/benchmarks/track_echo.py [--preset paper|fast] [--scales S] [--steps N] [--batch 1] [--device cpu]
        [--paper-size]

Prints one row per scale of the schedule (the field after that scale, as the SSMSR (s) rows of the paper's
Table II) and the identity, with mean +/- standard deviation over the 29 pairs of MSE (1e-3) and NLCC (1e-1),
inside the paper's default masks, on intensities divided by 255; then the time per sequence and of each scale (its
training, and the previous scale's prediction of every pair). ``--paper-size``: the paper's cine size instead,
49 frames of 1024x768 (the cine played forward then back, frames resized linearly, as ``speed.py`` builds it).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "SSMSRRegistration"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from SSMSRRegistrationLib.imaging import sample_data
from SSMSRRegistrationLib.common.presets import DEFAULT_PRESET
from SSMSRRegistrationLib.interfaces.api import save_tracking
from SSMSRRegistrationLib.engine.metrics import pair_metrics
from SSMSRRegistrationLib.workflows.track import track


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=DEFAULT_PRESET, help="the schedule, steps and precision not given")
    parser.add_argument("--scales", default=None)
    parser.add_argument("--steps", type=int, default=None, help="training steps per scale for the sequence")
    parser.add_argument("--precision", default=None, help="mixed or float32")
    parser.add_argument("--batch", type=int, default=1, help="frame pairs per step")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="also save the tracking outputs (fields, CSV, GIF, PNG) into this new folder")
    parser.add_argument("--paper-size", action="store_true", help="49 frames of 1024x768 (the cine resized)")
    args = parser.parse_args()

    cine = sample_data.echo_cine_path()
    if args.paper_size:
        from speed import echo_sequence

        cine = [sitk.GetImageFromArray(frame[0].numpy()) for frame in echo_sequence(49)]
    scale_seconds = {}

    def time_scales(event: dict) -> None:
        if event.get("event") == "progress":
            scale_seconds[event["scale"]] = event["elapsed_s"]

    start = time.perf_counter()
    result = track(cine, preset=args.preset, scales=args.scales, steps=args.steps, precision=args.precision,
                   batch_size=args.batch, device=args.device, seed=args.seed, progress=time_scales)
    per_sequence = time.perf_counter() - start

    frames = torch.from_numpy(result.cine.frames)[:, None]
    masks = torch.from_numpy(result.masks[1:, None].astype(np.float32))
    rows = [("identity", result.metrics["mse_identity"], result.metrics["nlcc_identity"])]
    for scale, displacements in zip(result.settings.scales, result.displacements_per_scale):
        metrics = pair_metrics(frames[1:], frames[:-1], displacements, masks)
        rows.append((f"SSMSR ({scale})", metrics["mse"], metrics["nlcc"]))

    frames_count, height, width = result.cine.frames.shape
    source = "pydicom's echo cine resized" if args.paper_size else sample_data.echo_cine_path()
    print(f"cine: {source} ({frames_count} frames, {width}x{height}, {frames_count - 1} pairs)")
    settings = result.settings
    print(f"preset {args.preset}: schedule {','.join(str(s) for s in settings.scales)}, {settings.steps_per_scale} "
          f"steps per scale for the sequence, mixed precision {settings.mixed_precision}, batch {args.batch}, "
          f"seed {args.seed}; device {result.device} ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__})")
    print(f"{'method':<16}{'MSE (1e-3)':>22}{'NLCC (1e-1)':>22}")
    for name, mse, nlcc in rows:
        print(f"{name:<16}{1e3 * mse.mean():>12.4f} +/- {1e3 * mse.std():<6.4f}"
              f"{10 * nlcc.mean():>12.4f} +/- {10 * nlcc.std():<6.4f}")
    print(f"time per sequence: {per_sequence:.1f} s (test-time training {result.seconds:.1f} s, "
          f"{per_sequence / (frames_count - 1):.2f} s per pair)")
    ends = list(scale_seconds.values())
    print("by scale, from the previous scale's last step (its prediction included): "
          + ", ".join(f"{scale} {end - before:.1f} s"
                      for scale, end, before in zip(scale_seconds, ends, [0.0] + ends[:-1])))
    if args.output:
        outputs = save_tracking(result, args.output)
        print(f"outputs: {outputs['folder']}")


if __name__ == "__main__":
    main()
