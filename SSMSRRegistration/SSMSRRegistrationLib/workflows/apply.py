"""Apply a saved registration to other images, label maps and points (the counterpart of ANTs' apply_transforms).

    >>> from SSMSRRegistrationLib.workflows.apply import read_transform
    >>> transform = read_transform("field.nii.gz")  # or "field.provenance.json"  # doctest: +SKIP
    >>> warped = transform.apply_to_image("other_moving.nii.gz")  # doctest: +SKIP
    >>> landmarks_on_fixed = transform.apply_to_points(landmarks_on_moving_lps)  # doctest: +SKIP

Directions. A result of ``register`` is a displacement field u on the fixed grid (mm, LPS, ITK's resampling
convention): the fixed point p corresponds to the moving point p + u(p); the field includes the pre-alignment.
``Transform`` goes the way images are warped, moving -> fixed: an image is resampled onto the fixed grid and a point
of the moving image's space is carried to where its structure lies in the warped image, which means solving
p + u(p) = q for p. ``Transform.inverse()`` goes fixed -> moving: images are resampled onto a given reference grid
(the moving image's) through the inverse field, points are mapped as p + u(p) directly.

Points that cannot be mapped (the solution of p + u(p) = q was not found within ``MAX_ITERATIONS``, or lies outside
the field's grid, where the registration says nothing) become NaN with an ``UnmappedPointsWarning``, or raise
InputError with ``unmapped="error"``.

Point files: CSV whose header names the convention, columns L,P,S (LPS) or R,A,S (RAS) (2D: L,P or R,A), other
columns carried through; and Slicer markups JSON (.mrk.json). Outputs keep the input's convention and content.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field as dataclass_field
from typing import Any, Dict, Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk

from ..common.errors import InputError
from ..imaging.alignment import identity, inverse_field
from ..imaging.fields import displacement_transform, read_field, sample_field
from ..imaging.images import ImageLike, read_image
from ..imaging.points import is_markups_path, read_points, write_points

#: Fixed-point iteration for p + u(p) = q: stop below this residual (mm) or after this many iterations.
TOLERANCE_MM = 1e-4
MAX_ITERATIONS = 100
INTERPOLATIONS = {"linear": sitk.sitkLinear, "bspline": sitk.sitkBSpline}  # sitkBSpline: cubic (order 3)
LABEL_MODES = ("nearest", "linear")
#: Per-label linear interpolation resamples one indicator per label; more distinct values than this is not a label map.
MAX_LINEAR_LABELS = 1000
UNMAPPED_CHOICES = ("nan", "error")


class UnmappedPointsWarning(UserWarning):
    """Some points could not be mapped and were set to NaN."""


def _check_unmapped(mapped: np.ndarray, failed: np.ndarray, reason: str, unmapped: str) -> np.ndarray:
    if not failed.any():
        return mapped
    rows = np.flatnonzero(failed)
    listed = ", ".join(str(int(row) + 1) for row in rows[:10]) + (", ..." if len(rows) > 10 else "")
    message = (f"{len(rows)} of {len(failed)} points could not be mapped ({reason}): point{'s' * (len(rows) > 1)} "
               f"number {listed}, counting from 1 in the order given,")
    if unmapped == "error":
        raise InputError(message[:-1] + ".")
    warnings.warn(message + " set to NaN.", UnmappedPointsWarning, stacklevel=3)
    mapped = mapped.copy()
    mapped[failed] = np.nan
    return mapped


def _image(source: ImageLike, role: str, ndim: int) -> sitk.Image:
    image = read_image(source, role)
    if image.GetDimension() != ndim:
        raise InputError(f"The {role} is {image.GetDimension()}D but the transform is {ndim}D.")
    return image


@dataclass
class Transform:
    """A registration result as a transform. ``field``: the registration's displacement field (on the fixed grid,
    mm, LPS, fixed point p -> moving point p + u(p)); ``inverse_field``: its inverse on the moving grid, when
    ``register`` wrote one; ``inverted``: False for moving -> fixed (how ``register`` warps), True for the other
    way (``inverse()``); ``source``: the file it was read from."""

    field: sitk.Image
    inverse_field: Optional[sitk.Image] = None
    inverted: bool = False
    source: Optional[str] = None
    _computed_inverses: Dict[tuple, sitk.Image] = dataclass_field(default_factory=dict, repr=False, compare=False)

    @property
    def dimension(self) -> int:
        return self.field.GetDimension()

    def inverse(self) -> "Transform":
        """The same result in the other direction (fixed -> moving for a result read from a file)."""
        return Transform(self.field, self.inverse_field, not self.inverted, self.source, self._computed_inverses)

    def _output(self, reference: Optional[ImageLike]):
        """(output grid, SimpleITK transform from output points to input points) for images and labels."""
        if not self.inverted:
            grid = self.field if reference is None else _image(reference, "reference image", self.dimension)
            return grid, displacement_transform(self.field)
        if reference is None:
            raise InputError("The inverse transform resamples onto a reference grid (the moving image's); give the "
                             "reference image.")
        grid = _image(reference, "reference image", self.dimension)
        if self.inverse_field is not None:
            return grid, displacement_transform(self.inverse_field)
        key = (grid.GetSize(), grid.GetSpacing(), grid.GetOrigin(), grid.GetDirection())
        if key not in self._computed_inverses:  # the inverse of the whole field (pre-alignment included)
            self._computed_inverses[key] = inverse_field(identity(self.dimension), self.field, grid)
        return grid, displacement_transform(self._computed_inverses[key])

    def apply_to_image(self, image: ImageLike, interpolation: str = "linear", default_value: float = 0.0,
                       reference: Optional[ImageLike] = None) -> sitk.Image:
        """``image`` (any grid, its own physical space) resampled through the transform, as float32 (vector images:
        vector float32), ``default_value`` where it has no data. The output grid is the fixed image's (the field's)
        or ``reference``, which the inverse requires. Equals ``register``'s warped output for the same field."""
        if interpolation not in INTERPOLATIONS:
            raise InputError(f"The interpolation must be linear or bspline, not {interpolation!r}.")
        image = _image(image, "image", self.dimension)
        grid, transform = self._output(reference)
        pixel = sitk.sitkFloat32 if image.GetNumberOfComponentsPerPixel() == 1 else sitk.sitkVectorFloat32
        return sitk.Resample(image, grid, transform, INTERPOLATIONS[interpolation], float(default_value), pixel)

    def apply_to_labels(self, labels: ImageLike, mode: str = "nearest",
                        reference: Optional[ImageLike] = None) -> sitk.Image:
        """A label map resampled through the transform, keeping its pixel type; 0 outside its grid.

        mode "nearest": nearest neighbour (as ``register`` warps labels). "linear": each label's indicator (the
        background 0 included) is resampled linearly and every voxel takes the label of the largest value (ties to
        the smaller label), which gives smooth edges instead of staircases."""
        if mode not in LABEL_MODES:
            raise InputError(f"The label interpolation must be nearest or linear, not {mode!r}.")
        labels = _image(labels, "label map", self.dimension)
        if labels.GetNumberOfComponentsPerPixel() != 1:
            raise InputError("The label map has several components per voxel; give a single-component label map.")
        grid, transform = self._output(reference)
        if mode == "nearest":
            return sitk.Resample(labels, grid, transform, sitk.sitkNearestNeighbor, 0, labels.GetPixelID())
        array = sitk.GetArrayViewFromImage(labels)
        values = np.unique(array)
        if len(values) > MAX_LINEAR_LABELS:
            raise InputError(f"The label map has {len(values)} distinct values: it looks like an intensity image. "
                             "Warp it as an image, or use nearest-neighbour label interpolation.")
        best = result = None
        for value in [0] + [v for v in values.tolist() if v != 0]:
            indicator = sitk.GetImageFromArray((array == value).astype(np.float32))
            indicator.CopyInformation(labels)
            outside = 1.0 if value == 0 else 0.0  # beyond the label map's grid: background
            resampled = sitk.GetArrayFromImage(sitk.Resample(indicator, grid, transform, sitk.sitkLinear, outside,
                                                             sitk.sitkFloat32))
            if best is None:
                best, result = resampled, np.zeros(resampled.shape, array.dtype)
            else:
                larger = resampled > best
                best[larger], result[larger] = resampled[larger], value
        output = sitk.GetImageFromArray(result)
        output.CopyInformation(grid)
        return output

    def apply_to_points(self, points_lps: Union[Sequence[Sequence[float]], np.ndarray],
                        unmapped: str = "nan") -> np.ndarray:
        """(N, ndim) physical points (mm, LPS) mapped through the transform: from the moving image's space to the
        fixed image's (where the structure at each point is in the warped image), or the other way for the inverse.

        Moving -> fixed solves p + u(p) = q for each point q by the fixed-point iteration p <- q - u(p) (u linearly
        interpolated; from q + inverse(q) when an inverse field is known), until the residual is below
        TOLERANCE_MM or MAX_ITERATIONS passed. Points that do not converge, or whose solution lies outside the
        field's grid, are NaN with an UnmappedPointsWarning (``unmapped="nan"``) or raise InputError ("error")."""
        if unmapped not in UNMAPPED_CHOICES:
            raise InputError(f"The handling of unmapped points must be nan or error, not {unmapped!r}.")
        points = np.asarray(points_lps, dtype=np.float64)
        if points.ndim != 2 or points.shape[1] != self.dimension:
            raise InputError(f"The points must be an (N, {self.dimension}) array of {self.dimension}D physical "
                             f"points for a {self.dimension}D transform; got shape {points.shape}.")
        if self.inverted:
            displacement, inside = sample_field(self.field, points)
            return _check_unmapped(points + displacement, ~inside, "outside the field's grid", unmapped)
        estimate = points.copy()
        if self.inverse_field is not None:
            start, known = sample_field(self.inverse_field, points)
            estimate[known] += start[known]
        for _ in range(MAX_ITERATIONS):
            displacement, _ = sample_field(self.field, estimate)
            if not np.any(np.linalg.norm(estimate + displacement - points, axis=1) >= TOLERANCE_MM):
                break  # every residual is below the tolerance (NaN inputs compare False and stay NaN)
            estimate = points - displacement
        displacement, inside = sample_field(self.field, estimate)
        residual = np.linalg.norm(estimate + displacement - points, axis=1)
        mapped = _check_unmapped(estimate, ~(residual < TOLERANCE_MM),
                                 f"p + u(p) = q not solved within {TOLERANCE_MM:g} mm in {MAX_ITERATIONS} iterations",
                                 unmapped)
        return _check_unmapped(mapped, ~inside & np.isfinite(mapped).all(axis=1), "outside the field's grid",
                               unmapped)


