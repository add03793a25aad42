"""The registration cases: real brain MRI from registry packages, with labels, masks and (when known) the truth.

Every image handed to a method is float32 in [0, 1] (clipped to mean +/- 6 std, as the paper and the API do)
on one fixed grid; moving images and label maps lie on the same grid (resampled by world coordinates).

* ``hippocampus_crop`` / ``whole_brain``: the ICBM152 2009a T1 template (nilearn) is the moving image (atlas);
  each fixed image is a simulated subject: the template warped by a random cubic B-spline deformation, times a
  smooth bias field, plus Gaussian noise (``simulate_subject``). Labels are the template's grey/white matter maps
  (``sample_data.brain_tissue_labels``) warped by the same deformation, so the true labels and field are known.
* ``individual_vs_icbm``: a real inter-subject pair, the individual T1 shipped with nibabel
  (``tests/data/anatomical.nii``, 33x41x25 voxels at 2 mm, already in MNI space) as the fixed image and the
  ICBM152 template as the moving image. Neither ships tissue labels for both, so both get labels from one
  automatic method applied identically (``derived_tissue_labels``): these are derived reference labels,
  not manual annotations.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from SSMSRRegistrationLib.imaging import sample_data
from SSMSRRegistrationLib.imaging.images import intensity_window, rescale

from .config import Config

#: Right hippocampus in MNI space (RAS, mm): x = 25, y = -20, z = -15, here in ITK's LPS frame.
HIPPOCAMPUS_LPS_MM = (-25.0, 20.0, -15.0)

#: Simulated subject: B-spline control-point spacing (mm), std of the control-point displacements (mm),
#: peak relative amplitude of the multiplicative bias field and std of the added noise (normalised units).
#: On the 48x64x48 crop at 2 mm this gives |u| of 3.0 mm on average, 6.3 mm at the 99th percentile and
#: 7.6 mm at most (5 seeds), without folding: the order of inter-subject differences after affine alignment.
DEFORMATION_SPACING_MM = 32.0
DEFORMATION_STD_MM = 6.0
BIAS_AMPLITUDE = 0.10
NOISE_STD = 0.02

TISSUE_NAMES = {sample_data.GREY_MATTER: "grey matter", sample_data.WHITE_MATTER: "white matter"}
DERIVED_NAMES = {1: "CSF (dark)", 2: "grey matter (mid)", 3: "white matter (bright)"}


@dataclass
class Pair:
    """One fixed/moving pair on the fixed grid.

    fixed, moving: float32 images in [0, 1]. mask: uint8, where MSE/NLCC are averaged (1 inside).
    fixed_labels, moving_labels: uint8 label maps (0 background) or None.
    true_field: the known registration field (ITK displacement field, mm, LPS) or None.
    """

    name: str
    fixed: sitk.Image
    moving: sitk.Image
    mask: Optional[sitk.Image]
    fixed_labels: Optional[sitk.Image] = None
    moving_labels: Optional[sitk.Image] = None
    true_field: Optional[sitk.Image] = None


@dataclass
class Case:
    """A set of test pairs registered by every method, and the pairs the VoxelMorph-equivalent trains on.

    training: pairs (images in [0, 1]) that are never a test pair; only their images and masks are used.
    nlcc_radius: radius (voxels) of the local NCC window of the NLCC metric.
    masked_registration: the methods that accept a fixed mask get each pair's mask (the cine, as the paper).
    sequence: a cine; SSMSR and SSR train once for all its pairs (``methods``).
    """

    name: str
    title: str
    description: str
    pairs: List[Pair]
    training: List[Pair]
    schedule: str
    nlcc_radius: int
    label_names: Dict[int, str] = field(default_factory=dict)
    label_source: str = ""
    mask_source: str = ""
    masked_registration: bool = False
    sequence: bool = False

    @property
    def dimension(self) -> int:
        return self.pairs[0].fixed.GetDimension()


def normalised(image: sitk.Image) -> sitk.Image:
    """The API's intensity normalisation: clip to mean +/- 6 std, map to [0, 1]; float32, same geometry."""
    array = sitk.GetArrayFromImage(image)
    output = sitk.GetImageFromArray(rescale(array, intensity_window(array, "image")))
    output.CopyInformation(image)
    return output


