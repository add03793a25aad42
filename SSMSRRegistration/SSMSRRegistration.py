"""SSMSR Registration: deformable registration by test-time trained multi-scale residual U-Nets, in 3D Slicer.

The computation runs in a separate PythonSlicer process (``SSMSRRegistrationLib.cli``); this file holds only the
Slicer module, the widget, a thin Slicer-side wrapper around the Qt-free ``SSMSRRegistrationLib.logic``, and the
self-test, which runs the scenarios of ``SSMSRRegistrationLib.scenarios`` shared with the pytest suite.
"""

import importlib.util
import logging
import shutil
import sys
import time
from typing import Annotated, Optional

import ctk
import qt
import slicer
import vtk
from slicer import vtkMRMLNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTransformNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from SSMSRRegistrationLib.cine_logic import CineTrackingJob, cineInputProblems
from SSMSRRegistrationLib.logic import (
    DEFAULT_SMOOTHNESS_WEIGHT,
    SCALE_PRESETS,
    AtlasSegmentationJob,
    JobState,
    RegistrationLogic,
    atlasInputProblems,
    atlasVolumeNode,
    describeProgress,
    inputProblems,
    modelFileProblems,
    overallFraction,
)
from SSMSRRegistrationLib.presets import PRESETS, budget, matching_preset

#: Milliseconds between two looks at the worker's output while a registration runs.
POLL_INTERVAL_MS = 100

#: The preset a new parameter node starts from (the command line's default is "paper").
GUI_PRESET = PRESETS["fast"]

#: Node reference role, on the module's parameter node, of each checked atlas segmentation.
ATLAS_REFERENCE_ROLE = "SSMSR.AtlasSegmentation"


#
# SSMSRRegistration
#


class SSMSRRegistration(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SSMSR Registration")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Registration")]
        self.parent.dependencies = []
        self.parent.contributors = ["SSMSR contributors"]
        self.parent.helpText = _(
            "Deformable registration of two 2D or 3D images by self-supervised, test-time trained multi-scale "
            "residual U-Nets (SSMSR). The result is a transform node holding a displacement field on the fixed "
            "image's grid: put the moving volume (or any node defined on it) under that transform to align it "
            "with the fixed volume. A segmentation of the moving image can be propagated onto the fixed image. "
            "In atlas selection mode, the atlases (segmentations with their volumes) most similar to the fixed "
            "volume by local normalized cross-correlation are registered onto it and their segments propagated. "
            "A model pretrained with `ssmsr train` can be the starting point of the test-time training. "
            "In cine tracking mode, every consecutive frame pair of a 2D+t cine (a sequence of 2D images or a volume "
            "whose third axis is time) is registered with one test-time training for the whole sequence; the fields "
            "become a sequence of transforms in the cine's sequence browser, with a metrics table and plots. "
            "The computation runs in the background with PyTorch (installed through the PyTorch extension); "
            "use a CUDA GPU for full-length schedules."
        )
        self.parent.acknowledgementText = _(
            "The method follows the SSMSR paper (self-supervised multi-scale neural registration with test-time "
            "training). PyTorch is set up through the PyTorch extension by Fernando Perez-Garcia and Andras Lasso."
        )


#
# Parameter node
#


