"""The panel as Slicer binds it: the Qt Designer file, the widget code and the parameter node agree, and every
binding is one that Slicer's ``parameterNodeWrapper`` makes at the oldest supported Slicer.

* the .ui file is well-formed and its widget names are unique; every ``self.ui.<name>`` the widget uses exists;
* every node class of the parameters (each member of a ``Union`` too) is concrete: the wrapper instantiates it
  (``getNodeTypes`` in ``Base/Python/slicer/parameterNodeWrapper/util.py``, the same at v5.6.2, v5.8.1 and
  v5.10.0); checked on the real classes of the ``slicer-core`` wheel;
* every (widget class, parameter type) pair is one the wrapper's GUI connectors accept at the minimum version
  (facts below, from Slicer's source at that tag), and every parameter except those bound in code has a widget;
* advanced settings and the log start collapsed, Apply starts disabled, selectors get the scene.
"""

import ast
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import typing

import pytest

slicer = pytest.importorskip("slicer", reason="the slicer-core wheel (real MRML) is needed")

from SSMSRRegistrationLib.gui.panel import MINIMUM_SLICER_VERSION, PARAMETERS, Parameter  # noqa: E402

MODULE_DIRECTORY = Path(__file__).resolve().parents[2] / "SSMSRRegistration"
UI_PATH = MODULE_DIRECTORY / "Resources" / "UI" / "SSMSRRegistration.ui"
WIDGET_PATH = MODULE_DIRECTORY / "SSMSRRegistrationLib" / "gui" / "widget.py"

#: Facts from Slicer's source at the minimum supported version, tag v5.6.2,
#: ``Base/Python/slicer/parameterNodeWrapper/guiConnectors.py``: the widget classes each connector's
#: ``canRepresent(widget, datatype)`` accepts for a parameter type. Widgets match by exact class
#: (``type(widget) == ...`` / ``type(widget) in (...)``), so a subclass does not match.
#:   QCheckBoxToBoolConnector: bool <-> qt.QCheckBox (``ctk.ctkCheckBox`` only from v5.8.0)
#:   QCheckablePushButtonToBoolConnector: bool <-> qt.QPushButton
#:   QSliderOrSpinBoxToIntConnector: int <-> qt.QSlider, qt.QSpinBox (ctkSliderWidget for int only from v5.10.0)
#:   QDoubleSpinBoxCtkSliderWidgetToFloatConnector: float <-> qt.QDoubleSpinBox, ctk.ctkSliderWidget,
#:       slicer.qMRMLSliderWidget (``ctk.ctkDoubleSpinBox``, ``ctk.ctkDoubleSlider``, ``slicer.qMRMLSpinBox`` only
#:       from v5.8.0); the two slider widgets also need a bounded type (WithinRange)
#:   QLineEditToStrConnector: str <-> qt.QLineEdit; QTextEditPlainTextToStrConnector: str <-> qt.QTextEdit
#:       (``qt.QLabel`` only from v5.8.0)
#:   qMRMLNodeComboBoxToNodeConnector: a node class, or a Union of node classes <-> slicer.qMRMLNodeComboBox
CONNECTORS_AT_MINIMUM = {
    bool: {"QCheckBox", "QPushButton"},
    int: {"QSpinBox", "QSlider"},
    float: {"QDoubleSpinBox", "ctkSliderWidget", "qMRMLSliderWidget"},
    str: {"QLineEdit", "QTextEdit"},
    "node": {"qMRMLNodeComboBox"},
}
#: The same file at v5.6.2: ``ctkSliderWidget`` and ``qMRMLSliderWidget`` raise "Cannot have a connection to
#: ctkSliderWidget where the float types is unbounded" without a range.
NEEDS_RANGE = {"ctkSliderWidget", "qMRMLSliderWidget", "QSlider"}
#: The same tag, ``serializers.py``: ``UnionSerializer`` writes a value through the first member serializer that
#: ``canSerialize(type(value))``; for None only a ``NoneType`` member does, so a Union of node classes without None
#: raises "Unable to write value 'None'" when the parameter is emptied (and when it is given its default, None).
#: device: GPU entries are added at run time; alignFirst: a combo box whose items are set in code (the wrapper
#: binds a QComboBox only with a Choice annotation); modelFile: a ctkPathLineEdit (the wrapper binds it to pathlib.Path
#: only, and "" must mean "no model"); preset: the preset combo box, filled in code; overrides, shownKind: the run
#: configuration's overrides and the kind of run the run-option widgets show, shown by no widget of their own
#: (``panel.reconcile``).
PARAMETERS_BOUND_IN_CODE = {"device", "modelFile", "alignFirst", "preset", "overrides", "shownKind"}


