"""The run configuration: a preset name plus explicit overrides, declared once and resolved once per kind of run.

``RUN_OPTIONS`` is the one declaration of every option a run takes. The command line's flags (``interfaces.cli``),
the Python API's keyword arguments, the batch command's options, the Slicer logic's keyword arguments and the
worker's job file are all derived from it; ``RunConfiguration.resolve(kind)`` gives the values a run uses (the
override, else the preset's value for that kind of run, else the option's default), which the engine turns into its
settings (``engine.multiscale.RegistrationSettings.from_run``). Adding a training option or a loss term takes one
``Option`` here (and a value in ``presets`` if presets differ on it) plus the engine code that uses it.

Errors about an option carry its name (``InputError.setting``); each interface words it in its own vocabulary: a
flag on the command line, a field label in the panel, the keyword in the API.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from .errors import InputError
from .presets import COARSE_BATCHES, DEFAULT_PRESET, DEFAULT_STOP_TOLERANCE, KINDS, PRECISIONS, PRESETS, Preset
from .protocol import check_device_name
from .schedule import DEFAULT_MAX_VOXELS, DEFAULT_PATCH_SIZE_3D, MIN_PATCH_SIZE, format_scales, parse_scales

#: Format name and version of a run configuration written as JSON (the worker's job file holds one).
FORMAT = "ssmsr-run-configuration"
FORMAT_VERSION = 1


def _at_least(bound: float, exclusive: bool = False) -> Callable[[Any], Optional[str]]:
    def check(value: Any) -> Optional[str]:
        if value > bound or (value == bound and not exclusive):
            return None
        return f"must be {'greater than' if exclusive else 'at least'} {bound:g}"
    return check


def _schedule(value: str) -> Optional[str]:
    parse_scales(value)  # raises an InputError that says what is wrong
    return None


def _device(value: str) -> Optional[str]:
    try:
        check_device_name(value)
    except ValueError as error:
        return str(error)
    return None


def _stop_window(value: int) -> Optional[str]:
    return None if value == 0 or value >= 5 else "must be 0 (train every step) or at least 5 steps"


def _patch_size(value: int) -> Optional[str]:
    return None if value == 0 or value >= MIN_PATCH_SIZE else \
        f"must be 0 (the whole image) or at least {MIN_PATCH_SIZE} voxels"


def _fraction(value: float) -> Optional[str]:
    return None if 0 <= value < 1 else "must be at least 0 and below 1"


@dataclass(frozen=True)
class Option:
    """One run option.

    name: the API keyword, the job file's key and the engine-facing name. type: int, float or str.
    flag: the command-line flag (``aliases``: other flags accepted). label: the panel's wording. help: what it does.
    kinds: the kinds of run that take it (``presets.KINDS``). default: its value where the preset gives none
    (None: the engine decides, e.g. the NCC window by dimension, as ``automatic`` says). choices: the values allowed
    (str options). check: value -> None, or what is wrong with it ("must be ..."). metavar: the command line's.
    """

    name: str
    type: type
    flag: str
    label: str
    help: str
    kinds: Tuple[str, ...] = KINDS
    default: Any = None
    choices: Tuple[str, ...] = ()
    check: Optional[Callable[[Any], Optional[str]]] = None
    aliases: Tuple[str, ...] = ()
    metavar: Optional[str] = None
    automatic: str = "automatic"  # what a None default means, in help texts

    def convert(self, value: Any) -> Any:
        """``value`` as this option's type (str values are trimmed and lower-cased where there are choices);
        InputError naming the option when it cannot be, is not one of the choices, or fails the check."""
        try:
            if self.type is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            converted = self.type(value.strip() if isinstance(value, str) else value)
        except (TypeError, ValueError):
            raise InputError(f"{{setting}} must be {'an integer' if self.type is int else 'a number'}, "
                             f"got {value!r}.", setting=self.name) from None
        if self.choices:
            converted = converted.lower()
            if converted not in self.choices:
                raise InputError(f"{{setting}} must be one of {', '.join(self.choices)}, got {value!r}.",
                                 setting=self.name)
        problem = self.check(converted) if self.check is not None else None
        if problem:
            raise InputError(f"{{setting}} {problem}, got {value!r}.", setting=self.name)
        return converted


RUN_OPTIONS: Tuple[Option, ...] = (
    Option("scales", str, "--scales", "Scales", "coarse-to-fine schedule of fractions of the full resolution, e.g. "
           "1/4,1/2,1 ('1' alone: single scale, SSR)", check=_schedule, metavar="S"),
    Option("steps", int, "--steps", "Steps per scale", "test-time training steps per scale (a cine: for the whole "
           "sequence; 0 with a model: inference only)", check=_at_least(0), metavar="N"),
    Option("finest_steps", int, "--finest-steps", "Steps at the finest scale", "training steps at the finest scale "
           "alone (the others take the steps per scale): the finest scale costs most per step, and the coarser ones "
           "have already found the large motion", kinds=("pair", "cine", "volume_cine"), check=_at_least(0),
           metavar="N", automatic="the steps per scale"),
    Option("precision", str, "--precision", "Precision", "mixed: bfloat16 convolutions where the device runs them "
           "natively (float32 elsewhere); float32: the plain reference", default="mixed", choices=PRECISIONS),
    Option("smoothness_weight", float, "--lambda", "Smoothness weight", "weight (lambda of Eq. 1) of the squared "
           "gradient of the field, in mm per mm on the working grid", check=_at_least(0),
           aliases=("--smoothness-weight",), metavar="L"),
    Option("learning_rate", float, "--lr", "Learning rate", "Adam's learning rate", check=_at_least(0, exclusive=True),
           aliases=("--learning-rate",), metavar="LR"),
    Option("mse_weight", float, "--mse-weight", "MSE weight", "weight of the mean squared intensity difference "
           "(intensities in [0, 1]) added to the paper's loss, for images whose intensities correspond",
           kinds=("pair", "cine", "volume_cine"), check=_at_least(0), metavar="W"),
    Option("ncc_window", int, "--window", "NCC window (voxels)", "local NCC window in voxels of the working grid",
           check=_at_least(2), metavar="N", automatic="5 in 3D, 6 in 2D"),
    Option("ncc_window_mm", float, "--window-mm", "NCC window (mm)", "local NCC window in millimetres (overrides the "
           "window in voxels)", kinds=("pair",), check=_at_least(0, exclusive=True), metavar="MM",
           automatic="none, the window in voxels"),
    Option("spacing", float, "--spacing", "Working spacing (mm)", "voxel side of the isotropic working grid the "
           "registration runs on (the field is written on the fixed grid)", kinds=("pair",),
           check=_at_least(0, exclusive=True), metavar="MM",
           automatic="the fixed image's finest spacing within the voxel budget, coarser if the device's memory "
                     "requires"),
    Option("max_voxels", int, "--max-voxels", "Voxel budget", "voxel budget of the automatic working grid",
           kinds=("pair",), default=DEFAULT_MAX_VOXELS, check=_at_least(1), metavar="N"),
    Option("stop_window", int, "--stop-window", "Convergence window", "convergence-based stopping: each scale ends "
           "when its mean loss over the last N steps fell by less than the stop tolerance; the steps are then a "
           "maximum (0: train every step)", kinds=("pair",), default=0, check=_stop_window, metavar="N"),
    Option("stop_tolerance", float, "--stop-tolerance", "Convergence tolerance", "see the convergence window",
           kinds=("pair",), default=DEFAULT_STOP_TOLERANCE, check=_at_least(0), metavar="T"),
    Option("patch_size", int, "--patch", "Training patch (voxels)", "scales whose grid is larger than this train "
           "each step on a random patch of this side where the fixed image has structure, so that a step costs the "
           "patch and not the whole volume; the field is still predicted over the whole image (0: train on the whole "
           "image)", kinds=("pair", "cine", "volume_cine"), check=_patch_size, metavar="N",
           automatic=f"{DEFAULT_PATCH_SIZE_3D} in 3D, the whole image in 2D"),
    Option("half_field_below", float, "--half-field-below", "Half-resolution field below (mm)", "3D images whose "
           "working voxels are smaller than this many millimetres have every scale but the coarsest predict its "
           "residual field at half resolution, upsampled: the U-Net runs on the pair average-pooled by 2, an eighth "
           "of the voxels (0: full resolution at every size)", kinds=("pair", "cine", "volume_cine"), default=0.0, check=_at_least(0),
           metavar="MM"),
    Option("batch_size", int, "--batch", "Pairs per step", "pairs per training step, drawn at random (a cine: 0 "
           "trains all pairs every step)", kinds=("cine", "volume_cine", "pretrain"), default=1, check=_at_least(0),
           metavar="N"),
    Option("coarse_batches", str, "--coarse-batches", "Pairs per step at coarser scales", "same: every scale trains "
           "the pairs per step; fill: each coarser scale trains as many pairs per step as the finest scale's step "
           "holds in voxels (a 3D scale at 1/4: 64 times as many), at most all, for about the same cost per step",
           kinds=("cine", "volume_cine"), default="same", choices=COARSE_BATCHES),
    Option("validation_fraction", float, "--validation-fraction", "Validation fraction", "fraction of the pairs (of "
           "a CSV) or images (of a folder) held out to measure the validation loss (0: none)", kinds=("pretrain",),
           default=0.2, check=_fraction, metavar="F"),
    Option("validation_every", int, "--validation-every", "Validation interval", "steps between validation losses",
           kinds=("pretrain",), default=100, check=_at_least(0), metavar="N"),
    Option("checkpoint_every", int, "--checkpoint-every", "Checkpoint interval", "steps between checkpoints (one is "
           "also written after each scale)", kinds=("pretrain",), default=500, check=_at_least(0), metavar="N"),
    Option("device", str, "--device", "Device", "auto, cpu, cuda or cuda:N", default="auto", check=_device,
           metavar="D"),
    Option("seed", int, "--seed", "Random seed", "random seed (the same inputs, seed, software, CPU and thread count "
           "give the same result)", default=0, metavar="N"),
)
OPTIONS: Mapping[str, Option] = MappingProxyType({option.name: option for option in RUN_OPTIONS})


def options_for(kind: str) -> Tuple[Option, ...]:
    """The options of ``kind`` runs, in declaration order."""
    _check_kind(kind)
    return tuple(option for option in RUN_OPTIONS if kind in option.kinds)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown kind of run {kind!r}; one of {', '.join(KINDS)}")


def preset_named(name: Optional[str]) -> Preset:
    """The preset called ``name`` (None: the default), or InputError listing the choices."""
    key = (name or DEFAULT_PRESET).strip().lower()
    if key not in PRESETS:
        raise InputError(f"Unknown preset {name!r}; {{setting}} must be one of {', '.join(PRESETS)}.", setting="preset")
    return PRESETS[key]


def default_text(option: Option, kind: str) -> str:
    """How the default of ``option`` for ``kind`` runs is described in help texts: the option's own default, or each
    preset's value ("balanced: 300, paper: 3500, fast: 80"; a preset that gives none has the option's own)."""
    values = {name: preset.value(kind, option.name, option.default) for name, preset in PRESETS.items()}
    if all(value is None for value in values.values()):
        return option.automatic
    if len(set(map(repr, values.values()))) == 1:
        return _shown(next(iter(values.values())))
    return ", ".join(f"{name}: {_shown(value)}" for name, value in values.items())


def _shown(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class RunConfiguration:
    """A preset plus explicit overrides ({option name: value}); what every interface hands down to a run.

    Build it with ``RunConfiguration.of(preset, **overrides)`` (None values mean "not given"); it is validated then,
    so a configuration that exists is a valid one. ``given`` holds the overrides as (name, value) pairs in
    declaration order (immutable and picklable); ``overrides`` gives them as a new dict.
    """

    preset: str = DEFAULT_PRESET
    given: Tuple[Tuple[str, Any], ...] = ()

    @property
    def overrides(self) -> Dict[str, Any]:
        return dict(self.given)

    @classmethod
    def of(cls, preset: Optional[str] = None, **overrides: Any) -> "RunConfiguration":
        """The configuration of ``preset`` (None: the default) with the ``overrides`` that are not None, each
        converted and checked (InputError naming the option otherwise)."""
        chosen = preset_named(preset).name
        checked: Dict[str, Any] = {}
        for name, value in overrides.items():
            if value is None:
                continue
            if name not in OPTIONS:
                raise InputError(f"Unknown run option {name!r}; the options are: {', '.join(OPTIONS)}.",
                                 setting=name)
            checked[name] = OPTIONS[name].convert(value)
        if "scales" in checked:
            checked["scales"] = format_scales(parse_scales(checked["scales"]))
        return cls(chosen, tuple((option.name, checked[option.name]) for option in RUN_OPTIONS
                                 if option.name in checked))

    def with_overrides(self, **changes: Any) -> "RunConfiguration":
        """This configuration with more overrides (None removes nothing: it is ignored)."""
        return RunConfiguration.of(self.preset, **{**self.overrides, **changes})

    def only_for(self, kind: str) -> "RunConfiguration":
        """This configuration without the overrides ``kind`` runs do not take (a cohort's options reach cases of
        several kinds)."""
        _check_kind(kind)
        return RunConfiguration(self.preset, tuple((name, value) for name, value in self.given
                                                   if kind in OPTIONS[name].kinds))

    def resolve(self, kind: str, fine: bool = False) -> "ResolvedRun":
        """Every option of ``kind`` runs: the override, else the preset's value for ``kind``, else the option's
        default. An override of an option that ``kind`` runs do not take is an InputError. ``fine``: a pair of 3D
        images whose working voxels are finer than the resolved ``half_field_below`` (the preset's values for fine
        pairs, ``presets.Preset.fine_pairs``, come before its pairs')."""
        _check_kind(kind)
        overrides = self.overrides
        for name in overrides:
            if kind not in OPTIONS[name].kinds:
                raise InputError(f"{{setting}} does not apply to a {kind} run.", setting=name)
        preset = PRESETS[self.preset]
        return ResolvedRun(kind, self.preset, tuple(
            (option.name, overrides.get(option.name, preset.value(kind, option.name, option.default, fine)))
            for option in options_for(kind)))

    def to_json(self) -> Dict[str, Any]:
        """The configuration as a JSON object (format, version, preset, overrides)."""
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "preset": self.preset,
                "overrides": self.overrides}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "RunConfiguration":
        """A configuration written by ``to_json`` (InputError for another format or a newer version)."""
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            raise InputError("This is not an SSMSR run configuration.")
        if int(data.get("format_version", 0)) > FORMAT_VERSION:
            raise InputError(f"This run configuration was written by a newer SSMSR (format version "
                             f"{data['format_version']}); update SSMSR to read it.")
        return cls.of(data.get("preset"), **dict(data.get("overrides") or {}))

    def dumps(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True)


