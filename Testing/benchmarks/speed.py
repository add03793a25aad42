"""Speed of SSMSR's test-time training, measured side by side in one run (the speed issue's benchmark).

    python Testing/benchmarks/speed.py [--device auto] [--sections steps,presets] [--pairs 3] [--json FILE]

Sections (default: steps,presets on a CPU; steps,schedules,large,presets on a GPU):

* ``steps``: time per training step (U-Net forward, warp, loss, backward, Adam) at full resolution for a 48x64x48
  3D pair (ICBM152 crops, 2 mm) and a 1024x768 2D pair (two echo frames resized): the plain eager float32 step
  (``precision="float32"``, the reference) against the optimised step (``precision="mixed"``: bfloat16
  convolutions on channels-last tensors, losses in float32), same device, same run; the ratio. A step's time is
  the difference between a run of 5 + N steps and a run of 5 steps, divided by N (set-up and warm-up cancel).
* ``schedules``: the paper's full schedules with the default (paper) preset: the 3D pair with 1/2,1 x 3500 steps,
  and a 49-frame 1024x768 2D+t sequence (pydicom's 30-frame echo played forward then back, frames resized) with
  1/8,1/4,1/2,1 x 3500 steps, one pair per step. Meant for a GPU (hours on a CPU).
* ``large``: 20 full-resolution steps on a 256x256x256 volume (the ICBM152 T1 resampled): peak memory, or the
  out-of-memory message the user would get. Meant for a GPU.
* ``wholebrain``: a 1 mm whole-brain pair (the harness's simulated subject on the ICBM152 brain's bounding box at
  1 mm, about 5 million voxels, and the template) through ``register`` with a preset (``fast`` unless told), its
  automatic working grid and its default pre-alignment (affine; ``--whole-brain-initial none`` for none, as every
  run before issue 24's fine pairs was): the values it trained with (a 1 mm brain takes the preset's values for fine
  pairs), the plan announced before training (grid, memory and time estimates), then the measured
  time, the training seconds of each scale, peak memory, Dice and folding. ``--whole-brain-preset``,
  ``--whole-brain-patch``, ``--whole-brain-finest-steps``, ``--whole-brain-precision`` and
  ``--whole-brain-half-field-below`` choose the preset, the training patch, the steps at the finest scale, the
  precision and the half-resolution fields; ``--whole-brain-steps N`` trains N steps per scale instead of the
  preset's and projects the preset's time from the measured time per step of each scale;
  ``--whole-brain-spacing MM`` builds the pair at another voxel side (a larger input at 0.7 mm);
  ``--whole-brain-ants default,paper`` also runs ANTs SyN with antspyx's default settings and/or the paper's on the
  same pair.
* ``presets``: the evaluation harness's hippocampus crop (``--pairs`` simulated subjects, 48x64x48 at 2 mm): the
  ``paper`` and ``fast`` presets and ANTs SyN with the paper's settings (antspyx, ``pip install .[bench]``), each
  pair registered by each method in this run: Dice (grey and white matter, mean over labels then pairs), time and
  peak memory per pair, and the fast preset's time as a fraction of ANTs'.

Peak memory is torch's peak CUDA allocation on a GPU, the peak resident set size above the start on a CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "SSMSRRegistration"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from evaluation.baselines import ANTS, ANTS_DEFAULT
from evaluation.cases import hippocampus_crop, whole_brain
from evaluation.metrics import evaluate_pair
from evaluation.config import FULL
from evaluation.measure import Usage, measured, torch_device_name
from evaluation.methods import preset_method
from evaluation.report import summarise
from evaluation.runner import configure_threads, run_case
from SSMSRRegistrationLib.imaging import sample_data
from SSMSRRegistrationLib.engine.multiscale import RegistrationSettings, register_tensors, resolve_device
from SSMSRRegistrationLib.common.schedule import parse_scales
from SSMSRRegistrationLib.engine.spatial import resize_image
from SSMSRRegistrationLib.engine.unet import bfloat16_supported
from SSMSRRegistrationLib.common.run_config import RunConfiguration
from SSMSRRegistrationLib.workflows.provenance import cpu_model
from SSMSRRegistrationLib.workflows.register import fine_pair_run, register

SECTIONS = ("steps", "schedules", "large", "wholebrain", "presets")


def normalised(array: np.ndarray) -> torch.Tensor:
    array = array.astype(np.float32)
    return torch.from_numpy((array - array.min()) / (array.max() - array.min()))


def brain_pair() -> List[torch.Tensor]:
    """Two overlapping 48x64x48 crops of the ICBM152 T1 at 2 mm, (1, 1, 48, 64, 48) each."""
    t1 = sample_data.brain_t1()
    crops = [sample_data.crop_and_shrink(t1, start, [96, 128, 96], 2) for start in ([50, 60, 60], [54, 56, 62])]
    return [normalised(sitk.GetArrayFromImage(crop))[None, None] for crop in crops]


def echo_sequence(frames: int, size=(768, 1024)) -> torch.Tensor:
    """(frames, 1, H, W): pydicom's echo cine played forward then backward until ``frames`` frames, resized."""
    images = [normalised(sitk.GetArrayFromImage(frame))[None, None] for frame in sample_data.echo_frames()]
    cycle = images + images[-2:0:-1]
    stack = torch.cat([cycle[index % len(cycle)] for index in range(frames)])
    return resize_image(stack, size)


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_run(fixed, moving, settings: RegistrationSettings, device: torch.device) -> float:
    synchronise(device)
    start = time.perf_counter()
    register_tensors(fixed, moving, settings, device=device)
    synchronise(device)
    return time.perf_counter() - start


