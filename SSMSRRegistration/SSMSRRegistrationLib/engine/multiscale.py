"""Multi-scale residual registration with test-time training (paper Sec. II-C/D/E).

At each scale s of a coarse-to-fine schedule, the moving image warped by the
field found so far and the fixed image are resized to scale s; a U-Net,
initialised from the previous scale's trained weights, is trained on this pair
(Adam) to predict a residual field; the residual is resized to full resolution
and composed with the field so far (``spatial.compose``).

Several pairs (e.g. the consecutive frames of a cine) share one network per
scale; each training step uses all pairs, or a random mini-batch of
``batch_size`` pairs, and the step count per scale is for the whole set.

A scale whose grid is larger than the training patch (``patch_size``) trains each
step on one patch and predicts its residual in tiles (``patches``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..common.errors import InputError, RegistrationCancelled
from ..common.presets import COARSE_BATCHES, DEFAULT_STOP_TOLERANCE, PAPER_LEARNING_RATE, PAPER_SMOOTHNESS_WEIGHT
from ..common.protocol import REPORT_SECONDS, ProgressCallback, check_device_name, progress_event, started_event
from ..common.run_config import ResolvedRun
from ..common.schedule import (DEFAULT_PATCH_SIZE_3D, MIN_PATCH_SIZE, check_schedule, format_scale, parse_scales,
                               scaled_size)
from .allocator import kept_heap
from .losses import local_ncc, masked_mean, registration_loss
from .optimizer import Adam
from .patches import PatchSampler, patch_shape, predict_tiled
from .spatial import compose, resize_field, resize_image, warp
from .unet import (DEFAULT_DECODER_CHANNELS, DEFAULT_ENCODER_CHANNELS, RegistrationUNet, bfloat16_supported,
                   predict, use_mixed_precision)

@dataclass
class RegistrationSettings:
    """Hyper-parameters of one SSMSR run (defaults from the paper)."""

    scales: Tuple[Fraction, ...] = (Fraction(1, 2), Fraction(1))
    steps_per_scale: int = 3500
    finest_steps: Optional[int] = None  # steps at the finest scale; None: steps_per_scale (``steps_at``)
    smoothness_weight: float = PAPER_SMOOTHNESS_WEIGHT
    mse_weight: float = 0.0  # weight of the mean squared intensity difference added to Eq. 1 (0: the paper's loss)
    ncc_window: Optional[int] = None  # None: 5 in 3D, 6 in 2D (the paper's windows)
    learning_rate: float = PAPER_LEARNING_RATE
    seed: int = 0
    encoder_channels: Tuple[int, ...] = DEFAULT_ENCODER_CHANNELS
    decoder_channels: Tuple[int, ...] = DEFAULT_DECODER_CHANNELS
    progress_every: int = 0  # report every N steps; 0: every REPORT_SECONDS of wall time
    batch_size: int = 0  # pairs per training step, drawn at random (seeded); 0 or >= N: all pairs every step
    coarse_batches: str = "same"  # "fill": coarser scales train more pairs per step (``pairs_per_step_at``)
    mixed_precision: bool = False  # bfloat16 convolutions (unet.predict) where the device runs them natively
    stop_window: int = 0  # convergence check every this many steps (0: always the full budget), see ``converged``
    stop_tolerance: float = DEFAULT_STOP_TOLERANCE  # ... stop when the window's mean loss improved by less than this
    patch_size: Optional[int] = None  # scales larger than this train on patches of this side (``patches``); 0: the
    # whole image; None: DEFAULT_PATCH_SIZE_3D in 3D, the whole image in 2D
    half_field_below: float = 0.0  # mm: finer 3D images predict at half resolution (``half_field_at``)
    voxel_mm: Optional[float] = None  # the full-resolution grid's voxel side (mm), set by the workflow; None: unknown

    @classmethod
    def from_run(cls, run: ResolvedRun, **engine_only) -> "RegistrationSettings":
        """The engine's settings for a resolved run configuration (``common.run_config``): every run option whose
        name is a field of these settings sets it (a new option with a field of its name needs nothing here), three
        are converted (scales, steps, precision); ``engine_only``: fields no run option sets (network widths, progress
        interval)."""
        values = run.as_dict()
        fields = {known.name for known in dataclasses.fields(cls)}
        mapped = {name: value for name, value in values.items() if name in fields}
        mapped.update(scales=parse_scales(values["scales"]), steps_per_scale=values["steps"],
                      mixed_precision=values["precision"] == "mixed")
        return cls(**mapped, **engine_only)

    def steps_at(self, index: int) -> int:
        """Training steps at scale ``index`` of ``scales``: ``finest_steps`` at the last, else ``steps_per_scale``."""
        if self.finest_steps is not None and index == len(self.scales) - 1:
            return int(self.finest_steps)
        return int(self.steps_per_scale)

    def schedule_steps(self) -> List[int]:
        """The training steps of each scale, coarse to fine."""
        return [self.steps_at(index) for index in range(len(self.scales))]

    def pairs_per_step(self, pairs: int) -> int:
        """Pairs trained together at each step of the finest scale when ``pairs`` are registered (``batch_size``,
        or all)."""
        return min(self.batch_size, pairs) if self.batch_size > 0 else pairs

    def trained_voxels(self, size: Sequence[int], index: int) -> int:
        """Voxels (pixels) of one pair a training step at scale ``index`` runs on, for a full-resolution grid of
        ``size``: the scale's grid, or its patch where the scale trains on patches."""
        scale_size = scaled_size(tuple(size), self.scales[index])
        return math.prod(patch_shape(scale_size, self.patch_for(len(size))) or scale_size)

    def pairs_per_step_at(self, index: int, pairs: int, size: Sequence[int]) -> int:
        """Pairs trained together at each step of scale ``index`` when ``pairs`` of full-resolution ``size`` are
        registered: ``pairs_per_step``, or with ``coarse_batches == "fill"`` as many as the finest scale's step holds
        in voxels (``trained_voxels``: a 3D scale at 1/4 of the finest, 64 times as many), at most all ``pairs``.
        A 3D+t series trained one pair a step at every scale ended its coarse scale 1.4-2.3 mm off depending on
        the seed; all pairs, 0.26-0.37 mm (Testing/benchmarks/RESULTS.md)."""
        finest = self.pairs_per_step(pairs)
        if self.coarse_batches != "fill":
            return finest
        room = self.trained_voxels(size, len(self.scales) - 1) // self.trained_voxels(size, index)
        return min(pairs, finest * max(1, room))

    def patch_for(self, ndim: int) -> int:
        """The training patch's side in voxels for ``ndim``-D images (0: the whole image)."""
        if self.patch_size is not None:
            return int(self.patch_size)
        return DEFAULT_PATCH_SIZE_3D if ndim == 3 else 0

    def half_field_at(self, index: int, ndim: int) -> bool:
        """Whether scale ``index`` predicts its residual at half resolution (``unet.RegistrationUNet``): every scale
        but the coarsest of a 3D image whose full-resolution voxels (``voxel_mm``) are smaller than
        ``half_field_below`` mm. The coarsest scale, which finds the large motion, keeps its full resolution
        (halved too, a 3D series' error went from 0.34 to 1.84 mm: Testing/benchmarks/RESULTS.md)."""
        return index > 0 and ndim == 3 and self.voxel_mm is not None and self.voxel_mm < self.half_field_below

    def window_for(self, ndim: int) -> int:
        return int(self.ncc_window) if self.ncc_window else (5 if ndim == 3 else 6)

    def validate(self) -> None:
        if self.steps_per_scale < 0:
            raise InputError("{setting} must be 0 (inference only) or more.", setting="steps")
        if self.finest_steps is not None and self.finest_steps < 0:
            raise InputError("{setting} must be 0 (the coarser scale's network, untrained further) or more.",
                             setting="finest_steps")
        if self.smoothness_weight < 0:
            raise InputError("{setting} must be at least 0.", setting="smoothness_weight")
        if not self.mse_weight >= 0:
            raise InputError("{setting} must be at least 0.", setting="mse_weight")
        if self.ncc_window is not None and self.ncc_window < 2:
            raise InputError("{setting} must be at least 2 voxels.", setting="ncc_window")
        if not self.learning_rate > 0:
            raise InputError("{setting} must be greater than 0.", setting="learning_rate")
        if self.batch_size < 0:
            raise InputError("{setting} must be 0 (all pairs) or more.", setting="batch_size")
        if self.coarse_batches not in COARSE_BATCHES:
            raise InputError(f"{{setting}} must be one of {', '.join(COARSE_BATCHES)}.", setting="coarse_batches")
        if self.stop_window < 0 or 0 < self.stop_window < 5:
            raise InputError("{setting} must be 0 (train every step) or at least 5 steps.", setting="stop_window")
        if not self.half_field_below >= 0:
            raise InputError("{setting} must be at least 0 (0: every scale predicts at full resolution).",
                             setting="half_field_below")
        if not self.stop_tolerance >= 0:
            raise InputError("{setting} must be at least 0.", setting="stop_tolerance")
        if self.patch_size is not None and (self.patch_size < 0 or 0 < self.patch_size < MIN_PATCH_SIZE):
            raise InputError(f"{{setting}} must be 0 (the whole image) or at least {MIN_PATCH_SIZE} voxels.",
                             setting="patch_size")


