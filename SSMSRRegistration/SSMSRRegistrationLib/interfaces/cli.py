"""The ``ssmsr`` command (also ``python -m SSMSRRegistrationLib``).

Exit codes: 0 success, 1 internal error, 2 bad input or options, 3 out of GPU memory, 4 a rerun's outputs differ
from the recorded ones, 130 cancelled.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
from typing import List, Optional

from ..common.errors import InputError, RegistrationCancelled, TrainingStopped
from ..common.presets import DEFAULT_PRESET, DEFAULT_STOP_TOLERANCE, PRECISIONS, PRESETS, budget
from ..common.schedule import DEFAULT_MAX_VOXELS
from ..report.progress import Reporter, make_reporter
from .threads import configure_threads

EXIT_OK, EXIT_INTERNAL, EXIT_INPUT, EXIT_OUT_OF_MEMORY, EXIT_DIFFERENT, EXIT_CANCELLED = 0, 1, 2, 3, 4, 130

#: Options of ``register`` and ``track`` that name what they write; ``rerun`` redirects them into its folder.
OUTPUT_OPTIONS = {"register": ("output", "warped", "warped_labels", "jacobian", "affine_output", "inverse"),
                  "track": ("output",), "segment": ("output",)}
#: Options of ``register`` and ``track`` that name files they read (made absolute in the provenance's command).
INPUT_OPTIONS = ("fixed", "moving", "moving_labels", "fixed_mask", "model", "initial", "cine", "mask", "target")


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that raises InputError instead of exiting, so usage errors follow the progress protocol."""

    def error(self, message):
        raise InputError(f"{message} (see `{self.prog} --help`)")


