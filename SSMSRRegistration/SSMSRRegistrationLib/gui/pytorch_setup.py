"""PyTorch inside Slicer, installed through the PyTorch extension's ``PyTorchUtils`` after asking the user."""

import slicer
from slicer.i18n import tr as _

from .panel import MINIMUM_TORCH, versionAtLeast


def setupPyTorch(askConfirmation: bool = True) -> bool:
    """Make sure PyTorch >= MINIMUM_TORCH is installed in Slicer's Python; False if the user declined.

    Raises RuntimeError with instructions if the PyTorch extension is missing or the install failed.
    """
    try:
        import PyTorchUtils
    except ModuleNotFoundError:
        raise RuntimeError(_("SSMSR Registration needs the PyTorch extension. Install 'PyTorch' from the "
                             "Extensions Manager, restart Slicer, and click Apply again.")) from None
    torchLogic = PyTorchUtils.PyTorchUtilsLogic()
    if torchLogic.torchInstalled() and installedTorchIsRecentEnough():
        return True
    if askConfirmation and not slicer.util.confirmOkCancelDisplay(
            _("SSMSR Registration needs PyTorch {version} or newer, which is not installed yet. Download and install "
              "it now? This can take several minutes; the PyTorch build matching your GPU is chosen "
              "automatically.").format(version=MINIMUM_TORCH)):
        return False
    with slicer.util.WaitCursor():
        torch = torchLogic.installTorch(askConfirmation=False, torchVersionRequirement=f">={MINIMUM_TORCH}")
    if torch is None:
        raise RuntimeError(_("PyTorch could not be installed. Install it from the PyTorch Utils module and "
                             "try again."))
    return True


def installedTorchIsRecentEnough() -> bool:
    """True if the installed torch's version (read from its metadata, without importing it) is >= MINIMUM_TORCH."""
    import importlib.metadata

    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return False
    return versionAtLeast(version, MINIMUM_TORCH)

