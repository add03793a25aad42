"""Slicer as it really runs: the self-test on a build machine without torch, the oldest torch the engine meets
(2.2, macOS x86_64), a job that ends while another module is shown, PyTorch set-up that never upgrades, and the
strings the panel hands to Slicer's translation.

Facts about Slicer used here come from its source (``fetch github:Slicer/Slicer``), cited at each test.
"""

import ast
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="the slicer-core wheel (real MRML) is needed")

from SSMSRRegistrationLib.common.presets import DEFAULT_PRESET, PRESETS  # noqa: E402
from SSMSRRegistrationLib.gui import panel, panel_runs, torch_status  # noqa: E402
from SSMSRRegistrationLib.gui.torch_status import TorchAction, torchSetupAction  # noqa: E402
from SSMSRRegistrationLib.logic import JobState, RegistrationLogic  # noqa: E402
from SSMSRRegistrationLib.testing import scene_helpers  # noqa: E402

MODULE_DIRECTORY = Path(__file__).resolve().parents[2] / "SSMSRRegistration"
FAKE_WORKER = Path(__file__).with_name("fake_worker.py")

# ---------------------------------------------------------------------------------------------------------------
# Item: the self-test on a machine without torch, run as CTest runs it

#: Runs in a fresh interpreter: torch made unimportable, then the module file loaded and its tests run as Slicer's
#: ``slicer.testing.runUnitTest`` runs them. Prints a JSON summary on its last line.
NO_TORCH_RUNNER = textwrap.dedent('''
    import importlib.util, io, json, logging, sys, types, unittest

    sys.modules["torch"] = None  # "import torch" raises ImportError; importlib.util.find_spec("torch") is None
    assert importlib.util.find_spec("torch") is None
    sys.path.insert(0, sys.argv[1])

    import slicer  # the slicer-core wheel: real MRML, no application

    # What the module file needs beyond slicer-core, as stand-ins:
    # - slicer.app: only its version is read at import (the real one is the Qt application).
    slicer.app = types.SimpleNamespace(majorVersion=5, minorVersion=6)
    # - slicer.mrmlScene: the application's scene; the self-test's setUp clears it.
    slicer.mrmlScene = slicer.vtkMRMLScene()
    # - slicer.i18n: tr/translate return the text (the real ones ask slicer.app.translate; v5.6.2
    #   Base/Python/slicer/i18n.py).
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    sys.modules["slicer.i18n"] = slicer.i18n = i18n
    # - slicer.ScriptedLoadableModule: ScriptedLoadableModuleTest is a unittest.TestCase with no setUp of its own
    #   and a runTest that only warns (v5.6.2 Base/Python/slicer/ScriptedLoadableModule.py, "class
    #   ScriptedLoadableModuleTest(unittest.TestCase)"; v5.10.0 adds a setUp and tearDown that do nothing);
    #   delayDisplay shows a message (recorded here). ScriptedLoadableModule keeps its parent.
    slm = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    messages = []

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, requestedDelay=None, msec=None):
            messages.append(message)

        def runTest(self):
            logging.warning("No test is defined in " + self.__class__.__name__)

    slm.ScriptedLoadableModule = ScriptedLoadableModule
    slm.ScriptedLoadableModuleTest = ScriptedLoadableModuleTest
    sys.modules["slicer.ScriptedLoadableModule"] = slicer.ScriptedLoadableModule = slm
    # - the panel's Qt modules (qt, ctk and the application's widgets are not in the test environment); the module
    #   file only names their classes.
    for name, className in (("module_logic", "SSMSRRegistrationLogic"), ("widget", "SSMSRRegistrationWidget")):
        stand_in = types.ModuleType("SSMSRRegistrationLib.gui." + name)
        setattr(stand_in, className, type(className, (), {}))
        sys.modules[stand_in.__name__] = stand_in

    # As slicer.testing.runUnitTest (v5.6.2 Base/Python/slicer/testing.py) for slicer_add_python_unittest's
    # "SSMSRRegistration" (CMake/SlicerMacroPythonTesting.cmake): loadTestsFromName, then a TextTestRunner.
    def run(name):
        suite = unittest.TestLoader().loadTestsFromName(name)
        result = unittest.TextTestRunner(verbosity=0, stream=io.StringIO()).run(suite)
        return {"run": result.testsRun,
                "skipped": {test.id().split(".")[-1]: reason for test, reason in result.skipped},
                "errors": [test.id().split(".")[-1] for test, _ in result.errors],
                "failures": [test.id().split(".")[-1] for test, _ in result.failures]}

    summary = {"module": run("SSMSRRegistration")}
    import SSMSRRegistration
    summary["each"] = {name: run("SSMSRRegistration.SSMSRRegistrationTest." + name)
                       for name in SSMSRRegistration.SSMSRRegistrationTest.TEST_NAMES}

    # runTest (the module's Test button): the tests that need torch are not called, the others are.
    called = []

    class Recorded(SSMSRRegistration.SSMSRRegistrationTest):
        pass

    for name in SSMSRRegistration.SSMSRRegistrationTest.TEST_NAMES:
        original = getattr(SSMSRRegistration.SSMSRRegistrationTest, name)
        setattr(Recorded, name, (lambda name, original: SSMSRRegistration.functools.wraps(original)(
            lambda self: called.append(name)))(name, original))
    messages.clear()
    Recorded().runTest()
    summary["runTest"] = {"called": called, "messages": list(messages)}
    summary["needsTorch"] = [name for name in SSMSRRegistration.SSMSRRegistrationTest.TEST_NAMES
                             if SSMSRRegistration.needsTorch(getattr(SSMSRRegistration.SSMSRRegistrationTest, name))]
    print(json.dumps(summary))
''')