def per_step_seconds(fixed, moving, mixed: bool, steps: int, device: torch.device) -> float:
    runs = [timed_run(fixed, moving, RegistrationSettings(scales=parse_scales("1"), steps_per_scale=count,
                                                          mixed_precision=mixed), device)
            for count in (5, 5 + steps)]
    return (runs[1] - runs[0]) / steps


def memory_text(usage: Usage) -> str:
    if not np.isnan(usage.peak_gpu_mib):
        return f"peak GPU memory {usage.peak_gpu_mib:.0f} MiB"
    return f"peak RSS +{usage.peak_rss_mib:.0f} MiB"


def section_steps(device: torch.device, steps: int, report: Dict) -> None:
    print("\n## Time per training step, plain float32 (reference) vs mixed precision (optimised)")
    if not bfloat16_supported(device):
        print(f"(this {device.type} has no native bfloat16: the 'mixed' step runs in float32, the ratio is ~1)")
    echo = echo_sequence(2)
    cases = {"3D 48x64x48": brain_pair(), "2D 1024x768": [echo[1:], echo[:1]]}
    for label, (fixed, moving) in cases.items():
        reference = per_step_seconds(fixed, moving, False, steps, device)
        optimised = per_step_seconds(fixed, moving, True, steps, device)
        print(f"{label}: reference {reference * 1000:.1f} ms/step, optimised {optimised * 1000:.1f} ms/step, "
              f"ratio {reference / optimised:.2f}x")
        report["steps"][label] = {"reference_ms": reference * 1000, "optimised_ms": optimised * 1000,
                                  "ratio": reference / optimised}


def section_schedules(device: torch.device, report: Dict) -> None:
    print("\n## The paper's full schedules (paper preset: mixed precision)")
    sequence = echo_sequence(49)
    paper, paper_cine = (RunConfiguration.of("paper").resolve(kind) for kind in ("pair", "cine"))
    runs = {f"3D 48x64x48 pair, {paper.scales} x {paper.steps}": (*brain_pair(), paper.scales, paper.steps, 0),
            f"2D+t 49 x 1024x768, {paper_cine.scales} x {paper_cine.steps}, 1 pair per step": (
                sequence[1:], sequence[:-1], paper_cine.scales, paper_cine.steps, 1)}
    for label, (fixed, moving, scales, steps, batch) in runs.items():
        settings = RegistrationSettings(scales=parse_scales(scales), steps_per_scale=steps, batch_size=batch,
                                        mixed_precision=True)
        _, usage = measured(lambda: register_tensors(fixed, moving, settings, device=device))
        per_step_ms = usage.seconds / (steps * len(settings.scales)) * 1000
        print(f"{label}: {usage.seconds:.1f} s total ({per_step_ms:.2f} ms per step on average); "
              f"{memory_text(usage)}")
        report["schedules"][label] = {"seconds": usage.seconds, "peak_gpu_mib": usage.peak_gpu_mib,
                                      "peak_rss_mib": usage.peak_rss_mib}


