"""``ssmsr apply``: warp another image, label map or point file with a saved registration result.

``add_parser(commands)`` adds the subcommand to the ``ssmsr`` subparsers; ``run(args, reporter)`` does it. One input
per call (an image, a label map or a point file) and one output, so that each output's options are unambiguous.
"""

from __future__ import annotations

import os
import sys
import time
import warnings

from ..common.errors import InputError
from ..imaging.fields import write_image
from ..report.progress import Reporter
from ..workflows.apply import (INTERPOLATIONS, LABEL_MODES, UNMAPPED_CHOICES, UnmappedPointsWarning,
                               apply_to_point_file, read_transform)

DESCRIPTION = (
    "Apply a registration result to another image, label map or point file. RESULT is the displacement field "
    "written by `ssmsr register -o` (or by ANTs/ITK: a vector image in mm, LPS, on the fixed grid, fixed point p -> "
    "moving point p + u(p)), or its NAME.provenance.json, which also names the inverse field written with "
    "`register --inverse`. By default images and label maps of the moving image's space are resampled onto the "
    "fixed grid (as `register --warped` does), and points of the moving image's space are carried to the fixed "
    "image's space (where their structures are in the warped image). --inverse goes the other way: fixed-space "
    "images onto --reference (the moving image's grid), fixed-space points to the moving space. Give one of "
    "--image, --labels or --points per call. Point files: CSV with columns L,P,S (LPS) or R,A,S (RAS) (2D: L,P or "
    "R,A; other columns are copied), or Slicer markups JSON (.mrk.json); the output keeps the input's format, "
    "coordinate convention and other content. A point that cannot be mapped (outside the field's grid, or the "
    "field cannot be inverted there) is written as nan (CSV) or as an undefined control point (markups), with a "
    "warning; --unmapped-points error refuses instead.")


def add_parser(commands) -> None:
    """Add ``apply`` to the subparsers ``commands`` of the ``ssmsr`` parser."""
    parser = commands.add_parser("apply", help="apply a saved registration to an image, label map or points",
                                 description=DESCRIPTION)
    parser.add_argument("result", metavar="RESULT", help="displacement field file or NAME.provenance.json")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", metavar="IN", help="image to resample (written as float32)")
    source.add_argument("--labels", metavar="IN", help="label map to resample (keeps its pixel type)")
    source.add_argument("--points", metavar="IN", help="points to map: .csv (L,P,S or R,A,S columns) or .mrk.json")
    parser.add_argument("-o", "--output", required=True, metavar="OUT",
                        help="file to write: an image (.nii.gz, .nrrd, .mha, ...) for --image and --labels, a file "
                             "of the input's format for --points")
    parser.add_argument("--interpolation", choices=tuple(INTERPOLATIONS), default=None,
                        help="image interpolation, linear or cubic B-spline (default: linear; --image only)")
    parser.add_argument("--default-value", type=float, default=None, metavar="V",
                        help="value where the image has no data (default: 0; --image only)")
    parser.add_argument("--label-mode", choices=LABEL_MODES, default=None,
                        help="nearest neighbour, or linear: each label's indicator interpolated linearly, the "
                             "largest wins (smooth edges) (default: nearest; --labels only)")
    parser.add_argument("--unmapped-points", choices=UNMAPPED_CHOICES, default="nan",
                        help="points that cannot be mapped: written as nan / undefined, or an error that writes "
                             "nothing (default: nan)")
    parser.add_argument("--inverse", action="store_true",
                        help="apply the inverse: fixed image's space -> moving image's space (uses the inverse "
                             "field named by a provenance file, else inverts the field on --reference's grid)")
    parser.add_argument("--reference", metavar="GRID",
                        help="image whose grid the output is resampled onto (required with --inverse for --image "
                             "and --labels: the moving image; default without --inverse: the field's, i.e. the "
                             "fixed image's grid)")
    parser.add_argument("--progress", choices=("bar", "jsonl", "none"), default="bar",
                        help="the final summary on stderr, as JSON lines on stdout (for programs), or nothing "
                             "(default: bar)")


def _check_options(args) -> str:
    """The input kind ("image", "labels", "points") after checking the options that belong to another kind."""
    kind = "image" if args.image else "labels" if args.labels else "points"
    misplaced = [option for option, value, owner in (("--interpolation", args.interpolation, "image"),
                                                     ("--default-value", args.default_value, "image"),
                                                     ("--label-mode", args.label_mode, "labels"))
                 if value is not None and owner != kind]
    if misplaced:
        raise InputError(f"{', '.join(misplaced)} does not apply to --{kind}.")
    if kind == "points" and args.reference:
        raise InputError("--reference is for --image and --labels; points need none.")
    if args.inverse and kind != "points" and not args.reference:
        raise InputError(f"--inverse resamples --{kind} onto a reference grid: give --reference (the moving image).")
    source = getattr(args, kind)
    inputs = {os.path.abspath(path) for path in (args.result, source, args.reference) if path}
    if os.path.abspath(args.output) in inputs:
        raise InputError(f"The output {args.output!r} is also an input; choose another output path.")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
        raise InputError(f"The folder of the output {args.output!r} does not exist; create it first.")
    return kind


def run(args, reporter: Reporter) -> None:
    """Run ``ssmsr apply`` from parsed arguments; reports the output and a few numbers through ``reporter``."""
    started = time.perf_counter()
    kind = _check_options(args)
    transform = read_transform(args.result)
    if args.inverse:
        transform = transform.inverse()
    metrics = {"applied": kind, "inverse": bool(args.inverse), "dimension": transform.dimension}
    if kind == "image":
        warped = transform.apply_to_image(args.image, args.interpolation or "linear", args.default_value or 0.0,
                                          args.reference)
        write_image(warped, args.output)
    elif kind == "labels":
        warped = transform.apply_to_labels(args.labels, args.label_mode or "nearest", args.reference)
        write_image(warped, args.output)
    else:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UnmappedPointsWarning)
            metrics.update(apply_to_point_file(transform, args.points, args.output, args.unmapped_points))
        for warning in caught:
            if args.progress != "none":
                print(f"ssmsr: warning: {warning.message}", file=sys.stderr, flush=True)
    metrics["seconds"] = time.perf_counter() - started
    reporter.finished({kind: os.path.abspath(args.output)}, metrics)
