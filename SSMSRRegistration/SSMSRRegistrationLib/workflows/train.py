"""Pretraining on a collection of image files (``ssmsr train``): pairs, validation split, checkpoints, resume.

    >>> from SSMSRRegistrationLib import train
    >>> result = train("pairs.csv", "model.pt", scales="1/2,1", steps=2000, batch_size=4)  # doctest: +SKIP
    >>> result.model.describe()  # doctest: +SKIP

A collection is either

* a CSV file with one ``fixed,moving`` pair of image paths per line (an optional ``fixed,moving`` header line,
  ``#`` comments and blank lines are skipped; relative paths are relative to the CSV file's folder), or
* a folder of image files (NIfTI, NRRD, MHA/MHD, ...): every ordered pair of two different images is a
  training pair, as in VoxelMorph's scan-to-scan training.

Validation split (``validation_fraction``, seeded): a CSV collection holds out that fraction of its pairs
(at least one, at most ``MAX_VALIDATION_PAIRS``); a folder holds out that fraction of its *images* (at least two),
so that no validation image is seen in training, and validates on up to ``MAX_VALIDATION_PAIRS`` of their pairs.

Each image is prepared as for ``ssmsr register``: intensities clipped to mean +/- 6 std and scaled to [0, 1],
the moving image resampled onto the fixed image's grid by world coordinates.
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import json
import os
import random
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk
import torch

from .. import __version__
from ..engine.multiscale import resolve_device
from ..engine.pretraining import PairSource, TrainingSettings, TrainingState, check_pairs, train_networks
from ..common.schedule import format_scales, parse_scales
from ..engine.unet import DEFAULT_DECODER_CHANNELS, DEFAULT_ENCODER_CHANNELS
from ..common.errors import InputError, TrainingStopped
from ..common.run_config import RunConfiguration, combined, takes_run_options
from ..common.protocol import Checkpoint, ProgressCallback
from ..imaging.images import check_image, normalised_on_grid, read_image
from .models import SavedModel, load_model, model_summary, save_model

#: File names (lower case) that a collection folder takes as images.
IMAGE_EXTENSIONS = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".hdr", ".png", ".tif", ".tiff")

#: Most validation pairs evaluated at each validation measurement.
MAX_VALIDATION_PAIRS = 32

#: Memory kept for prepared (normalised, resampled) pairs, so that later epochs do not read files again.
DEFAULT_CACHE_BYTES = 2 * 2 ** 30

#: Defaults of ``train`` (and ``ssmsr train``).
Pair = Tuple[str, str]


@dataclass
class PairCollection:
    """Training and validation pairs (absolute paths) of a collection, and where they came from."""

    source: str
    kind: str  # "csv" or "folder"
    training: List[Pair]
    validation: List[Pair]

    @property
    def digest(self) -> str:
        """SHA-256 of the pair lists: identifies the collection and its split (checked when resuming)."""
        text = json.dumps({"training": self.training, "validation": self.validation})
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _is_image_file(name: str) -> bool:
    lower = name.lower()
    return not lower.startswith(".") and lower.endswith(IMAGE_EXTENSIONS)


def read_pairs_csv(path: str) -> List[Pair]:
    """Pairs of a CSV collection (absolute paths); InputError with line numbers for bad lines or missing files."""
    folder = os.path.dirname(os.path.abspath(path))
    pairs, missing = [], []
    try:
        with open(path, newline="", encoding="utf-8-sig") as stream:
            lines = list(csv.reader(stream))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise InputError(f"Cannot read the pairs file {path!r}: {error}. Give a CSV file of fixed,moving image "
                         "paths or a folder of images.") from None
    for number, row in enumerate(lines, start=1):
        cells = [cell.strip() for cell in row]
        if not any(cells) or cells[0].startswith("#"):
            continue
        if len(pairs) == 0 and not missing and [c.lower() for c in cells[:2]] == ["fixed", "moving"]:
            continue  # header
        cells = [cell for cell in cells if cell]
        if len(cells) != 2:
            raise InputError(f"{path}, line {number}: expected two paths 'fixed,moving', found {len(cells)} "
                             f"field(s): {','.join(row)!r}.")
        pair = tuple(os.path.normpath(os.path.join(folder, os.path.expanduser(cell))) for cell in cells)
        for cell, resolved in zip(cells, pair):
            if not os.path.isfile(resolved):
                missing.append(f"line {number}: {cell!r}")
        pairs.append(pair)
    if missing:
        shown = "; ".join(missing[:5]) + (f"; and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise InputError(f"{len(missing)} image(s) listed in {path!r} do not exist ({shown}). Relative paths are "
                         "relative to the CSV file's folder.")
    if not pairs:
        raise InputError(f"The pairs file {path!r} lists no pairs; write one 'fixed,moving' pair of image paths "
                         "per line.")
    return pairs


def collect_pairs(source: str, validation_fraction: float = 0.2, seed: int = 0,
                  max_validation_pairs: int = MAX_VALIDATION_PAIRS) -> PairCollection:
    """Training and validation pairs of a CSV file or a folder of images (see the module docstring)."""
    if not 0 <= validation_fraction < 1:
        raise InputError(f"The validation fraction must be in [0, 1), got {validation_fraction}.")
    source = os.path.abspath(os.fspath(source))
    shuffler = random.Random(seed)
    if os.path.isdir(source):
        images = sorted(os.path.join(source, name) for name in os.listdir(source)
                        if _is_image_file(name) and os.path.isfile(os.path.join(source, name)))
        if len(images) < 2:
            raise InputError(f"The folder {source!r} holds {len(images)} image file(s) "
                             f"({', '.join(IMAGE_EXTENSIONS)}); training needs at least two.")
        held_out: List[str] = []
        if validation_fraction > 0:
            count = max(2, int(round(validation_fraction * len(images))))
            if len(images) - count < 2:
                raise InputError(f"The folder {source!r} holds {len(images)} images: too few to hold out "
                                 f"validation images (two or more) and keep two for training. Add images, or set "
                                 "{setting} to 0 (no validation loss).", setting="validation_fraction")
            held_out = sorted(shuffler.sample(images, count))
        kept = [image for image in images if image not in held_out]
        training = [(f, m) for f in kept for m in kept if f != m]
        validation = [(f, m) for f in held_out for m in held_out if f != m]
        if len(validation) > max_validation_pairs:
            validation = sorted(shuffler.sample(validation, max_validation_pairs))
        return PairCollection(source, "folder", training, validation)
    if not os.path.isfile(source):
        raise InputError(f"The pairs {source!r} do not exist; give a CSV file of fixed,moving paths or a folder "
                         "of images.")
    pairs = read_pairs_csv(source)
    validation = []
    if validation_fraction > 0:
        if len(pairs) < 2:
            raise InputError(f"{source!r} lists a single pair: nothing is left to validate on. Add pairs, or set "
                             "{setting} to 0 (no validation loss).", setting="validation_fraction")
        count = min(max(1, int(round(validation_fraction * len(pairs)))), len(pairs) - 1, max_validation_pairs)
        chosen = set(shuffler.sample(range(len(pairs)), count))
        validation = [pair for index, pair in enumerate(pairs) if index in chosen]
        pairs = [pair for index, pair in enumerate(pairs) if index not in chosen]
    return PairCollection(source, "csv", pairs, validation)


class ImagePairs(PairSource):
    """Pairs of image files, read and prepared on demand, kept in memory up to ``cache_bytes``."""

    def __init__(self, pairs: Sequence[Pair], role: str, cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.pairs = list(pairs)
        self.role = role
        self.cache_bytes = cache_bytes
        self._cache: "OrderedDict[int, Tuple[torch.Tensor, torch.Tensor]]" = OrderedDict()
        self._cached_bytes = 0
        info: Dict[str, Tuple[int, Tuple[int, ...], int]] = {}
        for path in {p for pair in self.pairs for p in pair}:
            info[path] = self._header(path)
        self._sizes = []
        for fixed, moving in self.pairs:
            (fixed_ndim, fixed_size, fixed_components), (moving_ndim, _, moving_components) = info[fixed], info[moving]
            for path, ndim, components in ((fixed, fixed_ndim, fixed_components), (moving, moving_ndim, moving_components)):
                if ndim not in (2, 3):
                    raise InputError(f"The {role} image {path!r} is {ndim}D; training takes 2D or 3D images.")
                if components != 1:
                    raise InputError(f"The {role} image {path!r} has {components} components per voxel; "
                                     "convert it to a single-channel grey-scale image first.")
            if moving_ndim != fixed_ndim:
                raise InputError(f"The {role} pair {fixed!r}, {moving!r} mixes a {fixed_ndim}D and a {moving_ndim}D "
                                 "image.")
            self._sizes.append(tuple(reversed(fixed_size)))

    @staticmethod
    def _header(path: str) -> Tuple[int, Tuple[int, ...], int]:
        reader = sitk.ImageFileReader()
        reader.SetFileName(path)
        try:
            reader.ReadImageInformation()
        except RuntimeError as error:
            last = str(error).strip().splitlines()[-1] if str(error).strip() else ""
            raise InputError(f"Cannot read the image {path!r}: not an image SimpleITK can read. {last}") from None
        return reader.GetDimension(), tuple(reader.GetSize()), reader.GetNumberOfComponents()

    def __len__(self) -> int:
        return len(self.pairs)

    def size(self, index: int) -> Tuple[int, ...]:
        return self._sizes[index]

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        fixed_path, moving_path = self.pairs[index]
        fixed = read_image(fixed_path, f"{self.role} fixed image")
        check_image(fixed, f"{self.role} fixed image {fixed_path!r}")
        moving = read_image(moving_path, f"{self.role} moving image")
        check_image(moving, f"{self.role} moving image {moving_path!r}", fixed.GetDimension())
        fixed_role, moving_role = f"{self.role} fixed image {fixed_path!r}", f"{self.role} moving image {moving_path!r}"
        pair = tuple(torch.from_numpy(np.ascontiguousarray(array))[None, None]
                     for array in (normalised_on_grid(fixed, fixed, fixed_role, fixed_role),
                                   normalised_on_grid(moving, fixed, moving_role, fixed_role)))
        cost = sum(t.numel() * t.element_size() for t in pair)
        while self._cache and self._cached_bytes + cost > self.cache_bytes:
            _, dropped = self._cache.popitem(last=False)
            self._cached_bytes -= sum(t.numel() * t.element_size() for t in dropped)
        if cost <= self.cache_bytes:
            self._cache[index] = pair
            self._cached_bytes += cost
        return pair


@dataclass
class TrainingOutput:
    """What ``train`` returns: the finished model, where it was written, and a JSON-friendly summary."""

    model: SavedModel
    path: str
    summary: Dict[str, Any] = field(default_factory=dict)


def _model_from_state(state: TrainingState, settings: TrainingSettings, ndim: int, collection: PairCollection,
                      validation_fraction: float, device: str) -> SavedModel:
    complete = state.finished(len(settings.scales))
    training = {
        "complete": complete, "steps_per_scale": settings.steps_per_scale, "batch_size": settings.batch_size,
        "learning_rate": settings.learning_rate, "seed": settings.seed, "validation_fraction": validation_fraction,
        "validation_every": settings.validation_every, "checkpoint_every": settings.checkpoint_every,
        "steps_done": [settings.steps_per_scale] * len(state.networks) + ([] if complete else [state.step]),
        "training_pairs": len(collection.training), "validation_pairs": len(collection.validation),
        "collection": collection.source, "collection_kind": collection.kind,
        "collection_digest": collection.digest,
        "loss_history": {key: torch.tensor(values, dtype=torch.float32) for key, values in state.loss_history.items()},
        "validation_history": [dict(record) for record in state.validation_history],
        "seconds": float(state.seconds), "device": device, "ssmsr_version": __version__,
        "updated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    resume = None
    if not complete and state.network is not None:
        resume = {"scale_index": state.scale_index, "step": state.step, "network": state.network,
                  "optimizer": state.optimizer}
    return SavedModel(ndim=ndim, scales=tuple(settings.scales), encoder_channels=tuple(settings.encoder_channels),
                      decoder_channels=tuple(settings.decoder_channels), smoothness_weight=settings.smoothness_weight,
                      ncc_window=settings.window_for(ndim), networks=list(state.networks), training=training,
                      resume=resume)


def _state_from_model(model: SavedModel) -> TrainingState:
    record = model.training
    return TrainingState(
        networks=list(model.networks),
        scale_index=model.resume["scale_index"] if model.resume else len(model.networks),
        step=model.resume["step"] if model.resume else 0,
        network=model.resume["network"] if model.resume else None,
        optimizer=model.resume["optimizer"] if model.resume else None,
        loss_history={key: [float(v) for v in torch.as_tensor(values).tolist()]
                      for key, values in (record.get("loss_history") or {}).items()},
        validation_history=[dict(r) for r in record.get("validation_history") or []],
        seconds=float(record.get("seconds", 0.0)))


def _settings_for_resume(model: SavedModel, path: str, requested: Dict[str, Any]) -> Tuple[TrainingSettings, float]:
    """The checkpoint's settings; InputError if an explicitly requested value differs from them."""
    record = model.training
    stored = {"scales": format_scales(model.scales), "steps": record.get("steps_per_scale"),
              "batch_size": record.get("batch_size"), "validation_fraction": record.get("validation_fraction"),
              "smoothness_weight": model.smoothness_weight, "ncc_window": model.ncc_window,
              "learning_rate": record.get("learning_rate"), "seed": record.get("seed"),
              "checkpoint_every": record.get("checkpoint_every"), "validation_every": record.get("validation_every")}
    if any(value is None for value in stored.values()):
        raise InputError(f"{path!r} does not record its training settings, so it cannot be resumed.")
    for name, value in requested.items():
        if name not in stored:  # device, precision: not part of what was trained
            continue
        same = format_scales(parse_scales(value)) == stored[name] if name == "scales" else value == stored[name]
        if not same:
            raise InputError(f"The checkpoint {path!r} was trained with {{setting}} {stored[name]}, not {value}; leave "
                             "that option out to resume, or start a new training without resuming.", setting=name)
    settings = TrainingSettings(scales=model.scales, steps_per_scale=int(stored["steps"]),
                                batch_size=int(stored["batch_size"]), smoothness_weight=model.smoothness_weight,
                                ncc_window=model.ncc_window, learning_rate=float(stored["learning_rate"]),
                                seed=int(stored["seed"]), encoder_channels=model.encoder_channels,
                                decoder_channels=model.decoder_channels,
                                validation_every=int(stored["validation_every"]),
                                checkpoint_every=int(stored["checkpoint_every"]))
    return settings, float(stored["validation_fraction"])


