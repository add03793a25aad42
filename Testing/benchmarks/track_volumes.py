"""Benchmark: a 3D+t series with a known breathing-like motion, tracked by SSMSR over the whole series (the reference
frame onto every other, one training) against ANTs SyN and elastix B-spline registering each frame separately (as
SlicerSequenceRegistration runs elastix), and against SSMSR registering each frame separately (``ssmsr-pairs``,
the default preset's pair registration, one training a frame; not in the default methods: it takes minutes a frame).

    python Testing/benchmarks/track_volumes.py [--frames 8] [--size 96] [--amplitude 12]
        [--methods ssmsr,ssmsr-fast,ants,elastix[,ssmsr-pairs]] [--batch N] [--patch N] [--steps N]
        [--finest-steps N] [--scales S] [--half-field-below MM] [--seed N] [--json results/track_volumes.json]

The series: the ICBM152 2009a T1 (nilearn, 1 mm) cropped to SIZE^3 voxels around the brain's centre, intensities in
[0, 1]. Frame t is that volume warped by a known smooth field v_t (mm, LPS): a superior-inferior displacement
A sin^2(pi t / T) weighted by a Gaussian profile (sigma 40 mm) centred 30 mm below the volume's centre (largest
at the bottom, as the diaphragm moves the lungs), plus a third of it antero-posterior; each frame gets its own noise
(standard deviation 0.02). Frame 0 (v_0 = 0, end-exhale) is the reference: the field registering it (moving) onto
frame t (fixed) is v_t. Printed per method: the endpoint error (mm, mean over the head and over frames 1..T-1; the
worst frame's), the largest percentage of folded voxels of a frame, and the total seconds; with --json, everything.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from typing import Callable, Dict, List, Optional

import numpy as np
import SimpleITK as sitk

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "SSMSRRegistration"))
sys.path.insert(0, HERE)

from evaluation.baselines import ANTS_DEFAULT, ELASTIX  # noqa: E402
from evaluation.cases import Case, Pair, normalised  # noqa: E402
from evaluation.config import FULL, Config  # noqa: E402
from evaluation.methods import Method  # noqa: E402
from evaluation.metrics import endpoint_error, field_regularity  # noqa: E402
from SSMSRRegistrationLib.engine.metrics import REGISTER_FOLDED_KEY  # noqa: E402
from SSMSRRegistrationLib.imaging import sample_data  # noqa: E402
from SSMSRRegistrationLib.workflows.provenance import cpu_model  # noqa: E402
from SSMSRRegistrationLib.workflows.register import register  # noqa: E402
from SSMSRRegistrationLib.workflows.track import track  # noqa: E402

NOISE_STD = 0.02
PROFILE_SIGMA_MM, PROFILE_DROP_MM = 40.0, 30.0


def reference_volume(size: int) -> sitk.Image:
    """The ICBM152 T1 (1 mm) cropped to size^3 voxels around its centre, in [0, 1]."""
    t1 = sample_data.brain_t1()
    start = [(n - size) // 2 for n in t1.GetSize()]
    return normalised(sitk.RegionOfInterest(t1, [size] * 3, start))


def breathing_field(grid: sitk.Image, amplitude_mm: float, phase: float) -> sitk.Image:
    """v(p) (mm, LPS) on ``grid``: amplitude sin^2(pi phase) x Gaussian profile, superior-inferior plus a third of it
    antero-posterior (phase in [0, 1): 0 end-exhale, 0.5 end-inhale)."""
    shape = tuple(reversed(grid.GetSize()))
    index = np.stack(np.meshgrid(*[np.arange(n) for n in grid.GetSize()], indexing="ij"), axis=-1).reshape(-1, 3)
    matrix = np.array(grid.GetDirection()).reshape(3, 3) @ np.diag(grid.GetSpacing())
    points = index @ matrix.T + np.array(grid.GetOrigin())
    centre = np.array(grid.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in grid.GetSize()]))
    centre[2] -= PROFILE_DROP_MM  # LPS: z grows superior
    profile = np.exp(-((points - centre) ** 2).sum(axis=1) / (2 * PROFILE_SIGMA_MM ** 2))
    strength = amplitude_mm * np.sin(np.pi * phase) ** 2 * profile
    vectors = np.stack([np.zeros_like(strength), strength / 3.0, strength], axis=1)  # x (L), y (P), z (S)
    vectors = vectors.reshape(tuple(grid.GetSize()) + (3,)).transpose(2, 1, 0, 3)  # to (z, y, x, 3)
    field = sitk.GetImageFromArray(np.ascontiguousarray(vectors, dtype=np.float64).reshape(shape + (3,)), isVector=True)
    field.CopyInformation(grid)
    return field


def series(size: int, frames: int, amplitude_mm: float, seed: int):
    """(frames as [0, 1] float32 images, true fields v_t, head mask) of the known-motion series."""
    volume = reference_volume(size)
    rng = np.random.default_rng(seed)
    images, truths = [], []
    for t in range(frames):
        truth = breathing_field(volume, amplitude_mm, t / frames)
        moved = sitk.Resample(volume, volume, sitk.DisplacementFieldTransform(sitk.Image(truth)), sitk.sitkLinear, 0.0,
                              sitk.sitkFloat32)
        noisy = sitk.GetArrayFromImage(moved) + rng.normal(0.0, NOISE_STD, moved.GetSize()[::-1])
        image = sitk.GetImageFromArray(np.clip(noisy, 0.0, 1.0).astype(np.float32))
        image.CopyInformation(volume)
        images.append(image)
        truths.append(truth)
    head = sitk.BinaryMorphologicalClosing(volume > 0.1, [3, 3, 3])
    return images, truths, head


def run_ssmsr(images: List[sitk.Image], preset: str, **overrides) -> Dict[int, sitk.Image]:
    """The preset's sequence training, frame 0 onto every frame; ``overrides``: run options (None: the preset's)."""
    result = track(images, reference=0, preset=preset, **overrides)
    return {t: result.field(t) for t in result.pairs}


def run_ssmsr_pairs(images: List[sitk.Image], seed: int) -> Dict[int, sitk.Image]:
    """The default preset's registration of frame 0 onto each frame, one pair (and one training) at a time."""
    return {t: register(images[t], images[0], seed=seed).field for t in range(1, len(images))}


