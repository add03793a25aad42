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
from ..common.presets import DEFAULT_PRESET, PRESETS
from ..common.protocol import JOB_COMMANDS, JOB_FORMAT, JOB_FORMAT_VERSION, read_json_document
from ..common.run_config import OPTIONS, RunConfiguration, default_text, options_for
from ..report.progress import Reporter, make_reporter
from . import apply_command
from .threads import configure_threads

EXIT_OK, EXIT_INTERNAL, EXIT_INPUT, EXIT_OUT_OF_MEMORY, EXIT_DIFFERENT, EXIT_CANCELLED = 0, 1, 2, 3, 4, 130

#: Options of ``register`` and ``track`` that name what they write; ``rerun`` redirects them into its folder.
OUTPUT_OPTIONS = {"register": ("output", "warped", "warped_labels", "jacobian", "affine_output", "inverse"),
                  "track": ("output",), "segment": ("output",)}
#: Options of ``register`` and ``track`` that name files they read (made absolute in the provenance's command).
INPUT_OPTIONS = ("fixed", "moving", "moving_labels", "fixed_mask", "model", "initial", "cine", "mask", "target", "landmarks")


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that raises InputError instead of exiting, so usage errors follow the progress protocol."""

    def error(self, message):
        raise InputError(f"{message} (see `{self.prog} --help`)")


def add_run_options(parser: argparse.ArgumentParser, kind: str) -> None:
    """The run options of ``kind`` runs (``common.run_config.RUN_OPTIONS``) and --preset, each defaulting to None
    (not given: the preset's value, see ``run_configuration``), and --progress."""
    parser.add_argument("--preset", choices=tuple(PRESETS), default=DEFAULT_PRESET,
                        help="; ".join(f"{p.name}: {p.summary}" for p in PRESETS.values())
                        + f" (default: {DEFAULT_PRESET})")
    for option in options_for(kind):
        default = default_text(option, kind)
        if kind == "cine" and default_text(option, "volume_cine") != default:  # ``track`` takes 3D+t cines too
            default = f"2D+t: {default}; 3D+t: {default_text(option, 'volume_cine')}"
        parser.add_argument(option.flag, *option.aliases, dest=option.name, type=option.type, default=None,
                            choices=option.choices or None, metavar=option.metavar,
                            help=f"{option.help} (default: {default})")
    parser.add_argument("--progress", choices=("bar", "jsonl", "none"), default="bar",
                        help="terminal bar, JSON lines on stdout (for programs), or nothing (default: bar)")


def run_configuration(args, kind: str) -> RunConfiguration:
    """The run configuration of a parsed command: its --preset and the run options given, or the configuration of a
    job file (``ssmsr job``)."""
    if getattr(args, "config", None) is not None:
        return args.config
    return RunConfiguration.of(args.preset, **{option.name: getattr(args, option.name, None)
                                               for option in options_for(kind)})


def command_parsers() -> dict:
    """The subcommands' parsers by name (``register``, ``track``, ...)."""
    return build_parser()._subparsers._group_actions[0].choices


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
    add_run_options(reg, "pair")
    _add_model_option(reg)

    trk = commands.add_parser("track", help="track the motion through a 2D+t or 3D+t cine (an echocardiogram, a 4D CT)",
                              description="Register every consecutive frame pair of a 2D+t or 3D+t cine (frame t-1 "
                                          "onto frame t), or with --reference R frame R onto every other frame, with "
                                          "one test-time training for the whole sequence, and write "
                                          "OUTDIR/field_NNNN.nii.gz (warps the pair's moving frame onto frame NNNN), "
                                          "fields.nii.gz (all of them, on the cine grid), mask.nii.gz, metrics.csv "
                                          "(MSE, NLCC, folding and with --landmarks TRE per pair), summary.json, "
                                          "tracking.gif and tracking.png (3D frames: their middle slice).")
    trk.add_argument("cine", help="multi-frame DICOM, NIfTI/NRRD whose last axis is time (x,y,t or x,y,z,t), a folder "
                                  "of 2D frames or of 3D volumes, or a DICOM folder with several temporal positions")
    trk.add_argument("-o", "--output", required=True, metavar="OUTDIR",
                     help="output folder to create (must not exist, or be empty)")
    trk.add_argument("--mask", default="auto", metavar="auto|FILE",
                     help="'auto' (intensities in [0.005, 0.995] dilated by a 16-pixel disk, as in the paper), or "
                          "a mask file: one 2D mask or one mask per frame, non-zero inside (default: auto)")
    trk.add_argument("--reference", type=int, metavar="R",
                     help="register frame R (from 0) onto every other frame instead of consecutive pairs; 3D frames "
                          "on other grids are resampled onto its grid")
    trk.add_argument("--landmarks", metavar="CSV", help="each pair's target registration error from landmarks: "
                     "columns frame, L,P,S or R,A,S, optional label (else the k-th point of each frame)")
    trk.add_argument("--accumulate", action="store_true",
                     help="also write accumulated_NNNN.nii.gz and accumulated.nii.gz (frame 0 onto frame NNNN; "
                          "consecutive pairs only)")
    trk.add_argument("--no-figures", action="store_true", help="do not draw tracking.gif and tracking.png")
    add_run_options(trk, "cine")

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
    add_run_options(trn, "pretrain")  # with --resume: the checkpoint's values, unless given

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
    add_run_options(seg, "pair")
    _add_model_option(seg)
    for command in (reg, trk, trn, seg):
        command.add_argument("--threads", type=int, metavar="N",
                             help="CPU threads (default: the cores this process may use, within its CPU affinity and "
                                  "container quota; waiting threads sleep instead of spinning, so a busy neighbour "
                                  "does not slow the run down several fold)")

    bat = commands.add_parser("batch", help="run a cohort of register/segment/track cases on Dask, resumably",
                              description="Run every case of JOBS.csv (columns case, kind and that kind's inputs; "
                                          "see docs/batch.md) into OUTDIR/CASE on an embedded Dask cluster or on "
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
    add_batch_run_options(bat)
    _add_model_option(bat)

    apply_command.add_parser(commands)

    job = commands.add_parser("job", help="run a job file (JSON: a command, its arguments and a run configuration), "
                                          "as the 3D Slicer module starts its worker",
                              description="Run the register, track or segment command that JOB describes: "
                                          f"{{\"format\": \"{JOB_FORMAT}\", \"format_version\": {JOB_FORMAT_VERSION}, "
                                          "\"command\": \"register\", \"arguments\": {the command's arguments by "
                                          "name: fixed, moving, output, ...}, \"configuration\": {a run configuration: "
                                          "preset and overrides}}. Progress as JSON lines, as with --progress jsonl.")
    job.add_argument("job", metavar="JOB", help="the job file")
    job.add_argument("--threads", type=int, metavar="N", help="CPU threads (as for register)")

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


def add_batch_run_options(parser: argparse.ArgumentParser) -> None:
    """The options of ``ssmsr batch``: those of pair runs, then those only cines take (for its track cases)."""
    add_run_options(parser, "pair")
    for option in options_for("cine"):
        if "pair" not in option.kinds:
            parser.add_argument(option.flag, *option.aliases, dest=option.name, type=option.type, default=None,
                                metavar=option.metavar,
                                help=f"track cases: {option.help} (default: {default_text(option, 'cine')})")


def _add_model_option(parser: argparse.ArgumentParser) -> None:
    """--model MODEL; the schedule, smoothness weight and window then default to the model's."""
    parser.add_argument("--model", metavar="MODEL",
                        help="start test-time training from a model written by `ssmsr train` (with --steps 0: "
                             "inference only, the VoxelMorph-equivalent); its scales, smoothness weight and window "
                             "are then the defaults")


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
                      initial=args.initial, model=args.model, config=run_configuration(args, "pair"),
                      progress=reporter.handle)
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
    reference = getattr(args, "reference", None)  # absent from the arguments recorded before it existed
    if args.accumulate and reference is not None:
        raise InputError("--accumulate composes consecutive pairs; with --reference the fields already go from the "
                         "reference frame to every other.")
    if not args.no_figures:
        check_figure_support()
    result = track(args.cine, mask=args.mask, reference=reference, landmarks=getattr(args, "landmarks", None),
                   config=run_configuration(args, "cine"), progress=reporter.handle)
    result.provenance["command"] = command_record(args)
    outputs = save_tracking(result, args.output, accumulated=args.accumulate, draw_figures=not args.no_figures)
    reporter.finished(outputs, result.summary())


def command_record(args) -> dict:
    """The command as the provenance records it: its arguments (input and output paths made absolute, the torch
    thread count it ran with) and its run configuration, for ``rerun``; the command line as typed, for people."""
    import shlex

    import torch

    kind = JOB_COMMANDS[args.command]
    run_options = {option.name for option in options_for(kind)} | {"preset", "config", "argv"}
    arguments = {name: value for name, value in vars(args).items() if name not in run_options}
    for name in INPUT_OPTIONS + OUTPUT_OPTIONS[args.command]:
        value = arguments.get(name)
        if isinstance(value, str) and (name in OUTPUT_OPTIONS[args.command] or os.path.exists(value)):
            arguments[name] = os.path.abspath(value)
    if arguments.get("atlas"):
        arguments["atlas"] = [[os.path.abspath(path) for path in pair] for pair in arguments["atlas"]]
    arguments["threads"] = torch.get_num_threads()
    typed = ["ssmsr", *args.argv] if getattr(args, "argv", None) else ["ssmsr", args.command]
    return {"name": args.command, "arguments": arguments,
            "configuration": run_configuration(args, kind).to_json(),
            "command_line": f"cd {shlex.quote(os.getcwd())} && {shlex.join(typed)}"}


def read_job(path: str) -> argparse.Namespace:
    """The parsed command of a job file: the command's defaults, its arguments, and its run configuration
    (``args.config``); InputError naming what is wrong with the file."""
    job = read_json_document(path, "job file", JOB_FORMAT, JOB_FORMAT_VERSION)
    command = job.get("command")
    if command not in JOB_COMMANDS:
        raise InputError(f"The job file {path!r} asks for the command {command!r}; a job runs one of: "
                         f"{', '.join(JOB_COMMANDS)}.")
    parser = command_parsers()[command]
    defaults = {action.dest: action.default for action in parser._actions if action.dest != "help"}
    arguments = job.get("arguments") or {}
    run_options = {option.name for option in options_for(JOB_COMMANDS[command])} | {"preset", "progress"}
    unknown = sorted(set(arguments) - set(defaults) | (set(arguments) & run_options))
    if unknown:
        raise InputError(f"The job file {path!r} gives unknown arguments for {command}: {', '.join(unknown)} (the run "
                         "options belong in its configuration).")
    namespace = argparse.Namespace(**{**defaults, **arguments, "command": command, "progress": "jsonl"})
    namespace.config = RunConfiguration.from_json(job.get("configuration") or {})
    namespace.config.resolve(JOB_COMMANDS[command])
    return namespace


def run_job_command(args, reporter: Reporter) -> None:
    """Run ``args.command`` (one of JOB_COMMANDS) with its parsed arguments: for ``job`` and ``rerun``."""
    {"register": run_register, "track": run_track, "segment": run_segment}[args.command](args, reporter)


def run_job(args, reporter: Reporter) -> None:
    """``ssmsr job``: the job file's command, with its run configuration."""
    job = read_job(args.job)
    job.threads, job.argv = args.threads, ["job", os.path.abspath(args.job)]
    run_job_command(job, reporter)


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
    rerun.config = RunConfiguration.from_json(command["configuration"])
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
    run_job_command(rerun, reporter)
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
        result = train(args.pairs, args.output, config=run_configuration(args, "pretrain"), resume=args.resume,
                       overwrite=args.overwrite, progress=reporter.handle, should_stop=lambda: bool(stop_requested))
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
                     fixed_mask=args.fixed_mask, model=args.model, config=run_configuration(args, "pair"),
                     progress=reporter.handle)
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


def flag_of(setting: str) -> str:
    """How the command line names ``setting`` (an API keyword): its flag, e.g. "--lambda" for smoothness_weight."""
    if setting in OPTIONS:
        return OPTIONS[setting].flag
    for command in command_parsers().values():
        for action in command._actions:
            if action.dest == setting and action.option_strings:
                return action.option_strings[-1]
    return setting


def use_threads(threads: int) -> None:
    """Give torch the thread count (after ``configure_threads`` set the OpenMP environment it starts with)."""
    import torch

    torch.set_num_threads(threads)


def _raise_cancelled(signum, frame):
    raise RegistrationCancelled(f"stopped by signal {signum}")


def _requested_progress(argv: List[str]) -> str:
    """The --progress choice (a job's: JSON lines), read before full parsing so that usage errors also follow the
    protocol."""
    if argv[:1] == ["job"]:
        return "jsonl"
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
        elif args.command == "job":
            run_job(args, reporter)
        elif args.command == "apply":
            apply_command.run(args, reporter)
        return EXIT_OK
    except InputError as error:
        reporter.error(error.worded(flag_of), "input")
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
