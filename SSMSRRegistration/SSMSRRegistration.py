"""SSMSR Registration: deformable registration by test-time trained multi-scale residual U-Nets, in 3D Slicer.

This file holds what Slicer looks for: the module, its widget and logic classes (from ``SSMSRRegistrationLib.gui``)
and the self-test, which runs the scenarios of ``SSMSRRegistrationLib.testing`` shared with the pytest suite. The
computation runs in a separate PythonSlicer process (``python -m SSMSRRegistrationLib``).
"""

import functools
import sys

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleTest

from SSMSRRegistrationLib.gui.panel import versionProblem
from SSMSRRegistrationLib.gui.torch_status import torchFound

#: Checked before anything that needs a recent Slicer is imported.
_VERSION_PROBLEM = versionProblem(slicer.app.majorVersion, slicer.app.minorVersion)
if _VERSION_PROBLEM is None:
    from SSMSRRegistrationLib.gui.module_logic import SSMSRRegistrationLogic  # noqa: F401 (found by Slicer)
    from SSMSRRegistrationLib.gui.widget import SSMSRRegistrationWidget as _PanelWidget


def reloadLibrary() -> None:
    """Forget the imported ``SSMSRRegistrationLib`` modules, so that the next import (the module file re-executed by
    the Reload button) reads them from disk again."""
    for name in [name for name in sys.modules if name == "SSMSRRegistrationLib" or name.startswith("SSMSRRegistrationLib.")]:
        del sys.modules[name]


class SSMSRRegistration(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SSMSR Registration")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Registration")]
        self.parent.dependencies = []
        self.parent.contributors = ["SSMSR developers (SSMSR project)"]
        self.parent.helpText = _(
            "Deformable registration of two 2D or 3D images by self-supervised, test-time trained multi-scale "
            "residual U-Nets (SSMSR). The result is a transform node holding a displacement field on the fixed "
            "image's grid: put the moving volume (or any node defined on it) under that transform to align it "
            "with the fixed volume. A segmentation of the moving image can be propagated onto the fixed image, and "
            "the Jacobian determinant of the result shown as a volume (red where the field folds). "
            "In atlas selection mode, the atlases (segmentations with their volumes) most similar to the fixed "
            "volume by local normalized cross-correlation are registered onto it and their segments propagated. "
            "A model pretrained with `ssmsr train` can be the starting point of the test-time training. "
            "In cine tracking mode, every consecutive frame pair of a 2D+t cine (a sequence of 2D images or a volume "
            "whose third axis is time) or of a sequence of 3D volumes (4D CT, 3D echo) is registered with one "
            "test-time training for the whole sequence; the fields become a sequence of transforms in the cine's "
            "sequence browser, with a metrics table and plots. "
            "The computation runs in the background with PyTorch (installed through the PyTorch extension); "
            "use a CUDA GPU for full-length schedules. Needs 3D Slicer 5.6 or newer."
        )
        self.parent.acknowledgementText = _(
            "The method follows the SSMSR paper (self-supervised multi-scale neural registration with test-time "
            "training). PyTorch is set up through the PyTorch extension by Fernando Perez-Garcia and Andras Lasso."
        )


if _VERSION_PROBLEM is None:
    class SSMSRRegistrationWidget(_PanelWidget):
        """The panel (``SSMSRRegistrationLib.gui.widget``); Reload also reloads the library."""

        def onReload(self):
            reloadLibrary()
            super().onReload()
else:
    from slicer.ScriptedLoadableModule import ScriptedLoadableModuleWidget

    class SSMSRRegistrationWidget(ScriptedLoadableModuleWidget):
        """On a Slicer older than the minimum: a panel that says so."""

        def setup(self) -> None:
            ScriptedLoadableModuleWidget.setup(self)
            import qt

            label = qt.QLabel(_VERSION_PROBLEM)
            label.wordWrap = True
            self.layout.addWidget(label)
            self.layout.addStretch(1)


#: Why a self-test that runs the worker skips itself.
TORCH_MISSING = ("PyTorch is not installed in this Slicer: the registration scenarios are skipped (install the PyTorch "
                 "extension and PyTorch, then run the test again).")


def requiresTorch(testMethod):
    """Mark a self-test that runs the worker, which needs PyTorch: without torch it skips itself (``skipTest``).

    CTest runs each test method on its own, not through ``runTest``: ``slicer_add_python_unittest`` runs
    ``slicer.testing.runUnitTest(..., "SSMSRRegistration")`` (v5.6.2, CMake/SlicerMacroPythonTesting.cmake), which
    is ``unittest.TestLoader().loadTestsFromName`` and a ``TextTestRunner`` (Base/Python/slicer/testing.py), so each
    ``test_*`` method is a test case of its own, with ``setUp`` before it. The extension build machines have no
    torch. The check is made when the test runs (not at import), so a torch installed later counts.
    """
    @functools.wraps(testMethod)
    def test(self, *args, **kwargs):
        if not torchFound():
            self.skipTest(TORCH_MISSING)
        return testMethod(self, *args, **kwargs)

    test.requiresTorch = True
    return test


def needsTorch(testMethod) -> bool:
    return getattr(testMethod, "requiresTorch", False)


