"""Displacement fields in physical space, and writing outputs without leaving partial files.

A field on disk is an ITK displacement field: a vector image on the fixed
image's grid whose vector at fixed-image point p (physical, millimetres) is the
displacement u(p) such that p maps to p + u(p) in the moving image ("resampling"
transform, Slicer's "from parent"). Vectors are in ITK's LPS physical frame; this
is what SimpleITK, ITK and ANTs read and write for NRRD, MetaImage and NIfTI
(NIfTI intent code 1007, "vector"), and what Slicer's transform reader expects.
A ``.h5`` path is written as an ITK transform file (DisplacementFieldTransform).
"""

from __future__ import annotations

import os

import numpy as np
import SimpleITK as sitk

from .atomic import write_atomically
from ..common.errors import InputError

TRANSFORM_EXTENSIONS = (".h5", ".hdf5")


def _index_to_physical_matrix(reference: sitk.Image) -> np.ndarray:
    """Matrix taking an index-space vector (ITK order x, y[, z]) to a physical vector: direction @ diag(spacing)."""
    ndim = reference.GetDimension()
    direction = np.array(reference.GetDirection(), dtype=np.float64).reshape(ndim, ndim)
    return direction @ np.diag(reference.GetSpacing())


def voxel_field_to_image(displacement: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """Convert an engine field to an ITK displacement field on ``reference``'s grid.

    Args:
        displacement: (ndim, *S) array in voxels, channel k along array axis k (reverse of ITK order).
        reference: the fixed image (its grid must have size S reversed).
    Returns:
        sitk vector image (float64) of physical displacements in millimetres (LPS).
    """
    ndim = reference.GetDimension()
    if displacement.shape != (ndim,) + tuple(reversed(reference.GetSize())):
        raise ValueError(f"field {displacement.shape} does not fit the grid {reference.GetSize()}")
    index_vectors = displacement[::-1]  # channel order (x, y[, z])
    physical = np.einsum("ij,j...->...i", _index_to_physical_matrix(reference), index_vectors)
    image = sitk.GetImageFromArray(np.ascontiguousarray(physical, dtype=np.float64), isVector=True)
    image.CopyInformation(reference)
    return image


def image_to_voxel_field(field: sitk.Image) -> np.ndarray:
    """Inverse of ``voxel_field_to_image``: physical field (mm) -> (ndim, *S) voxel field in array-axis order."""
    physical = sitk.GetArrayFromImage(field).astype(np.float64)  # (*S, ndim), ITK order vectors
    inverse = np.linalg.inv(_index_to_physical_matrix(field))
    index_vectors = np.einsum("ij,...j->i...", inverse, physical)
    return index_vectors[::-1].copy()


def sample_field(field: sitk.Image, points: np.ndarray):
    """Linear interpolation of a vector field at (N, ndim) physical points, as ITK's DisplacementFieldTransform does
    it (neighbours clamped at the border). Returns (values (N, ndim), inside (N,)): inside is False beyond half a
    voxel outside the grid, where ITK takes the displacement as 0 (the values there are the clamped border's)."""
    origin, matrix = np.array(field.GetOrigin(), dtype=np.float64), _index_to_physical_matrix(field)
    size = np.array(field.GetSize())
    index = (np.asarray(points, dtype=np.float64) - origin) @ np.linalg.inv(matrix).T  # continuous index (x, y[, z])
    inside = np.all((index >= -0.5) & (index < size - 0.5), axis=1)
    index = np.clip(np.nan_to_num(index), 0, size - 1)
    base = np.minimum(np.floor(index).astype(np.int64), np.maximum(size - 2, 0))
    fraction = index - base
    array = sitk.GetArrayViewFromImage(field)  # (*reversed size, ndim)
    ndim = len(size)
    values = np.zeros((len(index), ndim))
    for corner in np.ndindex(*([2] * ndim)):
        offset = np.array(corner)
        corner_index = np.minimum(base + offset, size - 1)
        weight = np.prod(np.where(offset == 1, fraction, 1.0 - fraction), axis=1)
        values += weight[:, None] * array[tuple(corner_index[:, ndim - 1 - k] for k in range(ndim))]
    return values, inside


def displacement_transform(field: sitk.Image) -> sitk.DisplacementFieldTransform:
    """A SimpleITK transform for a physical field (the field image is copied, not consumed)."""
    return sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))


def jacobian_determinant_image(field: sitk.Image) -> sitk.Image:
    """det(I + du/dp) of a physical displacement field (mm, LPS), a float32 image on the field's grid.

    Central differences in millimetres, as SimpleITK's ``DisplacementFieldJacobianDeterminant``; that filter
    differentiates along the grid axes and ignores the direction cosines, so the vectors are first expressed in
    the grid's axes (v = D^T u): det(I + D^T (du/dp) D) = det(I + du/dp). On an axis-aligned grid the result is
    the filter's. Values <= 0 mark folding.
    """
    ndim = field.GetDimension()
    direction = np.array(field.GetDirection(), dtype=np.float64).reshape(ndim, ndim)
    in_axes = sitk.GetImageFromArray(sitk.GetArrayFromImage(field).astype(np.float64) @ direction, isVector=True)
    in_axes.SetSpacing(field.GetSpacing())
    determinant = sitk.DisplacementFieldJacobianDeterminant(in_axes)
    determinant = sitk.Cast(determinant, sitk.sitkFloat32)
    determinant.CopyInformation(field)
    return determinant


def write_image(image: sitk.Image, path: str, compress: bool = True) -> None:
    """Write any image atomically (format from the extension)."""
    try:
        write_atomically(path, lambda temporary: sitk.WriteImage(image, temporary, compress))
    except RuntimeError as error:
        raise InputError(f"Cannot write {path!r}: {str(error).strip().splitlines()[-1]} "
                         "Use an extension SimpleITK writes, such as .nii.gz, .nrrd or .mha.") from None


def write_field(field: sitk.Image, path: str) -> None:
    """Write a physical displacement field atomically: an image file, or an ITK transform for .h5."""
    if os.fspath(path).lower().endswith(TRANSFORM_EXTENSIONS):
        write_atomically(path, lambda temporary: sitk.WriteTransform(displacement_transform(field), temporary))
    else:  # through numpy: SimpleITK's Cast does not take 4D vector images (the stacked field of a 3D+t cine)
        single = sitk.GetImageFromArray(sitk.GetArrayViewFromImage(field).astype(np.float32), isVector=True)
        single.CopyInformation(field)
        write_image(single, path)


def read_field(path: str) -> sitk.Image:
    """Read a displacement field written by ``write_field`` (or by ITK/ANTs) as a vector image in mm (LPS)."""
    if not os.path.exists(path):
        raise InputError(f"The displacement field {path!r} does not exist.")
    if os.fspath(path).lower().endswith(TRANSFORM_EXTENSIONS):
        transform = sitk.ReadTransform(path)
        if transform.GetName() == "CompositeTransform":
            transform = sitk.CompositeTransform(transform).GetNthTransform(0)
        return sitk.DisplacementFieldTransform(transform).GetDisplacementField()
    field = sitk.ReadImage(path)
    if field.GetNumberOfComponentsPerPixel() != field.GetDimension():
        raise InputError(f"{path!r} is not a displacement field: it has {field.GetNumberOfComponentsPerPixel()} "
                         f"components per voxel for a {field.GetDimension()}D grid.")
    return field
