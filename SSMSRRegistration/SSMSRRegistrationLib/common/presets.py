"""Named test-time training budgets, shared by the command line, the Python API and the Slicer module.

* ``balanced`` (the default): pairs 1/4,1/2,1 x 300 steps with the smoothness weight 3; cines 1/8,1/4,1/2,1 x 600
  steps for the sequence with the smoothness weight 2 plus the MSE term (weight 1000): the frames of one cine share
  their intensities, so their squared difference is a fair similarity too; on 3D brains between subjects (bias
  field, noise) it lowered the Dice, so pairs train without it. All measured by the accuracy ablation
  (Testing/benchmarks/ablation.py, RESULTS.md). About 7 min for a 48x64x48 volume and under 2 min for a 320x240
  image on a 2-core CPU without bfloat16 (measured: 435 s and 109 s); a 15-frame 320x240 cine about 4 min.
* ``paper``: the paper's schedules (1/2,1 for image pairs, 1/8,1/4,1/2,1 for echo cines), 3500 steps per scale,
  the paper's loss (smoothness weight 10, no MSE term) and learning rate 1e-3: reproduces the paper.
* ``fast``: a short budget for a laptop CPU or a quick look: pairs 1/4,1/2,1 x 80 steps (on the evaluation's
  hippocampus-sized 3D brain pairs, 48x64x48 at 2 mm, level with ANTs SyN's Dice at about a quarter of its time on
  a 2-core CPU without bfloat16, see Testing/benchmarks/speed.py and RESULTS.md); cines as ``balanced``.

Convergence-based stopping (``engine.multiscale.converged``, ``--stop-window``) is in no preset: it saved steps
from about 600 steps per scale on (Testing/benchmarks/convergence.py) and never ended a scale at 300 steps or
fewer on the ablation's echo and brain pairs.

All train with mixed precision (bfloat16 convolutions, losses in float32) where the device runs bfloat16
natively, and in float32 elsewhere; ``precision="float32"`` forces the plain float32 reference. An explicit
schedule, step count, precision, smoothness weight, learning rate or MSE weight overrides the preset's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .schedule import parse_scales
from .errors import InputError

PRECISIONS = ("mixed", "float32")
#: Convergence-based stopping's tolerance when only its window is given (Testing/benchmarks/convergence.py).
DEFAULT_STOP_TOLERANCE = 2e-4
#: The paper's smoothness weight (lambda of Eq. 1) and Adam learning rate.
PAPER_SMOOTHNESS_WEIGHT = 10.0
PAPER_LEARNING_RATE = 1e-3


@dataclass(frozen=True)
class Training:
    """The loss weights and learning rate of one kind of run (pairs, or cines); the defaults are the paper's.

    mse_weight: weight of the mean squared intensity difference (intensities in [0, 1]) added to Eq. 1; it suits
    images whose intensities correspond, such as the frames of one cine.
    """

    smoothness_weight: float = PAPER_SMOOTHNESS_WEIGHT
    learning_rate: float = PAPER_LEARNING_RATE
    mse_weight: float = 0.0


@dataclass(frozen=True)
class Preset:
    """Schedules (comma-separated fractions), steps per scale, precision and training of one preset."""

    name: str
    pair_scales: str  # ``register`` and ``segment`` (2D or 3D pairs)
    pair_steps: int
    cine_scales: str  # ``track`` (2D+t); its steps are for the whole sequence
    cine_steps: int
    precision: str
    summary: str
    pair_training: Training = Training()
    cine_training: Training = Training()


#: Cines of ``balanced`` and ``fast``: lambda 2 and the MSE term, measured on the echo cine (RESULTS.md).
CINE_TRAINING = Training(smoothness_weight=2.0, mse_weight=1000.0)

PRESETS = {
    "balanced": Preset("balanced", "1/4,1/2,1", 300, "1/8,1/4,1/2,1", 600, "mixed",
                       "pairs 1/4,1/2,1 x 300 steps with lambda 3, as measured best (for 48x64x48 about 7 min on 2 "
                       "CPU cores without bfloat16), cines 1/8,1/4,1/2,1 x 600 steps with lambda 2 and the MSE term "
                       "(weight 1000)",
                       pair_training=Training(smoothness_weight=3.0), cine_training=CINE_TRAINING),
    "paper": Preset("paper", "1/2,1", 3500, "1/8,1/4,1/2,1", 3500, "mixed",
                    "the paper's schedules and 3500 training steps per scale"),
    "fast": Preset("fast", "1/4,1/2,1", 80, "1/8,1/4,1/2,1", 600, "mixed",
                   "pairs 1/4,1/2,1 x 80 steps (for 48x64x48 about 100 s on 2 CPU cores without bfloat16), cines "
                   "as balanced", cine_training=CINE_TRAINING),
}
DEFAULT_PRESET = "balanced"


@dataclass(frozen=True)
class Budget:
    """What one run trains with, after applying a preset and the explicit choices."""

    scales: str
    steps: int
    mixed_precision: bool
    stop_window: int = 0
    stop_tolerance: float = DEFAULT_STOP_TOLERANCE
    smoothness_weight: float = PAPER_SMOOTHNESS_WEIGHT
    learning_rate: float = PAPER_LEARNING_RATE
    mse_weight: float = 0.0


def preset_named(name: Optional[str]) -> Preset:
    """The preset called ``name`` (None: the default), or InputError listing the choices."""
    key = (name or DEFAULT_PRESET).strip().lower()
    if key not in PRESETS:
        raise InputError(f"Unknown preset {name!r}; choose one of: {', '.join(PRESETS)}.")
    return PRESETS[key]


def budget(preset: Optional[str], cine: bool = False, scales: Optional[str] = None, steps: Optional[int] = None,
           precision: Optional[str] = None, stop_window: Optional[int] = None,
           stop_tolerance: Optional[float] = None, smoothness_weight: Optional[float] = None,
           learning_rate: Optional[float] = None, mse_weight: Optional[float] = None) -> Budget:
    """The preset's schedule, steps and training (of a pair, or of a ``cine``) and precision, each overridden when
    given; convergence-based stopping only when given (``stop_window`` > 0)."""
    chosen = preset_named(preset)
    precision = (precision or chosen.precision).strip().lower()
    if precision not in PRECISIONS:
        raise InputError(f"Unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}.")
    training = chosen.cine_training if cine else chosen.pair_training
    given = lambda value, default: float(default if value is None else value)  # noqa: E731
    return Budget(scales=scales if scales is not None else (chosen.cine_scales if cine else chosen.pair_scales),
                  steps=int(steps) if steps is not None else (chosen.cine_steps if cine else chosen.pair_steps),
                  mixed_precision=precision == "mixed", stop_window=int(stop_window or 0),
                  stop_tolerance=given(stop_tolerance, DEFAULT_STOP_TOLERANCE),
                  smoothness_weight=given(smoothness_weight, training.smoothness_weight),
                  learning_rate=given(learning_rate, training.learning_rate),
                  mse_weight=given(mse_weight, training.mse_weight))


def matching_preset(scales: str, steps: int, precision: str, cine: bool = False,
                    smoothness_weight: Optional[float] = None) -> Optional[str]:
    """The name of the preset whose schedule and steps (of a pair, or of a ``cine``), precision and (when given)
    smoothness weight these are, or None."""
    try:
        schedule = parse_scales(scales)
    except InputError:
        return None
    for name in PRESETS:
        plan = budget(name, cine=cine)
        if (schedule == parse_scales(plan.scales) and int(steps) == plan.steps
                and (precision == "mixed") == plan.mixed_precision
                and (smoothness_weight is None or float(smoothness_weight) == plan.smoothness_weight)):
            return name
    return None
