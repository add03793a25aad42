"""Pretraining the per-scale U-Nets on a collection of image pairs (paper Sec. III-B: "we also firstly update
the weights on the training set the same as VoxelMorph"), before test-time training on each new pair.

The procedure mirrors the test-time one (``multiscale.register_tensors``), scale by scale, coarse to fine:

* at scale s, each moving image is warped by the composed field of the already-trained coarser networks
  (inference, exactly as ``register_tensors`` computes it with ``steps_per_scale=0``), then it and the fixed
  image are resized to scale s;
* the network of scale s starts from the trained weights of scale s/2 (a fresh network at the coarsest scale)
  and is trained with Adam on random mini-batches of pairs for ``steps_per_scale`` steps;
* the validation loss (mean of Eq. 1 over the validation pairs at that scale) is measured before the scale's
  first step, every ``validation_every`` steps and after its last step.

Mini-batches are drawn without replacement within an epoch from a permutation that depends only on
(seed, scale, epoch), and the Adam state is part of the checkpoint, so a run resumed from a checkpoint takes
the same steps as an uninterrupted one (bit-identical on the CPU).

Torch only; images come from a ``PairSource`` (``TensorPairs`` in memory, or the file-backed collection of
``SSMSRRegistrationLib.training``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..common.errors import InputError, TrainingStopped
from ..common.protocol import REPORT_SECONDS, ProgressCallback, Validation, progress_event, started_event
from ..common.schedule import check_schedule, format_scale, scaled_size
from .allocator import kept_heap
from .losses import registration_loss
from .multiscale import RegistrationSettings, coarse_to_fine_field, scale_pair
from .spatial import warp
from .unet import RegistrationUNet

StateDict = Dict[str, torch.Tensor]


class PairSource:
    """A collection of (fixed, moving) pairs for training: ``len(source)``, ``source.size(i)`` (spatial size S of
    pair i, array-axis order) and ``source[i]`` -> (fixed, moving), each a (1, 1, *S) float tensor in [0, 1]
    with the moving image already on the fixed image's grid."""

    def __len__(self) -> int:
        raise NotImplementedError

    def size(self, index: int) -> Tuple[int, ...]:
        raise NotImplementedError

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class TensorPairs(PairSource):
    """Pairs held in memory: a sequence of (fixed, moving) tensors of shape (1, 1, *S) or (1, *S) or S."""

    def __init__(self, pairs: Sequence[Tuple[torch.Tensor, torch.Tensor]]):
        self.pairs = []
        for index, (fixed, moving) in enumerate(pairs):
            fixed, moving = _as_image(fixed), _as_image(moving)
            if fixed.shape != moving.shape:
                raise InputError(f"pair {index}: fixed {tuple(fixed.shape[2:])} and moving {tuple(moving.shape[2:])} "
                                 "differ in size; resample the moving image onto the fixed grid first.")
            self.pairs.append((fixed, moving))

    def __len__(self) -> int:
        return len(self.pairs)

    def size(self, index: int) -> Tuple[int, ...]:
        return tuple(self.pairs[index][0].shape[2:])

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.pairs[index]


def _as_image(tensor) -> torch.Tensor:
    """(1, 1, *S) float32 view of an image given as S-shaped or (1, 1, *S)-shaped data (S 2D or 3D)."""
    tensor = torch.as_tensor(tensor, dtype=torch.float32)
    if tensor.dim() in (2, 3):
        tensor = tensor[None, None]
    if tensor.dim() not in (4, 5) or tuple(tensor.shape[:2]) != (1, 1):
        raise InputError(f"expected an image of 2 or 3 spatial axes, shaped S or (1, 1, *S); got {tuple(tensor.shape)}.")
    return tensor