def read_transform(source: Union[str, os.PathLike, sitk.Image, Any]) -> Transform:
    """A registration result as a ``Transform``: a displacement field file (NIfTI, NRRD, MHA vector image or ITK
    .h5, as ``register`` and ANTs write), a provenance file NAME.provenance.json written beside a result (the
    field it names, and the inverse field when ``register`` wrote one), a SimpleITK field image, or an object with
    a ``field`` image (``register``'s RegistrationOutput).

    A saved registration of two echocardiogram frames applied again to the moving frame and to a point:

    >>> import tempfile, SSMSRRegistrationLib as ssmsr
    >>> from SSMSRRegistrationLib.imaging.sample_data import shipped_echo_frames
    >>> fixed, moving = shipped_echo_frames([0, 20])
    >>> written = ssmsr.register(fixed, moving, scales="1/2,1", steps=5, device="cpu").save(
    ...     tempfile.mkdtemp() + "/field.nii.gz", warped_path=tempfile.mkdtemp() + "/warped.nii.gz")
    >>> transform = ssmsr.read_transform(written["provenance"])
    >>> warped = transform.apply_to_image(moving)
    >>> import numpy as np, SimpleITK as sitk
    >>> bool(np.abs(sitk.GetArrayFromImage(warped) - sitk.GetArrayFromImage(sitk.ReadImage(written["warped"]))).max()
    ...      < 1e-3)
    True
    >>> transform.apply_to_points([[80.0, 60.0]]).shape
    (1, 2)
    """
    if isinstance(source, sitk.Image):
        return Transform(_checked_field(source, "the displacement field"))
    if not isinstance(source, (str, os.PathLike)) and isinstance(getattr(source, "field", None), sitk.Image):
        return Transform(_checked_field(source.field, "the result's field"))
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise InputError(f"The registration result {path!r} does not exist (give a displacement field file or its "
                         "NAME.provenance.json).")
    if path.lower().endswith(".json"):
        return _from_provenance(path)
    return Transform(_read_field_file(path, "displacement field"), source=os.path.abspath(path))


