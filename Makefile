# Two entry points (see README): `make demo` and `make test`. Both create .venv and install what they need;
# `make test` also creates .venv-slicer (the packages Slicer 5.6 ships, constraints-slicer.txt) for the Slicer side.
PYTHON ?= python3
# Python caches the bytecode of what it imports (torch: 3.6 s to import from source, 1.8 s from its cache, on a 2-core
# EPYC); the installs skip compiling everything (--no-compile), and the test run's many processes each import torch,
# so the cache must be written even where the environment sets PYTHONDONTWRITEBYTECODE.
unexport PYTHONDONTWRITEBYTECODE
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# uv (pinned in constraints.txt, put into .venv by pip) installs both environments: it unpacks wheels in parallel,
# where pip took about 75 s for the two (.venv-slicer holds PyPI's torch 2.2.2 with 2.8 GB of nvidia packages). uv
# reads its own settings, not pip's: a pip find-links folder (from PIP_FIND_LINKS or pip's configuration) is passed on.
UV := $(BIN)/uv
PIP_FIND_LINKS ?= $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)
comma := ,
empty :=
space := $(empty) $(empty)
ifneq ($(strip $(PIP_FIND_LINKS)),)
export UV_FIND_LINKS := $(subst $(space),$(comma),$(strip $(PIP_FIND_LINKS)))
endif
export UV_NO_PROGRESS := 1

# The Slicer side (MRML logic, panel, .ui, self-test scenarios and their data) on Slicer 5.6.2's numpy, SimpleITK
# and pydicom with torch 2.2.2, its worker started with this venv's python as PythonSlicer would be. Slicer 5.6 runs
# Python 3.9, but slicer-core has wheels for Python >= 3.10 only: the oldest Python that can run these tests is 3.10.
SLICER_VENV := .venv-slicer
SLICER_BIN := $(SLICER_VENV)/bin
SLICER_STAMP := $(SLICER_VENV)/.installed
SLICER_PYTHON ?= $(firstword $(foreach candidate,python3.10 $(wildcard $(HOME)/.pyenv/versions/3.10*/bin/python3.10),\
	$(shell $(candidate) -c 'import sys; assert sys.version_info[:2] == (3, 10)' >/dev/null 2>&1 && echo $(candidate))))
SLICER_TESTS := Testing/Python/test_slicer_logic.py Testing/Python/test_slicer_cine.py Testing/Python/test_panel.py \
	Testing/Python/test_ui_file.py
# Also run by the main suite: the regeneration check needs pydicom 3; the runtime checks meet both torch versions.
SLICER_ALSO := Testing/Python/test_test_data.py $(wildcard Testing/Python/test_slicer_runtime.py)

.PHONY: setup setup-slicer demo lint test lint-and-test-main test-main test-slicer test-all clean

$(UV): constraints.txt
	@$(PYTHON) -m venv $(VENV) || { echo "Could not create a virtual environment: install Python >= 3.10 with venv (Debian/Ubuntu: apt-get install python3-venv)."; exit 1; }
	$(BIN)/python -m pip install --quiet --no-compile -c constraints.txt uv
	@touch $@

$(STAMP): pyproject.toml constraints.txt | $(UV)
	$(UV) pip install --quiet --python $(BIN)/python -c constraints.txt torch==2.13.0 -e '.[test]'
	@touch $@

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m SSMSRRegistrationLib.interfaces.demo --out demo_output

$(SLICER_STAMP): constraints-slicer.txt | $(UV)
	@py="$(SLICER_PYTHON)"; if [ -z "$$py" ]; then py=python3; \
	  echo "WARNING: no Python 3.10 found; building $(SLICER_VENV) with $$(python3 --version) instead (slicer-core needs >= 3.10; Slicer 5.6 runs 3.9)."; fi; \
	  rm -rf $(SLICER_VENV) && $$py -m venv $(SLICER_VENV)
	$(UV) pip install --quiet --python $(SLICER_BIN)/python -c constraints-slicer.txt numpy SimpleITK pydicom Pillow torch slicer-core pytest
	@touch $@

setup-slicer: $(SLICER_STAMP)

# ruff and vermin (Python 3.9 compatibility, as Slicer 5.6 and 5.8 run it) and, where a Python 3.9 exists, its compileall.
lint: $(STAMP)
	VENV=$(VENV) Testing/scripts/lint.sh

# The two suites run side by side (their set-ups too), the main one in two pytest-xdist processes, a test file per
# process; each suite's output is printed when it ends. -k (as .ci/run gives) runs the other suite when one fails.
# OMP_NUM_THREADS=1: the three test processes and every worker or command they start compute on one thread each, so
# that they do not fight over two cores (test_threads checks the default thread count with OMP_* removed).
test:
	@echo "Setting up and running the main and the Slicer-side suites side by side; each prints its report when it ends."
	@OMP_NUM_THREADS=1 $(MAKE) --no-print-directory -j2 --output-sync=target lint-and-test-main test-slicer

lint-and-test-main: lint
	@$(MAKE) --no-print-directory test-main

test-main: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=20 $(addprefix --ignore=,$(SLICER_TESTS))

test-slicer: $(SLICER_STAMP)
	$(SLICER_BIN)/python -m pytest -q -p no:cacheprovider --durations=10 $(SLICER_TESTS) $(SLICER_ALSO)

test-all: $(STAMP) $(SLICER_STAMP)
	$(BIN)/python -m pytest -q -m "slow or not slow" $(addprefix --ignore=,$(SLICER_TESTS))
	$(SLICER_BIN)/python -m pytest -q -p no:cacheprovider -m "slow or not slow" $(SLICER_TESTS) $(SLICER_ALSO)

clean:
	rm -rf $(VENV) $(SLICER_VENV) demo_output