def section_large(device: torch.device, report: Dict) -> None:
    print("\n## 256x256x256 volume, 20 full-resolution steps (mixed precision)")
    t1 = normalised(sitk.GetArrayFromImage(sample_data.brain_t1()))[None, None]
    volume = resize_image(t1, (256, 256, 256))
    settings = RegistrationSettings(scales=parse_scales("1"), steps_per_scale=20, mixed_precision=True)
    try:
        _, usage = measured(lambda: register_tensors(volume, torch.roll(volume, 2, dims=4), settings, device=device))
    except torch.cuda.OutOfMemoryError as error:
        first_line = str(error).splitlines()[0]
        print(f"out of GPU memory ({first_line}); `ssmsr register` exits with code 3 and suggests --device cpu or "
              "a coarser schedule")
        report["large"] = {"out_of_memory": first_line}
        return
    print(f"{usage.seconds:.1f} s; {memory_text(usage)}")
    report["large"] = {"seconds": usage.seconds, "peak_gpu_mib": usage.peak_gpu_mib,
                       "peak_rss_mib": usage.peak_rss_mib}


def section_whole_brain(device: torch.device, steps: int, ants_settings: List[str], report: Dict,
                        preset: str = "fast", initial: str = "auto", spacing_mm: float = 1.0, **options) -> None:
    """``initial``: SSMSR's pre-alignment (``register``'s; default: affine in 3D, as antspyx's default SyN has one);
    ``spacing_mm``: the pair's voxel side (1 mm; finer for a larger input, registered on the same working grid);
    ``options``: run options for SSMSR (None: the preset's; a 1 mm brain takes its values for fine pairs)."""
    given = {name: value for name, value in options.items() if value is not None}
    print(f"\n## {spacing_mm:g} mm whole brain, {preset} preset"
          f"{''.join(f', {name} {value}' for name, value in given.items())}"
          f"{f', {steps} steps per scale' if steps else ''}, pre-alignment {initial}")
    config = replace(FULL, cases=("whole_brain",), whole_brain_spacing_mm=spacing_mm, synthetic_test_pairs=1,
                     training_pairs=0, device=str(device))
    case = whole_brain(config)
    pair = case.pairs[0]
    print(f"pair: {'x'.join(map(str, pair.fixed.GetSize()))} voxels at {spacing_mm:g} mm "
          f"({np.prod(pair.fixed.GetSize()) / 1e6:.1f} million)")
    events: List[dict] = []
    output, usage = measured(lambda: register(pair.fixed, pair.moving, initial=initial, preset=preset,
                                              steps=steps or None, **options, device=str(device),
                                              progress=lambda event: events.append({**event,
                                                                                    "wall": time.perf_counter()})))
    finished = time.perf_counter()
    started = next(event for event in events if event["event"] == "started")
    chosen = output.provenance["options"]
    # The values it trained with (a 1 mm brain takes the preset's values for fine pairs).
    resolved = fine_pair_run(RunConfiguration.of(preset, **given, steps=steps or None), chosen["working_size"],
                             chosen["working_spacing_mm"])
    print(f"trained: scales {resolved.scales} x {resolved.steps} steps"
          f"{'' if resolved.finest_steps is None else f' ({resolved.finest_steps} at the finest)'}, patch "
          f"{resolved.patch_size or 'automatic'}, half-resolution fields at "
          f"{','.join(started['half_field_scales']) or 'no scale'}, precision {started['precision']}")
    print(f"announced before training: {started['plan']}; from then to the end {finished - started['wall']:.1f} s "
          "(the pre-alignment ran before)")
    metrics, labels, _ = evaluate_pair(pair, output.field, case.label_names, case.nlcc_radius)
    dice = float(np.mean([values["dice"] for values in labels.values()]))
    print(f"measured: {usage.seconds:.1f} s in all ({output.metrics['seconds']:.1f} s training), "
          f"{memory_text(usage)}; Dice {dice * 100:.2f} %, folded {metrics['percent_non_positive_jacobian']:.3f} %")
    entry = {"plan": started["plan"], "seconds_after_plan": finished - started["wall"], "seconds": usage.seconds,
             "training_seconds": output.metrics["seconds"],
             "peak_rss_mib": usage.peak_rss_mib, "peak_gpu_mib": usage.peak_gpu_mib, "dice_percent": dice * 100,
             "folded_percent": metrics["percent_non_positive_jacobian"], "preset": preset, "initial": initial,
             "spacing_mm": spacing_mm,
             "scales": resolved.scales, "steps_per_scale": resolved.steps, "finest_steps": resolved.finest_steps,
             "patch_size": resolved.patch_size, "precision": resolved.precision,
             "half_field_below": resolved.half_field_below}
    # Seconds of each scale from the progress events (the scale's last event minus the previous one's; a scale
    # trained 0 steps reports none and took no training time).
    ends: List[float] = []
    for index in range(len(parse_scales(resolved.scales))):
        ends.append(max((e["elapsed_s"] for e in events if e["event"] == "progress" and e["scale_index"] == index),
                        default=ends[-1] if ends else 0.0))
    scale_seconds = np.diff([0.0] + ends)
    print(f"training seconds by scale ({resolved.scales}): {', '.join(f'{value:.1f}' for value in scale_seconds)}; "
          f"the rest of the run {usage.seconds - ends[-1]:.1f} s")
    entry["scale_seconds"] = [float(value) for value in scale_seconds]
    preset_steps = fine_pair_run(RunConfiguration.of(preset, **given), chosen["working_size"],
                                 chosen["working_spacing_mm"]).steps
    if steps and steps < preset_steps:
        per_step = scale_seconds / steps
        projected = usage.seconds - output.metrics["seconds"] + float(per_step.sum()) * preset_steps
        print(f"seconds per step by scale: {', '.join(f'{value:.2f}' for value in per_step)}; projected {preset} "
              f"preset ({preset_steps} steps per scale): {projected / 60:.1f} min")
        entry["projected_seconds"] = projected
    report["wholebrain"]["ssmsr"] = entry
    for settings in ants_settings:
        method = {"default": ANTS_DEFAULT, "paper": ANTS}[settings]
        if method.missing:
            print(f"{method.name}: skipped, {method.missing}")
            continue
        run = method.run(case, config)[0]
        ants_metrics, ants_labels, _ = evaluate_pair(pair, run.fields[0], case.label_names, case.nlcc_radius)
        ants_dice = float(np.mean([values["dice"] for values in ants_labels.values()]))
        print(f"{method.name} ({method.parameters(case, config)}): {run.usage[0].seconds:.1f} s, "
              f"{memory_text(run.usage[0])}; Dice {ants_dice * 100:.2f} %, folded "
              f"{ants_metrics['percent_non_positive_jacobian']:.3f} %")
        report["wholebrain"][f"ants_{settings}"] = {"seconds": run.usage[0].seconds, "dice_percent": ants_dice * 100,
                                                    "peak_rss_mib": run.usage[0].peak_rss_mib,
                                                    "folded_percent": ants_metrics["percent_non_positive_jacobian"]}