@parameterNodeWrapper
class SSMSRRegistrationParameterNode:
    """Module state saved with the scene.

    fixedVolume, movingVolume - images to register (the moving one is aligned to the fixed one).
    fixedMask - optional volume on the fixed image; the similarity is computed where it is non-zero.
    segmentation - optional segmentation of the moving image, propagated onto the fixed image.
    outputTransform - receives the displacement field; empty: a new transform node is created.
    outputVolume - optional volume that receives the moving volume warped onto the fixed grid.
    scales - coarse-to-fine schedule, e.g. "1/4,1/2,1". stepsPerScale - training steps at each scale.
    mixedPrecision - bfloat16 convolutions where the device supports them (else float32). The preset combo box
    fills these three from ``SSMSRRegistrationLib.presets`` (a new node starts from GUI_PRESET).
    smoothnessWeight - weight of the displacement-gradient penalty. nccWindow - local NCC window in voxels
    (0: the engine's default). device - "auto", "cpu", "cuda" or "cuda:N". keepTemporaryFiles - for debugging.
    modelFile - optional model written by `ssmsr train` to start from ("": train from scratch at test time).
    atlasSelection - segment the fixed volume with the most similar atlases instead of registering a pair; the
    checked atlas segmentations are node references (role ATLAS_REFERENCE_ROLE) of the parameter node, each
    drawn on its source volume. topK - number of best-ranked atlases registered and fused by majority vote.
    cineTracking - track the motion through ``cine`` (a sequence of 2D images or a volume whose third axis is time)
    instead; fixedMask is then an optional mask on the frames. batchSize - frame pairs per training step (0: all).
    """

    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    fixedMask: vtkMRMLScalarVolumeNode
    segmentation: vtkMRMLSegmentationNode
    outputTransform: vtkMRMLTransformNode
    outputVolume: vtkMRMLScalarVolumeNode
    scales: str = GUI_PRESET.pair_scales
    stepsPerScale: Annotated[int, WithinRange(0, 100000)] = GUI_PRESET.pair_steps
    mixedPrecision: bool = GUI_PRESET.precision == "mixed"
    smoothnessWeight: Annotated[float, WithinRange(0.0, 10000.0)] = DEFAULT_SMOOTHNESS_WEIGHT
    nccWindow: Annotated[int, WithinRange(0, 99)] = 0
    device: str = "auto"
    keepTemporaryFiles: bool = False
    modelFile: str = ""
    atlasSelection: bool = False
    topK: Annotated[int, WithinRange(1, 99)] = 1
    cineTracking: bool = False
    cine: vtkMRMLNode
    batchSize: Annotated[int, WithinRange(0, 999)] = 1


#
# SSMSRRegistrationWidget
#


class SSMSRRegistrationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel: inputs, outputs, schedule, Apply/Cancel, progress and log. No computation happens here."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._gpuDevicesListed = False
        self._logLinesShown = 0

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SSMSRRegistration.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = SSMSRRegistrationLogic()

        for preset in PRESETS.values():
            self.ui.presetComboBox.addItem(preset.name.capitalize(), preset.name)
            self.ui.presetComboBox.setItemData(self.ui.presetComboBox.count - 1, preset.summary, qt.Qt.ToolTipRole)
        self.ui.presetComboBox.addItem(_("Custom"), "")
        for preset in SCALE_PRESETS:
            self.ui.scalePresetComboBox.addItem(preset, preset)
        self.ui.scalePresetComboBox.addItem(_("Custom"), "")
        self.ui.deviceComboBox.addItem(_("Automatic (GPU if available)"), "auto")
        self.ui.deviceComboBox.addItem(_("CPU"), "cpu")
        self.ui.progressBar.setVisible(False)
        self.ui.modelPathLineEdit.filters = ctk.ctkPathLineEdit.Files | ctk.ctkPathLineEdit.Readable
        self.ui.modelPathLineEdit.nameFilters = [_("SSMSR models (*.pt *.pth)"), _("All files (*)")]

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.presetComboBox.connect("activated(int)", self.onPresetActivated)
        self.ui.cineTrackingCheckBox.connect("toggled(bool)", self.onCineTrackingToggled)
        self.ui.scalePresetComboBox.connect("activated(int)", self.onScalePresetActivated)
        self.ui.scalesLineEdit.connect("textChanged(QString)", self.updateScalePresetFromText)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.advancedCollapsibleButton.connect("contentsCollapsed(bool)", self.onAdvancedCollapsed)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelPathChanged)
        self.ui.atlasSegmentationsComboBox.connect("checkedNodesChanged()", self.onAtlasesChanged)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        self.logic.cancel()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)

    def onSceneStartClose(self, caller, event) -> None:
        # The nodes of a running registration are about to disappear.
        self.logic.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.fixedVolume:
            self._parameterNode.fixedVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def setParameterNode(self, inputParameterNode: Optional[SSMSRRegistrationParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self, caller=None, event=None) -> None:
        """Update what the parameter node wrapper does not bind: device choice, scale preset and the Apply button."""
        if self._parameterNode is None:
            return
        self._selectDevice(self._parameterNode.device)
        self.updateScalePresetFromText(self._parameterNode.scales)
        self._showPreset()
        if self.ui.modelPathLineEdit.currentPath != self._parameterNode.modelFile:
            wasBlocked = self.ui.modelPathLineEdit.blockSignals(True)
            self.ui.modelPathLineEdit.currentPath = self._parameterNode.modelFile
            self.ui.modelPathLineEdit.blockSignals(wasBlocked)
        self._showAtlasChecks()
        self._showMode(self._parameterNode.atlasSelection, self._parameterNode.cineTracking)
        self._updateApplyButton()

    # Atlas selection mode and pretrained model ------------------------------------------------------------

    def _showMode(self, atlasSelection: bool, cineTracking: bool = False) -> None:
        """Atlas selection: the fixed volume is the one to segment; pair-only inputs and outputs are hidden.
        Cine tracking (takes precedence): only the cine, an optional mask and the pairs per step are shown."""
        atlasSelection = atlasSelection and not cineTracking
        for name in ("movingVolumeLabel", "movingVolumeSelector", "segmentationLabel", "segmentationSelector",
                     "outputTransformLabel", "outputTransformSelector", "outputVolumeLabel", "outputVolumeSelector"):
            getattr(self.ui, name).setVisible(not atlasSelection and not cineTracking)
        for name in ("atlasSegmentationsLabel", "atlasSegmentationsComboBox", "topKLabel", "topKSpinBox"):
            getattr(self.ui, name).setVisible(atlasSelection)
        for name in ("fixedVolumeLabel", "fixedVolumeSelector", "atlasSelectionLabel", "atlasSelectionCheckBox"):
            getattr(self.ui, name).setVisible(not cineTracking)
        for name in ("cineLabel", "cineSelector", "batchSizeLabel", "batchSizeSpinBox"):
            getattr(self.ui, name).setVisible(cineTracking)
        self.ui.fixedVolumeLabel.text = _("Volume to segment:") if atlasSelection else _("Fixed volume:")
        self.ui.fixedMaskLabel.text = _("Mask (on the frames):") if cineTracking else _("Fixed mask:")

    def checkedAtlases(self) -> list:
        """(source volume or None, segmentation) of each atlas segmentation referenced by the parameter node."""
        if self._parameterNode is None:
            return []
        node = self._parameterNode.parameterNode
        segmentations = [node.GetNthNodeReference(ATLAS_REFERENCE_ROLE, index)
                         for index in range(node.GetNumberOfNodeReferences(ATLAS_REFERENCE_ROLE))]
        return [(atlasVolumeNode(segmentation), segmentation) for segmentation in segmentations if segmentation]

    def _showAtlasChecks(self) -> None:
        checked = {segmentation.GetID() for _, segmentation in self.checkedAtlases()}
        comboBox = self.ui.atlasSegmentationsComboBox
        wasBlocked = comboBox.blockSignals(True)
        for index in range(comboBox.nodeCount()):
            node = comboBox.nodeFromIndex(index)
            comboBox.setCheckState(node, qt.Qt.Checked if node.GetID() in checked else qt.Qt.Unchecked)
        comboBox.blockSignals(wasBlocked)

    def onAtlasesChanged(self) -> None:
        if self._parameterNode is None:
            return
        node = self._parameterNode.parameterNode
        with slicer.util.NodeModify(node):
            node.RemoveNodeReferenceIDs(ATLAS_REFERENCE_ROLE)
            for segmentation in self.ui.atlasSegmentationsComboBox.checkedNodes():
                node.AddNodeReferenceID(ATLAS_REFERENCE_ROLE, segmentation.GetID())

    def onModelPathChanged(self, path: str) -> None:
        if self._parameterNode is not None and self._parameterNode.modelFile != path:
            self._parameterNode.modelFile = path

    def _updateApplyButton(self) -> None:
        if self.logic.isRunning:
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.toolTip = _("Stop the registration; nothing is added to the scene.")
            self.ui.applyButton.enabled = True
            return
        self.ui.applyButton.text = _("Apply")
        parameters = self._parameterNode
        if parameters is None:
            problems = [_("No parameter node.")]
        elif parameters.cineTracking:
            problems = cineInputProblems(parameters.cine, parameters.fixedMask, parameters.scales, parameters.device,
                                         parameters.stepsPerScale, parameters.batchSize)
            if parameters.modelFile:
                problems.append(_("Cine tracking trains from scratch; clear the pretrained model."))
        elif parameters.atlasSelection:
            problems = atlasInputProblems(parameters.fixedVolume, self.checkedAtlases(), parameters.topK,
                                          parameters.fixedMask, parameters.scales, parameters.device,
                                          parameters.modelFile)
        else:
            problems = inputProblems(parameters.fixedVolume, parameters.movingVolume, parameters.fixedMask,
                                     parameters.segmentation, parameters.outputVolume, parameters.outputTransform,
                                     parameters.scales, parameters.device) + modelFileProblems(parameters.modelFile)
        if (parameters is not None and not parameters.cineTracking and parameters.stepsPerScale == 0
                and not parameters.modelFile):
            problems.append(_("0 steps per scale (no test-time training) needs a pretrained model."))
        self.ui.applyButton.enabled = not problems
        self.ui.applyButton.toolTip = "\n".join(problems) if problems else (
            _("Track the motion through the cine in the background.") if parameters.cineTracking
            else _("Segment the volume with the most similar atlases in the background.") if parameters.atlasSelection
            else _("Register the moving volume to the fixed volume in the background."))

    # Presets, scale presets and devices ---------------------------------------------------------------------

    def _matchingPreset(self, cineTracking: bool) -> Optional[str]:
        parameters = self._parameterNode
        return matching_preset(parameters.scales, parameters.stepsPerScale,
                               "mixed" if parameters.mixedPrecision else "float32", cine=cineTracking)

    def _showPreset(self) -> None:
        name = self._matchingPreset(self._parameterNode.cineTracking) or ""
        self.ui.presetComboBox.currentIndex = self.ui.presetComboBox.findData(name)

    def _applyPreset(self, name: str, cineTracking: bool) -> None:
        plan = budget(name, cine=cineTracking)
        self._parameterNode.scales = plan.scales
        self._parameterNode.stepsPerScale = plan.steps
        self._parameterNode.mixedPrecision = plan.mixed_precision

    def onPresetActivated(self, index: int) -> None:
        name = self.ui.presetComboBox.itemData(index)
        if name and self._parameterNode is not None:
            self._applyPreset(name, self._parameterNode.cineTracking)

    def onCineTrackingToggled(self, cineTracking: bool) -> None:
        # A preset chosen for the other mode follows the mode (a cine has its own schedule).
        if self._parameterNode is not None:
            name = self._matchingPreset(not cineTracking)
            if name:
                self._applyPreset(name, cineTracking)

    def onScalePresetActivated(self, index: int) -> None:
        preset = self.ui.scalePresetComboBox.itemData(index)
        if preset:
            self._parameterNode.scales = preset
        else:
            self.ui.scalesLineEdit.setFocus()

    def updateScalePresetFromText(self, text: str) -> None:
        presetIndex = self.ui.scalePresetComboBox.findData(text.replace(" ", ""))
        customIndex = self.ui.scalePresetComboBox.count - 1
        self.ui.scalePresetComboBox.currentIndex = presetIndex if presetIndex >= 0 else customIndex

    def onAdvancedCollapsed(self, collapsed: bool) -> None:
        if not collapsed:
            self._listGpuDevices()

    def _listGpuDevices(self) -> None:
        """Offer each CUDA device. Only done when the advanced settings are opened and PyTorch is already installed,
        so that opening the module never imports or installs PyTorch."""
        if self._gpuDevicesListed or importlib.util.find_spec("torch") is None:
            return
        self._gpuDevicesListed = True
        try:
            import torch

            deviceNames = [torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())]
        except Exception as error:  # a broken PyTorch install must not break the panel
            logging.warning(f"Could not list CUDA devices: {error}")
            return
        for index, name in enumerate(deviceNames):
            if self.ui.deviceComboBox.findData(f"cuda:{index}") < 0:
                self.ui.deviceComboBox.addItem(_("GPU {index}: {name}").format(index=index, name=name), f"cuda:{index}")
        self._selectDevice(self._parameterNode.device if self._parameterNode else "auto")

    def _selectDevice(self, device: str) -> None:
        index = self.ui.deviceComboBox.findData(device)
        if index < 0:  # e.g. a scene saved on a machine with a GPU
            self.ui.deviceComboBox.addItem(device, device)
            index = self.ui.deviceComboBox.findData(device)
        wasBlocked = self.ui.deviceComboBox.blockSignals(True)
        self.ui.deviceComboBox.currentIndex = index
        self.ui.deviceComboBox.blockSignals(wasBlocked)

    def onDeviceChanged(self, index: int) -> None:
        if self._parameterNode is not None:
            self._parameterNode.device = self.ui.deviceComboBox.itemData(index)

    # Apply / Cancel ----------------------------------------------------------------------------------------

    def onApplyButton(self) -> None:
        if self.logic.isRunning:
            self.logic.cancel()
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start the registration."), waitCursor=True):
            if not self.logic.setupPyTorch(askConfirmation=True):
                self.ui.statusLabel.text = _("PyTorch is not installed; the registration was not started.")
                return
            parameters = self._parameterNode
            self.ui.logTextEdit.clear()
            self._logLinesShown = 0
            self.ui.progressBar.value = 0
            self.ui.progressBar.setVisible(True)
            self.ui.statusLabel.text = _("Starting...")
            common = dict(scales=parameters.scales, stepsPerScale=parameters.stepsPerScale,
                          precision="mixed" if parameters.mixedPrecision else "float32",
                          smoothnessWeight=parameters.smoothnessWeight, nccWindow=parameters.nccWindow or None,
                          device=parameters.device, keepTemporaryFiles=parameters.keepTemporaryFiles,
                          waitForCompletion=False, progressCallback=self.onRegistrationProgress,
                          completionCallback=self.onRegistrationCompleted)
            if parameters.cineTracking:
                self.logic.trackSequence(parameters.cine, maskNode=parameters.fixedMask,
                                         batchSize=parameters.batchSize, **common)
                self._updateApplyButton()
                return
            common["modelFile"] = parameters.modelFile or None
            if parameters.atlasSelection:
                self.logic.segmentWithAtlases(parameters.fixedVolume, self.checkedAtlases(), topK=parameters.topK,
                                              fixedMaskNode=parameters.fixedMask, **common)
            else:
                self.logic.registerVolumes(
                    parameters.fixedVolume, parameters.movingVolume, outputTransformNode=parameters.outputTransform,
                    fixedMaskNode=parameters.fixedMask, segmentationNode=parameters.segmentation,
                    outputVolumeNode=parameters.outputVolume, **common)
        self._updateApplyButton()

    def onRegistrationProgress(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "progress":
            self.ui.progressBar.value = int(round(100 * overallFraction(event)))
            self.ui.statusLabel.text = describeProgress(event)
        elif kind == "started" and "pairs" in event:
            self.ui.statusLabel.text = _("Tracking {pairs} frame pairs on {device}...").format(
                pairs=event.get("pairs", "?"), device=event.get("device", "?"))
        elif kind == "started":
            self.ui.statusLabel.text = _("Registering on {device}...").format(device=event.get("device", "?"))
        elif kind == "atlas":
            self.ui.statusLabel.text = _("Registering atlas {number} of {count}: {name}...").format(
                number=int(event.get("index", 0)) + 1, count=event.get("count", "?"), name=event.get("atlasName", "?"))
        self._showNewLogLines(self.logic.activeJob)

    def onRegistrationCompleted(self, job) -> None:
        self._showNewLogLines(job)
        self.ui.progressBar.setVisible(False)
        self._updateApplyButton()
        if job.state is JobState.SUCCEEDED and isinstance(job, CineTrackingJob):
            self.ui.statusLabel.text = _("Done in {seconds:.0f} s: transforms '{name}' in the browser '{browser}'; mean "
                                         "MSE {mseBefore:.4g} -> {mseAfter:.4g}, NLCC {nlccBefore:.3f} -> "
                                         "{nlccAfter:.3f}.").format(
                seconds=time.monotonic() - job.startTime, name=job.transformSequenceNode.GetName(),
                browser=job.browserNode.GetName(), mseBefore=job.metrics.get("mse_before", float("nan")),
                mseAfter=job.metrics.get("mse_after", float("nan")),
                nlccBefore=job.metrics.get("ncc_before", float("nan")), nlccAfter=job.metrics.get("ncc_after", float("nan")))
            self._showTrackingResults(job)
        elif job.state is JobState.SUCCEEDED and isinstance(job, AtlasSegmentationJob):
            best = job.ranking[0] if job.ranking else {}
            self.ui.statusLabel.text = _("Done in {seconds:.0f} s: segmentation '{name}' from {count} atlas(es); best "
                                         "atlas '{atlas}' (NLCC {nlcc:.3f}). The ranking is in the log.").format(
                seconds=time.monotonic() - job.startTime, name=job.outputSegmentationNode.GetName(),
                count=job.parameters["topK"], atlas=best.get("atlasName", "?"), nlcc=best.get("nlcc", float("nan")))
            self.ui.logCollapsibleButton.collapsed = False
        elif job.state is JobState.SUCCEEDED:
            self._parameterNode.outputTransform = job.outputTransformNode
            self.ui.statusLabel.text = _("Done in {seconds:.0f} s. Put the moving volume under the transform '{name}' "
                                         "to see it aligned.").format(seconds=time.monotonic() - job.startTime,
                                                                     name=job.outputTransformNode.GetName())
            if job.outputVolumeNode is not None:
                slicer.util.setSliceViewerLayers(background=job.fixedVolumeNode, foreground=job.outputVolumeNode,
                                                 foregroundOpacity=0.5, fit=True)
        elif job.state is JobState.CANCELLED:
            self.ui.statusLabel.text = _("Cancelled; the scene was not changed.")
        else:
            self.ui.statusLabel.text = _("Failed; see the log.")
            slicer.util.errorDisplay(job.errorMessage, detailedText="\n".join(job.log))

    def _showTrackingResults(self, job) -> None:
        """Show the metrics table and the NLCC chart (the MSE chart is in the scene too) in a plot + table layout."""
        layoutManager = slicer.app.layoutManager()
        if layoutManager is None:
            return
        layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpPlotTableView)
        applicationLogic = slicer.app.applicationLogic()
        applicationLogic.GetSelectionNode().SetActiveTableID(job.metricsTableNode.GetID())
        applicationLogic.PropagateTableSelection()
        slicer.modules.plots.logic().ShowChartInLayout(job.chartNodes["nlcc"])

    def _showNewLogLines(self, job) -> None:
        """Append the job's log lines that the log panel does not show yet."""
        if job is None:
            return
        for line in job.log[self._logLinesShown:]:
            self.ui.logTextEdit.appendPlainText(line)
        self._logLinesShown = len(job.log)


