"""Python API: register two images given as files or SimpleITK images.

    >>> from SSMSRRegistrationLib import register
    >>> result = register("fixed.nii.gz", "moving.nii.gz", scales="1/2,1", steps=500)  # doctest: +SKIP
    >>> result.save("field.nii.gz", warped_path="warped.nii.gz")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk
import torch

from ..common.errors import InputError
from ..common.run_config import ResolvedRun, RunConfiguration, combined, takes_run_options
from ..common.protocol import STARTED, ProgressCallback
from ..common.schedule import MIN_PATCH_SIZE, fitting_schedule, parse_scales, scaled_size
from ..engine.metrics import folding_statistics
from ..engine.multiscale import RegistrationResult, RegistrationSettings, register_tensors, resolve_device, similarity
from ..imaging.alignment import (INITIAL_CHOICES, align, as_affine, check_invertible, inverse_field, is_identity,
                                 read_initial_transform, through_transform)
from ..imaging.atomic import write_atomically
from ..imaging.fields import (displacement_transform, jacobian_determinant_image, voxel_field_to_image, write_field,
                              write_image)
from ..imaging.images import (ImageLike, check_image, field_of_view, normalised_on_grid, overlaps, read_image,
                              resample_onto, same_grid)
from ..imaging.working_grid import field_onto
from .models import SavedModel, load_model
from .provenance import run_record, sidecar_path, with_outputs, write_sidecar
from .working_plan import WorkingPlan, estimated_seconds, plan_working_grid

#: What ``register(initial=...)`` accepts: one of INITIAL_CHOICES, an ITK transform file, or a SimpleITK transform.
InitialTransform = Union[str, os.PathLike, sitk.Transform]


@dataclass
class RegistrationOutput:
    """What ``register`` returns.

    field: ITK displacement field on the fixed grid, millimetres, LPS, resampling convention; it includes the
        pre-alignment: p maps to affine(p + u(p)) = p + field(p).
    affine: the pre-alignment (fixed point -> moving point; the identity with ``initial="none"``).
    warped: the moving image (its own intensities, float32) resampled through the field onto the fixed grid.
    warped_labels: the moving label map resampled (nearest neighbour) onto the fixed grid, if labels were given.
    loss_history: training loss per step, per scale.
    metrics: NCC/MSE before and after (normalised intensities, inside the mask), folding, time, device.
    engine_result: the raw engine output (voxel fields per scale on the working grid, trained network weights).
    plan: the working grid the engine ran on (``working_plan``).
    provenance: what reproduces the run (``provenance.run_record``); ``save`` writes it beside the field, with the
        outputs' digests, as FIELD.provenance.json. The command line adds the command that reruns it.
    """

    field: sitk.Image
    affine: sitk.AffineTransform
    moving_grid: sitk.Image
    warped: sitk.Image
    warped_labels: Optional[sitk.Image]
    loss_history: Dict[str, List[float]]
    metrics: Dict[str, float]
    engine_result: RegistrationResult
    fixed_grid: sitk.Image
    plan: WorkingPlan
    provenance: dict

    def deformable_field(self, index: int = -1) -> sitk.Image:
        """The deformable part alone (no pre-alignment) after scale ``index``, on the fixed grid (mm, LPS)."""
        displacement = self.engine_result.displacements_per_scale[index][0].cpu().numpy().astype(np.float64)
        return field_onto(voxel_field_to_image(displacement, self.plan.grid.reference), self.fixed_grid)

    def field_after_scale(self, index: int) -> sitk.Image:
        """The composed physical field after scale ``index`` of the schedule (the paper's SSMSR(s) rows), with the
        pre-alignment."""
        return through_transform(self.affine, self.deformable_field(index))

    def inverse(self) -> sitk.Image:
        """The inverse displacement field on the moving image's grid (mm, LPS): a moving point q maps to the fixed
        point q + inverse(q). For labels drawn on the fixed image, brought back onto the moving one."""
        return inverse_field(self.affine, self.deformable_field(), self.moving_grid)

    def jacobian(self) -> sitk.Image:
        """The Jacobian determinant of ``field`` on the fixed grid (float32; <= 0 where the field folds)."""
        return jacobian_determinant_image(self.field)

    def save(self, field_path: str, warped_path: Optional[str] = None, warped_labels_path: Optional[str] = None,
             jacobian_path: Optional[str] = None, affine_path: Optional[str] = None,
             inverse_path: Optional[str] = None) -> Dict[str, Optional[str]]:
        """Write the outputs (each atomically), then their provenance (``provenance.sidecar_path(field_path)``);
        returns the paths written. ``affine_path``: the pre-alignment alone as an ITK transform file (.tfm, .txt,
        .h5, .mat); ``inverse_path``: ``inverse()``."""
        if warped_labels_path and self.warped_labels is None:
            raise InputError("warped labels were asked for but no moving label map was registered.")
        write_field(self.field, field_path)
        if warped_path:
            write_image(self.warped, warped_path)
        if warped_labels_path:
            write_image(self.warped_labels, warped_labels_path)
        if jacobian_path:
            write_image(self.jacobian(), jacobian_path)
        if affine_path:
            write_atomically(affine_path, lambda temporary: sitk.WriteTransform(self.affine, temporary))
        if inverse_path:
            write_field(self.inverse(), inverse_path)
        outputs = {"field": field_path, "warped": warped_path, "warped_labels": warped_labels_path,
                   "jacobian": jacobian_path, "affine": affine_path, "inverse": inverse_path}
        provenance_path = write_sidecar(sidecar_path(field_path), with_outputs(self.provenance, outputs))
        return {**outputs, "provenance": provenance_path}


def _prepare_mask(mask_source: ImageLike, fixed: sitk.Image) -> np.ndarray:
    mask = read_image(mask_source, "fixed mask")
    check_image(mask, "fixed mask", fixed.GetDimension())
    if not same_grid(mask, fixed):
        mask = resample_onto(mask, fixed, labels=True)
    array = sitk.GetArrayFromImage(mask) > 0
    if not array.any():
        raise InputError("The fixed mask is empty (no voxel inside the fixed image's grid is set); "
                         "give a mask that covers the region to align.")
    return array


def initial_kind(initial: InitialTransform, ndim: int) -> str:
    """"none", "rigid" or "affine" for those choices ("auto": affine for 3D images, none for 2D, where frames of one
    probe or slices of one scanner rarely need it), "file" for an ITK transform file, "given" for a transform."""
    if isinstance(initial, sitk.Transform):
        return "given"
    choice = os.fspath(initial).lower()
    if choice == "auto":
        return "affine" if ndim == 3 else "none"
    return choice if choice in INITIAL_CHOICES else "file"


def initial_transform(initial: InitialTransform, fixed: sitk.Image, moving: sitk.Image, seed: int = 0,
                      fixed_mask: Optional[sitk.Image] = None) -> sitk.AffineTransform:
    """The pre-alignment T (fixed point -> moving point) asked for by ``initial`` (see ``initial_kind``)."""
    ndim = fixed.GetDimension()
    kind = initial_kind(initial, ndim)
    if kind == "given":
        transform = as_affine(initial, ndim, "initial transform")
        check_invertible(transform, "initial transform")
        return transform
    if kind == "file":
        return read_initial_transform(os.fspath(initial), ndim)
    return align(fixed, moving, kind, seed, fixed_mask)


@takes_run_options("pair")
def register(fixed: ImageLike, moving: ImageLike, *, fixed_mask: Optional[ImageLike] = None,
             moving_labels: Optional[ImageLike] = None, initial: InitialTransform = "auto",
             model: Optional[Union[str, os.PathLike, SavedModel]] = None,
             initial_networks: Optional[Sequence[dict]] = None, progress: Optional[ProgressCallback] = None,
             should_stop: Optional[Callable[[], bool]] = None, config: Optional[RunConfiguration] = None,
             preset: Optional[str] = None, **options) -> RegistrationOutput:
    """Register ``moving`` onto ``fixed`` with SSMSR (multi-scale test-time training).

    Args:
        fixed, moving: file paths (any SimpleITK format, or a DICOM series folder) or SimpleITK images,
            2D or 3D, single channel. Both are resampled onto the working grid (the ``spacing`` option), the moving
            image through the pre-alignment; where it has no data (outside its field of view) the similarity is not
            computed.
        initial: the pre-alignment (see ``initial_transform``): "auto" (affine in 3D, none in 2D), "none",
            "rigid", "affine", an ITK transform file (fixed point -> moving point, e.g. from Slicer's General
            Registration) or a SimpleITK transform. The returned field includes it.
        fixed_mask: optional mask (non-zero inside) restricting the similarity term.
        moving_labels: optional label map on the moving image's physical space, warped with the result.
        model: a model file written by ``ssmsr train`` (or a loaded ``SavedModel``): test-time training starts
            from its per-scale weights, with its channel widths; its schedule, smoothness weight and NCC window are
            then the defaults; its dimension and schedule must fit.
        initial_networks: optional U-Net weights to start from (one per scale, or one for all).
        progress: callback receiving the engine's progress dicts. should_stop: polled; True cancels.
        config, preset, options: the run configuration (``common.run_config``): ``config`` (default: the default
            preset), another ``preset`` ("balanced", "fast" or "paper"), and any run option below as a keyword
            (None: the preset's value; with ``steps=0`` and a model or ``initial_networks``: inference only, the
            VoxelMorph-equivalent baseline).

    Two frames of a real echocardiogram (shipped with the module), a short schedule:

    >>> import tempfile, SSMSRRegistrationLib as ssmsr
    >>> from SSMSRRegistrationLib.imaging.sample_data import shipped_echo_frames
    >>> fixed, moving = shipped_echo_frames([0, 20])
    >>> output = ssmsr.register(fixed, moving, preset="fast", scales="1/2,1", steps=10, device="cpu")
    >>> bool(output.metrics["mse_after"] < output.metrics["mse_before"])
    True
    >>> written = output.save(tempfile.mkdtemp() + "/field.nii.gz", warped_path=None)
    >>> sorted(name for name, path in written.items() if path)
    ['field', 'provenance']
    """
    resolved = _resolve_options(model, initial_networks, config, preset, options)
    images = _read_inputs(fixed, moving, moving_labels, resolved)
    working = _plan_grid(images.fixed, resolved)
    mask_image = _working_mask(fixed_mask, images.fixed, working)
    affine = _pre_align(initial, images, working, mask_image, resolved.settings.seed)
    tensors = _build_tensors(images, working, affine, mask_image)
    networks = initial_networks if resolved.model is None else resolved.model.networks
    result = _train(tensors, working, resolved, networks, progress, should_stop)
    field, warped, warped_labels = _compose_and_warp(result.displacement, working, affine, images)
    metrics = _measure(tensors, result, images, working, resolved, initial)
    provenance = _record(resolved, working, affine, metrics, result,
                         {"fixed": fixed, "moving": moving, "fixed_mask": fixed_mask, "moving_labels": moving_labels,
                          "initial": initial if metrics["pre_alignment"] == "file" else None})
    return RegistrationOutput(field=field, affine=affine, moving_grid=images.moving, warped=warped,
                              warped_labels=warped_labels,
                              loss_history=result.loss_history, metrics=metrics, engine_result=result,
                              fixed_grid=images.fixed, plan=working, provenance=provenance)


# The stages of ``register``, in the order it runs them.

@dataclass
class _Options:
    """The run's configuration resolved into engine settings (with a model's defaults), and its model."""

    configuration: RunConfiguration
    run: ResolvedRun
    settings: RegistrationSettings
    device: torch.device
    model: Optional[SavedModel]
    model_path: str  # the model file, or "the model" for a loaded one (named so in messages)

    @property
    def model_file(self) -> Optional[str]:
        """The model file the run started from (None without one, or for a model given loaded)."""
        return self.model_path if self.model is not None and self.model_path != "the model" else None


@dataclass
class _Images:
    """The inputs as read and checked (the moving labels: None when not given)."""

    fixed: sitk.Image
    moving: sitk.Image
    labels: Optional[sitk.Image]


@dataclass
class _Tensors:
    """The engine's inputs on the working grid, (1, 1, *S) each: normalised fixed and moving (through the
    pre-alignment) images, the moving image without it for the "before" measures (None when the images do not
    overlap), the fixed mask and the moving image's field of view (None: everywhere)."""

    fixed: torch.Tensor
    moving: torch.Tensor
    unaligned: Optional[torch.Tensor]
    mask: Optional[torch.Tensor]
    view: Optional[torch.Tensor]


