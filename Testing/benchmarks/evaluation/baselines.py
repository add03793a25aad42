"""Classical baselines from PyPI, each converted to an ITK displacement field on the fixed grid (mm, LPS).

* ANTs SyN (antspyx): ``ants.registration(type_of_transform="SyNOnly")``, CC metric, three levels, gradient
  step 0.25 (paper); the forward transforms are composed into one displacement field by antsApplyTransforms.
* elastix B-spline (itk-elastix): normalised correlation, final grid spacing 5 voxels, three resolutions;
  the field is transformix's deformation field.
* symmetric-forces demons (SimpleITK): three-level pyramid, moving intensities histogram-matched to the fixed.

Each takes the same [0, 1] images as every other method, and the pair's fixed mask on the cine (not demons).
The packages are optional (``pip install .[bench]``); a missing one makes its rows absent, and the report says so.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from typing import Callable, List, Optional

import numpy as np
import SimpleITK as sitk

from .cases import Case, Pair
from .config import Config
from .measure import measured
from .methods import Method, MethodRun
from SSMSRRegistrationLib.workflows.provenance import cpu_model

#: Demons: Gaussian smoothing of the displacement field (voxels of each level) and pyramid shrink factors.
#: On a training subject of the hippocampus crop (never a test pair), sigma 1.5 to 3 and pyramids (2, 1) or
#: (4, 2, 1) with 70 to 175 iterations in all gave Dice within 0.5 points of each other.
DEMONS_FIELD_SIGMA = 2.0
DEMONS_SHRINK = (4, 2, 1)
#: Histogram matching before demons: levels and match points (ITK's DeformableRegistration examples).
HISTOGRAM_LEVELS, MATCH_POINTS = 256, 7


def _missing(module: str, package: str) -> Optional[str]:
    """Why ``module`` (e.g. "itk.ElastixPython") cannot be imported, or None when it can."""
    parent = module.split(".")[0]
    if importlib.util.find_spec(parent) is None or importlib.util.find_spec(module) is None:
        return f"{package} is not installed (pip install .[bench])"
    return None


def _cpu_device(config: Config) -> str:
    return f"CPU ({cpu_model()}), {config.threads} threads"


def _per_pair(case: Case, config: Config, name: str, register_pair: Callable[[Pair, Case, Config], sitk.Image],
              ) -> List[MethodRun]:
    fields, usage = [], []
    for pair in case.pairs:
        field_image, pair_usage = measured(lambda: register_pair(pair, case, config))
        fields.append(field_image)
        usage.append(pair_usage)
    return [MethodRun(name, fields, usage, _cpu_device(config))]


# ---------------------------------------------------------------------------------------------------- ANTs
def _ants_radius(case: Case) -> int:
    """CC radius (voxels): 2 in 3D and 3 in 2D, the windows (5^3, 7^2) closest to SSMSR's NCC windows (5, 6)."""
    return 2 if case.dimension == 3 else 3


def ants_call(case: Case, config: Config) -> str:
    """The exact ants.registration call (text), as run."""
    mask = ", mask=fixed_mask" if case.masked_registration else ""
    return (f'ants.registration(fixed, moving, type_of_transform="SyNOnly", initial_transform="Identity", '
            f'syn_metric="CC", syn_sampling={_ants_radius(case)}, grad_step=0.25, flow_sigma=3, total_sigma=0, '
            f"reg_iterations={tuple(config.ants_iterations)}, random_seed={config.seed}{mask})")


def _ants_field(pair: Pair, masked: bool, **arguments) -> sitk.Image:
    """``ants.registration(fixed, moving, **arguments)`` on the pair (with its mask when ``masked``), its forward
    transforms composed into one displacement field on the fixed grid."""
    import ants

    with tempfile.TemporaryDirectory() as folder:
        paths = {}
        for role, image in (("fixed", pair.fixed), ("moving", pair.moving), ("mask", pair.mask)):
            if image is not None:
                paths[role] = os.path.join(folder, f"{role}.nii.gz")
                sitk.WriteImage(image, paths[role])
        fixed, moving = ants.image_read(paths["fixed"]), ants.image_read(paths["moving"])
        mask = ants.image_read(paths["mask"]) if masked else None
        result = ants.registration(fixed, moving, mask=mask, outprefix=os.path.join(folder, "ants_"), **arguments)
        composed = ants.apply_transforms(fixed, moving, transformlist=result["fwdtransforms"],
                                         compose=os.path.join(folder, "composed_"))
        field_image = sitk.ReadImage(composed, sitk.sitkVectorFloat64)
    field_image.CopyInformation(pair.fixed)  # same grid; removes round-off from the NIfTI header
    return field_image


