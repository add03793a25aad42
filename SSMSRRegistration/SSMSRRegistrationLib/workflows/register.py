"""Python API: register two images given as files or SimpleITK images.

    >>> from SSMSRRegistrationLib import register
    >>> result = register("fixed.nii.gz", "moving.nii.gz", scales="1/2,1", steps=500)  # doctest: +SKIP
    >>> result.save("field.nii.gz", warped_path="warped.nii.gz")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk
import torch

from ..common.errors import InputError
from ..common.run_config import RunConfiguration, combined, takes_run_options
from ..common.protocol import STARTED, ProgressCallback
from ..common.schedule import fitting_schedule, parse_scales
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
    settings.validate()
    torch_device = resolve_device(run.device)

    fixed_image = read_image(fixed, "fixed image")
    check_image(fixed_image, "fixed image")
    if model is not None:
        model.check_fits(fixed_image.GetDimension(), settings.scales if "scales" in given else None, model_path)
        initial_networks = model.networks
    moving_image = read_image(moving, "moving image")
    check_image(moving_image, "moving image", fixed_image.GetDimension())
    labels_image = None
    if moving_labels is not None:
        labels_image = read_image(moving_labels, "moving labels")
        check_image(labels_image, "moving labels", fixed_image.GetDimension())
    working = plan_working_grid(fixed_image, settings, torch_device, run.spacing, run.max_voxels, run.ncc_window_mm)
    settings.ncc_window = working.window
    if "scales" not in given and model is None:  # a preset's schedule: scales too coarse for a small image go
        settings.scales = fitting_schedule(working.grid.size, settings.scales)
    grid = working.grid.reference
    mask_image = None  # on the working grid
    if fixed_mask is not None:
        mask_image = sitk.GetImageFromArray(_prepare_mask(fixed_mask, fixed_image).astype(np.uint8))
        mask_image.CopyInformation(fixed_image)
        mask_image = resample_onto(mask_image, grid, labels=True) if working.grid.resampled else mask_image
    # The pre-alignment too runs on the isotropic grid (its pyramid shrinks every axis alike).
    fixed_on_grid = resample_onto(fixed_image, grid) if working.grid.resampled else fixed_image
    affine = initial_transform(initial, fixed_on_grid, moving_image, settings.seed, mask_image)

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
        "register", settings, configuration,
        inputs={"fixed": fixed, "moving": moving, "fixed_mask": fixed_mask, "moving_labels": moving_labels,
                "initial": initial if metrics["pre_alignment"] == "file" else None,
                "model": model_path if model is not None and model_path != "the model" else None},
        options={"initial": metrics["pre_alignment"], "pre_alignment": list(affine.GetParameters()),
                 "working_spacing_mm": working.grid.spacing, "working_size": list(working.grid.size)},
        device=result.device)
    return RegistrationOutput(field=field, affine=affine, moving_grid=moving_image, warped=warped,
                              warped_labels=warped_labels,
                              loss_history=result.loss_history, metrics=metrics, engine_result=result,
                              fixed_grid=fixed_image, plan=working, provenance=provenance)