def converged(losses: torch.Tensor, done: int, window: int, tolerance: float) -> bool:
    """Convergence-based stopping: after a multiple of ``window`` steps (at least two windows), True when the mean
    training loss of the last ``window`` steps is less than ``tolerance`` below the mean of the ``window`` before.

    losses: (steps,) tensor of the scale's losses, the first ``done`` filled. ``window`` 0 never stops early.
    """
    if window <= 0 or done < 2 * window or done % window:
        return False
    previous, last = losses[done - 2 * window: done].view(2, window).mean(dim=1).tolist()
    return previous - last < tolerance


@dataclass
class RegistrationResult:
    """Output of ``register_tensors``.

    displacement: (N, ndim, *S) full-resolution field in voxels (see ``spatial``).
    displacements_per_scale: the composed field after each scale (same shape), coarse to fine.
    loss_history: per scale, the training loss at every step trained (fewer than the budget where it converged).
    networks: per scale, the trained U-Net weights (state dicts on the CPU).
    """

    displacement: torch.Tensor
    displacements_per_scale: List[torch.Tensor]
    loss_history: Dict[str, List[float]]
    networks: List[Dict[str, torch.Tensor]]
    seconds: float
    device: str
    window: int
    scales: Tuple[Fraction, ...] = field(default_factory=tuple)


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' (CUDA if present, else CPU), 'cpu', 'cuda' or 'cuda:N' -> torch.device, with clear errors."""
    try:
        name = check_device_name(name)
    except ValueError as error:
        raise InputError(str(error)) from None
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise InputError(f"Device {name!r} was asked for but this PyTorch sees no CUDA GPU; choose the CPU (or "
                         "automatic) device instead.")
    device = torch.device(name)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise InputError(f"Device {name!r} does not exist: {torch.cuda.device_count()} CUDA device(s) are visible.")
    return device


