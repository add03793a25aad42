"""PyTorch inside Slicer: installed through the PyTorch extension's ``PyTorchUtils`` after asking the user, never
upgraded (see ``torch_status``, which decides; this file only acts on the decision)."""

import slicer
from slicer.i18n import tr as _

from .panel import MINIMUM_TORCH
from .torch_status import TorchAction, currentTorchSetup


def setupPyTorch(askConfirmation: bool = True) -> bool:
    """Make sure a PyTorch >= MINIMUM_TORCH imports in Slicer's Python; False if the user declined to install it.

    No torch: asks (when ``askConfirmation``; the question comes before any wait cursor) and installs it through
    PyTorchUtils, under a wait cursor. A torch that is too old or does not import is not touched: RuntimeError says
    which version is there, which is needed, and to use the PyTorch Util module and restart Slicer. RuntimeError
    with instructions too if the PyTorch extension is missing or the installation failed.
    """
    setup = currentTorchSetup()
    if setup.action is TorchAction.READY:
        return True
    if setup.action is TorchAction.REFUSE:
        raise RuntimeError(setup.message)
    try:
        import PyTorchUtils
    except ModuleNotFoundError:
        raise RuntimeError(_("SSMSR Registration needs the PyTorch extension. Install 'PyTorch' from the "
                             "Extensions Manager, restart Slicer, and click Apply again.")) from None
    if askConfirmation and not slicer.util.confirmOkCancelDisplay(setup.message):
        return False
    with slicer.util.WaitCursor():
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                               torchVersionRequirement=f">={MINIMUM_TORCH}")
    if torch is None:
        raise RuntimeError(_("PyTorch could not be installed. Install it from the PyTorch Util module and "
                             "try again."))
    return True