def _read_field_file(path: str, role: str) -> sitk.Image:
    try:
        field = read_field(path)
    except RuntimeError as error:
        last = str(error).strip().splitlines()[-1] if str(error).strip() else ""
        raise InputError(f"Cannot read the {role} {path!r}: it is not an image or transform SimpleITK can read "
                         f"({last}).") from None
    return _checked_field(field, f"the {role} {path!r}")


def _checked_field(field: sitk.Image, role: str) -> sitk.Image:
    ndim = field.GetDimension()
    if ndim not in (2, 3) or field.GetNumberOfComponentsPerPixel() != ndim:
        raise InputError(f"{role[0].upper() + role[1:]} is not a 2D or 3D displacement field: it is {ndim}D with "
                         f"{field.GetNumberOfComponentsPerPixel()} components per voxel.")
    if not np.isfinite(sitk.GetArrayViewFromImage(field)).all():
        raise InputError(f"{role[0].upper() + role[1:]} contains NaN or infinite displacements.")
    return sitk.Cast(field, sitk.sitkVectorFloat64)


def _output_file(record: dict, name: str, sidecar: str) -> Optional[str]:
    """The path of output ``name`` of a provenance record: as recorded, else beside the sidecar (a moved folder);
    checked against the recorded digest."""
    from .provenance import file_digest

    entry = (record.get("outputs") or {}).get(name)
    if not entry:
        return None
    recorded = entry.get("path", "")
    beside = os.path.join(os.path.dirname(os.path.abspath(sidecar)), os.path.basename(recorded))
    path = recorded if os.path.isfile(recorded) else beside
    if not os.path.isfile(path):
        raise InputError(f"The {name} file named by {sidecar!r} is missing (neither {recorded!r} nor {beside!r}).")
    if entry.get("sha256") and file_digest(path) != entry["sha256"]:
        raise InputError(f"The {name} file {path!r} has changed since {sidecar!r} was written; give the field file "
                         "itself to use it anyway.")
    return path


