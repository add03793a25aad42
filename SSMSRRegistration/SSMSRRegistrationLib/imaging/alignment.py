"""Pre-alignment before the deformable stage: rigid or affine registration with SimpleITK, or a given ITK transform.

Transforms follow ITK's resampling convention, as the displacement fields do: ``T`` maps a fixed-image point p
(millimetres, LPS) to the corresponding moving-image point T(p). A transform file written by Slicer's General
Registration (BRAINS) or by ANTs/elastix for "moving to fixed" follows the same convention.

The registration: a moments (centre of mass and principal axes) initialiser, then a rigid stage and, for
``affine``, an affine stage starting from it; Mattes mutual information (so CT, MR and different contrasts work) on
at most SAMPLED_VOXELS random voxels, regular-step gradient descent with scales from physical shifts, up to three
levels (shrink 4, 2, 1; smoothing 2, 1, 0 voxels; no level coarser than SMALLEST_AXIS voxels).

Bit-for-bit repeatable for a given seed, on any thread count: ITK's Mattes metric adds the threads' partial sums in
the order the threads finish, so the registration itself runs on one ITK thread (``single_itk_thread``). On a 1 mm
brain this was no slower than two threads (the sampled metric is cheap; the threads mostly wait on each other).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

import numpy as np
import SimpleITK as sitk

from ..common.errors import InputError

#: Values of ``register(initial=...)`` besides a transform file; "auto" is affine in 3D and none in 2D.
INITIAL_CHOICES = ("auto", "none", "rigid", "affine")

#: Smallest |det| of an initial transform's matrix accepted as invertible (it maps volumes to 1e-6 of their size).
MINIMUM_DETERMINANT = 1e-6


def identity(ndim: int) -> sitk.AffineTransform:
    return sitk.AffineTransform(ndim)


def as_affine(transform: sitk.Transform, ndim: int, what: str) -> sitk.AffineTransform:
    """A linear transform (Euler, versor, similarity, affine, or a composite of them) as one AffineTransform."""
    if transform.GetName() == "CompositeTransform":
        composite = sitk.CompositeTransform(transform)
        parts = [composite.GetNthTransform(index) for index in range(composite.GetNumberOfTransforms())]
    else:
        parts = [transform]
    matrix, offset = np.eye(ndim), np.zeros(ndim)
    for part in reversed(parts):  # a composite applies its last transform first
        if part.GetDimension() != ndim:
            raise InputError(f"The {what} is {part.GetDimension()}D but the images are {ndim}D.")
        if not part.IsLinear():
            raise InputError(f"The {what} is not linear ({part.GetName()}); give a rigid or affine transform (the "
                             "deformable part is what SSMSR computes).")
        part_matrix, part_offset = _matrix_of(part, ndim), np.array(part.TransformPoint([0.0] * ndim))
        matrix, offset = part_matrix @ matrix, part_matrix @ offset + part_offset
    affine = sitk.AffineTransform(ndim)
    affine.SetMatrix(matrix.ravel().tolist())
    affine.SetTranslation(offset.tolist())
    return affine


def _matrix_of(transform: sitk.Transform, ndim: int) -> np.ndarray:
    """The linear part of a linear transform, from where it sends the unit vectors."""
    origin = np.array(transform.TransformPoint([0.0] * ndim))
    return np.stack([np.array(transform.TransformPoint(list(unit))) - origin for unit in np.eye(ndim)], axis=1)


def check_invertible(transform: sitk.AffineTransform, what: str) -> None:
    determinant = float(np.linalg.det(np.array(transform.GetMatrix()).reshape(transform.GetDimension(), -1)))
    if not abs(determinant) > MINIMUM_DETERMINANT or not np.isfinite(determinant):
        raise InputError(f"The {what} cannot be inverted (its matrix has determinant {determinant:.3g}); give a "
                         "rigid or affine transform that maps volumes to volumes.")


def read_initial_transform(path: str, ndim: int) -> sitk.AffineTransform:
    """An ITK transform file (.tfm, .txt, .h5, .mat) holding a linear transform, as an invertible AffineTransform."""
    if not os.path.isfile(path):
        raise InputError(f"The initial transform {path!r} does not exist; give an ITK transform file (.tfm, .h5, "
                         ".txt, .mat), e.g. saved from Slicer's General Registration, or set {setting} to rigid or "
                         "affine.", setting="initial")
    try:
        transform = sitk.ReadTransform(path)
    except RuntimeError as error:
        last = str(error).strip().splitlines()[-1] if str(error).strip() else ""
        raise InputError(f"{path!r} is not a transform file SimpleITK can read ({last}); give an ITK transform "
                         "(.tfm, .h5, .txt, .mat).") from None
    affine = as_affine(transform, ndim, f"initial transform {path!r}")
    check_invertible(affine, f"initial transform {path!r}")
    return affine


#: Voxels the similarity is sampled on at each level (a random subset of larger images).
SAMPLED_VOXELS = 50_000
#: The coarsest level keeps at least this many voxels along every axis.
SMALLEST_AXIS = 16


@contextlib.contextmanager
def single_itk_thread() -> Iterator[None]:
    """ITK filters and registrations created inside run on one thread (the global default is restored after)."""
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def _registration(fixed: sitk.Image, moving: sitk.Image, initial: sitk.Transform, seed: int,
                  fixed_mask: Optional[sitk.Image]) -> sitk.Transform:
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    voxels = int(np.prod(fixed.GetSize()))
    if voxels > SAMPLED_VOXELS:
        method.SetMetricSamplingStrategy(method.RANDOM)
        method.SetMetricSamplingPercentage(SAMPLED_VOXELS / voxels, seed + 1)  # SimpleITK reads 0 as "wall clock"
    if fixed_mask is not None:
        method.SetMetricFixedMask(fixed_mask)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-3, numberOfIterations=200,
                                                    relaxationFactor=0.5, gradientMagnitudeTolerance=1e-6)
    method.SetOptimizerScalesFromPhysicalShift()
    shrinks = [factor for factor in (4, 2) if min(fixed.GetSize()) // factor >= SMALLEST_AXIS] + [1]
    method.SetShrinkFactorsPerLevel(shrinks)
    method.SetSmoothingSigmasPerLevel([{4: 2, 2: 1, 1: 0}[factor] for factor in shrinks])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    method.SetInitialTransform(initial, inPlace=False)
    try:
        return method.Execute(fixed, moving)
    except RuntimeError as error:
        last = str(error).strip().splitlines()[-1] if str(error).strip() else ""
        raise InputError(f"The automatic pre-alignment failed ({last}); check that the images show the same "
                         "anatomy, or give an initial transform file, or set {setting} to none.",
                         setting="initial") from None


def align(fixed: sitk.Image, moving: sitk.Image, kind: str, seed: int = 0,
          fixed_mask: Optional[sitk.Image] = None) -> sitk.AffineTransform:
    """The transform T (fixed point -> moving point) of a rigid or affine registration of ``moving`` onto ``fixed``
    (``kind`` "rigid" or "affine"); the identity for "none"."""
    ndim = fixed.GetDimension()
    if kind == "none":
        return identity(ndim)
    fixed32, moving32 = sitk.Cast(fixed, sitk.sitkFloat32), sitk.Cast(moving, sitk.sitkFloat32)
    rigid = sitk.Euler3DTransform() if ndim == 3 else sitk.Euler2DTransform()
    with single_itk_thread():
        rigid = sitk.CenteredTransformInitializer(fixed32, moving32, rigid,
                                                  sitk.CenteredTransformInitializerFilter.MOMENTS)
        rigid = _registration(fixed32, moving32, rigid, seed, fixed_mask)
        result = as_affine(rigid, ndim, "rigid pre-alignment")
        if kind == "affine":
            result = as_affine(_registration(fixed32, moving32, result, seed, fixed_mask), ndim,
                               "affine pre-alignment")
    check_invertible(result, f"{kind} pre-alignment")
    return result


def map_points(transform: sitk.AffineTransform, points: np.ndarray) -> np.ndarray:
    """T(p) for an (..., ndim) array of physical points (ITK order x, y[, z])."""
    ndim = transform.GetDimension()
    matrix = np.array(transform.GetMatrix()).reshape(ndim, ndim)
    return points @ matrix.T + np.array(transform.TransformPoint([0.0] * ndim))


def grid_points(image: sitk.Image) -> np.ndarray:
    """Physical points (mm, ITK order x, y[, z]) of every voxel, shaped (*S, ndim) in array-axis order."""
    ndim = image.GetDimension()
    indices = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in reversed(image.GetSize())],
                                   indexing="ij"), axis=-1)[..., ::-1]
    index_to_physical = np.array(image.GetDirection()).reshape(ndim, ndim) @ np.diag(image.GetSpacing())
    return indices @ index_to_physical.T + np.array(image.GetOrigin())


def is_identity(transform: sitk.AffineTransform) -> bool:
    ndim = transform.GetDimension()
    return bool(np.allclose(np.array(transform.GetMatrix()).reshape(ndim, ndim), np.eye(ndim), atol=0, rtol=0)
                and np.allclose(transform.TransformPoint([0.0] * ndim), 0.0, atol=0))


def through_transform(transform: sitk.AffineTransform, field: sitk.Image) -> sitk.Image:
    """The displacement field of p -> T(p + u(p)): a deformable field ``u`` found after the pre-alignment ``T``,
    as one field on the same grid (mm, LPS)."""
    if is_identity(transform):
        return field
    points = grid_points(field)
    moved = map_points(transform, points + sitk.GetArrayFromImage(field).astype(np.float64))
    combined = sitk.GetImageFromArray(moved - points, isVector=True)
    combined.CopyInformation(field)
    return combined


def inverse_field(transform: sitk.AffineTransform, field: sitk.Image, moving_grid: sitk.Image,
                  iterations: int = 50) -> sitk.Image:
    """The inverse of p -> T(p + u(p)) as a displacement field v on the moving image's grid: q -> q + v(q) maps a
    moving point back to its fixed point. (id + u) is inverted on the fixed grid by SimpleITK's
    InvertDisplacementField, then read through T^-1: v(q) = T^-1(q) + s(T^-1(q)) - q; 0 where T^-1(q) leaves the
    fixed grid's field (the inverse of u is taken as the identity there)."""
    ndim = field.GetDimension()
    inverse_deformable = sitk.InvertDisplacementField(sitk.Cast(field, sitk.sitkVectorFloat64),
                                                      maximumNumberOfIterations=iterations,
                                                      maxErrorToleranceThreshold=0.01,
                                                      meanErrorToleranceThreshold=0.0001,
                                                      enforceBoundaryCondition=True)
    inverse_affine = as_affine(transform.GetInverse(), ndim, "inverse of the pre-alignment")
    points = grid_points(moving_grid)
    back = map_points(inverse_affine, points)
    on_moving = sitk.Resample(inverse_deformable, moving_grid, inverse_affine, sitk.sitkLinear, 0.0,
                              sitk.sitkVectorFloat64)
    inverse = sitk.GetImageFromArray(back + sitk.GetArrayFromImage(on_moving) - points, isVector=True)
    inverse.CopyInformation(moving_grid)
    return inverse