@kept_heap()
def register_tensors(fixed: torch.Tensor, moving: torch.Tensor,
                     settings: RegistrationSettings = RegistrationSettings(),
                     fixed_mask: Optional[torch.Tensor] = None,
                     initial_networks: Optional[Sequence[Dict[str, torch.Tensor]]] = None,
                     device: Union[str, torch.device] = "auto",
                     progress: Optional[ProgressCallback] = None,
                     should_stop: Optional[Callable[[], bool]] = None,
                     moving_mask: Optional[torch.Tensor] = None) -> RegistrationResult:
    """Register ``moving`` to ``fixed`` with multi-scale test-time training.

    Args:
        fixed, moving: (N, 1, *S) intensities normalised to [0, 1], S 2D or 3D; N pairs share the networks.
        settings: schedule and hyper-parameters; with ``batch_size`` below N each step trains on a random
            mini-batch of pairs, and the fields of all pairs are evaluated in chunks of ``batch_size``.
        fixed_mask: optional (N, 1, *S) mask (non-zero = inside) restricting the similarity term.
        moving_mask: optional (N, 1, *S) field of view of ``moving`` (1 where it has data, on the same grid): the
            similarity ignores fixed voxels whose warped moving point falls outside it (no false edge at the border
            of a smaller moving image), and each residual is multiplied by the field of view as warped so far (the
            field does not move where nothing is known; the smoothness term then keeps the border still too).
        initial_networks: optional U-Net state dicts, one per scale (or one for all scales), to start
            from instead of a fresh network; with ``steps_per_scale == 0`` this is pure inference.
        device: 'auto', 'cpu', 'cuda[:N]' or a torch.device.
        progress: called with dict events: once {"event": "started", "device", "scales", "steps_per_scale",
            "image_size" (x, y[, z] order), "pairs", "batch_size", "precision", "scale_steps", "half_field_scales"
            (those predicting at half resolution, ``RegistrationSettings.half_field_at``)}, then {"event": "progress", "scale",
            "scale_index", "num_scales", "step", "steps", "loss" (of the step's batch), "fraction", "elapsed_s",
            "eta_s"}.
        should_stop: polled at every report; returning True raises RegistrationCancelled.
    Returns:
        RegistrationResult with the field in voxels of the full-resolution grid.
    """
    settings.validate()
    if fixed.shape != moving.shape:
        raise InputError(f"fixed {tuple(fixed.shape)} and moving {tuple(moving.shape)} tensors differ in shape.")
    ndim = fixed.dim() - 2
    if ndim not in (2, 3) or fixed.shape[1] != 1:
        raise InputError(f"expected (N, 1, *S) tensors with 2 or 3 spatial axes, got {tuple(fixed.shape)}.")
    scales = tuple(settings.scales)
    size = tuple(fixed.shape[2:])
    check_schedule(size, scales)
    schedule = settings.schedule_steps()
    if not any(schedule) and not initial_networks:
        raise InputError("{setting} is 0 (inference only) but no trained network weights were given.", setting="steps")
    if initial_networks is not None and len(initial_networks) not in (1, len(scales)):
        raise InputError(f"{len(initial_networks)} network weight sets given for {len(scales)} scales.")

    device = device if isinstance(device, torch.device) else resolve_device(device)
    window = settings.window_for(ndim)
    if window > min(size):
        raise InputError(f"The NCC window of {window} voxels is larger than the image ({'x'.join(map(str, size[::-1]))}"
                         f" voxels); choose a window of at most {min(size)} voxels.")
    torch.manual_seed(settings.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    fixed = fixed.to(device=device, dtype=torch.float32)
    moving = moving.to(device=device, dtype=torch.float32)
    mask = (fixed_mask.to(device) > 0).float() if fixed_mask is not None else None
    if mask is not None and mask.sum() == 0:
        raise InputError("The fixed mask is empty (no voxel inside); give a mask that covers the region to align.")
    view = (moving_mask.to(device) > 0).float() if moving_mask is not None else None

    pairs = int(fixed.shape[0])
    batches = [settings.pairs_per_step_at(index, pairs, size) for index in range(len(scales))]
    batch_sampler = torch.Generator().manual_seed(settings.seed)
    displacement = torch.zeros((pairs, ndim) + size, device=device)
    network = RegistrationUNet(ndim, settings.encoder_channels, settings.decoder_channels).to(device)
    mixed = settings.mixed_precision and bfloat16_supported(device)
    if mixed:
        network = use_mixed_precision(network)
    per_scale: List[torch.Tensor] = []
    histories: Dict[str, List[float]] = {}
    trained: List[Dict[str, torch.Tensor]] = []
    if progress is not None:
        progress(started_event(device, [format_scale(s) for s in scales], settings.steps_per_scale,
                               list(reversed(size)), pairs, batches[-1],
                               precision="bfloat16 mixed" if mixed else "float32", scale_steps=schedule,
                               half_field_scales=[format_scale(scale) for index, scale in enumerate(scales)
                                                  if settings.half_field_at(index, ndim)],
                               scale_batches=batches))
    start = last_report = time.perf_counter()

    for index, scale in enumerate(scales):
        if initial_networks is not None:
            network.load_state_dict(initial_networks[index if len(initial_networks) > 1 else 0])
        scale_size = scaled_size(size, scale)
        fixed_s, moving_s = scale_pair(fixed, moving, displacement, scale_size)
        mask_s = (resize_image(mask, scale_size) > 0.5).float() if mask is not None else None
        if mask_s is not None and mask_s.sum() == 0:
            mask_s = (resize_image(mask, scale_size) > 0).float()
        view_s = resize_image(warp(view, displacement), scale_size) if view is not None else None
        pair = torch.cat([moving_s, fixed_s], dim=1)
        shape = patch_shape(scale_size, settings.patch_for(ndim))
        steps = schedule[index]
        half = settings.half_field_at(index, ndim)
        batch_size = batches[index]
        sampler = PatchSampler(fixed_s, mask_s, shape, batch_sampler) if shape and steps else None

        losses = torch.zeros(steps, device=device)
        optimizer = Adam(network.parameters(), lr=settings.learning_rate)
        network.train()
        done = 0
        for step in range(steps):
            optimizer.zero_grad()
            if batch_size < pairs:
                chosen = torch.randperm(pairs, generator=batch_sampler)[:batch_size].to(device)
                pair_b, fixed_b, moving_b = pair[chosen], fixed_s[chosen], moving_s[chosen]
                mask_b = mask_s[chosen] if mask_s is not None else None
                view_b = view_s[chosen] if view_s is not None else None
            else:
                pair_b, fixed_b, moving_b, mask_b, view_b = pair, fixed_s, moving_s, mask_s, view_s
            loss = training_loss(network, pair_b, fixed_b, moving_b, mask_b, view_b, settings, window, mixed,
                                 sampler.draw() if sampler is not None else None, half)
            loss.backward()
            optimizer.step()
            losses[step] = loss.detach()
            done = step + 1
            now = time.perf_counter()
            if settings.progress_every > 0:
                due = done % settings.progress_every == 0
            else:
                due = now - last_report >= REPORT_SECONDS
            stop = converged(losses, done, settings.stop_window, settings.stop_tolerance)
            if due or stop or done == steps:
                last_report = now
                if should_stop is not None and should_stop():
                    raise RegistrationCancelled("registration cancelled")
                if progress is not None:
                    event = progress_event(format_scale(scale), index, len(scales), done, steps,
                                           float(losses[step]), 0, now - start, schedule)
                    progress({**event, "converged": True} if stop else event)
            if stop:
                break
        histories[format_scale(scale)] = losses[:done].tolist()

        network.eval()
        with torch.no_grad():
            residual = torch.cat([predict(network, chunk, mixed, half) if shape is None
                                  else predict_tiled(lambda tile: predict(network, tile, mixed, half), chunk, shape)
                                  for chunk in pair.split(batch_size)])
            if view_s is not None:
                residual = residual * view_s
        displacement = add_residual(displacement, residual)
        per_scale.append(displacement)
        # The next scale goes on training this network: it starts from these weights.
        trained.append({k: v.detach().cpu().clone(memory_format=torch.contiguous_format)
                        for k, v in network.state_dict().items()})

    return RegistrationResult(displacement=displacement, displacements_per_scale=per_scale,
                              loss_history=histories, networks=trained,
                              seconds=time.perf_counter() - start, device=str(device), window=window,
                              scales=scales)


def training_loss(network: RegistrationUNet, pair: torch.Tensor, fixed: torch.Tensor, moving: torch.Tensor,
                  mask: Optional[torch.Tensor], view: Optional[torch.Tensor], settings: RegistrationSettings,
                  window: int, mixed: bool, patch: Optional[Tuple[Tuple[slice, ...], Tuple[int, ...]]] = None,
                  half_resolution: bool = False) -> torch.Tensor:
    """The loss of one training step on a batch of pairs at one scale.

    pair: (B, 2, *S) moving and fixed; fixed, moving: (B, 1, *S); mask, view: optional (B, 1, *S) fixed mask and
    field of view of the moving image (see ``register_tensors``). patch: optional (region, corner) from
    ``PatchSampler.draw``: the U-Net sees that region only, and its residual warps the whole moving image there.
    half_resolution: the U-Net predicts the residual at half resolution (``RegistrationSettings.half_field_at``).
    """
    corner = None
    if patch is not None:
        region, corner = patch
        crop = (slice(None), slice(None)) + region
        pair, fixed = pair[crop], fixed[crop]
        mask = mask[crop] if mask is not None else None
    residual = predict(network, pair, mixed, half_resolution)
    if view is not None:  # where the warped moving image has data (not a path for the gradient)
        residual = residual * (view if patch is None else view[crop])
        inside = (warp(view, residual.detach(), corner=corner) > 0.5).float()
        mask = inside if mask is None else mask * inside
    return registration_loss(fixed, warp(moving, residual, corner=corner), residual, window,
                             settings.smoothness_weight, mask, settings.mse_weight)


def scale_pair(fixed: torch.Tensor, moving: torch.Tensor, displacement: torch.Tensor,
               scale_size: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The inputs of one scale: ``fixed`` and ``moving`` warped by the field so far, both resized to ``scale_size``.

    fixed, moving: (N, 1, *S); displacement: (N, ndim, *S) voxels. Returns two (N, 1, *scale_size) tensors.
    """
    return resize_image(fixed, scale_size), resize_image(warp(moving, displacement), scale_size)


def add_residual(displacement: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """The field so far (N, ndim, *S) composed with a residual predicted at a scale's size (N, ndim, *s), in voxels
    of that size: u(p) = r(p) + u_c(p + r(p)) at full resolution (see ``spatial.compose``)."""
    return compose(displacement, resize_field(residual, tuple(displacement.shape[2:])))


def coarse_to_fine_field(networks: Sequence[torch.nn.Module], fixed: torch.Tensor, moving: torch.Tensor,
                         scales: Sequence[Fraction]) -> torch.Tensor:
    """Composed full-resolution field of trained networks (no training), as ``register_tensors`` computes it.

    Args:
        networks: one network per leading scale of ``scales`` (fewer networks than scales: the field after them).
        fixed, moving: (N, 1, *S).
    Returns:
        (N, ndim, *S) voxel field (zeros when ``networks`` is empty).
    """
    size = tuple(fixed.shape[2:])
    displacement = torch.zeros((fixed.shape[0], len(size)) + size, device=fixed.device)
    with torch.no_grad():
        for network, scale in zip(networks, scales):
            fixed_s, moving_s = scale_pair(fixed, moving, displacement, scaled_size(size, scale))
            displacement = add_residual(displacement, network(torch.cat([moving_s, fixed_s], dim=1)))
    return displacement


def similarity(fixed: torch.Tensor, moving: torch.Tensor, displacement: Optional[torch.Tensor], window: int,
               mask: Optional[torch.Tensor] = None) -> Dict[str, float]:
    """Local NCC and MSE between ``fixed`` and ``moving`` warped by ``displacement`` (identity if None)."""
    with torch.no_grad():
        warped = moving if displacement is None else warp(moving, displacement)
        inside = None if mask is None else (mask > 0).float()
        mse = masked_mean((fixed - warped) ** 2, inside)
        return {"ncc": float(local_ncc(fixed, warped, window, inside)), "mse": float(mse)}
