"""The Qt Designer file and the module file agree (checked without Qt: XML and Python syntax trees).

* the .ui file is well-formed and its widget names are unique;
* every ``self.ui.<name>`` used in SSMSRRegistration.py is a widget of the .ui file;
* every ``SlicerParameterName`` names a parameter of the parameter node wrapper, on a widget class the
  parameter node wrapper can bind to that parameter's type, and every parameter except those bound in code
  (``device``: GPU entries are added at run time; ``modelFile``: a path selector) is bound to a widget;
* every custom widget class used is declared, and the model selector offers no model (train from scratch) by
  default;
* advanced settings and the log start collapsed, and Apply starts disabled.
"""

import ast
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

MODULE_DIRECTORY = Path(__file__).resolve().parents[2] / "SSMSRRegistration"
UI_PATH = MODULE_DIRECTORY / "Resources" / "UI" / "SSMSRRegistration.ui"
MODULE_PATH = MODULE_DIRECTORY / "SSMSRRegistration.py"

#: Widget classes the parameter node wrapper binds, per parameter type (Slicer's "Available connectors").
CONNECTORS = {
    "int": {"QSpinBox", "QSlider", "ctkSliderWidget"},
    "float": {"QDoubleSpinBox", "ctkDoubleSpinBox", "ctkSliderWidget", "ctkDoubleSlider"},
    "str": {"QLineEdit", "QTextEdit", "QLabel"},
    "bool": {"QCheckBox", "ctkCheckBox", "QPushButton"},
    "node": {"qMRMLNodeComboBox", "qMRMLSubjectHierarchyTreeView"},
}
#: device: GPU entries are added at run time; modelFile: a ctkPathLineEdit (the wrapper binds it to pathlib.Path
#: only, and "" must mean "no model").
PARAMETERS_BOUND_IN_CODE = {"device", "modelFile"}


@pytest.fixture(scope="module")
def uiTree():
    return ElementTree.parse(UI_PATH)


@pytest.fixture(scope="module")
def widgets(uiTree):
    return {widget.get("name"): widget for widget in uiTree.iter("widget")}


@pytest.fixture(scope="module")
def moduleSyntaxTree():
    return ast.parse(MODULE_PATH.read_text(encoding="utf-8"))


def parameterTypes(moduleSyntaxTree) -> dict:
    """Parameter name -> "int", "float", "str", "bool" or "node", from the @parameterNodeWrapper class."""
    for node in ast.walk(moduleSyntaxTree):
        if isinstance(node, ast.ClassDef) and any(getattr(d, "id", None) == "parameterNodeWrapper" for d in node.decorator_list):
            types = {}
            for statement in node.body:
                if isinstance(statement, ast.AnnAssign):
                    annotation = statement.annotation
                    if isinstance(annotation, ast.Subscript):  # Annotated[int, ...]
                        annotation = annotation.slice.elts[0]
                    name = annotation.id
                    types[statement.target.id] = "node" if name.startswith("vtkMRML") else name
            return types
    raise AssertionError("no @parameterNodeWrapper class in SSMSRRegistration.py")


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


def test_parameter_names_match_parameters_and_widget_types(moduleSyntaxTree, widgets):
    types = parameterTypes(moduleSyntaxTree)
    bound = {}
    for name, widget in widgets.items():
        parameter = property_(widget, "SlicerParameterName")
        if parameter is None:
            continue
        assert parameter in types, f"widget {name} is bound to unknown parameter '{parameter}'"
        assert widget.get("class") in CONNECTORS[types[parameter]], (
            f"{widget.get('class')} {name} cannot be bound to the {types[parameter]} parameter '{parameter}'")
        assert parameter not in bound, f"parameter '{parameter}' is bound to both {bound[parameter]} and {name}"
        bound[parameter] = name
    assert set(types) - set(bound) == PARAMETERS_BOUND_IN_CODE


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
    for optional in ("fixedMaskSelector", "segmentationSelector", "outputTransformSelector", "outputVolumeSelector"):
        assert property_(widgets[optional], "noneEnabled") == "true", f"{optional} should allow None"


def test_custom_widgets_are_declared_and_atlas_mode_widgets_exist(uiTree, widgets, moduleSyntaxTree):
    declared = {element.findtext("class") for element in uiTree.iter("customwidget")}
    used = {widget.get("class") for widget in widgets.values()}
    standard = {cls for cls in used if cls.startswith("Q")}
    assert used - standard <= declared, f"undeclared custom widgets: {sorted(used - standard - declared)}"
    assert widgets["modelPathLineEdit"].get("class") == "ctkPathLineEdit"
    assert widgets["atlasSegmentationsComboBox"].get("class") == "qMRMLCheckableNodeComboBox"
    defaults = {statement.target.id: statement.value for node in ast.walk(moduleSyntaxTree)
                if isinstance(node, ast.ClassDef) for statement in node.body
                if isinstance(statement, ast.AnnAssign) and statement.value is not None}
    assert ast.literal_eval(defaults["modelFile"]) == "" and ast.literal_eval(defaults["atlasSelection"]) is False


def test_cine_tracking_widgets_exist_and_the_mode_starts_off(widgets, moduleSyntaxTree):
    assert widgets["cineTrackingCheckBox"].get("class") == "QCheckBox"
    assert widgets["batchSizeSpinBox"].get("class") == "QSpinBox"
    cineSelector = widgets["cineSelector"]
    assert cineSelector.get("class") == "qMRMLNodeComboBox"
    nodeTypes = {element.text for element in cineSelector.iter("string")}
    assert {"vtkMRMLSequenceNode", "vtkMRMLScalarVolumeNode"} <= nodeTypes
    assert property_(cineSelector, "noneEnabled") == "true"
    defaults = {statement.target.id: statement.value for node in ast.walk(moduleSyntaxTree)
                if isinstance(node, ast.ClassDef) for statement in node.body
                if isinstance(statement, ast.AnnAssign) and statement.value is not None}
    assert ast.literal_eval(defaults["cineTracking"]) is False and ast.literal_eval(defaults["batchSize"]) == 1