def _ants_pair(pair: Pair, case: Case, config: Config) -> sitk.Image:
    return _ants_field(pair, case.masked_registration, type_of_transform="SyNOnly", initial_transform="Identity",
                       syn_metric="CC", syn_sampling=_ants_radius(case), grad_step=0.25, flow_sigma=3, total_sigma=0,
                       reg_iterations=tuple(config.ants_iterations), random_seed=config.seed)


def _ants_default_pair(pair: Pair, case: Case, config: Config) -> sitk.Image:
    return _ants_field(pair, False, type_of_transform="SyN", random_seed=config.seed)


def _ants_runner(name: str, register_pair: Callable[[Pair, Case, Config], sitk.Image]
                 ) -> Callable[[Case, Config], List[MethodRun]]:
    """A Method's run: ``register_pair`` on every pair of a case, ANTs on the configured number of threads."""
    def run(case: Case, config: Config) -> List[MethodRun]:
        os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(config.threads)
        return _per_pair(case, config, name, register_pair)
    return run


# ------------------------------------------------------------------------------------------------- elastix
def elastix_parameter_map(case: Case, config: Config) -> dict:
    """elastix's default B-spline map with the paper's settings (NiftyReg's: grid 5 voxels, 500 iterations)."""
    import itk

    parameters = itk.ParameterObject.New()
    default = parameters.GetDefaultParameterMap("bspline", 3)
    settings = {key: list(value) for key, value in dict(default).items()}
    settings.pop("FinalGridSpacingInPhysicalUnits", None)
    settings.update({"Metric": ["AdvancedNormalizedCorrelation"], "FinalGridSpacingInVoxels": ["5"],
                     "NumberOfResolutions": ["3"], "MaximumNumberOfIterations": [str(config.elastix_iterations)],
                     "RandomSeed": [str(config.seed)], "WriteResultImage": ["false"]})
    if case.masked_registration:
        settings["ErodeMask"] = ["false"]
    return settings


def _itk_image(image: sitk.Image, pixel):
    """A SimpleITK image as an itk image (same geometry)."""
    import itk

    converted = itk.GetImageFromArray(sitk.GetArrayFromImage(image).astype(pixel))
    converted.SetSpacing(image.GetSpacing())
    converted.SetOrigin(image.GetOrigin())
    dimension = image.GetDimension()
    converted.SetDirection(itk.matrix_from_array(np.array(image.GetDirection()).reshape(dimension, dimension)))
    return converted


def _elastix_pair(pair: Pair, case: Case, config: Config) -> sitk.Image:
    import itk

    parameters = itk.ParameterObject.New()
    parameters.AddParameterMap(elastix_parameter_map(case, config))
    fixed, moving = _itk_image(pair.fixed, np.float32), _itk_image(pair.moving, np.float32)
    options = {"fixed_mask": _itk_image(pair.mask, np.uint8)} if case.masked_registration else {}
    # The number_of_threads argument crashes itk-elastix 0.25.4; ITK's global default does the same job.
    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(config.threads)
    with tempfile.TemporaryDirectory() as folder:  # transformix writes deformationField.nii there
        _, transform = itk.elastix_registration_method(fixed, moving, parameter_object=parameters,
                                                       log_to_console=False, output_directory=folder, **options)
        deformation = itk.transformix_deformation_field(moving, transform, output_directory=folder)
        array = itk.array_from_image(deformation).astype(np.float64)
    field_image = sitk.GetImageFromArray(array, isVector=True)
    field_image.CopyInformation(pair.fixed)
    return field_image


def _run_elastix(case: Case, config: Config) -> List[MethodRun]:
    return _per_pair(case, config, "elastix B-spline", _elastix_pair)


def _elastix_parameters(case: Case, config: Config) -> str:
    settings = elastix_parameter_map(case, config)
    listed = "; ".join(f"{key}={' '.join(value)}" for key, value in sorted(settings.items()))
    mask = " with the fixed mask" if case.masked_registration else ""
    return (f"itk.elastix_registration_method(fixed, moving{mask}), field from itk.transformix_deformation_field; "
            f"parameter map: {listed}")