def _grid(origin: Sequence[float], size: Sequence[int], spacing: float, like: sitk.Image) -> sitk.Image:
    """An empty image with ``like``'s direction and the given origin (mm), size (voxels) and isotropic spacing."""
    grid = sitk.Image([int(n) for n in size], sitk.sitkUInt8)
    grid.SetSpacing([float(spacing)] * like.GetDimension())
    grid.SetOrigin([float(v) for v in origin])
    grid.SetDirection(like.GetDirection())
    return grid


def _centred_grid(centre_mm: Sequence[float], size: Sequence[int], spacing: float, like: sitk.Image) -> sitk.Image:
    direction = np.array(like.GetDirection()).reshape(3, 3)
    half_extent = direction @ (np.array(size, dtype=float) - 1) * spacing / 2
    return _grid(np.array(centre_mm) - half_extent, size, spacing, like)


def _brain_box_grid(labels: sitk.Image, spacing: float, margin_mm: float = 6.0) -> sitk.Image:
    """A grid of ``spacing`` mm covering the bounding box of the tissue labels plus a margin."""
    statistics = sitk.LabelShapeStatisticsImageFilter()
    statistics.Execute(labels > 0)
    start, extent = np.split(np.array(statistics.GetBoundingBox(1)), 2)
    corners = [labels.TransformIndexToPhysicalPoint([int(v) for v in start]),
               labels.TransformIndexToPhysicalPoint([int(v) for v in start + extent - 1])]
    centre = (np.array(corners[0]) + np.array(corners[1])) / 2
    size = np.ceil((extent * np.array(labels.GetSpacing()) + 2 * margin_mm) / spacing).astype(int)
    return _centred_grid(centre, size, spacing, labels)