@dataclass
class TrainingSettings(RegistrationSettings):
    """Hyper-parameters of a pretraining run: a registration's, plus validation, checkpoints and caching.

    ``batch_size`` is the number of pairs per Adam step (at least 1).
    """

    batch_size: int = 1
    validation_every: int = 100  # steps between validation measurements (0: only at the start and end of a scale)
    checkpoint_every: int = 500  # steps between checkpoints (0: only at the end of each scale)
    cache_bytes: int = 512 * 2 ** 20  # memory for the resized inputs of a scale, reused across epochs

    def validate(self) -> None:
        super().validate()
        if self.steps_per_scale < 1:
            raise InputError("training needs {setting} of at least 1.", setting="steps")
        if self.batch_size < 1:
            raise InputError("{setting} must be at least 1.", setting="batch_size")
        if self.validation_every < 0 or self.checkpoint_every < 0:
            raise InputError("validation and checkpoint intervals must be 0 or more steps.")


@dataclass
class TrainingState:
    """Where a training run stands; what a checkpoint holds.

    networks: trained state dicts of the finished scales, coarse to fine.
    scale_index, step: the scale in progress and the steps done in it (scale_index == len(scales): finished).
    network, optimizer: weights and Adam state of the scale in progress (None between scales).
    loss_history: per scale, the training loss (mean over the step's batch) at every step.
    validation_history: {"scale", "scale_index", "step", "loss"} records, in order.
    seconds: training time so far, over all sessions.
    """

    networks: List[StateDict] = field(default_factory=list)
    scale_index: int = 0
    step: int = 0
    network: Optional[StateDict] = None
    optimizer: Optional[dict] = None
    loss_history: Dict[str, List[float]] = field(default_factory=dict)
    validation_history: List[dict] = field(default_factory=list)
    seconds: float = 0.0

    def finished(self, number_of_scales: int) -> bool:
        return self.scale_index >= number_of_scales


def batch_indices(seed: int, scale_index: int, step: int, count: int, batch_size: int) -> List[int]:
    """The pairs of training step ``step`` at scale ``scale_index``: a slice of a per-epoch random permutation.

    An epoch is ``count // batch_size`` steps; each permutation depends only on (seed, scale, epoch), so any
    step's batch can be recomputed (resuming needs no sampler state).
    """
    per_epoch = count // batch_size
    epoch, position = divmod(step, per_epoch)
    generator = torch.Generator().manual_seed((((seed * 1_000_003) + scale_index) * 1_000_033 + epoch) % (2 ** 63))
    order = torch.randperm(count, generator=generator)
    return order[position * batch_size:(position + 1) * batch_size].tolist()