def nodeClasses(parameterType) -> list:
    """The node classes of a parameter type (a node class, or each member of a Union), else []."""
    members = typing.get_args(parameterType) if typing.get_origin(parameterType) is typing.Union else (parameterType,)
    return [member for member in members if isinstance(member, type) and issubclass(member, slicer.vtkMRMLNode)]


def bindingProblems(parameters: dict, widgetClasses: dict) -> list:
    """What Slicer's wrapper at the minimum version would refuse: abstract node classes (instantiating them
    raises), and (widget class, type) pairs no connector accepts. ``widgetClasses``: parameter -> .ui class."""
    problems = []
    for name, parameter in parameters.items():
        for nodeClass in nodeClasses(parameter.type):
            try:
                nodeClass().GetClassName()
            except TypeError as error:
                problems.append(f"{name}: {nodeClass.__name__} cannot be instantiated ({error})")
        if typing.get_origin(parameter.type) is typing.Union and type(None) not in typing.get_args(parameter.type):
            problems.append(f"{name}: a Union of node classes must include None (Optional[...]) to be emptied")
        if name not in widgetClasses:
            continue
        kind = "node" if nodeClasses(parameter.type) else parameter.type
        widgetClass = widgetClasses[name]
        if widgetClass not in CONNECTORS_AT_MINIMUM.get(kind, set()):
            problems.append(f"{name}: no connector binds a {widgetClass} to {parameter.type} at the minimum version")
        elif widgetClass in NEEDS_RANGE and parameter.range is None:
            problems.append(f"{name}: a {widgetClass} needs a bounded parameter")
    return problems


@pytest.fixture(scope="module")
def uiTree():
    return ElementTree.parse(UI_PATH)


@pytest.fixture(scope="module")
def widgets(uiTree):
    return {widget.get("name"): widget for widget in uiTree.iter("widget")}


@pytest.fixture(scope="module")
def moduleSyntaxTree():
    return ast.parse(WIDGET_PATH.read_text(encoding="utf-8"))


def boundWidgetClasses(widgets) -> dict:
    """Parameter name -> class of the .ui widget whose SlicerParameterName names it."""
    bound = {}
    for name, widget in widgets.items():
        parameter = property_(widget, "SlicerParameterName")
        if parameter is not None:
            assert parameter not in bound, f"parameter '{parameter}' is bound to two widgets"
            bound[parameter] = widget.get("class")
    return bound


def property_(widget, name):
    for element in widget.findall("property"):
        if element.get("name") == name:
            return element[0].text
    return None


def test_ui_file_is_well_formed_with_unique_widget_names(uiTree):
    names = [widget.get("name") for widget in uiTree.iter("widget")]
    assert uiTree.getroot().tag == "ui"
    assert len(names) == len(set(names)), "duplicate widget names"


