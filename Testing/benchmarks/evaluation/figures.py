"""Figures: checkerboard and colour overlay before/after, fields as arrows, Jacobian maps, summary bars.

3D cases show the middle axial slice (array index z = depth // 2) of the first pair; arrows are the in-plane
components of the field in voxels, pointing from a fixed-image point to its match in the moving image.
"""

from __future__ import annotations

import os
from typing import Dict, List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import SimpleITK as sitk
import torch

from SSMSRRegistrationLib.engine.metrics import jacobian_determinant
from SSMSRRegistrationLib.imaging.fields import image_to_voxel_field

from .runner import CaseResult
from .report import summarise

CHECKER_TILES = 8
PANELS_PER_ROW = 6
ARROWS_PER_SIDE = 20
DPI = 90


def _image_slice(image: sitk.Image) -> np.ndarray:
    array = sitk.GetArrayFromImage(image)
    return array[array.shape[0] // 2] if image.GetDimension() == 3 else array


def _field_slice(field: sitk.Image) -> np.ndarray:
    """(2, H, W) in-plane (y, x) voxel displacements of the shown slice."""
    voxels = image_to_voxel_field(field)
    if field.GetDimension() == 3:
        return voxels[1:, voxels.shape[1] // 2]
    return voxels


def checkerboard(fixed: np.ndarray, warped: np.ndarray, tiles: int = CHECKER_TILES) -> np.ndarray:
    """Alternating tiles of two (H, W) images."""
    rows = (np.arange(fixed.shape[0]) * tiles // fixed.shape[0])[:, None]
    columns = (np.arange(fixed.shape[1]) * tiles // fixed.shape[1])[None, :]
    return np.where((rows + columns) % 2 == 0, fixed, warped)


def _methods(result: CaseResult) -> List[str]:
    return list(result.examples)


def _panels(count: int, per_row: int = PANELS_PER_ROW, size: float = 2.4):
    """A figure with ``count`` panels in rows of ``per_row``; returns (figure, flat list of the used axes)."""
    columns = min(count, per_row)
    rows = -(-count // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(size * columns, size * rows + 0.5), squeeze=False)
    for axis in axes.ravel():
        axis.set_xticks([])
        axis.set_yticks([])
    for axis in axes.ravel()[count:]:
        axis.set_visible(False)
    return figure, list(axes.ravel()[:count])


def _save(figure, path: str) -> str:
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    plt.close(figure)
    return path


def overlay_figure(result: CaseResult, path: str) -> str:
    """Per method: checkerboard of fixed and warped moving, then fixed (magenta) over warped (green)."""
    fixed = _image_slice(result.case.pairs[0].fixed)
    methods = _methods(result)
    figure, axes = _panels(2 * len(methods))
    for index, method in enumerate(methods):
        warped = _image_slice(result.examples[method].warped)
        title = "before (identity)" if method == "identity" else method
        checker, colour = axes[2 * index], axes[2 * index + 1]
        checker.imshow(checkerboard(fixed, warped), cmap="gray", vmin=0, vmax=1, origin="upper")
        checker.set_title(f"{title}\ncheckerboard", fontsize=7)
        colour.imshow(np.stack([fixed, warped, fixed], axis=-1).clip(0, 1), origin="upper")
        colour.set_title(f"{title}\nfixed magenta, warped green", fontsize=7)
    figure.suptitle(f"{result.case.title}: {result.case.pairs[0].name}", fontsize=9)
    return _save(figure, path)


def field_figure(result: CaseResult, path: str) -> str:
    """In-plane displacement arrows (voxels) over the fixed image, one panel per method."""
    fixed = _image_slice(result.case.pairs[0].fixed)
    methods = [m for m in _methods(result) if m != "identity"]
    figure, axes = _panels(len(methods), per_row=4, size=3.0)
    step = max(1, max(fixed.shape) // ARROWS_PER_SIDE)
    ys, xs = np.mgrid[0:fixed.shape[0]:step, 0:fixed.shape[1]:step]
    for column, method in enumerate(methods):
        displacement = _field_slice(result.examples[method].field)[:, ::step, ::step]
        axis = axes[column]
        axis.imshow(fixed, cmap="gray", vmin=0, vmax=1, origin="upper")
        axis.quiver(xs, ys, displacement[1], displacement[0], color="yellow", angles="xy", scale_units="xy",
                    scale=1.0 / max(1.0, step / 2), width=0.006)
        peak = float(np.linalg.norm(_field_slice(result.examples[method].field), axis=0).max())
        axis.set_title(f"{method}\nmax {peak:.1f} vox (arrows x{max(1.0, step / 2):g})", fontsize=7)
    figure.suptitle(f"{result.case.title}: displacement field (in-plane, voxels)", fontsize=9)
    return _save(figure, path)


def jacobian_figure(result: CaseResult, path: str) -> str:
    """Jacobian determinant of each field on the shown slice; J <= 0 (folding) in black."""
    methods = [m for m in _methods(result) if m != "identity"]
    figure, axes = _panels(len(methods), per_row=4, size=3.0)
    image = None
    for column, method in enumerate(methods):
        voxels = torch.from_numpy(image_to_voxel_field(result.examples[method].field))[None]
        determinant = jacobian_determinant(voxels)[0].numpy()
        shown = determinant[determinant.shape[0] // 2] if determinant.ndim == 3 else determinant
        colours = plt.get_cmap("RdBu_r").copy()
        colours.set_under("black")
        image = axes[column].imshow(shown, cmap=colours, vmin=1e-6, vmax=2.0, origin="upper")
        axes[column].set_title(f"{method}\n{100 * (determinant <= 0).mean():.2f} % J<=0 (volume)", fontsize=7)
    figure.colorbar(image, ax=axes, shrink=0.8, label="det J")
    figure.suptitle(f"{result.case.title}: Jacobian determinant (central differences)", fontsize=9)
    figure.savefig(path, dpi=DPI)
    plt.close(figure)
    return path


def summary_figure(results: List[CaseResult], path: str) -> str:
    """Bars per method: mean Dice (cases with labels) or NLCC (cine), and time per pair (log scale)."""
    figure, axes = plt.subplots(len(results), 2, figsize=(11, 2.6 * len(results)), squeeze=False)
    for row, result in enumerate(results):
        summary = summarise(result)
        methods = list(summary)
        accuracy_key = "dice" if result.case.label_names else "nlcc"
        means = [summary[m][accuracy_key][0] for m in methods]
        spreads = [summary[m][accuracy_key][1] for m in methods]
        times = [max(summary[m]["seconds"][0], 1e-3) for m in methods]
        axes[row, 0].barh(methods, means, xerr=spreads, color="tab:blue")
        axes[row, 0].set_xlabel("mean Dice" if accuracy_key == "dice" else f"NLCC (radius {result.case.nlcc_radius})")
        axes[row, 0].set_title(result.case.title, fontsize=9)
        axes[row, 1].barh(methods, times, color="tab:orange")
        axes[row, 1].set_xscale("log")
        axes[row, 1].set_xlabel("seconds per pair (log)")
        for axis in axes[row]:
            axis.invert_yaxis()
            axis.tick_params(labelsize=7)
    return _save(figure, path)


def write_figures(results: List[CaseResult], folder: str) -> Dict[str, List[str]]:
    """All figures into ``folder``; returns case name (or "summary") -> written file names."""
    written: Dict[str, List[str]] = {}
    for result in results:
        name = result.case.name
        written[name] = [os.path.basename(draw(result, os.path.join(folder, f"{name}_{kind}.png")))
                         for kind, draw in (("overlay", overlay_figure), ("field", field_figure),
                                            ("jacobian", jacobian_figure))]
    written["summary"] = [os.path.basename(summary_figure(results, os.path.join(folder, "summary_accuracy_time.png")))]
    return written