def _resample(image: sitk.Image, grid: sitk.Image, transform: sitk.Transform = sitk.Transform(),
              labels: bool = False) -> sitk.Image:
    """Resample onto ``grid`` through a resampling transform (linear, or nearest neighbour for labels)."""
    if labels:
        return sitk.Resample(image, grid, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.Resample(image, grid, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def _template_source(spacing: float) -> sitk.Image:
    """The 1 mm ICBM152 T1 (float32), smoothed by a Gaussian of (spacing / 2 - 0.5) mm before a coarser grid
    samples it (anti-aliasing)."""
    t1 = sample_data.brain_t1()
    sigma = max(spacing / 2.0 - 0.5, 0.0)
    return sitk.SmoothingRecursiveGaussian(t1, sigma) if sigma > 0 else t1


def random_bspline(grid: sitk.Image, seed: int) -> sitk.BSplineTransform:
    """Random cubic B-spline deformation over ``grid``: control points every DEFORMATION_SPACING_MM,
    displacements ~ N(0, DEFORMATION_STD_MM) per axis."""
    physical = np.array(grid.GetSize()) * np.array(grid.GetSpacing())
    mesh = [max(1, int(round(extent / DEFORMATION_SPACING_MM))) for extent in physical]
    transform = sitk.BSplineTransformInitializer(grid, mesh, order=3)
    rng = np.random.default_rng(seed)
    transform.SetParameters(rng.normal(0.0, DEFORMATION_STD_MM, len(transform.GetParameters())).tolist())
    return transform


def _bias_field(grid: sitk.Image, rng: np.random.Generator) -> np.ndarray:
    """Smooth multiplicative field 1 + a * (linear ramp along a random direction), |a| <= BIAS_AMPLITUDE."""
    shape = tuple(reversed(grid.GetSize()))
    axes = np.meshgrid(*[np.linspace(-1.0, 1.0, n) for n in shape], indexing="ij")
    direction = rng.normal(size=len(shape))
    ramp = sum(d * a for d, a in zip(direction / np.linalg.norm(direction), axes))
    return (1.0 + BIAS_AMPLITUDE * ramp / np.abs(ramp).max()).astype(np.float32)


def simulate_subject(atlas: sitk.Image, grid: sitk.Image, seed: int) -> Tuple[sitk.Image, sitk.Transform]:
    """A simulated subject on ``grid``: (image in [0, 1], its deformation T).

    image(p) = normalised(atlas(T(p))) * bias(p) + noise, T = ``random_bspline(grid, seed)``; the field
    registering the atlas (moving) onto the subject (fixed) is u(p) = T(p) - p (``transform_field``).
    """
    transform = random_bspline(grid, seed)
    rng = np.random.default_rng(seed + 1)
    warped = sitk.GetArrayFromImage(normalised(_resample(atlas, grid, transform)))
    noisy = np.clip(warped * _bias_field(grid, rng) + rng.normal(0.0, NOISE_STD, warped.shape), 0.0, None)
    image = sitk.GetImageFromArray(noisy.astype(np.float32))
    image.CopyInformation(grid)
    return normalised(image), transform


def transform_field(transform: sitk.Transform, grid: sitk.Image) -> sitk.Image:
    """u(p) = T(p) - p on ``grid``: an ITK displacement field (float64, mm, LPS)."""
    return sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, grid.GetSize(), grid.GetOrigin(),
                                             grid.GetSpacing(), grid.GetDirection())


def _head_mask(labels: sitk.Image, radius: int = 2) -> sitk.Image:
    """Brain mask from tissue labels, dilated by ``radius`` voxels (uint8)."""
    return sitk.Cast(sitk.BinaryDilate(labels > 0, [radius] * labels.GetDimension()), sitk.sitkUInt8)


def _synthetic_case(name: str, title: str, grid: sitk.Image, spacing: float, config: Config) -> Case:
    atlas, atlas_labels = _template_source(spacing), sample_data.brain_tissue_labels()
    moving = normalised(_resample(atlas, grid))
    moving_labels = _resample(atlas_labels, grid, labels=True)
    pairs = []
    for index in range(config.synthetic_test_pairs):
        fixed, transform = simulate_subject(atlas, grid, config.seed + 1000 + 10 * index)
        fixed_labels = _resample(atlas_labels, grid, transform, labels=True)
        pairs.append(Pair(f"subject {index + 1}", fixed, moving, _head_mask(fixed_labels), fixed_labels,
                          moving_labels, transform_field(transform, grid)))
    training = [Pair(f"training {index + 1}", simulate_subject(atlas, grid, config.seed + 5000 + 10 * index)[0],
                     moving, None) for index in range(config.training_pairs)]
    size = "x".join(str(n) for n in grid.GetSize())
    description = (
        f"ICBM152 2009a T1 (nilearn) resampled to {size} voxels at {spacing:g} mm is the moving image (atlas). "
        f"Each fixed image is a simulated subject: the atlas warped by a random cubic B-spline deformation "
        f"(control points every {DEFORMATION_SPACING_MM:g} mm, displacements N(0, {DEFORMATION_STD_MM:g} mm) per "
        f"axis), times a linear bias field of up to +/-{100 * BIAS_AMPLITUDE:g} %, plus Gaussian noise "
        f"(std {NOISE_STD:g} of the [0, 1] range); {len(pairs)} simulated subject(s) (different seeds). The labels are the "
        "template's grey/white matter probability maps thresholded at 0.5 and warped by the same deformation, "
        "so the true labels and the true field are known. VoxelMorph-equivalent training set: "
        f"{len(training)} other simulated subjects (other seeds) registered to the same atlas.")
    return Case(name=name, title=title, description=description, pairs=pairs, training=training,
                schedule=config.schedule_3d, nlcc_radius=3, label_names=dict(TISSUE_NAMES),
                label_source="template tissue maps warped by the known deformation (ground truth by construction)",
                mask_source="fixed tissue labels dilated by 2 voxels")


def hippocampus_crop(config: Config) -> Case:
    """48x64x48 voxels at 2 mm (full run) centred on the right hippocampus of ICBM152."""
    t1 = sample_data.brain_t1()
    grid = _centred_grid(HIPPOCAMPUS_LPS_MM, config.crop_size, config.crop_spacing_mm, t1)
    return _synthetic_case("hippocampus_crop", "ICBM152 hippocampus-sized crop, simulated subjects", grid,
                           config.crop_spacing_mm, config)


def whole_brain(config: Config) -> Case:
    """The whole ICBM152 brain (bounding box of the tissue labels + 6 mm) at ``whole_brain_spacing_mm``."""
    grid = _brain_box_grid(sample_data.brain_tissue_labels(), config.whole_brain_spacing_mm)
    return _synthetic_case("whole_brain", "ICBM152 whole brain, simulated subjects", grid,
                           config.whole_brain_spacing_mm, config)


def nibabel_individual_path() -> str:
    """The individual T1 shipped with nibabel's tests (a real brain, 33x41x25 voxels at 2 mm, MNI space)."""
    spec = importlib.util.find_spec("nibabel")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the individual_vs_icbm case needs nibabel: pip install nibabel")
    return os.path.join(list(spec.submodule_search_locations)[0], "tests", "data", "anatomical.nii")


def derived_tissue_labels(image: sitk.Image) -> sitk.Image:
    """Three intensity classes by Otsu's multiple thresholds (2 thresholds, 128 bins) on the [0, 1] image
    smoothed by a Gaussian of 1 voxel: 1 dark (CSF), 2 mid (grey matter), 3 bright (white matter)."""
    smoothed = sitk.SmoothingRecursiveGaussian(image, float(image.GetSpacing()[0]))
    classes = sitk.OtsuMultipleThresholds(smoothed, numberOfThresholds=2, labelOffset=1, numberOfHistogramBins=128)
    return sitk.Cast(classes, sitk.sitkUInt8)


def individual_vs_icbm(config: Config) -> Case:
    """Real inter-subject pair: ICBM152 template (moving) onto nibabel's individual T1 (fixed)."""
    individual = normalised(sitk.ReadImage(nibabel_individual_path(), sitk.sitkFloat32))
    moving = normalised(_resample(_template_source(individual.GetSpacing()[0]), individual))
    fixed_labels, moving_labels = derived_tissue_labels(individual), derived_tissue_labels(moving)
    mask = sitk.Image(individual.GetSize(), sitk.sitkUInt8) + 1
    mask.CopyInformation(individual)
    pair = Pair("individual", individual, moving, mask, fixed_labels, moving_labels)
    training = []
    for index in range(config.training_pairs):
        source = individual if index % 2 == 0 else moving
        image = simulate_subject(source, individual, config.seed + 7000 + 10 * index)[0]
        training.append(Pair(f"training {index + 1}", image, source, None))
    size = "x".join(str(n) for n in individual.GetSize())
    description = (
        f"Real inter-subject registration: the individual T1 shipped with nibabel (tests/data/anatomical.nii, "
        f"{size} voxels at 2 mm, a central block of the brain already in MNI space) is the fixed image; the "
        "ICBM152 2009a template resampled onto its grid is the moving image. No deformation is simulated and "
        "no true field exists. VoxelMorph-equivalent training set: "
        f"{len(training)} intra-subject pairs, each image registered to a random B-spline deformation of "
        "itself (as in the simulated cases); the inter-subject test pair is never seen in training.")
    return Case(name="individual_vs_icbm", title="Individual T1 (nibabel) vs ICBM152, real inter-subject",
                description=description, pairs=[pair], training=training, schedule=config.schedule_3d,
                nlcc_radius=3, label_names=dict(DERIVED_NAMES),
                label_source=("DERIVED reference labels, not manual annotations: Otsu's 3-class thresholds "
                              "(2 thresholds, 128 bins) of each [0, 1] image after a 1-voxel Gaussian, the same "
                              "method applied to both images"),
                mask_source="the whole image (the crop lies inside the brain)")
