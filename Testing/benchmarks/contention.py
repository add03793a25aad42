"""A registration next to another busy one on the same cores: wall time alone and two at once, with the OpenMP wait
policy the ``ssmsr`` command now chooses (passive, threads from the CPU affinity and quota) against the former
default (active spinning, emulated with OMP_WAIT_POLICY=ACTIVE), in one run.

    python Testing/benchmarks/contention.py [--steps 60] [--repeats 1] [--json FILE]

Each case runs ``python -m SSMSRRegistrationLib register`` on two frames of pydicom's echo cine (320x240),
``--scales 1/2,1 --steps N --device cpu``, as separate processes started together. Run it on an otherwise idle
machine; the header prints the CPU, its core count and whether it has native bfloat16.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "SSMSRRegistration"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from SSMSRRegistrationLib.imaging import sample_data  # noqa: E402
from SSMSRRegistrationLib.interfaces.threads import available_cores  # noqa: E402
from SSMSRRegistrationLib.workflows.provenance import cpu_model  # noqa: E402


def bfloat16_text() -> str:
    import torch

    from SSMSRRegistrationLib.engine.unet import bfloat16_supported

    return "native bfloat16" if bfloat16_supported(torch.device("cpu")) else "no native bfloat16 (float32 runs)"


def run_together(count: int, pair, steps: int, environment: dict, folder: Path) -> list[float]:
    """Start ``count`` registrations at once; their wall times in seconds."""
    fixed, moving = pair
    processes = []
    for index in range(count):
        command = [sys.executable, "-m", "SSMSRRegistrationLib", "register", fixed, moving, "-o",
                   str(folder / f"field{index}-{time.monotonic_ns()}.nii.gz"), "--scales", "1/2,1", "--steps",
                   str(steps), "--device", "cpu", "--precision", "float32", "--progress", "none"]
        processes.append((time.perf_counter(), subprocess.Popen(command, env=environment)))
    seconds = []
    for started, process in processes:
        if process.wait() != 0:
            raise RuntimeError(f"a registration failed with exit code {process.returncode}")
        seconds.append(time.perf_counter() - started)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=1, help="repeat each case and keep the median")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    print(f"CPU: {cpu_model()}, {os.cpu_count()} logical cores, {available_cores()} usable, {bfloat16_text()}")
    base = {key: value for key, value in os.environ.items() if not key.startswith("OMP_")}
    base["PYTHONPATH"] = str(ROOT / "SSMSRRegistration")
    policies = {"former (OMP_WAIT_POLICY=ACTIVE)": dict(base, OMP_WAIT_POLICY="ACTIVE"),
                "now (no variable set)": base}
    results = {}
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        frames = sample_data.echo_frames([0, 10])
        pair = []
        for index, frame in enumerate(frames):
            path = str(folder / f"frame{index}.nii.gz")
            sitk.WriteImage(frame, path)
            pair.append(path)
        for name, environment in policies.items():
            alone = sorted(run_together(1, pair, args.steps, environment, folder)[0] for _ in range(args.repeats))
            together = sorted(max(run_together(2, pair, args.steps, environment, folder)) for _ in range(args.repeats))
            results[name] = {"alone_s": alone[len(alone) // 2], "two_at_once_s": together[len(together) // 2]}
            ratio = results[name]["two_at_once_s"] / results[name]["alone_s"]
            results[name]["ratio"] = ratio
            print(f"{name:34s} alone {results[name]['alone_s']:7.1f} s   two at once {results[name]['two_at_once_s']:7.1f}"
                  f" s each (slowest)   ratio {ratio:.2f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_model(), "steps": args.steps, "results": results},
                                              indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
