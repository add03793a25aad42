"""Identity and the SSMSR family, each returning ITK displacement fields on the fixed grid (mm, LPS).

* SSMSR (s): one multi-scale test-time trained run; the composed field after each scale of the schedule
  (``RegistrationOutput.field_after_scale``) gives the paper's ablation rows, the last one is SSMSR (1).
* SSR: the same training with the single scale "1".
* VoxelMorph-equivalent: the same U-Nets and loss, trained only on the case's training pairs (never a
  test pair), then applied with ``steps=0`` (no test-time training).

On a cine (``Case.sequence``) SSMSR and SSR train once for the whole sequence (``tracking.track``), as the
paper does per ultrasound sequence; the time per pair is the sequence's time divided by the pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

import numpy as np
import SimpleITK as sitk
import torch

from SSMSRRegistrationLib.workflows.register import register
from SSMSRRegistrationLib.engine.multiscale import RegistrationSettings, register_tensors, resolve_device
from SSMSRRegistrationLib.common.schedule import format_scale, format_scales, parse_scales
from SSMSRRegistrationLib.imaging.fields import voxel_field_to_image
from SSMSRRegistrationLib.common.run_config import RunConfiguration
from SSMSRRegistrationLib.imaging.cine import Cine
from SSMSRRegistrationLib.workflows.track import track

from .cases import Case, normalised
from .config import Config
from .measure import Usage, measured, torch_device_name


@dataclass
class MethodRun:
    """One row family of the tables: a method's fields on every pair of a case.

    fields: one ITK displacement field per pair (mm, LPS, on the pair's fixed grid).
    usage: per pair, wall time (s) and peak memory (MiB); NaN where not measured separately.
    """

    method: str
    fields: List[sitk.Image]
    usage: List[Usage]
    device: str
    note: str = ""


@dataclass
class Method:
    """A method family: ``run(case, config)`` gives its rows, ``parameters(case, config)`` the exact settings."""

    name: str
    run: Callable[[Case, Config], List[MethodRun]]
    parameters: Callable[[Case, Config], str]
    missing: Optional[str] = None  # why it cannot run here (a package is not installed), or None


def zero_field(grid: sitk.Image) -> sitk.Image:
    """The identity transform as a displacement field on ``grid`` (float64 vectors, mm)."""
    dimension = grid.GetDimension()
    zeros = np.zeros(tuple(reversed(grid.GetSize())) + (dimension,))
    image = sitk.GetImageFromArray(zeros, isVector=True)
    image.CopyInformation(grid)
    return image


def _run_identity(case: Case, config: Config) -> List[MethodRun]:
    return [MethodRun("identity", [zero_field(pair.fixed) for pair in case.pairs],
                      [Usage(0.0, float("nan"), float("nan")) for _ in case.pairs], "-")]


def _scale_end_seconds(events: List[dict], scales: int) -> List[float]:
    """Elapsed seconds at the end of each scale's training, from the engine's progress events."""
    ends = [float("nan")] * scales
    for event in events:
        if event.get("event") == "progress" and event["step"] == event["steps"]:
            ends[event["scale_index"]] = event["elapsed_s"]
    return ends


def _rows_per_scale(prefix: str, schedule: str, fields_per_scale: List[List[sitk.Image]], usage: List[Usage],
                    scale_ends: List[List[float]], device: str) -> List[MethodRun]:
    """One MethodRun per scale; the last scale gets the measured usage of the whole call, the others the
    elapsed training time up to the end of that scale (memory not measured separately)."""
    scales = [format_scale(s) for s in parse_scales(schedule)]
    rows = []
    for index, scale in enumerate(scales):
        if index == len(scales) - 1:
            row_usage = usage
        else:
            row_usage = [Usage(ends[index], float("nan"), float("nan")) for ends in scale_ends]
        name = f"{prefix} ({scale})" if len(scales) > 1 else prefix
        rows.append(MethodRun(name, [fields[index] for fields in fields_per_scale], row_usage, device))
    return rows


def _register_each_pair(case: Case, config: Config, prefix: str, **options) -> List[MethodRun]:
    """``api.register`` on each pair with ``options`` (scales, steps, precision or a preset)."""
    fields_per_scale, usage, scale_ends = [], [], []
    for pair in case.pairs:
        events: List[dict] = []
        mask = pair.mask if case.masked_registration else None
        # The cases are pre-aligned (the paper's protocol, as for every baseline): no pre-alignment stage.
        output, pair_usage = measured(lambda: register(pair.fixed, pair.moving, fixed_mask=mask, device=config.device,
                                                       seed=config.seed, progress=events.append, initial="none",
                                                       **options))
        scales = output.engine_result.scales
        fields_per_scale.append([output.field_after_scale(i) for i in range(len(scales) - 1)] + [output.field])
        usage.append(pair_usage)
        scale_ends.append(_scale_end_seconds(events, len(scales)))
    device = torch_device_name(resolve_device(config.device))
    return _rows_per_scale(prefix, format_scales(scales), fields_per_scale, usage, scale_ends, device)


def cine_of(case: Case) -> Cine:
    """The evaluated frames of a cine case as a ``tracking.Cine`` (frame 0 = the first pair's moving frame)."""
    frames = [case.pairs[0].moving] + [pair.fixed for pair in case.pairs]
    stack = np.stack([sitk.GetArrayFromImage(frame) for frame in frames]).astype(np.float32)
    grid = sitk.JoinSeries([sitk.Cast(frame, sitk.sitkUInt8) for frame in frames])
    return Cine(frames=stack, frame_grid=frames[0], cine_grid=grid, name=case.name)


def mask_stack(case: Case) -> sitk.Image:
    """Per-frame masks (W x H x T) for ``track``; frame 0 (never a fixed frame) gets the first pair's mask."""
    masks = [case.pairs[0].mask] + [pair.mask for pair in case.pairs]
    return sitk.JoinSeries(masks)


def _track_sequence(case: Case, config: Config, prefix: str, schedule: str) -> List[MethodRun]:
    events: List[dict] = []
    result, usage = measured(lambda: track(cine_of(case), mask=mask_stack(case), scales=schedule,
                                           steps=config.cine_steps, precision=config.precision,
                                           batch_size=config.cine_batch,
                                           device=config.device, seed=config.seed, progress=events.append))
    pairs = len(case.pairs)
    per_pair = Usage(usage.seconds / pairs, usage.peak_rss_mib, usage.peak_gpu_mib)
    fields_per_pair = [[voxel_field_to_image(displacements[index].double().numpy(), pair.fixed)
                        for displacements in result.displacements_per_scale]
                       for index, pair in enumerate(case.pairs)]
    ends = [end / pairs for end in _scale_end_seconds(events, len(result.displacements_per_scale))]
    device = torch_device_name(resolve_device(config.device))
    return _rows_per_scale(prefix, schedule, fields_per_pair, [per_pair] * pairs, [ends] * pairs, device)


def _test_time_run(case: Case, config: Config, prefix: str, schedule: str) -> List[MethodRun]:
    if case.sequence:
        return _track_sequence(case, config, prefix, schedule)
    return _register_each_pair(case, config, prefix, scales=schedule, steps=config.ssmsr_steps,
                               precision=config.precision)


def _run_ssmsr(case: Case, config: Config) -> List[MethodRun]:
    return _test_time_run(case, config, "SSMSR", case.schedule)


def _run_ssr(case: Case, config: Config) -> List[MethodRun]:
    return _test_time_run(case, config, "SSR", "1")


def _training_text(name: Optional[str], case: Case) -> str:
    """The loss weights and learning rate that preset ``name`` (None: the default) trains ``case`` with."""
    plan = RunConfiguration.of(name).resolve("cine" if case.sequence else "pair")
    mse = f", MSE weight {plan.mse_weight:g}" if plan.mse_weight else ""
    return (f"Adam lr {plan.learning_rate:g}, lambda {plan.smoothness_weight:g}{mse}, local NCC window "
            f"{RegistrationSettings().window_for(case.dimension)}")


def preset_method(name: str) -> Method:
    """SSMSR with a preset of ``presets`` (its pair schedule, steps and precision) on each pair (not a cine)."""
    preset = RunConfiguration.of(name).resolve("pair")

    def run(case: Case, config: Config) -> List[MethodRun]:
        return _register_each_pair(case, config, f"SSMSR {name} preset", preset=name)

    def parameters(case: Case, config: Config) -> str:
        return (f"api.register(..., preset={name!r}) per pair: schedule {preset.scales}, {preset.steps} steps "
                f"per scale, {preset.precision} precision; {_training_text(name, case)}, seed {config.seed}")

    return Method(f"SSMSR {name} preset", run, parameters)


def _training_steps(case: Case, config: Config) -> int:
    """Steps per scale of the VoxelMorph-equivalent training (the paper: 3500 x training sequences for the cine,
    so the same as SSMSR's per sequence; 3D: ``training_steps_per_pair`` x training pairs)."""
    return config.cine_steps if case.sequence else config.training_steps_per_pair * len(case.training)


def _training_batch(case: Case, config: Config) -> int:
    return config.cine_batch if case.sequence else 1


def _as_batch(images: List[sitk.Image]) -> torch.Tensor:
    """(N, 1, *S) float32 tensor of images normalised as the API does."""
    arrays = [sitk.GetArrayFromImage(normalised(image)) for image in images]
    return torch.from_numpy(np.stack(arrays)[:, None].astype(np.float32))


def _run_voxelmorph(case: Case, config: Config) -> List[MethodRun]:
    settings = RegistrationSettings(scales=parse_scales(case.schedule), steps_per_scale=_training_steps(case, config),
                                    seed=config.seed, batch_size=_training_batch(case, config))
    masks = None
    if case.masked_registration:
        masks = torch.from_numpy(np.stack([sitk.GetArrayFromImage(p.mask) for p in case.training])[:, None] > 0)
        masks = masks.float()
    trained, training_usage = measured(lambda: register_tensors(
        _as_batch([p.fixed for p in case.training]), _as_batch([p.moving for p in case.training]), settings,
        fixed_mask=masks, device=config.device))
    fields, usage = [], []
    for pair in case.pairs:
        output, pair_usage = measured(lambda: register(pair.fixed, pair.moving, scales=case.schedule, steps=0,
                                                       initial_networks=trained.networks, device=config.device,
                                                       initial="none"))
        fields.append(output.field)
        usage.append(pair_usage)
    note = (f"trained on {len(case.training)} pairs for {settings.steps_per_scale} steps per scale in "
            f"{training_usage.seconds:.0f} s (not included in the time per pair)")
    return [MethodRun("VoxelMorph-equivalent", fields, usage, torch_device_name(resolve_device(config.device)), note)]


def _test_time_parameters(case: Case, config: Config, schedule: str) -> str:
    steps = config.cine_steps if case.sequence else config.ssmsr_steps
    how = (f"tracking.track on the {len(case.pairs) + 1} evaluated frames: {steps} steps per scale for the whole "
           f"sequence, {config.cine_batch} pair(s) per step, fixed masks" if case.sequence else
           f"api.register per pair: {steps} steps per scale")
    precision = ("mixed precision (bfloat16 convolutions where the device supports them)"
                 if config.precision == "mixed" else "float32")
    chained = "; each scale's U-Net starts from the previous scale's weights" if "," in schedule else ""
    return (f"schedule {schedule}; {how}; {precision}; the default preset's training: {_training_text(None, case)}, "
            f"seed {config.seed}{chained}")


def _voxelmorph_parameters(case: Case, config: Config) -> str:
    masked = ", fixed masks" if case.masked_registration else ""
    return (f"same U-Nets, loss and schedule {case.schedule}; trained with engine.register_tensors on the case's "
            f"{len(case.training)} training pairs ({_training_steps(case, config)} steps per scale, "
            f"{_training_batch(case, config)} pair(s) per step{masked}, Adam lr 1e-3, lambda 10), then "
            "api.register(..., initial_networks=trained, steps=0) on each test pair")


IDENTITY = Method("identity", _run_identity, lambda case, config: "zero displacement (images as given)")
SSMSR = Method("SSMSR", _run_ssmsr, lambda case, config: _test_time_parameters(case, config, case.schedule))
SSR = Method("SSR", _run_ssr, lambda case, config: _test_time_parameters(case, config, "1"))
VOXELMORPH = Method("VoxelMorph-equivalent", _run_voxelmorph, _voxelmorph_parameters)
