"""Saved SSMSR models: the per-scale U-Net weights, their configuration and training record, in one file.

A model file is written by ``ssmsr train`` (``SSMSRRegistrationLib.training``) and read by
``ssmsr register --model`` and ``ssmsr segment --model``. It is a ``torch.save`` archive holding only
tensors, numbers, strings, lists and dicts, so it loads with ``torch.load(weights_only=True)`` (no code runs
when a file is read)::

    {
      "format": "ssmsr-model",            # FORMAT_ID: identifies the file
      "format_version": 1,                # FORMAT_VERSION: bumped on incompatible changes
      "ssmsr_version": "0.1.0",           # the package that wrote it
      "config": {                         # what the networks need to be rebuilt and used as trained
        "ndim": 2 | 3,
        "encoder_channels": [16, 32, 32, 32], "decoder_channels": [32, 32, 32, 32, 32, 16, 16],
        "scales": ["1/2", "1"],           # coarse-to-fine schedule; one network per scale
        "smoothness_weight": 10.0, "ncc_window": 6,   # the loss (Eq. 1) the networks were trained with
      },
      "networks": [state_dict, ...],      # one RegistrationUNet state dict per *finished* scale, coarse to fine
      "training": {...},                  # record: steps, pairs, batch, learning rate, seed, loss and
                                          # validation-loss histories, time, device (see training.py)
      "resume": None | {                  # only in checkpoints of an unfinished training
        "scale_index": int, "step": int,  # the scale in progress and the steps done in it
        "network": state_dict, "optimizer": Adam state dict,
      },
    }

A model is *complete* when it holds a network for every scale and no resume state; only complete models can
register images. Files are written atomically (temporary file in the same folder, then ``os.replace``), so
an interrupted save never leaves a half-written model under the final name.

Torch and file I/O only (no SimpleITK, no Slicer).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .. import __version__
from ..common.schedule import format_scales, parse_scales
from ..engine.unet import RegistrationUNet
from ..imaging.atomic import write_atomically
from ..common.errors import InputError

FORMAT_ID = "ssmsr-model"
FORMAT_VERSION = 1

StateDict = Dict[str, torch.Tensor]
PathLike = Union[str, os.PathLike]


@dataclass
class SavedModel:
    """A model in memory (see the module docstring for the file layout)."""

    ndim: int
    scales: Tuple[Fraction, ...]
    encoder_channels: Tuple[int, ...]
    decoder_channels: Tuple[int, ...]
    smoothness_weight: float
    ncc_window: int
    networks: List[StateDict] = field(default_factory=list)
    training: Dict[str, Any] = field(default_factory=dict)
    resume: Optional[Dict[str, Any]] = None

    @property
    def complete(self) -> bool:
        """True when every scale has its trained network (the model can register images)."""
        return len(self.networks) == len(self.scales) and self.resume is None

    def describe(self) -> str:
        """One line for messages, e.g. ``2D model, scales 1/2,1, trained 2 x 500 steps on 40 pairs``."""
        record = self.training
        text = f"{self.ndim}D model, scales {format_scales(self.scales)}"
        if record.get("steps_per_scale") is not None:
            text += f", {record['steps_per_scale']} steps per scale"
        if record.get("training_pairs") is not None:
            text += f" on {record['training_pairs']} pairs"
        if not self.complete:
            text += f" (unfinished: {self.progress_text()})"
        return text

    def progress_text(self) -> str:
        """Where an unfinished training stopped, e.g. ``scale 1/2 (1 of 2), step 300 of 500``."""
        if self.complete:
            return "finished"
        index = self.resume["scale_index"] if self.resume else len(self.networks)
        step = self.resume["step"] if self.resume else 0
        steps = self.training.get("steps_per_scale", "?")
        return f"scale {self.scales[index]} ({index + 1} of {len(self.scales)}), step {step} of {steps}"

    def check_fits(self, ndim: int, scales: Optional[Sequence[Fraction]] = None, path: str = "the model") -> None:
        """Raise InputError unless this model can register ``ndim``-D images with the schedule ``scales``."""
        if not self.complete:
            raise InputError(f"{path} is a checkpoint of an unfinished training ({self.progress_text()}); "
                             "finish it by resuming that training ({setting}), or give a finished model.",
                             setting="resume")
        if ndim != self.ndim:
            raise InputError(f"{path} was trained on {self.ndim}D images but the images to register are {ndim}D; "
                             f"use a model trained on {ndim}D images (or none, to train from scratch).")
        if scales is not None and tuple(scales) != tuple(self.scales):
            raise InputError(f"{path} was trained for the scales {format_scales(self.scales)}, not "
                             f"{format_scales(scales)}; leave {{setting}} out (the model's are used) or set it to "
                             f"{format_scales(self.scales)}.", setting="scales")

    def to_file_dict(self) -> Dict[str, Any]:
        """The ``weights_only``-loadable dict that ``save_model`` writes."""
        return {
            "format": FORMAT_ID,
            "format_version": FORMAT_VERSION,
            "ssmsr_version": __version__,
            "config": {"ndim": int(self.ndim), "encoder_channels": [int(c) for c in self.encoder_channels],
                       "decoder_channels": [int(c) for c in self.decoder_channels],
                       "scales": [str(s) for s in self.scales], "smoothness_weight": float(self.smoothness_weight),
                       "ncc_window": int(self.ncc_window)},
            "networks": [_cpu_state(network) for network in self.networks],
            "training": self.training,
            "resume": None if self.resume is None else {
                "scale_index": int(self.resume["scale_index"]), "step": int(self.resume["step"]),
                "network": _cpu_state(self.resume["network"]), "optimizer": self.resume["optimizer"]},
        }


def _cpu_state(state: StateDict) -> StateDict:
    return {key: value.detach().to("cpu").clone() for key, value in state.items()}


def save_model(model: SavedModel, path: PathLike) -> str:
    """Write ``model`` to ``path`` atomically; returns the absolute path.

    See ``atomic.write_atomically``: readers see the old file or the new one, never a partial one.
    """
    if os.path.isdir(os.fspath(path)):
        raise InputError(f"The model path {os.fspath(path)!r} is a folder; give a file name such as model.pt.")
    return write_atomically(path, lambda temporary: torch.save(model.to_file_dict(), temporary))


def _reject(path: str, problem: str, advice: str = "give a model file written by `ssmsr train`") -> InputError:
    return InputError(f"Cannot use the model file {path!r}: {problem}; {advice}.")


def load_model(path: PathLike) -> SavedModel:
    """Read and check a model file (safe deserialisation: ``torch.load(weights_only=True)``).

    Raises InputError, saying what is wrong and what to do, for a missing, truncated, corrupt or foreign file,
    a format version this SSMSR does not read, or weights that do not fit the stored configuration.
    Unfinished checkpoints load (for ``--resume``); ``SavedModel.check_fits`` rejects them for registration.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(f"The model file {path!r} does not exist.")
    if os.path.isdir(path):
        raise InputError(f"The model path {path!r} is a folder; give the model file written by `ssmsr train`.")
    with open(path, "rb") as stream:
        magic = stream.read(4)
    if magic != b"PK\x03\x04":  # torch.save writes zip archives
        kind = "an empty file" if not magic else "not a PyTorch file (torch.save writes zip archives)"
        raise _reject(path, f"it is {kind}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - torch.load raises many types for damaged or foreign files
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "Weights only load failed" in text:
            raise _reject(path, "it contains Python objects other than tensors, numbers and strings, so it is not "
                                "an SSMSR model and is not loaded (loading it could run code)") from None
        raise _reject(path, f"it is not a readable PyTorch file (truncated, damaged, or another kind of file: "
                            f"{type(error).__name__}: {text[:200]})",
                      "if a training was interrupted while writing, use the last complete checkpoint, "
                      "otherwise train again with `ssmsr train`") from None

    if not isinstance(data, dict) or data.get("format") != FORMAT_ID:
        raise _reject(path, "it is a PyTorch file but not an SSMSR model (it has no 'format': "
                            f"'{FORMAT_ID}' entry)")
    version = data.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise _reject(path, f"its format version {version!r} is not valid (damaged file)")
    if version > FORMAT_VERSION:
        raise _reject(path, f"it was written in model format version {version} by SSMSR "
                            f"{data.get('ssmsr_version', '?')}, and this SSMSR ({__version__}) reads version "
                            f"{FORMAT_VERSION}", "update SSMSR to use it")

    config = data.get("config")
    try:
        ndim = int(config["ndim"])
        encoder = tuple(int(c) for c in config["encoder_channels"])
        decoder = tuple(int(c) for c in config["decoder_channels"])
        scales = parse_scales(list(config["scales"]))
        smoothness_weight = float(config["smoothness_weight"])
        ncc_window = int(config["ncc_window"])
        template = RegistrationUNet(ndim, encoder, decoder).state_dict()
    except (TypeError, KeyError, ValueError) as error:
        raise _reject(path, f"its configuration is incomplete or invalid ({type(error).__name__}: {error})") from None

    networks = data.get("networks")
    if not isinstance(networks, list) or len(networks) > len(scales):
        raise _reject(path, f"it holds {len(networks) if isinstance(networks, list) else 'no list of'} networks "
                            f"for {len(scales)} scales (damaged file)")
    for index, state in enumerate(networks):
        _check_state(path, state, template, f"the network of scale {scales[index]}")

    resume = data.get("resume")
    if resume is not None:
        try:
            scale_index, step = int(resume["scale_index"]), int(resume["step"])
            optimizer = resume["optimizer"]
            network = resume["network"]
        except (TypeError, KeyError, ValueError):
            raise _reject(path, "its resume state is incomplete (damaged checkpoint)") from None
        if scale_index != len(networks) or scale_index >= len(scales) or step < 0 or not isinstance(optimizer, dict):
            raise _reject(path, "its resume state does not match its networks (damaged checkpoint)")
        _check_state(path, network, template, f"the network of scale {scales[scale_index]} in training")
        resume = {"scale_index": scale_index, "step": step, "network": network, "optimizer": optimizer}

    training = data.get("training")
    return SavedModel(ndim=ndim, scales=scales, encoder_channels=encoder, decoder_channels=decoder,
                      smoothness_weight=smoothness_weight, ncc_window=ncc_window, networks=list(networks),
                      training=dict(training) if isinstance(training, dict) else {}, resume=resume)


def _check_state(path: str, state: Any, template: StateDict, role: str) -> None:
    if not isinstance(state, dict) or set(state) != set(template):
        raise _reject(path, f"{role} does not have the layers of the configured U-Net (damaged file)")
    for key, value in template.items():
        tensor = state[key]
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(value.shape):
            raise _reject(path, f"{role} has a weight {key!r} of the wrong shape "
                                f"({tuple(getattr(tensor, 'shape', ()))} instead of {tuple(value.shape)}; "
                                "damaged file)")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise _reject(path, f"{role} has NaN or infinite weights (the training diverged)",
                          "train again with a lower learning rate or a larger smoothness weight")


def model_summary(model: SavedModel) -> Dict[str, Any]:
    """JSON-friendly description of a model (configuration and training record without histories)."""
    record = {key: value for key, value in model.training.items()
              if key not in ("loss_history", "validation_history")}
    validation = model.training.get("validation_history") or []
    return {"ndim": model.ndim, "scales": [str(s) for s in model.scales],
            "encoder_channels": list(model.encoder_channels), "decoder_channels": list(model.decoder_channels),
            "smoothness_weight": model.smoothness_weight, "ncc_window": model.ncc_window,
            "complete": model.complete, "training": record,
            "final_validation_loss": validation[-1]["loss"] if validation else None}

