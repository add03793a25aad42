"""The module panel's state and rules, without Qt or torch: the parameters it saves with the scene, what keeps Apply
disabled, the status line, the run configuration the panel holds (a preset plus the options the user changed), and
the mapping from the parameters to the logic's keyword arguments.

The widget (``gui.widget``) only wires Qt to this; the tests drive it on real MRML nodes (``slicer-core``).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import field, make_dataclass
from typing import Any, NamedTuple, Optional, Union

from slicer import (vtkMRMLLinearTransformNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode,
                    vtkMRMLSequenceNode, vtkMRMLTransformNode)

from ..common.errors import InputError
from ..common.presets import DEFAULT_PRESET, PRESETS
from ..common.protocol import overall_fraction
from ..common.run_config import OPTIONS, RunConfiguration
from ..mrml.cine import frameCount, isVolumeSequence, trackingInputProblems
from ..mrml.propagation import propagationProblems
from ..mrml.jobs import JobState
from ..mrml.parameters import alignmentProblems, atlasInputProblems, inputProblems, modelFileProblems, stepProblems
from ..mrml.progress_text import describeProgress

#: The oldest Slicer whose parameter-node wrapper binds every widget of the panel (checked by the tests against
#: Slicer's own source at this tag) and whose Python (3.9) runs the module.
MINIMUM_SLICER_VERSION = (5, 6)

#: The oldest torch the worker runs with: 2.2, the last PyTorch for x86_64 macOS (Slicer's macOS packages are x86_64).
#: What newer torch versions add is feature-detected (``engine.torch_compat``). PyTorch set-up asks the PyTorch
#: extension for it (``torch_status``).
MINIMUM_TORCH = "2.2"

#: The preset a new parameter node starts from (the command line's and the API's default too).
GUI_PRESET = PRESETS[DEFAULT_PRESET]

#: Node reference role, on the module's parameter node, of each checked atlas segmentation.
ATLAS_REFERENCE_ROLE = "SSMSR.AtlasSegmentation"

#: The run options the panel shows: panel parameter -> option name (``common.run_config.RUN_OPTIONS``). The widget
#: of each shows the option's value for the current kind of run (the user's override, else the preset's).
SHOWN_OPTIONS = {"scales": "scales", "stepsPerScale": "steps", "mixedPrecision": "precision",
                 "smoothnessWeight": "smoothness_weight", "nccWindow": "ncc_window", "workingSpacing": "spacing",
                 "device": "device", "batchSize": "batch_size"}
#: The options a preset gives values to: choosing a preset clears the user's overrides of these (the budget), and
#: keeps those of the others (device, precision, NCC window, working spacing, pairs per step).
PRESET_OPTIONS = frozenset(name for preset in PRESETS.values()
                           for values in (*preset.values.values(), preset.fine_pairs) for name in values)


def optionValue(parameter: str, shown: Any) -> Any:
    """The run option's value of what the panel's ``parameter`` shows (mixed precision: a check box; the NCC window
    and the working spacing: 0 for automatic)."""
    if parameter == "mixedPrecision":
        return "mixed" if shown else "float32"
    if parameter in ("nccWindow", "workingSpacing"):
        return shown or None
    return shown


def shownValue(parameter: str, value: Any) -> Any:
    """What the panel's ``parameter`` shows for the run option's ``value`` (the inverse of :func:`optionValue`)."""
    if parameter == "mixedPrecision":
        return value == "mixed"
    if parameter == "nccWindow":
        return int(value) if value is not None else 0
    if parameter == "workingSpacing":
        return float(value) if value is not None else 0.0
    return value


def presetValue(preset: str, kind: str, name: str) -> Any:
    """The value of option ``name`` in ``kind`` runs of ``preset`` when the user gives none (the option's default
    where the preset gives none)."""
    return PRESETS[preset].value(kind, name, OPTIONS[name].default)


def _shown(preset: str, overrides: dict, kind: str) -> dict:
    """{panel parameter: what it shows} for ``preset`` with ``overrides`` in ``kind`` runs."""
    return {parameter: shownValue(parameter, overrides[name] if name in overrides else presetValue(preset, kind, name))
            for parameter, name in SHOWN_OPTIONS.items()}


_DEFAULT_PAIR = _shown(DEFAULT_PRESET, {}, "pair")


class Parameter(NamedTuple):
    """One parameter of the panel: its Python type (a node class, a Union of node classes, int, float, str or
    bool), its default, and its inclusive range (numbers only)."""

    type: Any
    default: Any = None
    range: Optional[tuple] = None


#: The module state saved with the scene (the parameter node), in the order of the panel.
#: fixedVolume, movingVolume - images to register (the moving one is aligned to the fixed one).
#: fixedMask - optional volume on the fixed image (cine: on the frames); similarity only where it is non-zero.
#: segmentation - optional segmentation of the moving image, propagated onto the fixed image (cine: drawn on the
#: reference frame, propagated to every frame once the tracking ends).
#: initialTransform - optional linear transform overlaying the moving volume on the fixed one (pre-alignment);
#: alignFirst - otherwise the pre-alignment the worker computes: "auto", "none", "rigid" or "affine".
#: outputTransform - receives the displacement field (empty: a new node). outputVolume - the moving volume warped
#: onto the fixed grid. jacobianVolume - the Jacobian determinant of the result on the fixed grid (QC).
#: The run configuration: preset - the preset's name (``common.presets.PRESETS``); overrides - JSON of the run
#: options the user changed ({option name: value}); shownKind - the kind of run ("pair", "cine" or "volume_cine")
#: whose values the widgets of the run options show. Those widgets (SHOWN_OPTIONS: scales, stepsPerScale,
#: mixedPrecision, smoothnessWeight, nccWindow - 0: automatic, workingSpacing - 0: automatic, device, batchSize) each
#: show the option's value, the override else the preset's; a widget edited records an override (``reconcile``).
#: modelFile - a model written by `ssmsr train` ("" : none).
#: atlasSelection, topK - segment the fixed volume with the most similar checked atlases. cineTracking, cine,
#: batchSize - track the motion through a sequence of 2D images or of 3D volumes, or a volume whose third axis is time;
#: referenceFrame - the frame registered onto every other (-1: consecutive pairs, frame t-1 onto frame t).
PARAMETERS = {
    "fixedVolume": Parameter(vtkMRMLScalarVolumeNode),
    "movingVolume": Parameter(vtkMRMLScalarVolumeNode),
    "fixedMask": Parameter(vtkMRMLScalarVolumeNode),
    "segmentation": Parameter(vtkMRMLSegmentationNode),
    "initialTransform": Parameter(vtkMRMLLinearTransformNode),
    "alignFirst": Parameter(str, "auto"),
    "outputTransform": Parameter(vtkMRMLTransformNode),
    "outputVolume": Parameter(vtkMRMLScalarVolumeNode),
    "jacobianVolume": Parameter(vtkMRMLScalarVolumeNode),
    "preset": Parameter(str, DEFAULT_PRESET),
    "overrides": Parameter(str, "{}"),
    "shownKind": Parameter(str, "pair"),
    "scales": Parameter(str, _DEFAULT_PAIR["scales"]),
    "stepsPerScale": Parameter(int, _DEFAULT_PAIR["stepsPerScale"], (0, 100000)),
    "mixedPrecision": Parameter(bool, _DEFAULT_PAIR["mixedPrecision"]),
    "smoothnessWeight": Parameter(float, _DEFAULT_PAIR["smoothnessWeight"], (0.0, 10000.0)),
    "nccWindow": Parameter(int, _DEFAULT_PAIR["nccWindow"], (0, 99)),
    "workingSpacing": Parameter(float, _DEFAULT_PAIR["workingSpacing"], (0.0, 100.0)),
    "device": Parameter(str, _DEFAULT_PAIR["device"]),
    "keepTemporaryFiles": Parameter(bool, False),
    "modelFile": Parameter(str, ""),
    "atlasSelection": Parameter(bool, False),
    "topK": Parameter(int, 1, (1, 99)),
    "cineTracking": Parameter(bool, False),
    "cine": Parameter(Optional[Union[vtkMRMLSequenceNode, vtkMRMLScalarVolumeNode]]),
    "batchSize": Parameter(int, _shown(DEFAULT_PRESET, {}, "cine")["batchSize"], (0, 999)),
    "referenceFrame": Parameter(int, -1, (-1, 99999)),
}


#: Plain values of every parameter (defaults as in PARAMETERS), for scripts and tests; the parameter node wrapper
#: offers the same attributes in Slicer.
PanelValues = make_dataclass("PanelValues", [(name, Any, field(default=parameter.default))
                                             for name, parameter in PARAMETERS.items()])


def versionProblem(major: int, minor: int) -> Optional[str]:
    """A sentence for the user when the running Slicer is older than MINIMUM_SLICER_VERSION, else None."""
    if (int(major), int(minor)) >= MINIMUM_SLICER_VERSION:
        return None
    wanted = ".".join(map(str, MINIMUM_SLICER_VERSION))
    return (f"SSMSR Registration needs 3D Slicer {wanted} or newer; this is Slicer {major}.{minor}. Install a "
            f"current Slicer from download.slicer.org.")


def versionAtLeast(version: str, minimum: str) -> bool:
    """Compare the numeric release parts of two versions ("2.13.0+cu121" >= "2.4")."""
    def release(text):
        parts = []
        for piece in text.split("+")[0].split("."):
            digits = "".join(character for character in piece if character.isdigit())
            if not digits:
                break
            parts.append(int(digits))
        return tuple(parts)

    return release(version) >= release(minimum)


def mode(values) -> str:
    """"cine" (takes precedence), "atlas" or "pair"."""
    return "cine" if values.cineTracking else "atlas" if values.atlasSelection else "pair"


def kindOf(values) -> str:
    """The kind of run the panel asks for: "volume_cine" (a sequence of 3D volumes) or "cine", else "pair" (a
    registration or an atlas segmentation)."""
    if not values.cineTracking:
        return "pair"
    return "volume_cine" if isVolumeSequence(values.cine) else "cine"


def referenceFrameOf(values) -> Optional[int]:
    """The reference frame the panel asks for (None: consecutive pairs, the parameter's -1)."""
    return values.referenceFrame if values.referenceFrame >= 0 else None


def cineProblems(values) -> list[str]:
    """Sentences for a reference frame that is not a frame of the cine, and for a segmentation that could not be
    propagated once the tracking ends (``mrml.propagation.propagationProblems``)."""
    reference, frames = referenceFrameOf(values), frameCount(values.cine)
    found = []
    if reference is not None and frames and reference >= frames:
        found.append(f"The reference frame {reference} is not a frame of '{values.cine.GetName()}' (frames 0 to "
                     f"{frames - 1}).")
    return found + propagationProblems(values.cine, reference, values.segmentation)


def presetOf(values) -> str:
    """The parameter node's preset (the default one if it names none that exists)."""
    return values.preset if values.preset in PRESETS else DEFAULT_PRESET


def overridesOf(values) -> dict:
    """The overrides the parameter node records ({option name: value}; unreadable JSON and unknown names are
    dropped)."""
    try:
        recorded = json.loads(values.overrides or "{}")
    except (TypeError, ValueError):
        return {}
    return {name: value for name, value in recorded.items() if name in OPTIONS} if isinstance(recorded, dict) else {}


def _shownKindOf(values) -> str:
    return values.shownKind if values.shownKind in ("pair", "cine", "volume_cine") else "pair"


def currentOverrides(values) -> dict:
    """The overrides, with what the user edited since they were recorded: a run-option widget that shows another
    value than the recorded configuration gives for the kind it shows was edited; an edit back to the preset's own
    value removes the override."""
    preset, overrides, kind = presetOf(values), overridesOf(values), _shownKindOf(values)
    recorded = _shown(preset, overrides, kind)
    for parameter, name in SHOWN_OPTIONS.items():
        shown = getattr(values, parameter)
        if shown == recorded[parameter]:
            continue
        value = optionValue(parameter, shown)
        if value == presetValue(preset, kind, name):
            overrides.pop(name, None)
        else:
            overrides[name] = value
    return overrides


def _changes(values, wanted: dict) -> dict:
    return {name: value for name, value in wanted.items() if getattr(values, name) != value}


def reconcile(values) -> dict:
    """The parameter changes that bring the parameter node in line after any change (the widget applies them at
    once): the user's edits recorded as overrides, and the run-option widgets showing the values of the current
    kind of run (switching between pair and cine keeps the overrides and shows the other kind's preset values)."""
    overrides, kind = currentOverrides(values), kindOf(values)
    return _changes(values, {"preset": presetOf(values), "overrides": json.dumps(overrides, sort_keys=True),
                             "shownKind": kind, **_shown(presetOf(values), overrides, kind)})


def presetChosen(values, name: str) -> dict:
    """The parameter changes when the user chooses preset ``name`` (again): the overrides of the options presets
    set (``PRESET_OPTIONS``) are cleared, the others kept, and the widgets show the preset's values."""
    overrides = {option: value for option, value in currentOverrides(values).items() if option not in PRESET_OPTIONS}
    kind = kindOf(values)
    return _changes(values, {"preset": name, "overrides": json.dumps(overrides, sort_keys=True), "shownKind": kind,
                             **_shown(name, overrides, kind)})


def configuration(values) -> RunConfiguration:
    """The run configuration the panel asks for: its preset and the overrides of the options that the current kind
    of run takes (the others are kept for when the mode changes back). InputError naming the option if one is
    invalid."""
    kind = kindOf(values)
    return RunConfiguration.of(presetOf(values), **{name: value for name, value in currentOverrides(values).items()
                                                    if kind in OPTIONS[name].kinds})


def labelOf(name: str) -> str:
    """How the panel names a run option (its field label)."""
    return OPTIONS[name].label if name in OPTIONS else name.replace("_", " ").capitalize()


def presetDescription(values) -> str:
    """The preset combo box's tooltip: the preset's summary and what the user changed."""
    preset = PRESETS[presetOf(values)]
    overrides = currentOverrides(values)
    changed = ", ".join(f"{labelOf(name)} {value}" for name, value in overrides.items())
    return f"{preset.name.capitalize()}: {preset.summary}." + (f" Changed here: {changed}." if changed else "")


def problems(values, atlases: list) -> list[str]:
    """Everything that keeps Apply disabled, as sentences (empty when a run can start).

    ``atlases``: (source volume or None, segmentation node) of each checked atlas (atlas mode). A run option is
    named by its field label."""
    if values is None:
        return ["No parameter node."]
    current = mode(values)
    if current == "cine":
        found = trackingInputProblems(values.cine, values.fixedMask) + cineProblems(values)
        if values.modelFile:
            found.append("Cine tracking trains from scratch; clear the pretrained model.")
    elif current == "atlas":
        found = atlasInputProblems(values.fixedVolume, atlases, values.topK, values.fixedMask, values.modelFile)
    else:
        found = inputProblems(values.fixedVolume, values.movingVolume, values.fixedMask, values.segmentation,
                              values.outputVolume, values.outputTransform, values.jacobianVolume) \
            + modelFileProblems(values.modelFile)
        found += alignmentProblems(values.alignFirst, values.initialTransform, values.outputTransform)
    try:
        run = configuration(values).resolve(kindOf(values))
    except InputError as error:
        return found + [error.worded(labelOf)]
    if current == "cine":
        found += stepProblems(run.steps, cine=True)
    elif run.steps == 0 and not values.modelFile:
        found.append("0 steps per scale (no test-time training) needs a pretrained model.")
    return found


def applyButton(values, atlases: list, running: bool) -> tuple[str, bool, str]:
    """(text, enabled, tooltip) of the Apply button."""
    if running:
        return "Cancel", True, "Stop the run; nothing is added to the scene."
    found = problems(values, atlases)
    if found:
        return "Apply", False, "\n".join(found)
    return "Apply", True, {"cine": "Track the motion through the cine in the background.",
                           "atlas": "Segment the volume with the most similar atlases in the background.",
                           "pair": "Register the moving volume to the fixed volume in the background."}[mode(values)]


def logicCall(values, atlases: list) -> tuple[str, tuple, dict]:
    """(``RegistrationLogic`` method name, positional arguments, keyword arguments) of the run the panel asks for,
    with ``waitForCompletion`` left to the caller. The run options travel as the ``configuration`` (the panel's
    preset and overrides, :func:`configuration`), nothing else."""
    common = dict(configuration=configuration(values), keepTemporaryFiles=values.keepTemporaryFiles)
    current = mode(values)
    if current == "cine":
        return "trackSequence", (values.cine,), dict(common, maskNode=values.fixedMask,
                                                     reference=referenceFrameOf(values))
    common["modelFile"] = values.modelFile or None
    if current == "atlas":
        return "segmentWithAtlases", (values.fixedVolume, atlases), dict(common, topK=values.topK,
                                                                          fixedMaskNode=values.fixedMask)
    return "registerVolumes", (values.fixedVolume, values.movingVolume), dict(
        common, outputTransformNode=values.outputTransform, fixedMaskNode=values.fixedMask,
        segmentationNode=values.segmentation, outputVolumeNode=values.outputVolume,
        jacobianVolumeNode=values.jacobianVolume, initialTransformNode=values.initialTransform,
        alignFirst=values.alignFirst)


def eventStatus(event: dict, currentMode: str) -> Optional[str]:
    """The status line for a worker event of a run in ``currentMode`` (None: leave the line as it is)."""
    kind = event.get("event")
    if kind == "progress":
        return describeProgress(event)
    if kind == "started" and currentMode == "cine":
        return f"Tracking {event.get('pairs', '?')} frame pairs on {event.get('device', '?')}..."
    if kind == "started" and event.get("plan"):
        return f"Registering on {event.get('device', '?')}: {event['plan']}..."
    if kind == "started":
        return f"Registering on {event.get('device', '?')}..."
    if kind == "atlas":
        return f"Registering atlas {int(event.get('index', 0)) + 1} of {event.get('count', '?')}: " \
               f"{event.get('atlasName', '?')}..."
    return None


def progressPercent(event: dict) -> Optional[int]:
    """The progress bar's value (0..100) for a "progress" event, else None."""
    return int(round(100 * overall_fraction(event))) if event.get("event") == "progress" else None


def foldingText(metrics: dict) -> str:
    """``folded 0.12 % of voxels`` from the worker's metrics ("" when it reported none)."""
    percent = metrics.get("percent_non_positive_jacobian")
    if not isinstance(percent, (int, float)) or not math.isfinite(percent):
        return ""
    return f"{percent:.3g} % of voxels folded (Jacobian <= 0)"


def completionStatus(job) -> str:
    """The status line once a job has ended."""
    if job.state is JobState.CANCELLED:
        return "Cancelled; the scene was not changed."
    if job.state is not JobState.SUCCEEDED:
        return "Failed; see the log."
    seconds = time.monotonic() - job.startTime
    metrics = job.metrics
    if getattr(job, "transformSequenceNode", None) is not None:
        return (f"Done in {seconds:.0f} s: transforms '{job.transformSequenceNode.GetName()}' in the browser "
                f"'{job.browserNode.GetName()}'; mean MSE {metrics.get('mse_before', math.nan):.4g} -> "
                f"{metrics.get('mse_after', math.nan):.4g}, NLCC {metrics.get('ncc_before', math.nan):.3f} -> "
                f"{metrics.get('ncc_after', math.nan):.3f}; at most "
                f"{metrics.get('max_folded_percent', math.nan):.3g} % of pixels folded in a pair.")
    if getattr(job, "outputSegmentationNode", None) is not None:
        best = job.ranking[0] if job.ranking else {}
        return (f"Done in {seconds:.0f} s: segmentation '{job.outputSegmentationNode.GetName()}' from "
                f"{job.parameters['topK']} atlas(es); best atlas '{best.get('atlasName', '?')}' (NLCC "
                f"{best.get('nlcc', math.nan):.3f}). The ranking is in the log.")
    folding = foldingText(metrics)
    return (f"Done in {seconds:.0f} s" + (f"; {folding}" if folding else "") + ". Put the moving volume under the "
            f"transform '{job.outputTransformNode.GetName()}' to see it aligned.")


def failedStartStatus(error: BaseException) -> str:
    """The status line when a run could not start (the progress bar is hidden again)."""
    return f"Not started: {error}"