TORCH_TESTS = {"test_RealEchocardiogramPair", "test_SegmentationPropagation", "test_CancelLeavesSceneUnchanged",
               "test_WorkerErrorReachesUser", "test_AtlasSelection"}


@pytest.fixture(scope="module")
def noTorchSelfTest():
    completed = subprocess.run([sys.executable, "-c", NO_TORCH_RUNNER, str(MODULE_DIRECTORY)], capture_output=True,
                               text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_without_torch_every_self_test_that_runs_the_worker_skips_itself_when_ctest_runs_it(noTorchSelfTest):
    """CTest: ``slicer_add_python_unittest(SCRIPT SSMSRRegistration.py)`` runs ``slicer.testing.runUnitTest(...,
    'SSMSRRegistration')`` (v5.6.2 CMake/SlicerMacroPythonTesting.cmake), i.e. ``loadTestsFromName`` on the module
    (v5.6.2 Base/Python/slicer/testing.py): each test method is its own test case, runTest is not called."""
    assert set(noTorchSelfTest["needsTorch"]) == TORCH_TESTS
    whole = noTorchSelfTest["module"]
    assert set(whole["skipped"]) == TORCH_TESTS
    assert all("PyTorch is not installed" in reason for reason in whole["skipped"].values())
    assert not TORCH_TESTS & set(whole["errors"] + whole["failures"])
    # The test that needs no torch runs (it needs the real panel, which this stand-in lacks, so it errors here).
    assert "test_ApplyButtonSaysWhatIsMissing" not in whole["skipped"]
    for name, result in noTorchSelfTest["each"].items():
        assert result["run"] == 1, name
        if name in TORCH_TESTS:
            assert list(result["skipped"]) == [name] and not result["errors"] and not result["failures"], result
        else:
            assert not result["skipped"], result


def test_without_torch_the_test_button_runs_only_the_tests_that_need_no_torch(noTorchSelfTest):
    ran = noTorchSelfTest["runTest"]
    assert ran["called"] == ["test_ApplyButtonSaysWhatIsMissing"]
    assert any("PyTorch is not installed" in message for message in ran["messages"])


def test_torch_detection_is_one_check_that_follows_the_path(monkeypatch):
    pytest.importorskip("torch")
    assert torch_status.torchFound()
    monkeypatch.setitem(sys.modules, "torch", None)
    assert not torch_status.torchFound()


# ---------------------------------------------------------------------------------------------------------------
# Item: torch 2.2 (the last PyTorch for x86_64 macOS, which Slicer's macOS packages are)


def test_the_minimum_torch_is_2_2():
    assert panel.MINIMUM_TORCH == "2.2"
    assert panel.versionAtLeast("2.2.2", panel.MINIMUM_TORCH) and not panel.versionAtLeast("2.1.2", "2.2")


def test_bfloat16_support_on_cuda_is_read_with_the_torch_2_2_signature(monkeypatch):
    """torch < 2.4: ``torch.cuda.is_bf16_supported()`` takes no ``including_emulation`` and also says True where
    bfloat16 is only emulated; native support is then compute capability >= 8.0."""
    torch = pytest.importorskip("torch")
    from SSMSRRegistrationLib.engine.unet import bfloat16_supported

    def is_bf16_supported():  # the torch 2.2 signature
        return True

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(torch.version, "hip", None)
    for capability, expected in (((7, 5), False), ((8, 0), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert bfloat16_supported(torch.device("cuda")) is expected
        assert bfloat16_supported(torch.device("cuda:0")) is expected
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert bfloat16_supported(torch.device("cuda")) is False

    asked = []

    def is_bf16_supported_2_4(including_emulation=True):  # torch >= 2.4
        asked.append(including_emulation)
        return not including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported_2_4)
    assert bfloat16_supported(torch.device("cuda")) is True and asked == [False]


def test_mixed_precision_falls_back_to_float32_where_bfloat16_is_only_emulated(monkeypatch):
    """The engine's choice (``mixed = settings.mixed_precision and bfloat16_supported(device)`` in
    engine/multiscale.py) on a Turing GPU under torch 2.2: float32, without raising."""
    torch = pytest.importorskip("torch")
    from SSMSRRegistrationLib.engine import multiscale

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert multiscale.bfloat16_supported(torch.device("cuda")) is False


def test_the_cpu_bfloat16_check_survives_a_torch_without_the_mkldnn_operator(monkeypatch):
    torch = pytest.importorskip("torch")
    from SSMSRRegistrationLib.engine import torch_compat

    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.ops, "mkldnn", SimpleNamespace())  # no _is_mkldnn_bf16_supported
    assert torch_compat.cpu_bfloat16_native() is False


def test_autocast_state_is_read_with_the_torch_2_2_signatures(monkeypatch):
    """torch < 2.4: ``torch.is_autocast_enabled()`` takes no device and answers for CUDA;
    ``torch.is_autocast_cpu_enabled()`` answers for the CPU."""
    torch = pytest.importorskip("torch")
    from SSMSRRegistrationLib.engine import torch_compat, unet

    state = {"cuda": False, "cpu": True}

    def is_autocast_enabled():  # the torch 2.2 signature
        return state["cuda"]

    monkeypatch.setattr(torch, "is_autocast_enabled", is_autocast_enabled)
    monkeypatch.setattr(torch, "is_autocast_cpu_enabled", lambda: state["cpu"], raising=False)
    assert torch_compat.autocast_enabled("cpu") is True and torch_compat.autocast_enabled("cuda") is False
    assert torch_compat.autocast_enabled("mps") is False
    state.update(cuda=True, cpu=False)
    assert torch_compat.autocast_enabled("cuda") is True and torch_compat.autocast_enabled("cpu") is False
    # The network's forward pass runs on that signature (the slab path is left while "autocast" is on).
    state.update(cpu=True)
    block = unet.ConvBlock(3, 2, 4)
    with torch.no_grad():
        output = block(torch.rand(1, 2, 8, 6, 6))
    assert output.shape == (1, 4, 8, 6, 6) and torch.isfinite(output).all()


def test_autocast_state_on_the_installed_torch():
    torch = pytest.importorskip("torch")
    from SSMSRRegistrationLib.engine.torch_compat import autocast_enabled

    assert not autocast_enabled("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocast_enabled("cpu")
    assert not autocast_enabled("cpu")


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_engines_adam_gives_the_weights_of_torch_optim_adam_bit_for_bit(channels_last):
    """engine.optimizer.Adam against torch.optim.Adam (the reference) on the installed torch (2.13 in the main suite,
    2.2.2 in the Slicer-side one): the same U-Net trained 8 steps on the same loss, weights stored as given or
    channels-last (mixed precision's layout); a parameter without a gradient stays as it was, and one that gets its
    first gradient at the fifth step counts its own steps."""
    torch = pytest.importorskip("torch")
    from SSMSRRegistrationLib.engine.optimizer import Adam
    from SSMSRRegistrationLib.engine.unet import RegistrationUNet

    torch.manual_seed(3)
    reference = RegistrationUNet(3, (4, 8), (8, 8, 4))
    reference.unused, reference.late = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    if channels_last:
        reference = reference.to(memory_format=torch.channels_last_3d)
    engine = RegistrationUNet(3, (4, 8), (8, 8, 4))
    engine.unused, engine.late = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    engine.load_state_dict(reference.state_dict())
    if channels_last:
        engine = engine.to(memory_format=torch.channels_last_3d)
    optimizers = [torch.optim.Adam(reference.parameters(), lr=3e-3), Adam(engine.parameters(), lr=3e-3)]
    pair = torch.rand(2, 2, 8, 12, 8, generator=torch.Generator().manual_seed(0))
    for step in range(8):
        for network, optimizer in zip((reference, engine), optimizers):
            optimizer.zero_grad()
            loss = (network(pair) - pair[:, :1]).square().mean()
            (loss + network.late.square().sum() if step >= 4 else loss).backward()
            optimizer.step()
    for (name, expected), actual in zip(reference.named_parameters(), engine.parameters()):
        assert torch.equal(actual, expected), name
    assert torch.equal(engine.unused, torch.ones(3))
    assert not torch.equal(engine.flow.weight, RegistrationUNet(3, (4, 8), (8, 8, 4)).flow.weight)  # it trained


def test_a_registration_does_not_import_the_compiler_stack():
    """torch.optim imports torch._dynamo when an optimizer is built (1.2-1.9 s of CPU per process); a registration's
    process, as the Slicer worker and ``ssmsr`` run it, never does."""
    pytest.importorskip("torch")
    script = textwrap.dedent('''
        import sys
        import torch
        from SSMSRRegistrationLib.engine.multiscale import RegistrationSettings, register_tensors
        from SSMSRRegistrationLib.common.schedule import parse_scales
        image = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(0))
        register_tensors(image, image.roll(2, dims=3), RegistrationSettings(scales=parse_scales("1/2,1"),
                                                                           steps_per_scale=2), device="cpu")
        print(sorted(name for name in sys.modules if name.startswith("torch._dynamo")))
    ''')
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=str(MODULE_DIRECTORY))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


# ---------------------------------------------------------------------------------------------------------------
# Item: PyTorch set-up never upgrades a torch Slicer may have loaded


def test_no_torch_asks_to_install_it():
    setup = torchSetupAction(None, importable=False)
    assert setup.action is TorchAction.INSTALL
    assert "PyTorch 2.2 or newer" in setup.message and setup.message.endswith("chosen automatically.")


def test_an_older_torch_is_not_upgraded_but_the_user_is_told_what_to_do():
    for importable in (True, False):
        setup = torchSetupAction("2.1.2+cu121", importable=importable)
        assert setup.action is TorchAction.REFUSE
        for words in ("PyTorch 2.1.2+cu121 is installed", "needs PyTorch 2.2 or newer", "PyTorch Util module",
                      ">=2.2", "restart Slicer"):
            assert words in setup.message


def test_a_torch_that_does_not_import_is_not_reinstalled_here():
    setup = torchSetupAction("2.5.1", importable=False, importError="OSError: [WinError 126] c10.dll")
    assert setup.action is TorchAction.REFUSE
    for words in ("PyTorch 2.5.1 is installed", "cannot be imported", "WinError 126", "PyTorch Util module",
                  "restart Slicer"):
        assert words in setup.message
    assert torchSetupAction(None, importable=True).action is TorchAction.REFUSE  # no metadata: version unknown


def test_a_recent_enough_torch_is_used_as_it_is():
    for version in ("2.2.0", "2.2.2", "2.4.1+cpu", "2.13.0+cu128"):
        assert torchSetupAction(version, importable=True) == (TorchAction.READY, "")


def test_this_pythons_torch_is_ready():
    torch = pytest.importorskip("torch")
    assert torch_status.installedTorchVersion() == torch.__version__.split("+")[0] or \
        torch_status.installedTorchVersion() == torch.__version__
    assert torch_status.currentTorchSetup().action is TorchAction.READY
    # A minimum above the installed version is refused without importing anything new.
    assert torch_status.currentTorchSetup(minimum="99.0").action is TorchAction.REFUSE


# ---------------------------------------------------------------------------------------------------------------
# Item: a job that ends while another module is shown completes with the parameter node it started from

#: The parameter node wrapper stores a node parameter as a node reference named after the parameter
#: (v5.6.2 Base/Python/slicer/parameterNodeWrapper/serializers.py, NodeSerializer: write
#: ``parameterNode.SetNodeReferenceID(name, value.GetID() if value is not None else None)``, read
#: ``parameterNode.GetNodeReference(name)``), and exposes the MRML node as ``.parameterNode``.
NODE_PARAMETERS = {name for name, parameter in panel.PARAMETERS.items()
                   if parameter.type not in (str, int, float, bool)}


class WrapperLikeParameterNode:
    """What the completion uses of Slicer's parameter node wrapper, over a real ``vtkMRMLScriptedModuleNode``: node
    parameters as node references as the wrapper stores them; the other values in ``panel.PanelValues``."""

    def __init__(self, node, **values):
        object.__setattr__(self, "parameterNode", node)
        object.__setattr__(self, "_values", panel.PanelValues(**values))

    def __getattr__(self, name):
        if name in NODE_PARAMETERS:
            return self.parameterNode.GetNodeReference(name)
        return getattr(self._values, name)

    def __setattr__(self, name, value):
        if name in NODE_PARAMETERS:
            self.parameterNode.SetNodeReferenceID(name, value.GetID() if value is not None else None)
        else:
            setattr(self._values, name, value)


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


@pytest.fixture
def moduleScene(scene):
    """The module's parameter node and the three slice views' composite nodes, as the application creates them."""
    moduleNode = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")
    moduleNode.SetAttribute("ModuleName", "SSMSRRegistration")
    composites = []
    for viewName in ("Red", "Yellow", "Green"):
        composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
        composite.SetLayoutName(viewName)
        composites.append(composite)
    return SimpleNamespace(scene=scene, moduleNode=moduleNode, composites=composites)


def smallPair(scene):
    """Two 2D images: a blob and the same blob shifted by two pixels."""
    j, i = np.mgrid[0:32, 0:40]
    fixed = np.exp(-((i - 20.0) ** 2 + (j - 16.0) ** 2) / 40.0).astype(np.float32)[None]
    moving = np.exp(-((i - 22.0) ** 2 + (j - 15.0) ** 2) / 40.0).astype(np.float32)[None]
    return (scene_helpers.addVolumeFromArray(scene, fixed, "fixed", spacing=(1.5, 1.5, 1.0)),
            scene_helpers.addVolumeFromArray(scene, moving, "moving", spacing=(1.5, 1.5, 1.0)))


def test_a_run_completes_with_its_parameter_node_while_the_panel_is_detached(moduleScene, tmp_path):
    """The widget's exit() only disconnects its widgets (v5.6.2 Utilities/Templates/Modules/Scripted/TemplateKey.py:
    exit disconnects the GUI and keeps the parameter node); the run keeps its own parameter node and completes from
    the module logic's poll: outputs selected there, the warped volume over the fixed one in the slice views."""
    pytest.importorskip("torch")
    scene = moduleScene.scene
    fixed, moving = smallPair(scene)
    warped = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "warped")
    runs = panel_runs.BackgroundRuns(RegistrationLogic(scene, temporaryDirectoryRoot=str(tmp_path)))
    parameterNode = WrapperLikeParameterNode(moduleScene.moduleNode, scales="1", stepsPerScale=5,
                                             mixedPrecision=False, device="cpu", alignFirst="none")
    parameterNode.fixedVolume, parameterNode.movingVolume, parameterNode.outputVolume = fixed, moving, warped
    panelDisplay = []
    job, run = runs.startFromPanel(parameterNode, [], completions=(panelDisplay.append,))
    assert run.mode == "pair" and run.status == "" and runs.isRunning
    assert job.workerJob["configuration"]["preset"] == "balanced"  # the panel's edits are the overrides, no more
    assert job.workerJob["configuration"]["overrides"] == {"scales": "1", "steps": 5, "precision": "float32",
                                                           "device": "cpu"}
    del parameterNode  # the panel let go of it (the former exit() set it to None); the run holds its own
    deadline = time.monotonic() + 240
    while runs.poll():
        assert time.monotonic() < deadline, "the worker did not finish"
        time.sleep(0.1)
    assert job.state is JobState.SUCCEEDED, job.errorMessage
    assert panelDisplay == [job] and not runs.isRunning

    # Back in the module (enter): a new wrapper of the module's parameter node shows the selected result.
    shown = WrapperLikeParameterNode(moduleScene.moduleNode)
    assert shown.outputTransform is not None and shown.outputTransform.GetID() == job.outputTransformNode.GetID()
    assert shown.outputVolume.GetID() == warped.GetID()
    for composite in moduleScene.composites:  # as setSliceViewerLayers(background=fixed, foreground=warped, 0.5)
        assert composite.GetBackgroundVolumeID() == fixed.GetID()
        assert composite.GetForegroundVolumeID() == warped.GetID()
        assert composite.GetForegroundOpacity() == pytest.approx(panel_runs.OVERLAY_OPACITY)
    assert run.status.startswith("Done in") and job.outputTransformNode.GetName() in run.status