def _from_provenance(path: str) -> Transform:
    from .provenance import read_sidecar

    record = read_sidecar(path)
    if record.get("kind") != "register":
        raise InputError(f"{path!r} is the provenance of a {record.get('kind')!r} run; give that of a registration "
                         "(its outputs include a displacement field).")
    field_path = _output_file(record, "field", path)
    if field_path is None:
        raise InputError(f"{path!r} names no displacement field among its outputs.")
    field = _read_field_file(field_path, "displacement field")
    inverse_path = _output_file(record, "inverse", path)
    inverse = _read_field_file(inverse_path, "inverse field") if inverse_path else None
    if inverse is not None and inverse.GetDimension() != field.GetDimension():
        raise InputError(f"The inverse field {inverse_path!r} is {inverse.GetDimension()}D but the field is "
                         f"{field.GetDimension()}D.")
    return Transform(field, inverse, source=os.path.abspath(field_path))


# Point files -------------------------------------------------------------------------------------------------------

def apply_to_point_file(transform: Transform, input_path: str, output_path: str, unmapped: str = "nan") -> dict:
    """Map the points of a CSV or markups file and write them (same format and convention) to ``output_path``;
    returns {"points": N, "points_not_mapped": K}."""
    if is_markups_path(input_path) != is_markups_path(output_path):
        raise InputError(f"Write the points in the input's format: {input_path!r} and {output_path!r} differ (CSV "
                         "and markups JSON).")
    point_file = read_points(input_path, transform.dimension)
    moved = transform.apply_to_points(point_file.points, unmapped=unmapped)
    write_points(point_file, moved, output_path)
    return {"points": int(len(moved)), "points_not_mapped": int((~np.isfinite(moved).all(axis=1)).sum())}


def apply(transform: Union[Transform, str, os.PathLike, sitk.Image, Any], image: Optional[ImageLike] = None,
          labels: Optional[ImageLike] = None, points=None, *, inverse: bool = False,
          reference: Optional[ImageLike] = None, interpolation: str = "linear", label_mode: str = "nearest",
          default_value: float = 0.0, unmapped: str = "nan"):
    """Apply a registration result (a ``Transform`` or anything ``read_transform`` reads) to one input: an image
    (returns the resampled image), a label map (returns the resampled label map) or (N, ndim) LPS points (returns
    the mapped points). ``inverse``: fixed -> moving (images and labels then need ``reference``).

    A registration's result carries a label map drawn on the moving frame to the fixed frame, and back:

    >>> import SimpleITK as sitk, SSMSRRegistrationLib as ssmsr
    >>> from SSMSRRegistrationLib.imaging.sample_data import shipped_echo_frames
    >>> fixed, moving = shipped_echo_frames([0, 20])
    >>> output = ssmsr.register(fixed, moving, scales="1/2,1", steps=5, device="cpu")
    >>> labels = sitk.Cast(moving > 60, sitk.sitkUInt8)
    >>> on_fixed = ssmsr.apply(output, labels=labels)
    >>> on_fixed.GetSize() == fixed.GetSize(), on_fixed.GetPixelID() == labels.GetPixelID()
    (True, True)
    >>> ssmsr.apply(output, labels=on_fixed, inverse=True, reference=moving).GetSize() == moving.GetSize()
    True
    """
    given = [name for name, value in (("image", image), ("labels", labels), ("points", points)) if value is not None]
    if len(given) != 1:
        raise InputError(f"Give exactly one of an image, a label map or points to apply the transform to (got "
                         f"{' and '.join(given) or 'none'}).")
    transform = transform if isinstance(transform, Transform) else read_transform(transform)
    transform = transform.inverse() if inverse else transform
    if image is not None:
        return transform.apply_to_image(image, interpolation, default_value, reference)
    if labels is not None:
        return transform.apply_to_labels(labels, label_mode, reference)
    return transform.apply_to_points(points, unmapped)
