"""Python API: register two images given as files or SimpleITK images.

    >>> from SSMSRRegistrationLib import register
    >>> result = register("fixed.nii.gz", "moving.nii.gz", scales="1/2,1", steps=500)
    >>> result.save("field.nii.gz", warped_path="warped.nii.gz")
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk
import torch

from ..common.errors import InputError
from ..common.presets import DEFAULT_PRESET, budget
from ..common.protocol import STARTED, ProgressCallback
from ..common.schedule import DEFAULT_MAX_VOXELS, fitting_schedule, parse_scales
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
from .working_plan import WorkingPlan, plan_working_grid

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


def register(fixed: ImageLike, moving: ImageLike, *, fixed_mask: Optional[ImageLike] = None,
             moving_labels: Optional[ImageLike] = None, initial: InitialTransform = "auto",
             preset: str = DEFAULT_PRESET, scales=None,
             steps: Optional[int] = None, precision: Optional[str] = None,
             smoothness_weight: Optional[float] = None, ncc_window: Optional[int] = None,
             ncc_window_mm: Optional[float] = None, spacing: Optional[float] = None,
             stop_window: Optional[int] = None, stop_tolerance: Optional[float] = None,
             max_voxels: Optional[int] = DEFAULT_MAX_VOXELS, learning_rate: Optional[float] = None,
             mse_weight: Optional[float] = None, device: str = "auto", seed: int = 0,
             initial_networks: Optional[Sequence[dict]] = None,
             model: Optional[Union[str, os.PathLike, SavedModel]] = None,
             progress: Optional[ProgressCallback] = None,
             should_stop: Optional[Callable[[], bool]] = None) -> RegistrationOutput:
    """Register ``moving`` onto ``fixed`` with SSMSR (multi-scale test-time training).

    Args:
        fixed, moving: file paths (any SimpleITK format, or a DICOM series folder) or SimpleITK images,
            2D or 3D, single channel. Both are resampled onto the working grid (below), the moving image through
            the pre-alignment; where it has no data (outside its field of view) the similarity is not computed.
        initial: the pre-alignment (see ``initial_transform``): "auto" (affine in 3D, none in 2D), "none",
            "rigid", "affine", an ITK transform file (fixed point -> moving point, e.g. from Slicer's General
            Registration) or a SimpleITK transform. The returned field includes it.
        fixed_mask: optional mask (non-zero inside) restricting the similarity term.
        moving_labels: optional label map on the moving image's physical space, warped with the result.
        preset: "balanced" (the default), "fast" or "paper" (``presets``): the schedule, steps, precision, smoothness
            weight and learning rate not given explicitly.
        scales: schedule, e.g. "1/4,1/2,1" ("1" alone is the paper's SSR); default: the model's, or the preset's.
        steps: test-time training steps per scale (0 with a model or ``initial_networks``: inference only,
            the VoxelMorph-equivalent baseline); default: the preset's.
        precision: "mixed" (bfloat16 convolutions where the device supports them) or "float32"; default: the preset's.
        smoothness_weight: lambda of Eq. 1 (default: the model's, or the preset's); the smoothness term is the squared
            gradient of the field in mm per mm on the isotropic working grid. ncc_window: local NCC box side in
            voxels of the working grid (default: the model's, or 5 in 3D and 6 in 2D: 5 mm on a 1 mm grid);
            ncc_window_mm: the same in millimetres (overrides ``ncc_window``).
        spacing: the working grid's voxel side in mm (default: the fixed image's finest spacing, coarsened to
            ``max_voxels``; an isotropic fixed image that fits is registered on its own grid). The training's
            memory is estimated first: an automatic grid is coarsened to fit the device, an explicit ``spacing``
            that does not fit raises InputError. The field is written on the fixed grid either way.
        stop_window, stop_tolerance: convergence-based stopping (``engine.multiscale.converged``): each scale ends
            when the mean loss of the last ``stop_window`` steps fell by less than ``stop_tolerance``; the steps
            are then a maximum (default: 0, train every step; tolerance ``presets.DEFAULT_STOP_TOLERANCE``).
        learning_rate: Adam's learning rate (default: the preset's).
        mse_weight: weight of the mean squared intensity difference (intensities normalised to [0, 1]) added to
            Eq. 1's similarity inside the mask (default: the preset's; 0 is the paper's loss).
        device: 'auto', 'cpu', 'cuda', 'cuda:N'. seed: random seed.
        initial_networks: optional U-Net weights to start from (one per scale, or one for all).
        model: a model file written by ``ssmsr train`` (or a loaded ``SavedModel``): test-time training starts
            from its per-scale weights, with its channel widths; its dimension and schedule must fit.
        progress: callback receiving the engine's progress dicts. should_stop: polled; True cancels.
    """
    if model is not None and initial_networks is not None:
        raise InputError("Give either a model or initial network weights, not both.")
    model_path = os.fspath(model) if isinstance(model, (str, os.PathLike)) else "the model"
    if isinstance(model, (str, os.PathLike)):
        model = load_model(model)
    requested_scales = parse_scales(scales) if scales is not None else None
    plan = budget(preset, steps=steps, precision=precision, stop_window=stop_window, stop_tolerance=stop_tolerance,
                  learning_rate=learning_rate, mse_weight=mse_weight)
    settings = RegistrationSettings(
        scales=requested_scales or (model.scales if model is not None else parse_scales(plan.scales)),
        steps_per_scale=plan.steps, mixed_precision=plan.mixed_precision,
        stop_window=plan.stop_window, stop_tolerance=plan.stop_tolerance,
        smoothness_weight=float(smoothness_weight if smoothness_weight is not None
                                else model.smoothness_weight if model is not None else plan.smoothness_weight),
        ncc_window=ncc_window if ncc_window is not None else (model.ncc_window if model is not None else None),
        mse_weight=plan.mse_weight, learning_rate=plan.learning_rate, seed=int(seed))
    if model is not None:
        settings.encoder_channels, settings.decoder_channels = model.encoder_channels, model.decoder_channels
    settings.validate()
    torch_device = resolve_device(device)

    fixed_image = read_image(fixed, "fixed image")
    check_image(fixed_image, "fixed image")
    if model is not None:
        model.check_fits(fixed_image.GetDimension(), requested_scales, model_path)
        initial_networks = model.networks
    moving_image = read_image(moving, "moving image")
    check_image(moving_image, "moving image", fixed_image.GetDimension())
    labels_image = None
    if moving_labels is not None:
        labels_image = read_image(moving_labels, "moving labels")
        check_image(labels_image, "moving labels", fixed_image.GetDimension())
    working = plan_working_grid(fixed_image, settings, torch_device, spacing, max_voxels, ncc_window_mm)
    settings.ncc_window = working.window
    if requested_scales is None and model is None:  # a preset's schedule: scales too coarse for a small image go
        settings.scales = fitting_schedule(working.grid.size, settings.scales)
    grid = working.grid.reference
    mask_image = None  # on the working grid
    if fixed_mask is not None:
        mask_image = sitk.GetImageFromArray(_prepare_mask(fixed_mask, fixed_image).astype(np.uint8))
        mask_image.CopyInformation(fixed_image)
        mask_image = resample_onto(mask_image, grid, labels=True) if working.grid.resampled else mask_image
    # The pre-alignment too runs on the isotropic grid (its pyramid shrinks every axis alike).
    fixed_on_grid = resample_onto(fixed_image, grid) if working.grid.resampled else fixed_image
    affine = initial_transform(initial, fixed_on_grid, moving_image, int(seed), mask_image)

    as_tensor = lambda array: torch.from_numpy(np.ascontiguousarray(array))[None, None]  # noqa: E731
    fixed_tensor = as_tensor(normalised_on_grid(fixed_image, grid, "fixed image", "fixed image"))
    aligned = not is_identity(affine)
    moving_tensor = as_tensor(normalised_on_grid(moving_image, grid, "moving image", "fixed image",
                                                 affine if aligned else None))
    # The "before" measures: the images as given (none when they do not even overlap before the pre-alignment).
    unaligned_tensor = moving_tensor if not aligned else (
        as_tensor(normalised_on_grid(moving_image, grid, "moving image", "fixed image"))
        if overlaps(moving_image, fixed_image) else None)
    mask_tensor = as_tensor(sitk.GetArrayFromImage(mask_image).astype(np.float32)) if mask_image is not None else None
    view = field_of_view(moving_image, grid, affine if aligned else None)
    view_tensor = None if view.all() else as_tensor(view.astype(np.float32))

    def report(event: dict) -> None:
        progress({**event, **working.started_fields()} if event.get("event") == STARTED else event)

    result = register_tensors(fixed_tensor, moving_tensor, settings, fixed_mask=mask_tensor,
                              initial_networks=initial_networks, device=torch_device,
                              progress=report if progress is not None else None,
                              should_stop=should_stop, moving_mask=view_tensor)

    displacement = result.displacement
    deformable = field_onto(voxel_field_to_image(displacement[0].cpu().numpy().astype(np.float64), grid),
                            fixed_image)
    field = through_transform(affine, deformable)
    transform = displacement_transform(field)
    warped = sitk.Resample(moving_image, fixed_image, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    warped_labels = None
    if labels_image is not None:
        warped_labels = sitk.Resample(labels_image, fixed_image, transform, sitk.sitkNearestNeighbor, 0,
                                      labels_image.GetPixelID())

    device_of = lambda tensor: tensor.to(displacement.device) if tensor is not None else None  # noqa: E731
    fixed_eval, mask_eval = device_of(fixed_tensor), device_of(mask_tensor)
    before = (similarity(fixed_eval, device_of(unaligned_tensor), None, result.window, mask_eval)
              if unaligned_tensor is not None else {"ncc": float("nan"), "mse": float("nan")})
    after = similarity(fixed_eval, device_of(moving_tensor), displacement, result.window, mask_eval)
    metrics = {"ncc_before": before["ncc"], "ncc_after": after["ncc"],
               "mse_before": before["mse"], "mse_after": after["mse"],
               "final_loss": (next(reversed(result.loss_history.values()))[-1] if settings.steps_per_scale
                              else float("nan")),
               "seconds": result.seconds, "device": result.device,
               "model": os.path.abspath(model_path) if model is not None and model_path != "the model" else None,
               "pre_alignment": initial_kind(initial, fixed_image.GetDimension()),
               "working_spacing_mm": working.grid.spacing, "working_size": list(working.grid.size),
               "steps_trained": [len(losses) for losses in result.loss_history.values()],
               **folding_statistics(displacement.detach().cpu())}
    provenance = run_record(
        "register", settings,
        inputs={"fixed": fixed, "moving": moving, "fixed_mask": fixed_mask, "moving_labels": moving_labels,
                "initial": initial if metrics["pre_alignment"] == "file" else None,
                "model": model_path if model is not None and model_path != "the model" else None},
        options={"preset": preset, "initial": metrics["pre_alignment"], "pre_alignment": list(affine.GetParameters()),
                 "spacing": spacing, "max_voxels": max_voxels, "ncc_window_mm": ncc_window_mm,
                 "working_spacing_mm": working.grid.spacing, "working_size": list(working.grid.size)},
        device=result.device)
    return RegistrationOutput(field=field, affine=affine, moving_grid=moving_image, warped=warped,
                              warped_labels=warped_labels,
                              loss_history=result.loss_history, metrics=metrics, engine_result=result,
                              fixed_grid=fixed_image, plan=working, provenance=provenance)