def test_a_cancelled_or_failed_run_selects_nothing(moduleScene, tmp_path):
    """Cancel is what the widget does on scene close (onSceneStartClose) and in cleanup()."""
    scene = moduleScene.scene
    fixed, moving = smallPair(scene)
    logic = RegistrationLogic(scene, temporaryDirectoryRoot=str(tmp_path))
    runs = panel_runs.BackgroundRuns(logic)
    parameterNode = WrapperLikeParameterNode(moduleScene.moduleNode, scales="1", stepsPerScale=5, device="cpu")
    parameterNode.fixedVolume, parameterNode.movingVolume = fixed, moving
    nodesBefore = scene.GetNumberOfNodes()
    for mode, expected in (("stubborn", JobState.CANCELLED), ("error", JobState.FAILED)):
        logic.workerCommandPrefix = [sys.executable, str(FAKE_WORKER), mode]
        ended = []
        job, run = runs.startFromPanel(parameterNode, [], completions=(ended.append,))
        if mode == "stubborn":
            time.sleep(0.5)
            runs.cancel()
        deadline = time.monotonic() + 60
        while runs.poll():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert job.state is expected and ended == [job]
        assert parameterNode.outputTransform is None and scene.GetNumberOfNodes() == nodesBefore
        assert all(composite.GetForegroundVolumeID() is None for composite in moduleScene.composites)
        assert run.status.startswith("Cancelled" if mode == "stubborn" else "Failed")
    assert not runs.poll() and not runs.isRunning


