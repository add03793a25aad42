"""The ``ssmsr`` command (also ``python -m SSMSRRegistrationLib``).

Exit codes: 0 success, 1 internal error, 2 bad input or options, 3 out of GPU memory, 130 cancelled.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
from typing import List, Optional

from .errors import InputError, RegistrationCancelled
from .progress import Reporter, make_reporter

EXIT_OK, EXIT_INTERNAL, EXIT_INPUT, EXIT_OUT_OF_MEMORY, EXIT_CANCELLED = 0, 1, 2, 3, 130


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that raises InputError instead of exiting, so usage errors follow the progress protocol."""

    def error(self, message):
        raise InputError(f"{message} (see `ssmsr {self.prog.split()[-1]} --help`)")


def _add_training_options(parser: argparse.ArgumentParser, default_scales: str, steps_help: str,
                          window_help: str) -> None:
    """Options shared by every command that runs test-time training."""
    parser.add_argument("--scales", default=default_scales,
                        help=f"coarse-to-fine schedule (default: {default_scales}; '1' is single scale, SSR)")
    parser.add_argument("--steps", type=int, default=3500, help=f"{steps_help} (default: 3500)")
    parser.add_argument("--lambda", dest="smoothness_weight", type=float, default=10.0,
                        help="smoothness weight (default: 10)")
    parser.add_argument("--window", type=int, default=None, help=window_help)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: 1e-3)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--progress", choices=("bar", "jsonl", "none"), default="bar",
                        help="terminal bar, JSON lines on stdout (for programs), or nothing (default: bar)")


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog="ssmsr", description="SSMSR: test-time trained multi-scale deformable "
                                                       "registration of 2D and 3D images.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_ArgumentParser)
    reg = commands.add_parser("register", help="register a moving image onto a fixed image",
                              description="Register MOVING onto FIXED and write the displacement field "
                                          "(ITK convention: millimetres, LPS, on the fixed grid).")
    reg.add_argument("fixed", help="fixed image file (NIfTI, NRRD, MHA, ...) or DICOM series folder")
    reg.add_argument("moving", help="moving image file or DICOM series folder")
    reg.add_argument("-o", "--output", required=True, metavar="FIELD",
                     help="displacement field to write (.nii.gz, .nrrd, .mha, or .h5 for an ITK transform)")
    reg.add_argument("--warped", metavar="OUT", help="write the moving image warped onto the fixed grid")
    reg.add_argument("--moving-labels", metavar="L", help="label map of the moving image to warp")
    reg.add_argument("--warped-labels", metavar="OUT", help="write the warped label map (needs --moving-labels)")
    reg.add_argument("--fixed-mask", metavar="M", help="mask of the fixed image restricting the similarity")
    _add_training_options(reg, default_scales="1/2,1", steps_help="training steps per scale",
                          window_help="local NCC window in voxels (default: 5 in 3D, 6 in 2D)")

    trk = commands.add_parser("track", help="track the motion through a 2D+t cine (e.g. an echocardiogram)",
                              description="Register every consecutive frame pair of a 2D+t cine (frame t-1 onto "
                                          "frame t) with one test-time training for the whole sequence, and write "
                                          "OUTDIR/field_NNNN.nii.gz (warps frame NNNN-1 onto frame NNNN), "
                                          "fields.nii.gz (2D+t), mask.nii.gz, metrics.csv (MSE and NLCC per pair, "
                                          "identity and SSMSR), summary.json, tracking.gif and tracking.png.")
    trk.add_argument("cine", help="multi-frame DICOM, NIfTI/NRRD whose last axis is time, or a folder of 2D frames")
    trk.add_argument("-o", "--output", required=True, metavar="OUTDIR",
                     help="output folder to create (must not exist, or be empty)")
    trk.add_argument("--mask", default="auto", metavar="auto|FILE",
                     help="'auto' (intensities in [0.005, 0.995] dilated by a 16-pixel disk, as in the paper), or "
                          "a mask file: one 2D mask or one mask per frame, non-zero inside (default: auto)")
    trk.add_argument("--batch", type=int, default=1, metavar="N",
                     help="frame pairs per training step, drawn at random; 0: all pairs (default: 1)")
    trk.add_argument("--accumulate", action="store_true",
                     help="also write accumulated_NNNN.nii.gz and accumulated.nii.gz (frame 0 onto frame NNNN)")
    trk.add_argument("--no-figures", action="store_true", help="do not draw tracking.gif and tracking.png")
    _add_training_options(trk, default_scales="1/8,1/4,1/2,1",
                          steps_help="training steps per scale for the whole sequence",
                          window_help="local NCC window of the loss in pixels (default: 6)")
    return parser