class _ScaleInputs:
    """(fixed_s, moving_s) of pairs at one scale, moving warped by the coarser networks; cached up to a budget."""

    def __init__(self, source: PairSource, coarse: List[torch.nn.Module], scales, index: int, device,
                 budget_bytes: int):
        self.source, self.coarse, self.scales, self.index, self.device = source, coarse, scales, index, device
        self.budget = budget_bytes
        self.used = 0
        self.cache: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        if index in self.cache:
            return self.cache[index]
        fixed, moving = self.source[index]
        fixed = fixed.to(self.device, torch.float32)
        moving = moving.to(self.device, torch.float32)
        size = tuple(fixed.shape[2:])
        scale_size = scaled_size(size, self.scales[self.index])
        with torch.no_grad():
            displacement = coarse_to_fine_field(self.coarse, fixed, moving, self.scales[:self.index])
            inputs = scale_pair(fixed, moving, displacement, scale_size)
        cost = 2 * inputs[0].numel() * inputs[0].element_size()
        if self.used + cost <= self.budget:
            self.cache[index] = inputs
            self.used += cost
        return inputs

    def batch(self, indices: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
        items = [self.get(i) for i in indices]
        return torch.cat([f for f, _ in items]), torch.cat([m for _, m in items])


def check_pairs(source: PairSource, settings: TrainingSettings, role: str) -> int:
    """Check sizes against the schedule and the batch size; return the number of spatial dimensions."""
    if len(source) == 0:
        raise InputError(f"There are no {role} pairs.")
    sizes = [tuple(source.size(i)) for i in range(len(source))]
    dimensions = {len(size) for size in sizes}
    if len(dimensions) > 1 or not dimensions <= {2, 3}:
        raise InputError(f"The {role} pairs mix image dimensions ({sorted(dimensions)}); train on 2D or on 3D "
                         "images, not both.")
    for size in set(sizes):
        check_schedule(size, settings.scales)
    if role == "training" and settings.batch_size > 1:
        if settings.batch_size > len(source):
            raise InputError(f"The batch size {settings.batch_size} is larger than the {len(source)} training "
                             "pairs; use a smaller {setting}.", setting="batch_size")
        if len(set(sizes)) > 1:
            examples = ", ".join("x".join(map(str, reversed(size))) for size in sorted(set(sizes))[:4])
            raise InputError(f"A batch of {settings.batch_size} pairs needs images of one size, but the training "
                             f"pairs have {len(set(sizes))} sizes ({examples}, ...); train with a batch size of 1, or resample "
                             "the images onto a common grid.")
    return dimensions.pop()


@kept_heap()
def train_networks(training: PairSource, validation: Optional[PairSource], settings: TrainingSettings, *,
                   state: Optional[TrainingState] = None, device: Union[str, torch.device] = "cpu",
                   progress: Optional[ProgressCallback] = None, should_stop: Optional[Callable[[], bool]] = None,
                   checkpoint: Optional[Callable[[TrainingState], None]] = None) -> TrainingState:
    """Train one U-Net per scale on ``training`` (coarse to fine), measuring the loss on ``validation``.

    Args:
        training, validation: pair sources (validation may be None or empty: no validation loss).
        settings: schedule and hyper-parameters (``settings.validate()`` is called).
        state: a checkpoint's state to continue from (None: start afresh).
        device: a torch.device (or name).
        progress: receives {"event": "started", ...}, {"event": "progress", "scale", "scale_index",
            "num_scales", "step", "steps", "loss", "fraction", "elapsed_s", "eta_s"} and
            {"event": "validation", "scale", "scale_index", "step", "loss"} dicts.
        should_stop: polled after every step; True stops the training: the last consistent state is passed to
            ``checkpoint`` and TrainingStopped (a RegistrationCancelled) is raised.
        checkpoint: called with the state every ``checkpoint_every`` steps, after each scale, and when stopped.
    Returns:
        The final state (every scale trained).
    """
    settings.validate()
    ndim = check_pairs(training, settings, "training")
    has_validation = validation is not None and len(validation) > 0
    if has_validation and check_pairs(validation, settings, "validation") != ndim:
        raise InputError("The validation pairs do not have the dimension of the training pairs.")
    device = torch.device(device)
    scales = tuple(settings.scales)
    window = settings.window_for(ndim)
    steps = settings.steps_per_scale
    state = state if state is not None else TrainingState()
    if len(state.networks) != min(state.scale_index, len(scales)) or state.step > steps:
        raise InputError(f"The checkpoint (scale index {state.scale_index}, step {state.step}, "
                         f"{len(state.networks)} trained networks) does not fit {len(scales)} scales of {steps} steps.")
    pairs = len(training)
    done_before = min(state.scale_index, len(scales)) * steps + (state.step if state.scale_index < len(scales) else 0)
    if progress is not None:
        progress(started_event(device, [format_scale(s) for s in scales], steps, list(reversed(training.size(0))),
                               pairs, settings.batch_size, validation_pairs=len(validation) if has_validation else 0,
                               resumed_at=done_before))
    start = last_report = time.perf_counter()
    seconds_before = state.seconds

    def make_network(weights: Optional[StateDict]) -> RegistrationUNet:
        network = RegistrationUNet(ndim, settings.encoder_channels, settings.decoder_channels)
        if weights is not None:
            network.load_state_dict(weights)
        return network.to(device)

    def snapshot(network, optimizer) -> TrainingState:
        state.seconds = seconds_before + time.perf_counter() - start
        state.network = {k: v.detach().cpu().clone() for k, v in network.state_dict().items()}
        state.optimizer = _cpu_optimizer_state(optimizer.state_dict())
        return state

    coarse = [make_network(weights).eval() for weights in state.networks]
    torch.manual_seed(settings.seed)
    while state.scale_index < len(scales):
        index = state.scale_index
        scale = scales[index]
        key = format_scale(scale)
        if state.network is not None:
            network = make_network(state.network)
        else:  # a new scale starts from the previous scale's trained weights (a fresh network at the coarsest)
            network = make_network(state.networks[-1] if state.networks else None)
        optimizer = torch.optim.Adam(network.parameters(), lr=settings.learning_rate)
        if state.optimizer is not None:
            optimizer.load_state_dict(state.optimizer)
        history = state.loss_history.setdefault(key, [])
        del history[state.step:]
        train_inputs = _ScaleInputs(training, coarse, scales, index, device, settings.cache_bytes)
        valid_inputs = (_ScaleInputs(validation, coarse, scales, index, device, settings.cache_bytes)
                        if has_validation else None)

        def validate_now(step: int) -> None:
            if valid_inputs is None or any(r["scale_index"] == index and r["step"] == step
                                           for r in state.validation_history):
                return
            loss = validation_loss(network, valid_inputs, len(validation), window, settings.smoothness_weight)
            record = {"scale": key, "scale_index": index, "step": step, "loss": loss}
            state.validation_history.append(record)
            if progress is not None:
                progress(Validation(**record).to_dict())

        network.eval()
        validate_now(state.step)
        network.train()
        while state.step < steps:
            step = state.step
            indices = batch_indices(settings.seed, index, step, pairs, settings.batch_size)
            fixed_b, moving_b = train_inputs.batch(indices)
            optimizer.zero_grad(set_to_none=True)
            residual = network(torch.cat([moving_b, fixed_b], dim=1))
            loss = registration_loss(fixed_b, warp(moving_b, residual), residual, window, settings.smoothness_weight)
            loss.backward()
            optimizer.step()
            history.append(float(loss.detach()))
            state.step = done = step + 1

            if settings.validation_every and done % settings.validation_every == 0 and done < steps:
                network.eval()
                validate_now(done)
                network.train()
            if checkpoint is not None and settings.checkpoint_every and done % settings.checkpoint_every == 0 \
                    and done < steps:
                checkpoint(snapshot(network, optimizer))
            now = time.perf_counter()
            due = (done % settings.progress_every == 0) if settings.progress_every > 0 \
                else now - last_report >= REPORT_SECONDS
            if progress is not None and (due or done == steps):
                last_report = now
                progress(progress_event(key, index, len(scales), done, steps, history[-1], done_before, now - start))
            if should_stop is not None and should_stop() and done < steps:
                snapshot(network, optimizer)
                if checkpoint is not None:
                    checkpoint(state)
                raise TrainingStopped(f"training stopped at scale {key} ({index + 1} of {len(scales)}), step "
                                      f"{done} of {steps}", state)

        network.eval()
        validate_now(steps)
        trained = {k: v.detach().cpu().clone() for k, v in network.state_dict().items()}
        state.networks.append(trained)
        coarse.append(make_network(trained).eval())
        state.scale_index, state.step, state.network, state.optimizer = index + 1, 0, None, None
        state.seconds = seconds_before + time.perf_counter() - start
        if checkpoint is not None:
            checkpoint(state)
        if should_stop is not None and should_stop() and state.scale_index < len(scales):
            raise TrainingStopped(f"training stopped after scale {key} ({index + 1} of {len(scales)})", state)
    return state


def validation_loss(network: torch.nn.Module, inputs: _ScaleInputs, count: int, window: int,
                    smoothness_weight: float) -> float:
    """Mean over the validation pairs of the loss (Eq. 1) of ``network`` at the inputs' scale (no training)."""
    total = 0.0
    with torch.no_grad():
        for index in range(count):
            fixed_s, moving_s = inputs.get(index)
            residual = network(torch.cat([moving_s, fixed_s], dim=1))
            total += float(registration_loss(fixed_s, warp(moving_s, residual), residual, window, smoothness_weight))
    return total / count


def _cpu_optimizer_state(state: dict) -> dict:
    """An optimizer state dict with every tensor on the CPU (checkpoints load anywhere)."""
    def move(value):
        if isinstance(value, torch.Tensor):
            return value.detach().cpu().clone()
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        if isinstance(value, list):
            return [move(v) for v in value]
        return value
    return move(state)