def test_every_widget_the_module_uses_exists(moduleSyntaxTree, widgets):
    used = {node.attr for node in ast.walk(moduleSyntaxTree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
            and node.value.attr == "ui" and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"}
    assert used, "the module uses no widget from the .ui file"
    assert used <= set(widgets), f"widgets used in the code but missing from the .ui file: {sorted(used - set(widgets))}"


def test_every_node_class_of_the_parameters_can_be_instantiated():
    classes = [nodeClass for parameter in PARAMETERS.values() for nodeClass in nodeClasses(parameter.type)]
    assert len(classes) >= 8
    for nodeClass in classes:
        assert nodeClass().GetClassName() == nodeClass.__name__


def test_every_binding_is_accepted_at_the_minimum_slicer_version(widgets):
    assert MINIMUM_SLICER_VERSION == (5, 6), "the connector facts above are those of v5.6.2"
    bound = boundWidgetClasses(widgets)
    assert set(bound) <= set(PARAMETERS), f"widgets bound to unknown parameters: {sorted(set(bound) - set(PARAMETERS))}"
    assert bindingProblems(PARAMETERS, bound) == []
    assert set(PARAMETERS) - set(bound) == PARAMETERS_BOUND_IN_CODE


def test_the_binding_check_refuses_what_crashed_the_former_panel(widgets):
    """The former panel declared ``cine: vtkMRMLNode`` and bound ``smoothnessWeight`` to a ctkDoubleSpinBox."""
    former = dict(PARAMETERS, cine=Parameter(slicer.vtkMRMLNode))
    formerWidgets = dict(boundWidgetClasses(widgets), smoothnessWeight="ctkDoubleSpinBox")
    problems = bindingProblems(former, formerWidgets)
    assert any(problem.startswith("cine: vtkMRMLNode cannot be instantiated") for problem in problems)
    assert any(problem.startswith("smoothnessWeight: no connector binds a ctkDoubleSpinBox") for problem in problems)
    withoutNone = dict(PARAMETERS, cine=Parameter(typing.Union[slicer.vtkMRMLSequenceNode, slicer.vtkMRMLScalarVolumeNode]))
    assert bindingProblems(withoutNone, boundWidgetClasses(widgets)) == [
        "cine: a Union of node classes must include None (Optional[...]) to be emptied"]


def test_advanced_settings_and_log_start_collapsed_and_apply_disabled(widgets):
    assert property_(widgets["advancedCollapsibleButton"], "collapsed") == "true"
    assert property_(widgets["logCollapsibleButton"], "collapsed") == "true"
    assert property_(widgets["inputsCollapsibleButton"], "collapsed") is None
    assert property_(widgets["applyButton"], "enabled") == "false"


def test_node_selectors_get_the_scene_and_create_new_transform_by_default(uiTree, widgets):
    selectors = {name for name, widget in widgets.items()
                 if widget.get("class") in ("qMRMLNodeComboBox", "qMRMLCheckableNodeComboBox")}
    connected = {connection.findtext("receiver") for connection in uiTree.iter("connection")
                 if connection.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    assert selectors == connected, f"selectors without the scene: {sorted(selectors - connected)}"
    assert property_(widgets["outputTransformSelector"], "noneDisplay") == "Create new transform"
    for optional in ("fixedMaskSelector", "segmentationSelector", "outputTransformSelector", "outputVolumeSelector",
                     "jacobianVolumeSelector"):
        assert property_(widgets[optional], "noneEnabled") == "true", f"{optional} should allow None"


def test_custom_widgets_are_declared_and_atlas_mode_widgets_exist(uiTree, widgets):
    declared = {element.findtext("class") for element in uiTree.iter("customwidget")}
    used = {widget.get("class") for widget in widgets.values()}
    standard = {cls for cls in used if cls.startswith("Q")}
    assert used - standard <= declared, f"undeclared custom widgets: {sorted(used - standard - declared)}"
    assert widgets["modelPathLineEdit"].get("class") == "ctkPathLineEdit"
    assert widgets["atlasSegmentationsComboBox"].get("class") == "qMRMLCheckableNodeComboBox"
    assert PARAMETERS["modelFile"].default == "" and PARAMETERS["atlasSelection"].default is False


def test_cine_tracking_widgets_exist_and_the_mode_starts_off(widgets):
    assert widgets["cineTrackingCheckBox"].get("class") == "QCheckBox"
    assert widgets["batchSizeSpinBox"].get("class") == "QSpinBox"
    cineSelector = widgets["cineSelector"]
    assert cineSelector.get("class") == "qMRMLNodeComboBox"
    nodeTypes = {element.text for element in cineSelector.iter("string")}
    assert {"vtkMRMLSequenceNode", "vtkMRMLScalarVolumeNode"} <= nodeTypes
    assert property_(cineSelector, "noneEnabled") == "true"
    assert PARAMETERS["cineTracking"].default is False and PARAMETERS["batchSize"].default == 1
