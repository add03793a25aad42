"""Packaging: the version has one source, Dask is the optional `batch` extra, and `ssmsr batch` says how to get it.

The metadata checks read the installed distribution (``pip install -e .`` writes it): after editing pyproject.toml or
``__version__``, install again (``.venv/bin/pip install -e . --no-deps -c constraints.txt``).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import SSMSRRegistrationLib

ROOT = Path(__file__).resolve().parents[2]
LIB_PARENT = ROOT / "SSMSRRegistration"  # conftest.py puts it on sys.path here too

BATCH_PACKAGES = {"dask", "distributed"}


def _installed_requirements():
    try:
        return importlib.metadata.requires("ssmsr") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the ssmsr distribution is not installed (pip install -e .)")


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower()


def test_installed_version_is_the_package_version():
    try:
        installed = importlib.metadata.version("ssmsr")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the ssmsr distribution is not installed (pip install -e .)")
    assert installed == SSMSRRegistrationLib.__version__, (
        "pyproject.toml reads the version from SSMSRRegistrationLib.__version__; the installed metadata is stale: "
        "run .venv/bin/pip install -e . --no-deps -c constraints.txt")


def test_pyproject_has_no_second_version():
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    project = text.split("[project]", 1)[1].split("\n[", 1)[0]
    assert not re.search(r"^version\s*=", project, re.MULTILINE), "the version belongs in __init__.py only"
    assert re.search(r'^dynamic\s*=\s*\[[^]]*"version"', project, re.MULTILINE)
    assert 'attr = "SSMSRRegistrationLib.__version__"' in text


def test_dask_is_the_batch_extra_and_core_dependencies_have_lower_bounds_only():
    requirements = _installed_requirements()
    core = [r for r in requirements if "extra ==" not in r]
    assert core, requirements
    assert not BATCH_PACKAGES & {_name(r) for r in core}, core
    for requirement in core:
        specifier = requirement.split(";", 1)[0]
        assert ">=" in specifier and not re.search(r"==|<|~=|!=", specifier), requirement
    batch = {_name(r) for r in requirements if re.search(r"extra\s*==\s*['\"]batch['\"]", r)}
    assert BATCH_PACKAGES <= batch, requirements
    test_extra = [r for r in requirements if re.search(r"extra\s*==\s*['\"]test['\"]", r)]
    # The test extra names the demo and batch extras instead of copying their lists.
    assert any(_name(r) == "ssmsr" and "batch" in r and "demo" in r for r in test_extra), test_extra


def test_batch_without_dask_says_to_install_the_extra(tmp_path):
    """With Dask absent, the other commands' modules still import, and `ssmsr batch` is an input error (exit 2) that
    names the extra, with no traceback; the Python API raises a ModuleNotFoundError of the missing module."""
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(LIB_PARENT)!r})
        sys.modules["dask"] = None          # as if the batch extra were not installed
        sys.modules["distributed"] = None
        from SSMSRRegistrationLib.interfaces import api, cli
        from SSMSRRegistrationLib.workflows import batch
        try:
            from SSMSRRegistrationLib.interfaces.batch import run_batch
        except ModuleNotFoundError as error:
            api_error = {{"name": error.name, "message": str(error)}}
        else:
            api_error = None
        print(json.dumps({{"api_error": api_error}}), flush=True)
        sys.exit(cli.main(["batch", {str(tmp_path / "JOBS.csv")!r}, "--output", {str(tmp_path / "out")!r},
                           "--progress", "jsonl"]))
    """)
    env = dict(os.environ, PYTHONPATH=str(LIB_PARENT))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines[0]["api_error"]["name"].split(".")[0] == "dask", lines[0]
    assert 'pip install "ssmsr[batch]"' in lines[0]["api_error"]["message"]
    errors = [line for line in lines[1:] if line.get("event") == "error"]
    assert errors and 'pip install "ssmsr[batch]"' in errors[0]["message"], done.stdout
    assert "Traceback" not in done.stderr, done.stderr
    assert 'ssmsr: error: `ssmsr batch` needs Dask' in done.stderr
    assert not (tmp_path / "out").exists()