def run_ants_default(images: List[sitk.Image], config: Config) -> Dict[int, sitk.Image]:
    """antspyx's default SyN (affine, then SyN with mutual information) of frame 0 onto each frame."""
    return _per_frame(ANTS_DEFAULT, images, None, config)


def run_elastix(images: List[sitk.Image], head: sitk.Image, config: Config) -> Dict[int, sitk.Image]:
    """The evaluation harness's elastix B-spline (its full settings: NCC, grid 5 voxels, 500 iterations x 3
    resolutions), frame 0 onto each frame."""
    return _per_frame(ELASTIX, images, head, config)


def _per_frame(method: Method, images: List[sitk.Image], mask: Optional[sitk.Image], config: Config
               ) -> Dict[int, sitk.Image]:
    """The harness's ``method`` registering frame 0 (moving) onto each other frame (fixed): {frame: field}."""
    pairs = [Pair(f"frame {t}", fixed=images[t], moving=images[0], mask=mask) for t in range(1, len(images))]
    case = Case("breathing", "3D+t breathing", "", pairs, [], "", 2)
    return {t: field for t, field in zip(range(1, len(images)), method.run(case, config)[0].fields)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=96, help="voxels per axis of the 1 mm volume")
    parser.add_argument("--amplitude", type=float, default=12.0, help="largest displacement (mm)")
    parser.add_argument("--methods", default="ssmsr,ssmsr-fast,ants,elastix")
    parser.add_argument("--batch", type=int, help="SSMSR's pairs per step (0: all; default: the preset's)")
    parser.add_argument("--patch", type=int, help="SSMSR's training patch in voxels (0: whole; default: the preset's)")
    parser.add_argument("--steps", type=int, help="SSMSR's steps per scale (default: the preset's)")
    parser.add_argument("--finest-steps", type=int, help="SSMSR's steps at the finest scale (default: --steps)")
    parser.add_argument("--scales", help="SSMSR's schedule, e.g. 1/4,1/2 (default: the preset's)")
    parser.add_argument("--half-field-below", type=float,
                        help="SSMSR's half-resolution fields below this voxel side (mm; default: the preset's)")
    parser.add_argument("--seed", type=int, default=0, help="the frames' noise, SSMSR's and the baselines' seed")
    parser.add_argument("--json", help="write every figure to this JSON file")
    args = parser.parse_args()

    images, truths, head = series(args.size, args.frames, args.amplitude, args.seed)
    config = replace(FULL, threads=os.cpu_count() or 1, seed=args.seed)
    methods: Dict[str, Callable[[], Dict[int, sitk.Image]]] = {
        "ssmsr": lambda: run_ssmsr(images, "balanced", **overrides),
        "ssmsr-fast": lambda: run_ssmsr(images, "fast", **overrides),
        "ssmsr-pairs": lambda: run_ssmsr_pairs(images, args.seed),
        "ants": lambda: run_ants_default(images, config),
        "elastix": lambda: run_elastix(images, head, config),
    }
    overrides = dict(batch_size=args.batch, patch_size=args.patch, steps=args.steps, scales=args.scales,
                     finest_steps=args.finest_steps, half_field_below=args.half_field_below, seed=args.seed)
    batch = "" if args.batch is None else f", {'every pair' if args.batch == 0 else args.batch} per step"
    batch += "" if args.patch is None else f", patches of {args.patch}^3"
    batch += "" if args.steps is None else f", {args.steps} steps per scale"
    batch += "" if args.finest_steps is None else f", {args.finest_steps} at the finest scale"
    batch += "" if args.scales is None else f", scales {args.scales}"
    batch += "" if args.half_field_below is None else f", half-resolution fields below {args.half_field_below} mm"
    names = {"ssmsr": f"SSMSR sequence (balanced{batch})", "ssmsr-fast": f"SSMSR sequence (fast{batch})",
             "ssmsr-pairs": "SSMSR per frame (balanced, one training a pair)",
             "ants": "ANTs SyN per frame (antspyx default)", "elastix": "elastix B-spline per frame"}
    machine = {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version()}
    print(f"{args.frames} frames of {args.size}^3 voxels at 1 mm, largest motion {args.amplitude} mm; {machine}")
    true_mean = np.mean([endpoint_error(truths[t], truths[0], head) for t in range(1, args.frames)])
    print(f"identity: endpoint error {true_mean:.2f} mm (the mean motion in the head)")
    rows = []
    for key in args.methods.split(","):
        start = time.perf_counter()
        fields = methods[key]()
        seconds = time.perf_counter() - start
        errors = [endpoint_error(fields[t], truths[t], head) for t in range(1, args.frames)]
        folded = [field_regularity(fields[t])[REGISTER_FOLDED_KEY] for t in range(1, args.frames)]
        row = {"method": names[key], "endpoint_error_mm": float(np.mean(errors)),
               "worst_frame_mm": float(np.max(errors)), "max_folded_percent": float(np.max(folded)),
               "seconds": seconds, "per_frame_mm": [float(e) for e in errors]}
        rows.append(row)
        print(f"{row['method']}: endpoint error {row['endpoint_error_mm']:.2f} mm (worst frame "
              f"{row['worst_frame_mm']:.2f}), folded {row['max_folded_percent']:.3f} %, {seconds:.0f} s", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as stream:
            json.dump({"arguments": vars(args), "machine": machine, "identity_mm": float(true_mean), "rows": rows},
                      stream, indent=2)


if __name__ == "__main__":
    main()