def _resolve_options(model: Optional[Union[str, os.PathLike, SavedModel]],
                     initial_networks: Optional[Sequence[dict]], config: Optional[RunConfiguration],
                     preset: Optional[str], options: dict) -> _Options:
    """Resolve the run configuration and load the model; its schedule, smoothness weight, NCC window and channel
    widths are the defaults, and its fields are predicted at full resolution unless asked otherwise."""
    if model is not None and initial_networks is not None:
        raise InputError("Give either a model or initial network weights, not both.")
    model_path = os.fspath(model) if isinstance(model, (str, os.PathLike)) else "the model"
    if isinstance(model, (str, os.PathLike)):
        model = load_model(model)
    configuration = combined(config, preset, **options)
    run = configuration.resolve("pair")
    settings = RegistrationSettings.from_run(run)
    given = configuration.overrides
    if model is not None:
        settings.scales = parse_scales(given["scales"]) if "scales" in given else model.scales
        settings.smoothness_weight = float(given.get("smoothness_weight", model.smoothness_weight))
        settings.ncc_window = given.get("ncc_window", model.ncc_window)
        settings.encoder_channels, settings.decoder_channels = model.encoder_channels, model.decoder_channels
        # A model is trained predicting at full resolution (``train`` has no half-resolution fields): so it runs.
        settings.half_field_below = float(given.get("half_field_below", 0.0))
    settings.validate()
    return _Options(configuration=configuration, run=run, settings=settings, device=resolve_device(run.device),
                    model=model, model_path=model_path)


