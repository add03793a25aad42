"""Make the ``SSMSRRegistrationLib`` package importable from a source checkout (before ``pip install -e .``)."""

import sys
from pathlib import Path

MODULE_DIRECTORY = Path(__file__).resolve().parents[2] / "SSMSRRegistration"
if str(MODULE_DIRECTORY) not in sys.path:
    sys.path.insert(0, str(MODULE_DIRECTORY))