# -------------------------------------------------------------------------------------------------- demons
def _axis_aligned(image: sitk.Image) -> sitk.Image:
    """A copy with identity direction cosines (same voxels, spacing, origin)."""
    aligned = sitk.Image(image)
    aligned.SetDirection(np.eye(image.GetDimension()).ravel().tolist())
    return aligned


def _demons_pair(pair: Pair, case: Case, config: Config) -> sitk.Image:
    # ITK's demons forces ignore the direction cosines, so the images are registered with identity
    # directions and the field's vectors are rotated back into the physical (LPS) frame at the end.
    fixed = _axis_aligned(pair.fixed)
    moving = sitk.HistogramMatching(_axis_aligned(pair.moving), fixed, HISTOGRAM_LEVELS, MATCH_POINTS, True)
    field_image = None
    for shrink, iterations in zip(DEMONS_SHRINK, config.demons_iterations):
        if shrink > 1:
            sigma = [0.5 * shrink * s for s in fixed.GetSpacing()]
            level_fixed = sitk.Shrink(sitk.SmoothingRecursiveGaussian(fixed, sigma), [shrink] * fixed.GetDimension())
            level_moving = sitk.Shrink(sitk.SmoothingRecursiveGaussian(moving, sigma),
                                       [shrink] * fixed.GetDimension())
        else:
            level_fixed, level_moving = fixed, moving
        initial = sitk.Image(level_fixed.GetSize(), sitk.sitkVectorFloat64, fixed.GetDimension())
        initial.CopyInformation(level_fixed)
        if field_image is not None:
            initial = sitk.Resample(field_image, level_fixed, sitk.Transform(), sitk.sitkLinear, 0.0,
                                    sitk.sitkVectorFloat64)
        demons = sitk.SymmetricForcesDemonsRegistrationFilter()
        demons.SetNumberOfIterations(int(iterations))
        demons.SetStandardDeviations(DEMONS_FIELD_SIGMA)
        demons.SetSmoothDisplacementField(True)
        demons.SetNumberOfThreads(config.threads)
        field_image = demons.Execute(level_fixed, level_moving, initial) if iterations > 0 else initial
    dimension = pair.fixed.GetDimension()
    direction = np.array(pair.fixed.GetDirection()).reshape(dimension, dimension)
    vectors = sitk.GetArrayFromImage(field_image).astype(np.float64) @ direction.T
    physical = sitk.GetImageFromArray(vectors, isVector=True)
    physical.CopyInformation(pair.fixed)
    return physical


def _run_demons(case: Case, config: Config) -> List[MethodRun]:
    return _per_pair(case, config, "demons (symmetric forces)", _demons_pair)


def _demons_parameters(case: Case, config: Config) -> str:
    return (f"SimpleITK SymmetricForcesDemonsRegistrationFilter, pyramid shrink {DEMONS_SHRINK} (Gaussian "
            f"sigma 0.5 x shrink voxels before shrinking), iterations {tuple(config.demons_iterations)}, "
            f"displacement-field smoothing sigma {DEMONS_FIELD_SIGMA} voxels, no update-field smoothing; moving "
            f"image histogram-matched to the fixed ({HISTOGRAM_LEVELS} levels, {MATCH_POINTS} match points, "
            "threshold at mean); no mask")


ANTS = Method("ANTs SyN", _ants_runner("ANTs SyN", _ants_pair), lambda case, config: ants_call(case, config)
              + "; field: ants.apply_transforms(fixed, moving, fwdtransforms, compose=prefix)",
              missing=_missing("ants", "antspyx"))
#: antspyx's own defaults: an affine registration (mutual information), then SyN with mutual information, no mask.
ANTS_DEFAULT = Method("ANTs SyN (antspyx default)", _ants_runner("ANTs SyN (antspyx default)", _ants_default_pair),
                      lambda case, config: f'ants.registration(fixed, moving, type_of_transform="SyN", '
                                           f'random_seed={config.seed}); field: ants.apply_transforms(fixed, moving, '
                                           'fwdtransforms, compose=prefix)', missing=_missing("ants", "antspyx"))
ELASTIX = Method("elastix B-spline", _run_elastix, _elastix_parameters, missing=_missing("itk.ElastixPython", "itk-elastix"))
DEMONS = Method("demons (symmetric forces)", _run_demons, _demons_parameters)