def _read_inputs(fixed: ImageLike, moving: ImageLike, moving_labels: Optional[ImageLike],
                 options: _Options) -> _Images:
    """Read and check the images (the model must fit the fixed image's dimension)."""
    fixed_image = read_image(fixed, "fixed image")
    check_image(fixed_image, "fixed image")
    settings, given = options.settings, options.configuration.overrides
    if options.model is not None:
        options.model.check_fits(fixed_image.GetDimension(), settings.scales if "scales" in given else None,
                                 options.model_path)
    moving_image = read_image(moving, "moving image")
    check_image(moving_image, "moving image", fixed_image.GetDimension())
    labels_image = None
    if moving_labels is not None:
        labels_image = read_image(moving_labels, "moving labels")
        check_image(labels_image, "moving labels", fixed_image.GetDimension())
    return _Images(fixed=fixed_image, moving=moving_image, labels=labels_image)


def fine_pair_run(configuration: RunConfiguration, size: Sequence[int], spacing_mm: float) -> ResolvedRun:
    """The values a pair registered on a working grid of ``size`` voxels at ``spacing_mm`` trains with: the preset's
    values for fine pairs (``presets``) on a 3D grid finer than ``half_field_below`` and large enough for their
    coarsest scale to keep MIN_PATCH_SIZE voxels a side (the U-Net's four poolings unpadded: a 1 mm brain, not a
    1 mm crop), else the pairs' values; the user's overrides before either."""
    run = configuration.resolve("pair")
    if len(size) != 3 or not spacing_mm < run.half_field_below:
        return run
    fine = configuration.resolve("pair", fine=True)
    return fine if min(scaled_size(size, parse_scales(fine.scales)[0])) >= MIN_PATCH_SIZE else run


