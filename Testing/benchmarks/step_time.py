"""Time per test-time training step of SSMSR on real images, as reported in the engine issue.

    python Testing/benchmarks/step_time.py [--device auto] [--steps 20]

Cases: a 48x64x48 crop of the ICBM152 T1 (2 mm, a hippocampus-sized 3D pair) and a
384x512 echocardiogram pair (two frames of pydicom's example cine, resized). One step is
a forward pass of the U-Net, the warp, the loss, the backward pass and the Adam update,
at full resolution (schedule "1"). The per-step time is the difference between a run of
5 + N steps and a run of 5 steps, divided by N, so set-up and warm-up cancel out.
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "SSMSRRegistration"))

from SSMSRRegistrationLib import sample_data  # noqa: E402
from SSMSRRegistrationLib.engine.multiscale import RegistrationSettings, register_tensors, resolve_device  # noqa: E402
from SSMSRRegistrationLib.engine.schedule import parse_scales  # noqa: E402
from SSMSRRegistrationLib.engine.spatial import resize_image  # noqa: E402


def to_tensor(array: np.ndarray) -> torch.Tensor:
    array = array.astype(np.float32)
    return torch.from_numpy((array - array.min()) / (array.max() - array.min()))[None, None]


def brain_pair():
    t1 = sample_data.brain_t1()
    fixed = sample_data.crop_and_shrink(t1, [50, 60, 60], [96, 128, 96], 2)
    moving = sample_data.crop_and_shrink(t1, [54, 56, 62], [96, 128, 96], 2)
    return to_tensor(sitk.GetArrayFromImage(fixed)), to_tensor(sitk.GetArrayFromImage(moving))


def echo_pair():
    frames = sample_data.echo_frames([0, 8])
    fixed, moving = (to_tensor(sitk.GetArrayFromImage(frame)) for frame in frames)
    return resize_image(fixed, (384, 512)), resize_image(moving, (384, 512))


def timed_run(fixed, moving, steps, device) -> float:
    settings = RegistrationSettings(scales=parse_scales("1"), steps_per_scale=steps)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    register_tensors(fixed, moving, settings, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per case")
    args = parser.parse_args()
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"device: {device} ({name}); torch {torch.__version__}")
    for label, (fixed, moving) in (("3D 48x64x48", brain_pair()), ("2D 384x512", echo_pair())):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        short = timed_run(fixed, moving, 5, device)
        long = timed_run(fixed, moving, 5 + args.steps, device)
        per_step = (long - short) / args.steps
        if device.type == "cuda":
            memory = f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB"
        else:
            memory = f"peak process RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"
        print(f"{label}: {per_step * 1000:.1f} ms per training step "
              f"(3500 steps: {per_step * 3500:.0f} s); {memory}")


if __name__ == "__main__":
    main()