def _add_training_options(parser: argparse.ArgumentParser, steps_help: str, window_help: str,
                          default_scales: Optional[str] = None) -> None:
    """Options shared by every command that trains. Without ``default_scales`` (register, track, segment) the
    schedule, steps and precision default to those of --preset (``presets``)."""
    if default_scales is None:
        parser.add_argument("--preset", choices=tuple(PRESETS), default=DEFAULT_PRESET,
                            help="; ".join(f"{p.name}: {p.summary}" for p in PRESETS.values())
                            + f" (default: {DEFAULT_PRESET})")
        parser.add_argument("--precision", choices=PRECISIONS, default=None,
                            help="mixed: bfloat16 convolutions where the device supports them (float32 elsewhere); "
                                 "float32: the plain reference (default: the preset's, mixed)")
    scales_default, steps_default = (default_scales, "3500") if default_scales else ("the preset's",) * 2
    parser.add_argument("--scales", default=default_scales,
                        help=f"coarse-to-fine schedule (default: {scales_default}; '1' is single scale, SSR)")
    parser.add_argument("--steps", type=int, default=3500 if default_scales else None,
                        help=f"{steps_help} (default: {steps_default})")
    parser.add_argument("--lambda", dest="smoothness_weight", type=float, default=None,
                        help="smoothness weight (default: the preset's)" if default_scales is None
                        else "smoothness weight (default: 10)")
    parser.add_argument("--window", type=int, default=None, help=window_help)
    parser.add_argument("--lr", type=float, default=None,
                        help="Adam learning rate (default: the preset's)" if default_scales is None
                        else "Adam learning rate (default: 1e-3)")
    if default_scales is None:
        parser.add_argument("--mse-weight", type=float, default=None,
                            help="weight of the mean squared intensity difference (intensities in [0, 1]) added to the "
                                 "paper's loss, for images whose intensities correspond (default: the preset's; "
                                 f"{DEFAULT_PRESET}: {budget(DEFAULT_PRESET, cine=True).mse_weight:g} for cines, "
                                 f"{budget(DEFAULT_PRESET).mse_weight:g} for pairs)")
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
    reg.add_argument("--jacobian", metavar="OUT",
                     help="write the Jacobian determinant of the field on the fixed grid (values <= 0: folding)")
    reg.add_argument("--initial", default="auto", metavar="auto|none|rigid|affine|FILE",
                     help="pre-alignment before the deformable stage: 'auto' (affine for 3D images, none for 2D), "
                          "'none', 'rigid', 'affine', or an ITK transform file mapping fixed to moving points (e.g. "
                          "from Slicer's General Registration); the written field includes it (default: auto)")
    reg.add_argument("--affine-output", metavar="OUT", help="also write the pre-alignment alone as an ITK transform "
                                                            "file (.tfm, .txt, .h5, .mat)")
    reg.add_argument("--inverse", metavar="OUT", help="write the inverse displacement field on the moving image's grid "
                                                      "(maps moving points to fixed points)")
    _add_training_options(reg, steps_help="training steps per scale",
                          window_help="local NCC window in voxels of the working grid (default: 5 in 3D, 6 in 2D)")
    reg.add_argument("--window-mm", type=float, metavar="MM",
                     help="local NCC window in millimetres (overrides --window)")
    reg.add_argument("--spacing", type=float, metavar="MM",
                     help="voxel side of the isotropic working grid the registration runs on (default: the fixed "
                          "image's finest spacing within --max-voxels, coarser if the device's memory requires; "
                          "the field is written on the fixed grid)")
    reg.add_argument("--stop-window", type=int, metavar="N",
                     help="convergence-based stopping: each scale ends when its mean loss over the last N steps fell "
                          "by less than --stop-tolerance; --steps is then a maximum (default: 0, train every step)")
    reg.add_argument("--stop-tolerance", type=float, metavar="T",
                     help=f"see --stop-window (default: {DEFAULT_STOP_TOLERANCE:g})")
    reg.add_argument("--max-voxels", type=int, default=DEFAULT_MAX_VOXELS, metavar="N",
                     help=f"voxel budget of the automatic working grid (default: {DEFAULT_MAX_VOXELS})")
    _add_model_option(reg)

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
    _add_training_options(trk, steps_help="training steps per scale for the whole sequence",
                          window_help="local NCC window of the loss in pixels (default: 6)")

    trn = commands.add_parser("train", help="pretrain the per-scale networks on a collection of image pairs",
                              description="Train one U-Net per scale, coarse to fine, on a collection of pairs (as "
                                          "VoxelMorph is trained), and write MODEL for `ssmsr register --model` "
                                          "and `ssmsr segment --model`. MODEL is rewritten atomically as a "
                                          "checkpoint during training; an interrupted training (Ctrl-C, SIGTERM) "
                                          "saves a checkpoint that --resume continues.")
    trn.add_argument("pairs", metavar="PAIRS",
                     help="CSV file of fixed,moving image paths (relative to the CSV's folder), or a folder of "
                          "images whose ordered pairs are the training pairs")
    trn.add_argument("-o", "--output", required=True, metavar="MODEL", help="model file to write (e.g. model.pt)")
    trn.add_argument("--resume", metavar="MODEL",
                     help="continue the training saved in this checkpoint (same PAIRS; its settings are used)")
    trn.add_argument("--overwrite", action="store_true", help="replace MODEL if it exists")
    trn.add_argument("--batch", type=int, default=None, metavar="N",
                     help="pairs per step, drawn at random (default: 1; more than 1 needs images of one size)")
    trn.add_argument("--validation-fraction", type=float, default=None, metavar="F",
                     help="fraction of the pairs (of a CSV) or images (of a folder) held out to measure the "
                          "validation loss (default: 0.2; 0: none)")
    trn.add_argument("--validation-every", type=int, default=None, metavar="N",
                     help="steps between validation losses (default: 100)")
    trn.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                     help="steps between checkpoints (default: 500; one is also written after each scale)")
    _add_training_options(trn, steps_help="training steps per scale",
                          window_help="local NCC window in voxels (default: 5 in 3D, 6 in 2D)", default_scales="1/2,1")
    # None: the defaults of a new training, or the checkpoint's values with --resume.
    trn.set_defaults(scales=None, steps=None, smoothness_weight=None, lr=None, seed=None)

    seg = commands.add_parser("segment", help="segment an image with the most similar atlas(es)",
                              description="Rank the atlases by NLCC with TARGET (each brought onto the target grid "
                                          "by world coordinates), register the best (or the best K) onto TARGET, "
                                          "and write their warped label map (K > 1: per-voxel majority vote, ties "
                                          "to the best-ranked atlas). The ranking is printed (in the 'finished' "
                                          "event with --progress jsonl).")
    seg.add_argument("target", help="image to segment (file or DICOM series folder)")
    seg.add_argument("--atlas", nargs=2, action="append", required=True, metavar=("IMAGE", "LABELS"),
                     help="an atlas image and its label map; repeat for each atlas")
    seg.add_argument("-o", "--output", required=True, metavar="LABELS_OUT", help="label map to write on TARGET's grid")
    seg.add_argument("--top-k", type=int, default=1, metavar="K",
                     help="register the K best-ranked atlases and fuse their labels by majority vote (default: 1)")
    seg.add_argument("--fixed-mask", metavar="M", help="mask of the target restricting the ranking and the similarity")
    _add_training_options(seg, steps_help="training steps per scale and atlas",
                          window_help="local NCC window in voxels, also used for the ranking (default: 5 in 3D, "
                                      "6 in 2D)")
    _add_model_option(seg)
    for command in (reg, trk, trn, seg):
        command.add_argument("--threads", type=int, metavar="N",
                             help="CPU threads (default: the cores this process may use, within its CPU affinity and "
                                  "container quota; waiting threads sleep instead of spinning, so a busy neighbour "
                                  "does not slow the run down several fold)")

    bat = commands.add_parser("batch", help="run a cohort of register/segment/track cases on Dask, resumably",
                              description="Run every case of JOBS.csv (columns case, kind and that kind's inputs; "
                                          "see the README) into OUTDIR/CASE on an embedded Dask cluster or on "
                                          "--scheduler, skipping the cases already done, and write "
                                          "OUTDIR/results.csv. Exit code 1 when a case failed.")
    bat.add_argument("jobs", metavar="JOBS.csv", help="one line per case (relative paths: relative to the CSV)")
    bat.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder (created if needed)")
    bat.add_argument("--scheduler", metavar="ADDRESS",
                     help="attach to a running Dask scheduler (tcp://host:8786 or a scheduler file) instead of "
                          "starting an embedded cluster")
    bat.add_argument("--workers", type=int, metavar="N",
                     help="worker processes of the embedded cluster (default: one per visible GPU, else CPU cores "
                          "divided by --threads-per-worker)")
    bat.add_argument("--threads-per-worker", type=int, metavar="T",
                     help="CPU threads of a case (default: 1 on CPU workers, else the cores shared out)")
    bat.add_argument("--gpus-per-worker", type=int, metavar="G",
                     help="GPUs of a worker, one case per GPU (the Dask resource GPU; default: 1 when GPUs are used)")
    bat.add_argument("--retries", type=int, default=1, metavar="R",
                     help="extra attempts of a case whose worker failed (bad input is not retried; default: 1)")
    bat.add_argument("--top-k", type=int, default=1, metavar="K", help="segment cases: atlases to register and fuse")
    bat.add_argument("--batch", type=int, default=1, metavar="N", help="track cases: frame pairs per training step")
    _add_training_options(bat, steps_help="training steps per scale (track: for the whole sequence)",
                          window_help="local NCC window in voxels (default: 5 in 3D, 6 in 2D)")
    _add_model_option(bat)

    rer = commands.add_parser("rerun", help="run a register, track or segment command again from its provenance file",
                              description="Run the command recorded in PROVENANCE (NAME.provenance.json beside a "
                                          "registered field or a segmentation, or OUTDIR/provenance.json of a "
                                          "tracking) again, with "
                                          "the same inputs (checked against their recorded digests), settings, seed "
                                          "and thread count, writing into OUTDIR, and compare the new outputs with "
                                          "the recorded digests. Exit code 4 when an output differs.")
    rer.add_argument("provenance", metavar="PROVENANCE", help="a provenance file written by register or track")
    rer.add_argument("-o", "--output", required=True, metavar="OUTDIR",
                     help="folder for the new outputs (created; for a tracking it must not exist or be empty)")
    rer.add_argument("--threads", type=int, metavar="N",
                     help="CPU threads (default: the recorded run's; another count may change the last bits)")
    rer.add_argument("--progress", choices=("bar", "jsonl", "none"), default="bar", help="as for register")
    return parser