def _plan_grid(fixed_image: sitk.Image, options: _Options) -> WorkingPlan:
    """The working grid and the NCC window on it; a preset's schedule loses the scales too coarse for it. A grid
    that takes the preset's values for fine pairs (``fine_pair_run``) is planned again with them; not with a model
    (its schedule is the default). The time is estimated once, with the values the run trains with."""
    working = plan_working_grid(fixed_image, options.settings, options.device, options.run.spacing,
                                options.run.max_voxels, options.run.ncc_window_mm, estimate=False)
    fine = fine_pair_run(options.configuration, working.grid.size, working.grid.spacing)
    if options.model is None and fine != options.run:
        options.run, options.settings = fine, RegistrationSettings.from_run(fine)
        options.settings.validate()
        working = plan_working_grid(fixed_image, options.settings, options.device, fine.spacing, fine.max_voxels,
                                    fine.ncc_window_mm, estimate=False)
    settings = options.settings
    working.estimated_seconds = estimated_seconds(working, settings, options.device)
    settings.ncc_window = working.window
    settings.voxel_mm = working.grid.spacing
    if "scales" not in options.configuration.overrides and options.model is None:
        settings.scales = fitting_schedule(working.grid.size, settings.scales)
    return working


def _working_mask(fixed_mask: Optional[ImageLike], fixed_image: sitk.Image,
                  working: WorkingPlan) -> Optional[sitk.Image]:
    """The fixed mask (uint8) on the working grid, or None."""
    if fixed_mask is None:
        return None
    mask_image = sitk.GetImageFromArray(_prepare_mask(fixed_mask, fixed_image).astype(np.uint8))
    mask_image.CopyInformation(fixed_image)
    return resample_onto(mask_image, working.grid.reference, labels=True) if working.grid.resampled else mask_image


