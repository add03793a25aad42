"""SSMSR: test-time trained multi-scale deformable registration, its command line and its 3D Slicer logic.

One folder per layer; a layer imports only those listed below it (see each package's docstring):

    gui/         the Slicer module panel (qt, ctk, Slicer application)       -> mrml, common
    mrml/        Qt-free, torch-free Slicer logic on MRML, the worker process -> common
    testing/     scenarios shared by pytest and the Slicer self-test          -> mrml, imaging, common
    interfaces/  the ``ssmsr`` command, the Python API, the demo              -> workflows, report, imaging, common
    report/      progress bars, JSON lines, figures from arrays               -> common
    workflows/   register, track, train, segment, model files                 -> engine, imaging, common
    engine/      torch: networks, losses, test-time training, pretraining     -> common
    imaging/     SimpleITK: images, cines, fields, atomic writes              -> common
    common/      standard library: errors, protocol, schedules, presets

The public functions (``register``, ``track``, ``train``, ``segment``, ``save_tracking``, ``apply``,
``read_transform``) and ``RunConfiguration`` are imported on first use, so that the Slicer panel loads without
torch; ``help(SSMSRRegistrationLib.register)`` shows the function itself, with its signature.

    >>> import SSMSRRegistrationLib as ssmsr
    >>> sorted(ssmsr.__all__)[:3]
    ['RunConfiguration', 'apply', 'read_transform']
    >>> ssmsr.RunConfiguration.of("fast", steps=120).resolve("pair").steps
    120
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, List

__version__ = "0.1.0"

#: Public name -> the module (relative to this package) that defines it.
_PUBLIC = {"register": "interfaces.api", "track": "interfaces.api", "train": "interfaces.api",
           "segment": "interfaces.api", "save_tracking": "interfaces.api", "apply": "interfaces.api",
           "read_transform": "interfaces.api", "RunConfiguration": "common.run_config"}
__all__ = ["RunConfiguration", "apply", "read_transform", "register", "save_tracking", "segment", "track", "train"]

if TYPE_CHECKING:  # what IDEs and type checkers see
    from .common.run_config import RunConfiguration
    from .interfaces.api import apply, read_transform, register, save_tracking, segment, track, train


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(_PUBLIC))