def _check_outputs(args) -> None:
    if args.warped_labels and not args.moving_labels:
        raise InputError("--warped-labels needs --moving-labels.")
    inputs = {os.path.abspath(p) for p in (args.fixed, args.moving, args.moving_labels, args.fixed_mask) if p}
    for path in (args.output, args.warped, args.warped_labels):
        if path and os.path.abspath(path) in inputs:
            raise InputError(f"The output {path!r} is also an input; choose another output path.")
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise InputError(f"The folder of the output {path!r} does not exist; create it first.")


def run_register(args, reporter: Reporter) -> None:
    from .api import register

    _check_outputs(args)
    result = register(args.fixed, args.moving, fixed_mask=args.fixed_mask, moving_labels=args.moving_labels,
                      scales=args.scales, steps=args.steps, smoothness_weight=args.smoothness_weight,
                      ncc_window=args.window, learning_rate=args.lr, device=args.device, seed=args.seed,
                      progress=reporter.handle)
    outputs = result.save(args.output, warped_path=args.warped, warped_labels_path=args.warped_labels)
    reporter.finished({key: os.path.abspath(path) if path else None for key, path in outputs.items()},
                      result.metrics)


def run_track(args, reporter: Reporter) -> None:
    from .tracking import check_figure_support, check_output_folder, track

    check_output_folder(args.output)
    if not args.no_figures:
        check_figure_support()
    result = track(args.cine, mask=args.mask, scales=args.scales, steps=args.steps, batch_size=args.batch,
                   smoothness_weight=args.smoothness_weight, ncc_window=args.window, learning_rate=args.lr,
                   device=args.device, seed=args.seed, progress=reporter.handle)
    outputs = result.save(args.output, accumulated=args.accumulate, figures=not args.no_figures)
    reporter.finished(outputs, result.summary())


def _raise_cancelled(signum, frame):
    raise RegistrationCancelled(f"stopped by signal {signum}")


def _requested_progress(argv: List[str]) -> str:
    """The --progress choice, read before full parsing so that usage errors also follow the protocol."""
    for index, item in enumerate(argv):
        value = item.split("=", 1)[1] if item.startswith("--progress=") else (
            argv[index + 1] if item == "--progress" and index + 1 < len(argv) else None)
        if value in ("bar", "jsonl", "none"):
            return value
    return "bar"


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    reporter = make_reporter(_requested_progress(argv))
    signal.signal(signal.SIGTERM, _raise_cancelled)
    try:
        args = build_parser().parse_args(argv)
        if args.command == "register":
            run_register(args, reporter)
        elif args.command == "track":
            run_track(args, reporter)
        return EXIT_OK
    except InputError as error:
        reporter.error(str(error), "input")
        return EXIT_INPUT
    except BrokenPipeError:
        # Whoever read our output has gone (e.g. the Slicer process ended): stop without writing outputs.
        sys.stdout = open(os.devnull, "w")
        return EXIT_CANCELLED
    except (RegistrationCancelled, KeyboardInterrupt):
        reporter.error("Registration cancelled; no output was written.", "cancelled")
        return EXIT_CANCELLED
    except Exception as error:  # noqa: BLE001 - the last line of defence reports every failure
        import torch

        if isinstance(error, torch.cuda.OutOfMemoryError):
            reporter.error("The GPU ran out of memory. Use a coarser schedule or fewer channels, close other GPU "
                           "programs, or run with --device cpu.", "out_of_memory")
            return EXIT_OUT_OF_MEMORY
        traceback.print_exc(file=sys.stderr)
        reporter.error(f"Internal error: {type(error).__name__}: {error}", "internal")
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
