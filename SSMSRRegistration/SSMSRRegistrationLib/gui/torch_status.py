"""Whether this Slicer's Python has a usable PyTorch, and what to do when it has not. Qt-free: the decision is one
function of what is installed (``torchSetupAction``), tested in pytest; ``pytorch_setup`` acts on it in Slicer.

An older PyTorch is never upgraded from here: once Slicer has imported it, its files stay loaded (and locked on
Windows) until Slicer restarts. The user is sent to the PyTorch Util module instead, as the MONAIAuto3DSeg extension
does (``MONAIAuto3DSegLib/dependency_handler.py``: a too old torch raises and names the PyTorch Util module).
"""

from __future__ import annotations

import enum
import importlib
import importlib.metadata
import importlib.util
from typing import NamedTuple, Optional

from .panel import MINIMUM_TORCH, versionAtLeast

try:
    from slicer.i18n import tr as _
except ImportError:  # the slicer-core wheel (pytest) has no slicer.i18n: the English text
    def _(text: str) -> str:
        return text


def torchFound() -> bool:
    """Whether a ``torch`` package can be found on the path, without importing it. The one check of the module file's
    self-test (which skips the tests that run the worker without it) and of the panel's GPU list."""
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):  # e.g. sys.modules["torch"] set to None, or a module without a spec
        return False


def installedTorchVersion() -> Optional[str]:
    """The installed torch's version from its package metadata (nothing is imported), or None."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


class TorchAction(enum.Enum):
    READY = "ready"  # a recent enough torch imports
    INSTALL = "install"  # no torch: ask the user, then install it through the PyTorch extension
    REFUSE = "refuse"  # a torch is there but too old or broken: say so, install nothing


class TorchSetup(NamedTuple):
    action: TorchAction
    #: For INSTALL, the confirmation question; for REFUSE, what is wrong and what to do; for READY, "".
    message: str


def torchSetupAction(installedVersion: Optional[str], importable: bool, importError: str = "",
                     minimum: str = MINIMUM_TORCH) -> TorchSetup:
    """What to do about PyTorch, given the installed version (None: no package metadata) and whether it imports
    (for a version older than ``minimum`` it is not asked: such a torch is refused either way)."""
    if installedVersion is None and not importable:
        return TorchSetup(TorchAction.INSTALL, _(
            "SSMSR Registration needs PyTorch {minimum} or newer, which is not installed yet. Download and install "
            "it now? This can take several minutes; the PyTorch build matching your GPU is chosen "
            "automatically.").format(minimum=minimum))
    if installedVersion is not None and not versionAtLeast(installedVersion, minimum):
        return TorchSetup(TorchAction.REFUSE, _(
            "PyTorch {installed} is installed in this Slicer, but SSMSR Registration needs PyTorch {minimum} or "
            "newer. It is not upgraded here: a PyTorch that Slicer may have loaded cannot be replaced while Slicer "
            "runs. Open the PyTorch Util module, install PyTorch with the version requirement >={minimum}, "
            "restart Slicer, and click Apply again.").format(installed=installedVersion, minimum=minimum))
    if not importable:
        return TorchSetup(TorchAction.REFUSE, _(
            "PyTorch {installed} is installed in this Slicer but cannot be imported ({error}). Reinstall it in the "
            "PyTorch Util module (version requirement: >={minimum}), restart Slicer, and click Apply "
            "again.").format(installed=installedVersion, error=importError or _("unknown error"), minimum=minimum))
    if installedVersion is None:
        return TorchSetup(TorchAction.REFUSE, _(
            "A PyTorch of unknown version is installed in this Slicer; SSMSR Registration needs PyTorch {minimum} or "
            "newer. Reinstall PyTorch in the PyTorch Util module (version requirement: >={minimum}), restart "
            "Slicer, and click Apply again.").format(minimum=minimum))
    return TorchSetup(TorchAction.READY, "")


def currentTorchSetup(minimum: str = MINIMUM_TORCH) -> TorchSetup:
    """``torchSetupAction`` for this Python. torch is imported only when its version is recent enough (or unknown
    but a package is there): a too old one is left unloaded, so that the PyTorch Util module can replace it."""
    version = installedTorchVersion()
    if version is None and not torchFound():
        return torchSetupAction(None, False, minimum=minimum)
    if version is not None and not versionAtLeast(version, minimum):
        return torchSetupAction(version, False, minimum=minimum)
    try:
        torch = importlib.import_module("torch")
    except Exception as error:  # noqa: BLE001 - a broken install raises ImportError, OSError (DLLs), ...
        # Without package metadata, a leftover folder: PyTorchUtils' torchInstalled() says False too, so install.
        return torchSetupAction(version, False, f"{type(error).__name__}: {error}", minimum)
    return torchSetupAction(version or getattr(torch, "__version__", None), True, minimum=minimum)