def _add_model_option(parser: argparse.ArgumentParser) -> None:
    """--model MODEL; the schedule, smoothness weight and window then default to the model's."""
    parser.add_argument("--model", metavar="MODEL",
                        help="start test-time training from a model written by `ssmsr train` (with --steps 0: "
                             "inference only, the VoxelMorph-equivalent); its scales, smoothness weight and window "
                             "are then the defaults")
    parser.set_defaults(scales=None, smoothness_weight=None)


def _check_outputs(args) -> None:
    if args.warped_labels and not args.moving_labels:
        raise InputError("--warped-labels needs --moving-labels.")
    inputs = {os.path.abspath(p) for p in (args.fixed, args.moving, args.moving_labels, args.fixed_mask, args.model,
                                           args.initial) if p}
    for path in (args.output, args.warped, args.warped_labels, args.jacobian, args.affine_output, args.inverse):
        if path and os.path.abspath(path) in inputs:
            raise InputError(f"The output {path!r} is also an input; choose another output path.")
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise InputError(f"The folder of the output {path!r} does not exist; create it first.")


def run_register(args, reporter: Reporter) -> None:
    from ..workflows.register import register

    _check_outputs(args)
    result = register(args.fixed, args.moving, fixed_mask=args.fixed_mask, moving_labels=args.moving_labels,
                      initial=args.initial,
                      preset=args.preset, scales=args.scales, steps=args.steps, precision=args.precision,
                      smoothness_weight=args.smoothness_weight,
                      ncc_window=args.window, ncc_window_mm=args.window_mm, spacing=args.spacing,
                      max_voxels=args.max_voxels, stop_window=args.stop_window, stop_tolerance=args.stop_tolerance,
                      learning_rate=args.lr, mse_weight=args.mse_weight, device=args.device, seed=args.seed,
                      model=args.model, progress=reporter.handle)
    result.provenance["command"] = command_record(args)
    outputs = result.save(args.output, warped_path=args.warped, warped_labels_path=args.warped_labels,
                          jacobian_path=args.jacobian, affine_path=args.affine_output, inverse_path=args.inverse)
    reporter.finished({key: os.path.abspath(path) if path else None for key, path in outputs.items()},
                      result.metrics)