def test_a_run_whose_parameter_node_left_the_scene_completes_without_it(moduleScene):
    """Scene closed while the run ended: the parameter node's MRML node is gone; the result is not written to it."""
    scene = moduleScene.scene
    fixed, warped = smallPair(scene)
    transform = scene.AddNewNodeByClass("vtkMRMLTransformNode")
    parameterNode = WrapperLikeParameterNode(moduleScene.moduleNode)
    run = panel_runs.PanelRun(parameterNode, "pair")
    scene.RemoveNode(moduleScene.moduleNode)
    job = SimpleNamespace(state=JobState.SUCCEEDED, startTime=time.monotonic(), metrics={}, scene=scene,
                          outputTransformNode=transform, outputVolumeNode=warped, fixedVolumeNode=fixed)
    run.complete(job)
    assert moduleScene.moduleNode.GetNodeReferenceID("outputTransform") is None
    assert moduleScene.composites[0].GetForegroundVolumeID() == warped.GetID()
    assert run.status.startswith("Done in")


# ---------------------------------------------------------------------------------------------------------------
# Smaller items


def test_the_sequence_browser_method_the_cine_logic_uses_exists_in_the_wheel():
    """``IsSynchronizedSequenceNodeID`` (v5.6.2 Modules/Loadable/Sequences/MRML/vtkMRMLSequenceBrowserNode.h:
    "Returns true if the node is selected for synchronized browsing"; the const char* overload of
    IsSynchronizedSequenceNode is "Deprecated. Use IsSynchronizedSequenceNodeID instead.")."""
    from SSMSRRegistrationLib.mrml.cine import sequenceBrowsersOf

    scene = slicer.vtkMRMLScene()
    sequencesLogic = slicer.vtkSlicerSequencesLogic()  # registers the browser node class, as in the application
    sequencesLogic.SetMRMLScene(scene)
    sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode")
    other = scene.AddNewNodeByClass("vtkMRMLSequenceNode")
    browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode")
    browser.SetAndObserveMasterSequenceNodeID(sequence.GetID())
    assert browser.IsSynchronizedSequenceNodeID(sequence.GetID(), True)
    assert not browser.IsSynchronizedSequenceNodeID(sequence.GetID(), False)
    assert sequenceBrowsersOf(scene, sequence) == [browser] and sequenceBrowsersOf(scene, other) == []


