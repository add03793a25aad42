"""The package's layers: each folder imports only the layers below it and only the libraries its runtime has;
the Slicer logic and the panel's rules import without torch; the public entry points exist."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "SSMSRRegistration" / "SSMSRRegistrationLib"

#: Layer -> the package's layers it may import (itself included).
ALLOWED_LAYERS = {
    "common": {"common"},
    "engine": {"common", "engine"},
    "imaging": {"common", "imaging"},
    "workflows": {"common", "engine", "imaging", "workflows"},
    "report": {"common", "report"},
    "interfaces": {"common", "imaging", "workflows", "report", "interfaces"},
    "mrml": {"common", "mrml"},
    "testing": {"common", "imaging", "mrml", "testing", "logic"},
    "gui": {"common", "mrml", "gui", "logic"},
}
#: Layer -> third-party modules it must not import (anywhere in its files, lazily or not).
FORBIDDEN_LIBRARIES = {
    "common": {"numpy", "torch", "SimpleITK", "vtk", "slicer", "qt", "ctk", "matplotlib"},
    "engine": {"SimpleITK", "vtk", "slicer", "qt", "ctk"},
    "imaging": {"torch", "vtk", "slicer", "qt", "ctk"},
    "workflows": {"vtk", "slicer", "qt", "ctk", "matplotlib"},
    "report": {"torch", "SimpleITK", "vtk", "slicer", "qt", "ctk"},
    "interfaces": {"vtk", "slicer", "qt", "ctk"},
    "mrml": {"torch", "qt", "ctk"},
    "testing": {"torch", "qt", "ctk"},
}


def imports(path: Path) -> set:
    """Absolute names of everything a module imports (relative imports resolved inside the package)."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = parts if path.name == "__init__.py" else parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def layerFiles():
    for layer in ALLOWED_LAYERS:
        for path in sorted((PACKAGE / layer).glob("*.py")):
            yield layer, path


@pytest.mark.parametrize("layer, path", list(layerFiles()), ids=lambda value: getattr(value, "name", value))
def test_each_module_imports_only_lower_layers_and_its_runtimes_libraries(layer, path):
    names = imports(path)
    internal = {name.split(".")[1] for name in names if name.startswith("SSMSRRegistrationLib.")}
    internal &= set(ALLOWED_LAYERS) | {"logic", "interfaces"}
    assert internal <= ALLOWED_LAYERS[layer], f"{path.name} imports {sorted(internal - ALLOWED_LAYERS[layer])}"
    external = {name.split(".")[0] for name in names}
    assert not external & FORBIDDEN_LIBRARIES.get(layer, set()), f"{path.name} imports {external & FORBIDDEN_LIBRARIES[layer]}"


def test_the_panel_rules_import_neither_qt_nor_torch():
    names = {name.split(".")[0] for name in imports(PACKAGE / "gui" / "panel.py")}
    assert not names & {"qt", "ctk", "torch"}


def test_no_python_file_is_over_500_lines_and_every_package_says_what_it_may_import():
    for path in PACKAGE.parent.rglob("*.py"):
        assert len(path.read_text(encoding="utf-8").splitlines()) <= 500, path
    for layer in ALLOWED_LAYERS:
        docstring = ast.get_docstring(ast.parse((PACKAGE / layer / "__init__.py").read_text(encoding="utf-8")))
        assert docstring and ("import" in docstring), f"{layer}/__init__.py does not say what the layer may import"


BLOCK_TORCH = """
import importlib.abc, sys
class BlockTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError("No module named 'torch' (blocked by the test)")
sys.meta_path.insert(0, BlockTorch())
import SSMSRRegistrationLib.logic, SSMSRRegistrationLib.gui.panel, SSMSRRegistrationLib.testing.scenarios
import SSMSRRegistrationLib.mrml.cine, SSMSRRegistrationLib.mrml.registration_jobs
assert "torch" not in sys.modules
try:
    import torch
except ModuleNotFoundError:
    print("torch blocked")
"""


def test_the_slicer_logic_imports_without_torch():
    pytest.importorskip("slicer", reason="the slicer-core wheel (real MRML) is needed")
    result = subprocess.run([sys.executable, "-c", BLOCK_TORCH], capture_output=True, text=True, timeout=120,
                            env={"PYTHONPATH": str(PACKAGE.parent), "PATH": ""})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "torch blocked"


def test_the_workflows_and_the_slicer_logic_are_public_entry_points():
    """The package's names are the workflows' own functions (not wrappers), so help() and inspect show them."""
    import inspect

    import SSMSRRegistrationLib
    from SSMSRRegistrationLib.logic import RegistrationLogic  # noqa: F401
    from SSMSRRegistrationLib.workflows import apply, register, segment, track, train

    assert SSMSRRegistrationLib.register is register.register and SSMSRRegistrationLib.track is track.track
    assert SSMSRRegistrationLib.segment is segment.segment and SSMSRRegistrationLib.train is train.train
    assert SSMSRRegistrationLib.apply is apply.apply and SSMSRRegistrationLib.read_transform is apply.read_transform
    assert list(inspect.signature(SSMSRRegistrationLib.register).parameters)[:2] == ["fixed", "moving"]