class SSMSRRegistrationTest(ScriptedLoadableModuleTest):
    """Runs the scenarios shared with the pytest suite (``SSMSRRegistrationLib.testing.scenarios``) inside Slicer.

    ``ScriptedLoadableModuleTest`` is a ``unittest.TestCase`` (v5.6.2 and v5.10.0,
    Base/Python/slicer/ScriptedLoadableModule.py); the module's Test button calls :meth:`runTest`, CTest runs each
    ``test_*`` method on its own (see :func:`requiresTorch`). Both decide with the same ``torchFound()``.
    """

    #: Short schedules keep the self-test under a few minutes on a CPU.
    STEPS_PER_SCALE = 80

    #: The tests, in the order runTest runs them.
    TEST_NAMES = ("test_ApplyButtonSaysWhatIsMissing", "test_RealEchocardiogramPair", "test_SegmentationPropagation",
                  "test_CancelLeavesSceneUnchanged", "test_WorkerErrorReachesUser", "test_AtlasSelection")

    def setUp(self):
        # A test run on its own that needs torch skips before touching the scene (unittest counts a SkipTest
        # raised in setUp as a skip).
        if needsTorch(getattr(self, self._testMethodName, None)) and not torchFound():
            self.skipTest(TORCH_MISSING)
        slicer.mrmlScene.Clear()

    def runTest(self):
        skipped = [name for name in self.TEST_NAMES if needsTorch(getattr(self, name)) and not torchFound()]
        if skipped:
            self.delayDisplay(TORCH_MISSING)
        for name in self.TEST_NAMES:
            if name not in skipped:
                self.setUp()
                getattr(self, name)()

    def _registrationLogic(self):
        return slicer.util.getModuleLogic("SSMSRRegistration").registration

    def _echoPair(self):
        from SSMSRRegistrationLib.testing import scene_helpers

        (fixedFrame, movingFrame), spacingMm = scene_helpers.echocardiogramFrames()
        geometry = dict(spacing=(spacingMm, spacingMm, 1.0), origin=(12.0, -40.0, 25.0),
                        directions=scene_helpers.OBLIQUE_DIRECTIONS)
        return (scene_helpers.addVolumeFromArray(slicer.mrmlScene, fixedFrame, "echo frame 0", **geometry),
                scene_helpers.addVolumeFromArray(slicer.mrmlScene, movingFrame, "echo frame 20", **geometry))

    def test_ApplyButtonSaysWhatIsMissing(self):
        widget = slicer.modules.ssmsrregistration.widgetRepresentation().self()
        parameterNode = widget.logic.getParameterNode()
        parameterNode.fixedVolume = None
        parameterNode.movingVolume = None
        self.assertFalse(widget.ui.applyButton.enabled)
        self.assertIn("Select a fixed volume", widget.ui.applyButton.toolTip)
        fixed, moving = self._echoPair()
        parameterNode.fixedVolume = fixed
        parameterNode.movingVolume = moving
        self.assertTrue(widget.ui.applyButton.enabled)
        self.assertTrue(widget.ui.advancedCollapsibleButton.collapsed)

    @requiresTorch
    def test_RealEchocardiogramPair(self):
        from SSMSRRegistrationLib.testing import scenarios

        measures = scenarios.runRealPairScenario(self._registrationLogic(), *self._echoPair(),
                                                 steps=self.STEPS_PER_SCALE)
        self.delayDisplay(f"Real echocardiogram pair: {measures}")

    @requiresTorch
    def test_SegmentationPropagation(self):
        from SSMSRRegistrationLib.testing import scenarios, scene_helpers

        (fixedFrame,), spacingMm = scene_helpers.echocardiogramFrames(frameIndices=(0,))
        fixed = scene_helpers.addVolumeFromArray(slicer.mrmlScene, fixedFrame, "echo frame 0",
                                                 (spacingMm, spacingMm, 1.0), (5.0, 8.0, -3.0),
                                                 scene_helpers.rotationMatrix("y", 30.0))
        measures = scenarios.runSegmentationPropagationScenario(
            self._registrationLogic(), fixed, scene_helpers.echocardiogramLabels(fixedFrame), amplitudeMm=3.0,
            wavelengthMm=80.0, steps=self.STEPS_PER_SCALE)
        self.delayDisplay(f"Segmentation propagation: Dice {measures['diceBefore']:.3f} -> {measures['diceAfter']:.3f}")

    @requiresTorch
    def test_CancelLeavesSceneUnchanged(self):
        from SSMSRRegistrationLib.testing import scenarios

        measures = scenarios.runCancelScenario(self._registrationLogic(), *self._echoPair())
        self.delayDisplay(f"Cancelled in {measures['cancelSeconds']:.2f} s")

    @requiresTorch
    def test_WorkerErrorReachesUser(self):
        from SSMSRRegistrationLib.testing import scenarios

        message = scenarios.runWorkerErrorScenario(self._registrationLogic(), *self._echoPair())
        self.assertIn("mask is empty", message)

    @requiresTorch
    def test_AtlasSelection(self):
        from SSMSRRegistrationLib.testing import scenarios, scene_helpers

        frames, spacingMm = scene_helpers.echocardiogramFrames(frameIndices=(0, 10, 20))
        reference = scene_helpers.addVolumeFromArray(slicer.mrmlScene, frames[0], "echo frame 0",
                                                     (spacingMm, spacingMm, 1.0), (5.0, 8.0, -3.0),
                                                     scene_helpers.rotationMatrix("y", 30.0))
        others = [(frame, scene_helpers.echocardiogramLabels(frame)) for frame in frames[1:]]
        measures = scenarios.runAtlasSegmentationScenario(
            self._registrationLogic(), reference, scene_helpers.echocardiogramLabels(frames[0]), others,
            amplitudeMm=3.0, wavelengthMm=80.0, steps=self.STEPS_PER_SCALE)
        self.delayDisplay(f"Atlas selection: Dice {measures['diceBefore']:.3f} -> {measures['diceAfter']:.3f}")
