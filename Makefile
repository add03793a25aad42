# Two entry points (see README): `make demo` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-all clean

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -m venv $(VENV) || { echo "Could not create a virtual environment: install Python >= 3.10 with venv (Debian/Ubuntu: apt-get install python3-venv)."; exit 1; }
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	@touch $@

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m SSMSRRegistrationLib.interfaces.demo --out demo_output

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow or not slow"

clean:
	rm -rf $(VENV) demo_output