def _pre_align(initial: InitialTransform, images: _Images, working: WorkingPlan, mask_image: Optional[sitk.Image],
               seed: int) -> sitk.AffineTransform:
    """The pre-alignment; it too runs on the isotropic grid (its pyramid shrinks every axis alike)."""
    grid = working.grid.reference
    fixed_on_grid = resample_onto(images.fixed, grid) if working.grid.resampled else images.fixed
    return initial_transform(initial, fixed_on_grid, images.moving, seed, mask_image)


def _build_tensors(images: _Images, working: WorkingPlan, affine: sitk.AffineTransform,
                   mask_image: Optional[sitk.Image]) -> _Tensors:
    grid = working.grid.reference
    as_tensor = lambda array: torch.from_numpy(np.ascontiguousarray(array))[None, None]  # noqa: E731
    fixed_tensor = as_tensor(normalised_on_grid(images.fixed, grid, "fixed image", "fixed image"))
    aligned = not is_identity(affine)
    moving_tensor = as_tensor(normalised_on_grid(images.moving, grid, "moving image", "fixed image",
                                                 affine if aligned else None))
    # The "before" measures: the images as given (none when they do not even overlap before the pre-alignment).
    unaligned_tensor = moving_tensor if not aligned else (
        as_tensor(normalised_on_grid(images.moving, grid, "moving image", "fixed image"))
        if overlaps(images.moving, images.fixed) else None)
    mask_tensor = as_tensor(sitk.GetArrayFromImage(mask_image).astype(np.float32)) if mask_image is not None else None
    view = field_of_view(images.moving, grid, affine if aligned else None)
    view_tensor = None if view.all() else as_tensor(view.astype(np.float32))
    return _Tensors(fixed=fixed_tensor, moving=moving_tensor, unaligned=unaligned_tensor, mask=mask_tensor,
                    view=view_tensor)