def translatedArguments(path: Path):
    """(line, source) of each ``_(...)`` call whose argument is not one string literal."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "_":
            literal = (len(node.args) == 1 and not node.keywords and isinstance(node.args[0], ast.Constant)
                       and isinstance(node.args[0].value, str))
            if not literal:
                yield node.lineno, ast.get_source_segment(path.read_text(encoding="utf-8"), node)


def test_every_translated_string_is_a_literal_template():
    """Qt's lupdate extracts only literal strings from ``_()`` / ``tr()`` (v5.6.2 Base/Python/slicer/i18n.py: "This
    ``translate(context, message)`` function is recognized by Qt's lupdate tool"); values go in with .format."""
    files = [MODULE_DIRECTORY / "SSMSRRegistration.py", *sorted((MODULE_DIRECTORY / "SSMSRRegistrationLib" / "gui")
                                                                .glob("*.py"))]
    found = [(path.name, line, source) for path in files for line, source in translatedArguments(path)]
    assert found == []


def test_the_readme_panel_sketch_shows_the_current_defaults():
    readme = (MODULE_DIRECTORY.parent / "README.md").read_text(encoding="utf-8")
    start = readme.index("+- Inputs ---")
    sketch = readme[start:readme.index("```", start)]
    preset = PRESETS[DEFAULT_PRESET]
    assert f"[ {preset.name.capitalize()} " in sketch
    assert f"[ {preset.value('pair', 'scales')}" in sketch
    assert f"Steps per scale:           [ {preset.value('pair', 'steps')} ]" in sketch
    assert f"Smoothness weight [{preset.value('pair', 'smoothness_weight'):g}]" in sketch
    assert "Mixed precision [x]" in sketch and panel.PARAMETERS["mixedPrecision"].default is True
    defaults = panel.PanelValues()  # a new parameter node shows exactly those values, with no override
    assert (defaults.preset, defaults.scales, defaults.stepsPerScale) == (
        DEFAULT_PRESET, preset.value("pair", "scales"), preset.value("pair", "steps"))
    assert defaults.smoothnessWeight == preset.value("pair", "smoothness_weight")
    assert panel.currentOverrides(defaults) == {} and panel.reconcile(defaults) == {}
