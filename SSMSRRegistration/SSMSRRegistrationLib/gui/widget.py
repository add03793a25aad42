"""The module panel: wires the .ui's Qt widgets to the parameter node, to ``panel`` (the panel's rules) and to the
logic. No computation and no decision happens here that ``panel`` could make."""

import logging
from typing import Optional

import ctk
import qt
import slicer
import vtk
from slicer.i18n import tr as _
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleWidget
from slicer.util import VTKObservationMixin

from ..common.presets import PRESETS
from ..mrml.jobs import JobState
from ..mrml.parameters import SCALE_PRESETS, atlasVolumeNode
from . import panel
from .module_logic import SSMSRRegistrationLogic
from .parameter_node import boundWidgets
from .torch_status import torchFound



class SSMSRRegistrationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel: inputs, outputs, budget, Apply/Cancel, progress and log."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._parameterNodeShown = False  # the widgets connected to the parameter node and observing it
        self._gpuDevicesListed = False
        self._logLinesShown = 0
        self._run = None  # the panel_runs.PanelRun last started from this panel

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SSMSRRegistration.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        self._boundWidgets = boundWidgets(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SSMSRRegistrationLogic()

        for preset in PRESETS.values():
            self.ui.presetComboBox.addItem(preset.name.capitalize(), preset.name)
            self.ui.presetComboBox.setItemData(self.ui.presetComboBox.count - 1, preset.summary, qt.Qt.ToolTipRole)
        for schedule in SCALE_PRESETS:
            self.ui.scalePresetComboBox.addItem(schedule, schedule)
        self.ui.scalePresetComboBox.addItem(_("Custom"), "")
        for label, alignment in ((_("Automatic (affine for 3D)"), "auto"), (_("None"), "none"), (_("Rigid"), "rigid"),
                                 (_("Affine"), "affine")):
            self.ui.alignFirstComboBox.addItem(label, alignment)
        self.ui.deviceComboBox.addItem(_("Automatic (GPU if available)"), "auto")
        self.ui.deviceComboBox.addItem(_("CPU"), "cpu")
        self.ui.progressBar.setVisible(False)
        self.ui.modelPathLineEdit.filters = ctk.ctkPathLineEdit.Files | ctk.ctkPathLineEdit.Readable
        self.ui.modelPathLineEdit.nameFilters = [_("SSMSR models (*.pt *.pth)"), _("All files (*)")]

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.presetComboBox.connect("activated(int)", self.onPresetActivated)
        self.ui.scalePresetComboBox.connect("activated(int)", self.onScalePresetActivated)
        self.ui.scalesLineEdit.connect("textChanged(QString)", self.updateScalePresetFromText)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.alignFirstComboBox.connect("currentIndexChanged(int)", self.onAlignFirstChanged)
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
        """Only disconnect the widgets, as Slicer's scripted-module template does (v5.6.2,
        Utilities/Templates/Modules/Scripted/TemplateKey.py): the parameter node stays, and a running job still
        completes with the parameter node it started from (``panel_runs.PanelRun``, driven by the module logic)."""
        self._disconnectParameterNode()

    def onSceneStartClose(self, caller, event) -> None:
        self.logic.cancel()  # the nodes of a running job are about to disappear
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.fixedVolume:
            self._parameterNode.fixedVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def _disconnectParameterNode(self) -> None:
        """Stop showing the parameter node, once (``removeObserver`` warns about an observer it does not have:
        v5.6.2 Base/Python/slicer/util.py, VTKObservationMixin)."""
        if self._parameterNode and self._parameterNodeShown:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNodeShown = False

    def setParameterNode(self, parameterNode) -> None:
        self._disconnectParameterNode()
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectParametersToGui(self._boundWidgets)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
            self._parameterNodeShown = True
        self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self, caller=None, event=None) -> None:
        """Record the user's edits of run options and show the current kind's values (``panel.reconcile``: the
        parameter node holds the preset and the overrides), then show what the parameter node wrapper does not bind:
        device, preset, atlases, mode and Apply."""
        if self._parameterNode is None:
            return
        changes = panel.reconcile(self._parameterNode)
        if changes:
            self._setParameters(changes)  # its ModifiedEvent shows the result
            return
        self._selectDevice(self._parameterNode.device)
        wasBlocked = self.ui.alignFirstComboBox.blockSignals(True)
        self.ui.alignFirstComboBox.currentIndex = max(
            self.ui.alignFirstComboBox.findData(self._parameterNode.alignFirst), 0)
        self.ui.alignFirstComboBox.blockSignals(wasBlocked)
        self.updateScalePresetFromText(self._parameterNode.scales)
        self.ui.presetComboBox.currentIndex = self.ui.presetComboBox.findData(panel.presetOf(self._parameterNode))
        self.ui.presetComboBox.toolTip = panel.presetDescription(self._parameterNode)
        if self.ui.modelPathLineEdit.currentPath != self._parameterNode.modelFile:
            wasBlocked = self.ui.modelPathLineEdit.blockSignals(True)
            self.ui.modelPathLineEdit.currentPath = self._parameterNode.modelFile
            self.ui.modelPathLineEdit.blockSignals(wasBlocked)
        self._showAtlasChecks()
        self._showMode(panel.mode(self._parameterNode))
        self._updateApplyButton()

    def _showMode(self, currentMode: str) -> None:
        """Atlas mode: the fixed volume is the one to segment, pair-only widgets hidden. Cine mode: only the cine,
        an optional mask, the reference frame, a segmentation drawn on it and the pairs per step."""
        for name in ("movingVolumeLabel", "movingVolumeSelector", "outputTransformLabel", "outputTransformSelector", "outputVolumeLabel", "outputVolumeSelector",
                     "jacobianVolumeLabel", "jacobianVolumeSelector", "alignFirstLabel", "alignFirstComboBox",
                     "initialTransformLabel", "initialTransformSelector"):
            getattr(self.ui, name).setVisible(currentMode == "pair")
        for name in ("atlasSegmentationsLabel", "atlasSegmentationsComboBox", "topKLabel", "topKSpinBox"):
            getattr(self.ui, name).setVisible(currentMode == "atlas")
        for name in ("fixedVolumeLabel", "fixedVolumeSelector", "atlasSelectionLabel", "atlasSelectionCheckBox"):
            getattr(self.ui, name).setVisible(currentMode != "cine")
        for name in ("cineLabel", "cineSelector", "batchSizeLabel", "batchSizeSpinBox", "referenceFrameLabel",
                     "referenceFrameSpinBox"):
            getattr(self.ui, name).setVisible(currentMode == "cine")
        for name in ("segmentationLabel", "segmentationSelector"):
            getattr(self.ui, name).setVisible(currentMode != "atlas")
        self.ui.segmentationLabel.text = (_("Segmentation on the reference frame:") if currentMode == "cine"
                                          else _("Segmentation to propagate:"))
        self.ui.fixedVolumeLabel.text = _("Volume to segment:") if currentMode == "atlas" else _("Fixed volume:")
        self.ui.fixedMaskLabel.text = _("Mask (on the frames):") if currentMode == "cine" else _("Fixed mask:")

    # Atlases and model -------------------------------------------------------------------------------------

    def checkedAtlases(self) -> list:
        """(source volume or None, segmentation) of each atlas segmentation referenced by the parameter node."""
        if self._parameterNode is None:
            return []
        node = self._parameterNode.parameterNode
        role = panel.ATLAS_REFERENCE_ROLE
        segmentations = [node.GetNthNodeReference(role, index) for index in range(node.GetNumberOfNodeReferences(role))]
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
            node.RemoveNodeReferenceIDs(panel.ATLAS_REFERENCE_ROLE)
            for segmentation in self.ui.atlasSegmentationsComboBox.checkedNodes():
                node.AddNodeReferenceID(panel.ATLAS_REFERENCE_ROLE, segmentation.GetID())

    def onModelPathChanged(self, path: str) -> None:
        if self._parameterNode is not None and self._parameterNode.modelFile != path:
            self._parameterNode.modelFile = path

    def _updateApplyButton(self) -> None:
        text, enabled, toolTip = panel.applyButton(self._parameterNode, self.checkedAtlases(), self.logic.isRunning)
        self.ui.applyButton.text = _("Cancel") if text == "Cancel" else _("Apply")  # literals for lupdate
        self.ui.applyButton.enabled = enabled
        self.ui.applyButton.toolTip = toolTip

    # Presets, schedules and devices ------------------------------------------------------------------------

    def _setParameters(self, values: Optional[dict]) -> None:
        if values and self._parameterNode is not None:
            with slicer.util.NodeModify(self._parameterNode.parameterNode):
                for name, value in values.items():
                    setattr(self._parameterNode, name, value)

    def onPresetActivated(self, index: int) -> None:
        name = self.ui.presetComboBox.itemData(index)
        if name and self._parameterNode is not None:
            self._setParameters(panel.presetChosen(self._parameterNode, name))

    def onScalePresetActivated(self, index: int) -> None:
        schedule = self.ui.scalePresetComboBox.itemData(index)
        if schedule:
            self._parameterNode.scales = schedule
        else:
            self.ui.scalesLineEdit.setFocus()

    def updateScalePresetFromText(self, text: str) -> None:
        index = self.ui.scalePresetComboBox.findData(text.replace(" ", ""))
        self.ui.scalePresetComboBox.currentIndex = index if index >= 0 else self.ui.scalePresetComboBox.count - 1

    def onAdvancedCollapsed(self, collapsed: bool) -> None:
        if not collapsed:
            self._listGpuDevices()

    def _listGpuDevices(self) -> None:
        """Offer each CUDA device, once PyTorch is installed (opening the panel never imports or installs it)."""
        if self._gpuDevicesListed or not torchFound():
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

    def onAlignFirstChanged(self, index: int) -> None:
        if self._parameterNode is not None:
            self._parameterNode.alignFirst = self.ui.alignFirstComboBox.itemData(index)

    def onDeviceChanged(self, index: int) -> None:
        if self._parameterNode is not None:
            self._parameterNode.device = self.ui.deviceComboBox.itemData(index)

    # Apply / Cancel ----------------------------------------------------------------------------------------

    def onApplyButton(self) -> None:
        if self.logic.isRunning:
            self.logic.cancel()
            return
        self.ui.logTextEdit.clear()
        self._logLinesShown = 0
        self.ui.progressBar.value = 0
        self.ui.progressBar.setVisible(True)
        self.ui.statusLabel.text = _("Starting...")
        try:
            # No wait cursor here: setupPyTorch may ask before installing PyTorch (and sets one while installing).
            with slicer.util.tryWithErrorDisplay(_("Failed to start.")):
                if not self.logic.setupPyTorch(askConfirmation=True):
                    self.ui.progressBar.setVisible(False)
                    self.ui.statusLabel.text = _("PyTorch is not installed; nothing was started.")
                    return
            with slicer.util.tryWithErrorDisplay(_("Failed to start."), waitCursor=True):
                _job, self._run = self.logic.runFromPanel(self._parameterNode, self.checkedAtlases(),
                                                          progressCallback=self.onProgress,
                                                          completionCallback=self.onCompleted)
        except Exception as error:  # shown by tryWithErrorDisplay; the panel must not stay in "Starting..."
            self.ui.progressBar.setVisible(False)
            self.ui.statusLabel.text = panel.failedStartStatus(error)
        finally:
            self._updateApplyButton()

    def onProgress(self, event: dict) -> None:
        percent = panel.progressPercent(event)
        if percent is not None:
            self.ui.progressBar.value = percent
        status = panel.eventStatus(event, self._run.mode if self._run is not None else "pair")
        if status is not None:
            self.ui.statusLabel.text = status
        self._showNewLogLines(self.logic.activeJob)

    def onCompleted(self, job, run) -> None:
        """The panel's own display of a run that ended (also while another module is shown). The outputs are
        already selected in the parameter node the run started from and shown (``run``, in the module logic)."""
        self._showNewLogLines(job)
        self.ui.progressBar.setVisible(False)
        self._updateApplyButton()
        self.ui.statusLabel.text = run.status
        if job.state is JobState.FAILED:
            slicer.util.errorDisplay(job.errorMessage, detailedText="\n".join(job.log))
        elif job.state is JobState.SUCCEEDED and run.mode == "atlas":
            self.ui.logCollapsibleButton.collapsed = False

    def _showNewLogLines(self, job) -> None:
        """Append the job's log lines that the log panel does not show yet."""
        if job is None:
            return
        for line in job.log[self._logLinesShown:]:
            self.ui.logTextEdit.appendPlainText(line)
        self._logLinesShown = len(job.log)