def run_track(args, reporter: Reporter) -> None:
    from ..report.figures import check_figure_support
    from ..workflows.track import check_output_folder, track
    from .api import save_tracking

    check_output_folder(args.output)
    if not args.no_figures:
        check_figure_support()
    result = track(args.cine, mask=args.mask, preset=args.preset, scales=args.scales, steps=args.steps,
                   precision=args.precision, batch_size=args.batch,
                   smoothness_weight=args.smoothness_weight, ncc_window=args.window, learning_rate=args.lr,
                   mse_weight=args.mse_weight, device=args.device, seed=args.seed, progress=reporter.handle)
    result.provenance["command"] = command_record(args)
    outputs = save_tracking(result, args.output, accumulated=args.accumulate, draw_figures=not args.no_figures)
    reporter.finished(outputs, result.summary())


def command_record(args) -> dict:
    """The command as the provenance records it: every parsed option (input and output paths made absolute, the
    torch thread count it ran with) for ``rerun``, and the command line as typed, in its folder, for people."""
    import shlex

    import torch

    arguments = {name: value for name, value in vars(args).items() if name != "argv"}
    for name in INPUT_OPTIONS + OUTPUT_OPTIONS[args.command]:
        value = arguments.get(name)
        if isinstance(value, str) and (name in OUTPUT_OPTIONS[args.command] or os.path.exists(value)):
            arguments[name] = os.path.abspath(value)
    if arguments.get("atlas"):
        arguments["atlas"] = [[os.path.abspath(path) for path in pair] for pair in arguments["atlas"]]
    arguments["threads"] = torch.get_num_threads()
    typed = ["ssmsr", *args.argv] if getattr(args, "argv", None) else ["ssmsr", args.command]
    return {"name": args.command, "arguments": arguments,
            "command_line": f"cd {shlex.quote(os.getcwd())} && {shlex.join(typed)}"}


def run_rerun(args, reporter: Reporter) -> int:
    """``ssmsr rerun``: the recorded command again, outputs into args.output, compared with the recorded digests."""
    from ..workflows.provenance import file_digest, read_sidecar, sidecar_path

    record = read_sidecar(args.provenance)
    command = record.get("command")
    if not command or command.get("name") not in OUTPUT_OPTIONS:
        raise InputError(f"{args.provenance!r} was not written by `ssmsr register`, `track` or `segment` (a result "
                         "saved through the Python API records its settings, but no command to rerun).")
    for name, recorded in record["inputs"].items():
        if recorded and "path" in recorded:
            if not os.path.exists(recorded["path"]):
                raise InputError(f"The {name} input {recorded['path']!r} of the recorded run is missing.")
            if file_digest(recorded["path"]) != recorded["sha256"]:
                raise InputError(f"The {name} input {recorded['path']!r} changed since the recorded run (its SHA-256 "
                                 "differs); a rerun would not reproduce it.")
    rerun = argparse.Namespace(**command["arguments"])
    rerun.progress, rerun.argv = args.progress, ["rerun", os.path.abspath(args.provenance), "-o", args.output]
    folder = os.path.abspath(args.output)
    if command["name"] == "track":
        rerun.output = folder
    else:
        os.makedirs(folder, exist_ok=True)
        for name in OUTPUT_OPTIONS[command["name"]]:
            if getattr(rerun, name):
                setattr(rerun, name, os.path.join(folder, os.path.basename(getattr(rerun, name))))
    use_threads(args.threads if args.threads is not None else int(command["arguments"]["threads"]))
    {"register": run_register, "track": run_track, "segment": run_segment}[command["name"]](rerun, reporter)
    new_record = read_sidecar(os.path.join(folder, "provenance.json") if command["name"] == "track" else
                              sidecar_path(rerun.output))
    different = sorted(name for name, output in record.get("outputs", {}).items()
                       if new_record["outputs"].get(name, {}).get("sha256") != output["sha256"])
    for name in different:
        print(f"differs from the recorded run: {name}", file=sys.stderr)
    return EXIT_DIFFERENT if different else EXIT_OK