def _train(tensors: _Tensors, working: WorkingPlan, options: _Options, initial_networks: Optional[Sequence[dict]],
           progress: Optional[ProgressCallback], should_stop: Optional[Callable[[], bool]]) -> RegistrationResult:
    """The test-time training; the "started" event carries the working grid."""

    def report(event: dict) -> None:
        progress({**event, **working.started_fields()} if event.get("event") == STARTED else event)

    return register_tensors(tensors.fixed, tensors.moving, options.settings, fixed_mask=tensors.mask,
                            initial_networks=initial_networks, device=options.device,
                            progress=report if progress is not None else None,
                            should_stop=should_stop, moving_mask=tensors.view)


def _compose_and_warp(displacement: torch.Tensor, working: WorkingPlan, affine: sitk.AffineTransform,
                      images: _Images) -> Tuple[sitk.Image, sitk.Image, Optional[sitk.Image]]:
    """The physical field on the fixed grid (with the pre-alignment), the warped image and the warped labels."""
    deformable = field_onto(voxel_field_to_image(displacement[0].cpu().numpy().astype(np.float64),
                                                 working.grid.reference), images.fixed)
    field = through_transform(affine, deformable)
    transform = displacement_transform(field)
    warped = sitk.Resample(images.moving, images.fixed, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    warped_labels = None
    if images.labels is not None:
        warped_labels = sitk.Resample(images.labels, images.fixed, transform, sitk.sitkNearestNeighbor, 0,
                                      images.labels.GetPixelID())
    return field, warped, warped_labels


def _measure(tensors: _Tensors, result: RegistrationResult, images: _Images, working: WorkingPlan,
             options: _Options, initial: InitialTransform) -> Dict[str, Any]:
    """``RegistrationOutput.metrics``: similarity before and after (normalised intensities, inside the mask, on the
    working grid), the run's facts, and the field's folding (``engine.metrics.folding_statistics``)."""
    displacement = result.displacement
    device_of = lambda tensor: tensor.to(displacement.device) if tensor is not None else None  # noqa: E731
    fixed_eval, mask_eval = device_of(tensors.fixed), device_of(tensors.mask)
    before = (similarity(fixed_eval, device_of(tensors.unaligned), None, result.window, mask_eval)
              if tensors.unaligned is not None else {"ncc": float("nan"), "mse": float("nan")})
    after = similarity(fixed_eval, device_of(tensors.moving), displacement, result.window, mask_eval)
    model_file = options.model_file
    return {"ncc_before": before["ncc"], "ncc_after": after["ncc"],
            "mse_before": before["mse"], "mse_after": after["mse"],
            "final_loss": next((losses[-1] for losses in reversed(list(result.loss_history.values())) if losses),
                               float("nan")),
            "seconds": result.seconds, "device": result.device,
            "model": os.path.abspath(model_file) if model_file is not None else None,
            "pre_alignment": initial_kind(initial, images.fixed.GetDimension()),
            "working_spacing_mm": working.grid.spacing, "working_size": list(working.grid.size),
            "steps_trained": [len(losses) for losses in result.loss_history.values()],
            **folding_statistics(displacement.detach().cpu())}


def _record(options: _Options, working: WorkingPlan, affine: sitk.AffineTransform, metrics: Dict[str, Any],
            result: RegistrationResult, inputs: Dict[str, Any]) -> dict:
    """The provenance record (``provenance.run_record``) of the run."""
    return run_record(
        "register", options.settings, options.configuration, inputs={**inputs, "model": options.model_file},
        options={"initial": metrics["pre_alignment"], "pre_alignment": list(affine.GetParameters()),
                 "working_spacing_mm": working.grid.spacing, "working_size": list(working.grid.size)},
        device=result.device)
