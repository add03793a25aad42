"""Provenance of a result: what it takes to reproduce it, written beside it as a JSON sidecar.

A record holds the run's resolved settings (the engine's, after the preset and every override), the seed, each
input with its SHA-256 digest, the software versions, the device, the CPU (model, the instruction sets that change
the arithmetic: AVX-512, bfloat16, AMX) and the thread counts, and, for a command-line run, the command that
reproduces it (``ssmsr rerun SIDECAR`` replays it). The same inputs, seed, software, CPU and thread count give
byte-identical fields; across thread counts, CPUs, torch versions or on a GPU they may differ in the last bits.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
from fractions import Fraction
from typing import Any, Dict, Mapping, Optional

import numpy as np
import SimpleITK as sitk
import torch

from ..common.protocol import read_json_document
from ..common.run_config import RunConfiguration
from ..imaging.atomic import write_atomically

FORMAT = "ssmsr-provenance"
FORMAT_VERSION = 1

#: Packages whose versions can change a result.
PACKAGES = ("ssmsr", "torch", "numpy", "SimpleITK")

#: /proc/cpuinfo flags that select different arithmetic kernels (and so can change the last bits of a result).
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")

#: Image extensions stripped from an output's name to name its sidecar.
IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".h5", ".hdf5", ".tfm", ".txt")


def sidecar_path(output_path: str) -> str:
    """The sidecar of an output file: its name without the image extension, plus ``.provenance.json``."""
    path = os.path.abspath(os.fspath(output_path))
    for extension in IMAGE_EXTENSIONS:
        if path.lower().endswith(extension):
            return path[: -len(extension)] + ".provenance.json"
    return path + ".provenance.json"


def file_digest(path: str) -> str:
    """SHA-256 of a file, or of a folder's files (a DICOM series): their sorted relative names and contents."""
    digest = hashlib.sha256()
    if os.path.isdir(path):
        for folder, _, names in sorted(os.walk(path)):
            for name in sorted(names):
                member = os.path.join(folder, name)
                digest.update(os.path.relpath(member, path).encode())
                _update_from_file(digest, member)
    else:
        _update_from_file(digest, path)
    return digest.hexdigest()


def _update_from_file(digest, path: str) -> None:
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)


def image_digest(image: sitk.Image) -> str:
    """SHA-256 of an in-memory image's pixels, pixel type and geometry."""
    digest = hashlib.sha256()
    digest.update(json.dumps([image.GetPixelIDTypeAsString(), image.GetSize(), image.GetSpacing(),
                              image.GetOrigin(), image.GetDirection()]).encode())
    digest.update(np.ascontiguousarray(sitk.GetArrayViewFromImage(image)).tobytes())
    return digest.hexdigest()


def input_record(source: Any) -> Optional[Dict[str, str]]:
    """{"path", "sha256"} for a file or folder, {"image": "in memory", "sha256"} for a SimpleITK image, None for
    None, and {"value": str} for anything else (an option such as "auto")."""
    if source is None:
        return None
    if isinstance(source, sitk.Image):
        return {"image": "in memory", "sha256": image_digest(source)}
    if isinstance(source, (str, os.PathLike)) and os.path.exists(source):
        return {"path": os.path.abspath(os.fspath(source)), "sha256": file_digest(os.fspath(source))}
    return {"value": str(source)}


def software() -> Dict[str, Optional[str]]:
    """Versions of Python and of PACKAGES (None for a package that is not installed as a distribution)."""
    versions: Dict[str, Optional[str]] = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def cpu_model() -> str:
    """The processor's model name (/proc/cpuinfo on Linux, else what ``platform`` says)."""
    for line in _cpuinfo_lines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> list:
    """The CPU_FLAGS this processor has (empty where /proc/cpuinfo is unavailable)."""
    for line in _cpuinfo_lines():
        if line.startswith("flags"):
            present = set(line.split(":", 1)[1].split())
            return [flag for flag in CPU_FLAGS if flag in present]
    return []


def _cpuinfo_lines() -> list:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as stream:
            return stream.readlines()
    except OSError:
        return []


def machine(device: str) -> Dict[str, Any]:
    """The device a run used, the CPU and the thread counts."""
    record: Dict[str, Any] = {"device": device, "platform": platform.platform(), "cpu": cpu_model(),
                              "cpu_flags": cpu_flags(), "torch_threads": torch.get_num_threads(),
                              "itk_threads": sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()}
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        record["gpu"] = torch.cuda.get_device_name(index)
        record["cuda"] = torch.version.cuda
    return record


def settings_record(settings: Any) -> Dict[str, Any]:
    """A dataclass of settings as JSON values (fractions as "1/2" strings, tuples as lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, Fraction):
            return str(value)
        if isinstance(value, (list, tuple)):
            return [plain(item) for item in value]
        return value

    return {name: plain(value) for name, value in dataclasses.asdict(settings).items()}


def run_record(kind: str, settings: Any, configuration: RunConfiguration, inputs: Mapping[str, Any],
               options: Mapping[str, Any], device: str) -> Dict[str, Any]:
    """The provenance of one run (``kind``: "register", "track" or "segment"): its run ``configuration`` (preset and
    overrides) and the engine ``settings`` it resolved to, the ``inputs`` (name -> path, image or None; digested),
    what the workflow chose beyond them (``options``: pre-alignment, working grid, ...), the software and the
    machine."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind,
            "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "seed": getattr(settings, "seed", None), "configuration": configuration.to_json(),
            "settings": settings_record(settings),
            "options": dict(options), "inputs": {name: input_record(value) for name, value in inputs.items()},
            "software": software(), "machine": machine(device)}


def with_outputs(record: Mapping[str, Any], outputs: Mapping[str, Optional[str]]) -> Dict[str, Any]:
    """``record`` plus each written output's path and digest (files; a folder is digested as a whole)."""
    written = {name: {"path": os.path.abspath(path), "sha256": file_digest(path)}
               for name, path in outputs.items() if path and os.path.exists(path)}
    return {**record, "outputs": written}


def write_sidecar(path: str, record: Mapping[str, Any]) -> str:
    """Write ``record`` as JSON at ``path`` (atomically); returns the absolute path."""
    text = json.dumps(record, indent=2, allow_nan=False, default=str) + "\n"

    def write(temporary: str) -> None:
        with open(temporary, "w", encoding="utf-8") as stream:
            stream.write(text)

    return write_atomically(path, write)


def read_sidecar(path: str) -> Dict[str, Any]:
    """A sidecar written by ``write_sidecar``; InputError if it is missing or is not one."""
    return read_json_document(path, "provenance file", FORMAT, FORMAT_VERSION)