def run_train(args, reporter: Reporter) -> None:
    from ..workflows.train import train

    # Ctrl-C and SIGTERM stop the training between two steps, so that the checkpoint written then is consistent.
    stop_requested = []
    handlers = {number: signal.signal(number, lambda signum, frame: stop_requested.append(signum))
                for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        result = train(args.pairs, args.output, scales=args.scales, steps=args.steps, batch_size=args.batch,
                       validation_fraction=args.validation_fraction, smoothness_weight=args.smoothness_weight,
                       ncc_window=args.window, learning_rate=args.lr, seed=args.seed,
                       checkpoint_every=args.checkpoint_every, validation_every=args.validation_every,
                       device=args.device, resume=args.resume, overwrite=args.overwrite,
                       progress=reporter.handle, should_stop=lambda: bool(stop_requested))
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
    reporter.finished({"model": result.path}, result.summary)


def run_segment(args, reporter: Reporter) -> None:
    from ..workflows.segment import format_ranking, segment

    inputs = {os.path.abspath(p) for p in [args.target, args.fixed_mask, args.model] + sum(args.atlas, []) if p}
    if os.path.abspath(args.output) in inputs:
        raise InputError(f"The output {args.output!r} is also an input; choose another output path.")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
        raise InputError(f"The folder of the output {args.output!r} does not exist; create it first.")
    result = segment(args.target, [tuple(atlas) for atlas in args.atlas], top_k=args.top_k,
                     fixed_mask=args.fixed_mask, model=args.model, preset=args.preset, scales=args.scales,
                     steps=args.steps, precision=args.precision,
                     smoothness_weight=args.smoothness_weight, ncc_window=args.window, learning_rate=args.lr,
                     mse_weight=args.mse_weight, device=args.device, seed=args.seed, progress=reporter.handle)
    result.provenance["command"] = command_record(args)
    outputs = result.save(args.output)
    reporter.finished(outputs, result.metrics)
    if args.progress != "jsonl":
        print(format_ranking(result.ranking), flush=True)


def run_batch_command(args, reporter: Reporter) -> int:
    from .batch import BatchInterrupted, options_from_args, run_batch

    try:
        rows = run_batch(args.jobs, args.output, **options_from_args(args))
    except BatchInterrupted as stopped:
        reporter.error(str(stopped), "cancelled")
        return EXIT_CANCELLED
    return EXIT_INTERNAL if any(row["status"] == "failed" for row in rows) else EXIT_OK


def use_threads(threads: int) -> None:
    """Give torch the thread count (after ``configure_threads`` set the OpenMP environment it starts with)."""
    import torch

    torch.set_num_threads(threads)


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
        args.argv = list(argv)
        # In a new process torch is not imported yet, so its OpenMP runtime starts with these settings; a caller
        # that already runs torch (main() called in-process) keeps its own unless --threads is given.
        if hasattr(args, "threads") and ("torch" not in sys.modules or args.threads is not None):
            use_threads(configure_threads(args.threads))
        if args.command == "register":
            run_register(args, reporter)
        elif args.command == "track":
            run_track(args, reporter)
        elif args.command == "train":
            run_train(args, reporter)
        elif args.command == "segment":
            run_segment(args, reporter)
        elif args.command == "batch":
            return run_batch_command(args, reporter)
        elif args.command == "rerun":
            return run_rerun(args, reporter)
        return EXIT_OK
    except InputError as error:
        reporter.error(str(error), "input")
        return EXIT_INPUT
    except BrokenPipeError:
        # Whoever read our output has gone (e.g. the Slicer process ended): stop without writing outputs.
        sys.stdout = open(os.devnull, "w")
        return EXIT_CANCELLED
    except TrainingStopped as error:
        reporter.error(str(error), "cancelled")
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
