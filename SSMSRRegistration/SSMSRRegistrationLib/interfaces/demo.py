"""Demo: register two real echocardiogram frames and draw the result.

    python -m SSMSRRegistrationLib.demo [--out demo_output] [--preset balanced] [--device auto]

Frames 0 and 10 of the 30-frame ultrasound cine shipped with pydicom are the moving
and fixed images. Writes to the output folder: the inputs (NIfTI), the displacement
field (``field.nii.gz``, ITK convention, mm), the warped moving image (``warped.nii.gz``)
and ``registration.png`` (images, differences before/after, the field as arrows).
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import SimpleITK as sitk

from ..common.presets import DEFAULT_PRESET, PRESETS
from ..imaging import sample_data
from ..workflows.register import register
from ..imaging.fields import write_image
from ..report.progress import BarReporter

FIXED_FRAME, MOVING_FRAME = 10, 0


def draw_figure(fixed: sitk.Image, moving: sitk.Image, warped: sitk.Image, field: sitk.Image, metrics: dict,
                path: str) -> None:
    """Six panels: fixed, moving, warped; |fixed - moving|, |fixed - warped|; displacement arrows (mm)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    f, m, w = (sitk.GetArrayFromImage(image) for image in (fixed, moving, warped))
    vectors = sitk.GetArrayFromImage(field)  # (rows, columns, 2) physical (x, y) in mm
    spacing = fixed.GetSpacing()
    extent = (0, f.shape[1] * spacing[0], f.shape[0] * spacing[1], 0)
    figure, axes = plt.subplots(2, 3, figsize=(13, 7.5))
    panels = [(f, "fixed (frame %d)" % FIXED_FRAME), (m, "moving (frame %d)" % MOVING_FRAME),
              (w, "moving warped by SSMSR"),
              (np.abs(f - m), "|fixed - moving|  MSE %.2e" % metrics["mse_before"]),
              (np.abs(f - w), "|fixed - warped|  MSE %.2e" % metrics["mse_after"])]
    difference_max = float(np.percentile(np.abs(f - m), 99.5))
    for axis, (array, title) in zip(axes.ravel(), panels):
        is_difference = title.startswith("|")
        axis.imshow(array, cmap="magma" if is_difference else "gray", extent=extent,
                    vmin=0, vmax=difference_max if is_difference else None)
        axis.set_title(title)
    arrows = axes[1, 2]
    arrows.imshow(f, cmap="gray", extent=extent)
    step = max(1, min(f.shape) // 24)
    rows, columns = np.mgrid[step // 2:f.shape[0]:step, step // 2:f.shape[1]:step]
    x, y = (columns + 0.5) * spacing[0], (rows + 0.5) * spacing[1]
    u, v = vectors[rows, columns, 0], vectors[rows, columns, 1]
    magnitude = np.hypot(u, v)
    quiver = arrows.quiver(x, y, u, v, magnitude, cmap="viridis", angles="xy", scale_units="xy", scale=0.25)
    figure.colorbar(quiver, ax=arrows, label="displacement (mm), arrows x4")
    arrows.set_title("displacement field (fixed -> moving)")
    for axis in axes.ravel():
        axis.set_xlabel("x (mm)")
    figure.suptitle(f"SSMSR on a real echocardiogram pair: local NCC {metrics['ncc_before']:.3f} -> "
                    f"{metrics['ncc_after']:.3f}, {metrics['seconds']:.0f} s on {metrics['device']}")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Register two real echocardiogram frames with SSMSR.")
    parser.add_argument("--out", default="demo_output", help="output folder (created)")
    parser.add_argument("--preset", default=DEFAULT_PRESET, choices=tuple(PRESETS),
                        help=f"the training budget (default: {DEFAULT_PRESET}, as for `ssmsr register`)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    fixed, moving = sample_data.echo_frames([FIXED_FRAME, MOVING_FRAME])
    fixed_path, moving_path = (os.path.join(args.out, name) for name in ("fixed.nii.gz", "moving.nii.gz"))
    write_image(fixed, fixed_path)
    write_image(moving, moving_path)
    print(f"Registering frame {MOVING_FRAME} (moving) onto frame {FIXED_FRAME} (fixed) of pydicom's echo cine, "
          f"{fixed.GetSize()[0]}x{fixed.GetSize()[1]} pixels, preset {args.preset}: {PRESETS[args.preset].summary}.")
    reporter = BarReporter()
    result = register(fixed_path, moving_path, preset=args.preset, device=args.device,
                      progress=reporter.handle)
    outputs = result.save(os.path.join(args.out, "field.nii.gz"), os.path.join(args.out, "warped.nii.gz"))
    reporter.finished(outputs, result.metrics)
    figure_path = os.path.join(args.out, "registration.png")
    draw_figure(fixed, moving, result.warped, result.field, result.metrics, figure_path)
    metrics = result.metrics
    print(f"local NCC (window {result.engine_result.window}) {metrics['ncc_before']:.3f} -> {metrics['ncc_after']:.3f}; "
          f"MSE {metrics['mse_before']:.2e} -> {metrics['mse_after']:.2e}; "
          f"folded voxels {metrics['percent_non_positive_jacobian']:.2f}%")
    print(f"Wrote {outputs['field']}, {outputs['warped']} and {figure_path}")


if __name__ == "__main__":
    main()