@dataclass(frozen=True)
class ResolvedRun:
    """The values one run uses (``RunConfiguration.resolve``): a value for every option of ``kind``, readable as
    attributes (``resolved.steps``) or as a dict (``as_dict()``)."""

    kind: str
    preset: str
    values: Tuple[Tuple[str, Any], ...]

    def as_dict(self) -> Dict[str, Any]:
        return dict(self.values)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # copy and pickle probe for special methods before the fields exist
            raise AttributeError(name)
        for key, value in self.values:
            if key == name:
                return value
        raise AttributeError(f"a {self.kind} run has no option {name!r}")


def combined(config: Optional[RunConfiguration] = None, preset: Optional[str] = None,
             **options: Any) -> RunConfiguration:
    """``config`` (default: the default preset alone) with another ``preset`` and more ``options`` (None: not
    given): what an API function called with ``config=``, ``preset=`` and option keywords runs with."""
    base = config if config is not None else RunConfiguration()
    return RunConfiguration.of(preset or base.preset, **{**base.overrides, **options})


def takes_run_options(kind: str) -> Callable[[Callable], Callable]:
    """Decorator of an API function taking ``config``, ``preset`` and ``**options``: its signature (``help()``,
    ``inspect.signature``) lists every option of ``kind`` runs as a keyword argument, and its docstring ends with
    what each one does and its default."""

    def decorate(function: Callable) -> Callable:
        import inspect

        signature = inspect.signature(function)
        parameters = [parameter for parameter in signature.parameters.values()
                      if parameter.kind is not inspect.Parameter.VAR_KEYWORD]
        parameters += [inspect.Parameter(option.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                         annotation=f"Optional[{option.type.__name__}]")
                       for option in options_for(kind)]
        function.__signature__ = signature.replace(parameters=parameters)
        lines = [f"        {option.name}: {option.help} (default: {default_text(option, kind)})."
                 for option in options_for(kind)]
        function.__doc__ = (function.__doc__ or "").rstrip() + "\n\n    Run options (None: the preset's value, see " \
            "``common.run_config``):\n" + "\n".join(lines) + "\n"
        return function

    return decorate