#
# SSMSRRegistrationLogic
#


def pythonSlicerExecutable() -> str:
    """Slicer's command-line Python interpreter (PythonSlicer), which runs the worker."""
    return shutil.which("PythonSlicer") or sys.executable


class SSMSRRegistrationLogic(ScriptedLoadableModuleLogic):
    """Slicer-side logic: the module's parameter node, PyTorch set-up, and a QTimer that drives background jobs.

    The registration itself is ``self.registration``, a Qt-free ``SSMSRRegistrationLib.logic.RegistrationLogic``
    on ``slicer.mrmlScene``. From the Python console::

        logic = slicer.util.getModuleLogic("SSMSRRegistration")
        transformNode = logic.registerVolumes(fixedVolumeNode, movingVolumeNode, stepsPerScale=500)
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.registration = RegistrationLogic(slicer.mrmlScene, pythonExecutable=pythonSlicerExecutable(),
                                              temporaryDirectoryRoot=slicer.app.temporaryPath)
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(POLL_INTERVAL_MS)
        self._pollTimer.connect("timeout()", self._pollBackgroundJob)
        self._backgroundJob = None
        self._completionCallback = None
        sequences = getattr(slicer.modules, "sequences", None)
        if sequences is not None:  # creates the proxy (glyph display) of a new transform sequence at once
            self.registration.sequencesLogic = sequences.logic()

    def getParameterNode(self):
        return SSMSRRegistrationParameterNode(super().getParameterNode())

    @property
    def activeJob(self):
        return self.registration.activeJob

    @property
    def isRunning(self) -> bool:
        return self.registration.activeJob is not None

    def registerVolumes(self, *args, completionCallback=None, waitForCompletion=True, **kwargs):
        """Same as ``RegistrationLogic.registerVolumes``. With ``waitForCompletion=False`` the job runs in the
        background, driven by a QTimer, and ``completionCallback(job)`` is called when it ends."""
        result = self.registration.registerVolumes(*args, waitForCompletion=waitForCompletion, **kwargs)
        return self._driveInBackground(result, waitForCompletion, completionCallback)

    def segmentWithAtlases(self, *args, completionCallback=None, waitForCompletion=True, **kwargs):
        """Same as ``RegistrationLogic.segmentWithAtlases``, run in the background like :meth:`registerVolumes`."""
        result = self.registration.segmentWithAtlases(*args, waitForCompletion=waitForCompletion, **kwargs)
        return self._driveInBackground(result, waitForCompletion, completionCallback)

    def trackSequence(self, *args, completionCallback=None, waitForCompletion=True, **kwargs):
        """Same as ``RegistrationLogic.trackSequence`` (cine tracking), run in the background like
        :meth:`registerVolumes`."""
        result = self.registration.trackSequence(*args, waitForCompletion=waitForCompletion, **kwargs)
        return self._driveInBackground(result, waitForCompletion, completionCallback)

    def _driveInBackground(self, result, waitForCompletion: bool, completionCallback):
        if not waitForCompletion:
            self._backgroundJob = result
            self._completionCallback = completionCallback
            self._pollTimer.start()
        return result

    def cancel(self) -> None:
        """Cancel the running registration (the process tree ends within about two seconds)."""
        self.registration.cancel()
        self._pollBackgroundJob()

    def _pollBackgroundJob(self) -> None:
        job = self._backgroundJob
        if job is None:
            self._pollTimer.stop()
            return
        job.poll()
        if job.isDone:
            self._pollTimer.stop()
            self._backgroundJob = None
            callback, self._completionCallback = self._completionCallback, None
            if callback is not None:
                callback(job)

    def setupPyTorch(self, askConfirmation: bool = True) -> bool:
        """Make sure PyTorch is installed in Slicer's Python, through the PyTorch extension's PyTorchUtils.

        Asks the user before installing (unless ``askConfirmation`` is False). Returns False if the user declined.
        Raises RuntimeError with instructions if the PyTorch extension is missing.
        """
        try:
            import PyTorchUtils
        except ModuleNotFoundError:
            raise RuntimeError(_("SSMSR Registration needs the PyTorch extension. Install 'PyTorch' from the "
                                 "Extensions Manager, restart Slicer, and click Apply again.")) from None
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if torchLogic.torchInstalled():
            return True
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                _("SSMSR Registration needs PyTorch, which is not installed yet. Download and install it now? "
                  "This can take several minutes; the PyTorch build matching your GPU is chosen automatically.")):
            return False
        with slicer.util.WaitCursor():
            torch = torchLogic.installTorch(askConfirmation=False)
        if torch is None:
            raise RuntimeError(_("PyTorch could not be installed. Install it from the PyTorch Utils module and "
                                 "try again."))
        return True


#
# SSMSRRegistrationTest
#


class SSMSRRegistrationTest(ScriptedLoadableModuleTest):
    """Runs the scenarios shared with the pytest suite (``SSMSRRegistrationLib.scenarios``) inside Slicer."""

    #: Short schedules keep the self-test under a few minutes on a CPU.
    STEPS_PER_SCALE = 80

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_ApplyButtonSaysWhatIsMissing()
        self.setUp()
        self.test_RealEchocardiogramPair()
        self.setUp()
        self.test_SegmentationPropagation()
        self.setUp()
        self.test_CancelLeavesSceneUnchanged()
        self.setUp()
        self.test_WorkerErrorReachesUser()
        self.setUp()
        self.test_AtlasSelection()

    def _registrationLogic(self) -> RegistrationLogic:
        logic = SSMSRRegistrationLogic()
        self.assertTrue(logic.setupPyTorch(askConfirmation=False))
        return logic.registration

    def _echoPair(self):
        from SSMSRRegistrationLib import scenarios

        (fixedFrame, movingFrame), spacingMm = scenarios.echocardiogramFrames()
        geometry = dict(spacing=(spacingMm, spacingMm, 1.0), origin=(12.0, -40.0, 25.0),
                        directions=scenarios.OBLIQUE_DIRECTIONS)
        return (scenarios.addVolumeFromArray(slicer.mrmlScene, fixedFrame, "echo frame 0", **geometry),
                scenarios.addVolumeFromArray(slicer.mrmlScene, movingFrame, "echo frame 20", **geometry))

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

    def test_RealEchocardiogramPair(self):
        from SSMSRRegistrationLib import scenarios

        measures = scenarios.runRealPairScenario(self._registrationLogic(), *self._echoPair(), stepsPerScale=self.STEPS_PER_SCALE)
        self.delayDisplay(f"Real echocardiogram pair: {measures}")

    def test_SegmentationPropagation(self):
        from SSMSRRegistrationLib import scenarios

        (fixedFrame,), spacingMm = scenarios.echocardiogramFrames(frameIndices=(0,))
        fixed = scenarios.addVolumeFromArray(slicer.mrmlScene, fixedFrame, "echo frame 0", (spacingMm, spacingMm, 1.0),
                                             (5.0, 8.0, -3.0), scenarios.rotationMatrix("y", 30.0))
        measures = scenarios.runSegmentationPropagationScenario(
            self._registrationLogic(), fixed, scenarios.echocardiogramLabels(fixedFrame), amplitudeMm=3.0,
            wavelengthMm=80.0, stepsPerScale=self.STEPS_PER_SCALE)
        self.delayDisplay(f"Segmentation propagation: Dice {measures['diceBefore']:.3f} -> {measures['diceAfter']:.3f}")

    def test_CancelLeavesSceneUnchanged(self):
        from SSMSRRegistrationLib import scenarios

        measures = scenarios.runCancelScenario(self._registrationLogic(), *self._echoPair())
        self.delayDisplay(f"Cancelled in {measures['cancelSeconds']:.2f} s")

    def test_WorkerErrorReachesUser(self):
        from SSMSRRegistrationLib import scenarios

        message = scenarios.runWorkerErrorScenario(self._registrationLogic(), *self._echoPair())
        self.assertIn("mask is empty", message)

    def test_AtlasSelection(self):
        from SSMSRRegistrationLib import scenarios

        frames, spacingMm = scenarios.echocardiogramFrames(frameIndices=(0, 10, 20))
        reference = scenarios.addVolumeFromArray(slicer.mrmlScene, frames[0], "echo frame 0", (spacingMm, spacingMm, 1.0),
                                                 (5.0, 8.0, -3.0), scenarios.rotationMatrix("y", 30.0))
        others = [(frame, scenarios.echocardiogramLabels(frame)) for frame in frames[1:]]
        measures = scenarios.runAtlasSegmentationScenario(
            self._registrationLogic(), reference, scenarios.echocardiogramLabels(frames[0]), others, amplitudeMm=3.0,
            wavelengthMm=80.0, stepsPerScale=self.STEPS_PER_SCALE)
        self.delayDisplay(f"Atlas selection: Dice {measures['diceBefore']:.3f} -> {measures['diceAfter']:.3f}")