@takes_run_options("pretrain")
def train(pairs: Union[str, os.PathLike], output: Union[str, os.PathLike], *,
          encoder_channels: Sequence[int] = DEFAULT_ENCODER_CHANNELS,
          decoder_channels: Sequence[int] = DEFAULT_DECODER_CHANNELS,
          resume: Optional[Union[str, os.PathLike]] = None, overwrite: bool = False,
          cache_bytes: int = DEFAULT_CACHE_BYTES, progress: Optional[ProgressCallback] = None,
          should_stop: Optional[Callable[[], bool]] = None, config: Optional[RunConfiguration] = None,
          preset: Optional[str] = None, **options) -> TrainingOutput:
    """Pretrain the per-scale networks on a collection and write the model file ``output``.

    Args:
        pairs: CSV file of fixed,moving paths, or a folder of images (see the module docstring).
        output: model file to write; checkpoints are written to it (atomically) during training. An existing
            file is only replaced when it is the ``resume`` file or ``overwrite`` is True.
        encoder_channels, decoder_channels: U-Net widths (default: VoxelMorph's); ignored when resuming.
        resume: a checkpoint written by an interrupted ``train`` on the same collection; training continues from
            its step count, weights and optimizer state (the result equals an uninterrupted run's).
        progress: receives the engine's events ("started", "progress", "validation") and
            {"event": "checkpoint", "path", "scale", "scale_index", "step"}.
        should_stop: polled after every step; True writes a checkpoint and raises TrainingStopped.
        config, preset, options: the run configuration (the preset's pretraining values: the paper's settings);
            when resuming, the checkpoint's values instead (an option given explicitly that differs from the
            checkpoint's is an error).

    Three frames of a real echocardiogram as a folder of images (their six ordered pairs), two steps:

    >>> import os, tempfile, SimpleITK as sitk, SSMSRRegistrationLib as ssmsr
    >>> from SSMSRRegistrationLib.imaging.sample_data import shipped_echo_frames
    >>> images, models = tempfile.mkdtemp(), tempfile.mkdtemp()
    >>> for index, frame in enumerate(shipped_echo_frames([0, 10, 20])):
    ...     sitk.WriteImage(frame, os.path.join(images, f"frame{index}.nrrd"))
    >>> result = ssmsr.train(images, os.path.join(models, "model.pt"), scales="1", steps=2, validation_fraction=0,
    ...                      device="cpu")
    >>> result.model.complete, result.model.ndim
    (True, 2)
    """
    output = os.path.abspath(os.fspath(output))
    if not os.path.isdir(os.path.dirname(output)):
        raise InputError(f"The folder of the model file {output!r} does not exist; create it first.")
    configuration = combined(config, preset, **options)
    run = configuration.resolve("pretrain")
    state = None
    if resume is not None:
        resume = os.path.abspath(os.fspath(resume))
        checkpoint_model = load_model(resume)
        if checkpoint_model.complete:
            raise InputError(f"{resume!r} is a finished model ({checkpoint_model.describe()}); there is nothing to "
                             "resume. Start a new training without resuming to train another model.")
        settings, validation_fraction = _settings_for_resume(checkpoint_model, resume, configuration.overrides)
        state = _state_from_model(checkpoint_model)
    else:
        validation_fraction = float(run.validation_fraction)
        settings = TrainingSettings.from_run(run, encoder_channels=tuple(encoder_channels),
                                             decoder_channels=tuple(decoder_channels))
    if os.path.exists(output) and output != resume and not overwrite:
        raise InputError(f"The model file {output!r} already exists; choose another name, allow replacing it "
                         "({setting}), or resume it if it is a checkpoint of this training.", setting="overwrite")
    settings.validate()
    torch_device = resolve_device(run.device)

    collection = collect_pairs(os.fspath(pairs), validation_fraction, settings.seed)
    if state is not None and checkpoint_model.training.get("collection_digest") != collection.digest:
        raise InputError(f"The checkpoint {resume!r} was trained on another collection or split "
                         f"({checkpoint_model.training.get('training_pairs')} training and "
                         f"{checkpoint_model.training.get('validation_pairs')} validation pairs from "
                         f"{checkpoint_model.training.get('collection')!r}); resume with the same PAIRS.")
    training_pairs = ImagePairs(collection.training, "training", cache_bytes)
    validation_pairs = ImagePairs(collection.validation, "validation", cache_bytes) if collection.validation else None
    ndim = check_pairs(training_pairs, settings, "training")

    def write_checkpoint(current: TrainingState) -> None:
        save_model(_model_from_state(current, settings, ndim, collection, validation_fraction, str(torch_device)),
                   output)
        if progress is not None:
            finished = current.finished(len(settings.scales))
            progress(Checkpoint(path=output, complete=finished,
                                scale_index=min(current.scale_index, len(settings.scales) - 1),
                                step=settings.steps_per_scale if finished else current.step).to_dict())

    try:
        state = train_networks(training_pairs, validation_pairs, settings, state=state, device=torch_device,
                               progress=progress, should_stop=should_stop, checkpoint=write_checkpoint)
    except TrainingStopped as stopped:
        raise TrainingStopped(f"Training stopped; a checkpoint ({stopped}) was saved to {output}. Continue it with "
                              f"`ssmsr train {collection.source} -o {output} --resume {output}`.",
                              stopped.state) from None
    model = _model_from_state(state, settings, ndim, collection, validation_fraction, str(torch_device))
    summary = model_summary(model)
    summary["validation_loss_per_scale"] = {
        key: {"first": records[0]["loss"], "last": records[-1]["loss"]}
        for key in (str(s) for s in settings.scales)
        for records in [[r for r in state.validation_history if r["scale"] == key]] if records}
    summary["final_training_loss"] = {key: values[-1] for key, values in state.loss_history.items() if values}
    summary["seconds"] = state.seconds
    return TrainingOutput(model=model, path=output, summary=summary)