def section_presets(device: torch.device, pairs: int, names: List[str], report: Dict) -> None:
    print(f"\n## Presets {', '.join(names)} vs ANTs SyN on the hippocampus crop ({pairs} simulated subject(s))")
    config = replace(FULL, cases=("hippocampus_crop",), synthetic_test_pairs=pairs, device=str(device))
    configure_threads(config.threads)
    case = hippocampus_crop(config)
    methods = [preset_method(name) for name in names] + [ANTS]
    result = run_case(case, config, methods, log=lambda line: print(line, flush=True))
    for name, why in result.skipped.items():
        print(f"{name}: skipped, {why}")
    summary = summarise(result)
    last_scale = {name: RunConfiguration.of(name).resolve("pair").scales.split(",")[-1] for name in names}
    final = {**{f"SSMSR {name} preset": f"SSMSR {name} preset ({last_scale[name]})" for name in names},
             "ANTs SyN": "ANTs SyN"}  # the presets' rows after their last scale
    rows = {name: summary[row] for name, row in final.items() if row in summary}
    for name, stats in rows.items():
        dice, seconds, peak = stats["dice"], stats["seconds"], stats["peak_rss_mib"]
        print(f"{name}: Dice {dice[0] * 100:.2f} +/- {dice[1] * 100:.2f} %, {seconds[0]:.1f} +/- {seconds[1]:.1f} s "
              f"per pair, peak RSS +{peak[0]:.0f} MiB")
        report["presets"][name] = {"dice_percent": dice[0] * 100, "dice_std": dice[1] * 100,
                                   "seconds": seconds[0], "seconds_std": seconds[1], "peak_rss_mib": peak[0],
                                   "parameters": result.parameters.get(name, "")}
    fast, paper = rows.get("SSMSR fast preset"), rows.get("SSMSR paper preset")
    if fast and paper:
        print(f"fast - paper: {100 * (fast['dice'][0] - paper['dice'][0]):+.2f} Dice points; "
              f"fast takes {fast['seconds'][0] / paper['seconds'][0]:.3f} of paper's time")
    ants = rows.get("ANTs SyN")
    for name in names:
        row = rows.get(f"SSMSR {name} preset")
        if row and ants:
            print(f"{name} preset time / ANTs SyN time: {row['seconds'][0] / ants['seconds'][0]:.3f}; Dice - ANTs "
                  f"Dice: {100 * (row['dice'][0] - ants['dice'][0]):+.2f} points")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--sections", default=None, help=f"comma-separated, from {', '.join(SECTIONS)}")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per case in 'steps' (default: 10)")
    parser.add_argument("--pairs", type=int, default=3, help="simulated subjects in 'presets' (default: 3)")
    parser.add_argument("--presets", default="fast,paper", help="the presets of 'presets' (default: fast,paper)")
    parser.add_argument("--whole-brain-steps", type=int, default=0, metavar="N",
                        help="'wholebrain': train N steps per scale and project the preset's time (default: the "
                             "preset's steps)")
    parser.add_argument("--whole-brain-ants", default="", metavar="SETTINGS",
                        help="'wholebrain': also run ANTs SyN with these settings, comma-separated: default "
                             "(antspyx's: affine then SyN, mutual information), paper (the paper's SyN)")
    parser.add_argument("--whole-brain-preset", default="fast", help="'wholebrain': the preset (default: fast)")
    parser.add_argument("--whole-brain-initial", default="auto",
                        help="'wholebrain': SSMSR's pre-alignment (default: auto, affine in 3D; none: as before "
                             "2026-12-03)")
    parser.add_argument("--whole-brain-spacing", type=float, default=1.0, metavar="MM",
                        help="'wholebrain': the pair's voxel side (default: 1; 0.7 gives a 14-million-voxel input, "
                             "registered on the same working grid)")
    parser.add_argument("--whole-brain-patch", type=int, metavar="N",
                        help="'wholebrain': the training patch (default: the preset's)")
    parser.add_argument("--whole-brain-finest-steps", type=int, metavar="N",
                        help="'wholebrain': steps at the finest scale (default: as many as the other scales)")
    parser.add_argument("--whole-brain-precision", choices=("mixed", "float32"),
                        help="'wholebrain': the precision (default: the preset's, mixed)")
    parser.add_argument("--whole-brain-half-field-below", type=float, metavar="MM",
                        help="'wholebrain': half-resolution fields below this voxel side (default: the preset's)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args()
    device = resolve_device(args.device)
    default = "steps,schedules,large,wholebrain,presets" if device.type == "cuda" else "steps,presets"
    sections = [name.strip() for name in (args.sections or default).split(",")]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")

    name = torch_device_name(device) if device.type == "cuda" else f"{cpu_model()}, {torch.get_num_threads()} threads"
    print(f"# SSMSR speed, {time.strftime('%Y-%m-%d %H:%M')}\ndevice: {device} ({name}); torch {torch.__version__}; "
          f"python {platform.python_version()}; CPU instruction set used by torch: "
          f"{torch.backends.cpu.get_cpu_capability()}; native bfloat16 on {device.type}: {bfloat16_supported(device)}")
    report: Dict = {"device": name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                    "command": " ".join(sys.argv), **{section: {} for section in sections}}
    runners: Dict[str, Callable[[], None]] = {
        "steps": lambda: section_steps(device, args.steps, report),
        "schedules": lambda: section_schedules(device, report),
        "large": lambda: section_large(device, report),
        "wholebrain": lambda: section_whole_brain(device, args.whole_brain_steps,
                                                  [name for name in args.whole_brain_ants.split(",") if name], report,
                                                  args.whole_brain_preset, args.whole_brain_initial,
                                                  args.whole_brain_spacing,
                                                  patch_size=args.whole_brain_patch,
                                                  precision=args.whole_brain_precision,
                                                  finest_steps=args.whole_brain_finest_steps,
                                                  half_field_below=args.whole_brain_half_field_below),
        "presets": lambda: section_presets(device, args.pairs, args.presets.split(","), report),
    }
    for section in sections:
        runners[section]()
    if args.json:
        with open(args.json, "w", encoding="utf-8") as stream:
            json.dump(report, stream, indent=1)


if __name__ == "__main__":
    main()
