"""Make the ``SSMSRRegistrationLib`` package importable from a source checkout (before ``pip install -e .``), and let
the test process's OpenMP threads sleep while they wait, as the ``ssmsr`` command does (``interfaces.threads``):
many tests start worker processes that share the cores with this one."""

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported by any test module

MODULE_DIRECTORY = Path(__file__).resolve().parents[2] / "SSMSRRegistration"
if str(MODULE_DIRECTORY) not in sys.path:
    sys.path.insert(0, str(MODULE_DIRECTORY))
