"""Make the ``SSMSRRegistrationLib`` package importable from a source checkout (before ``pip install -e .``), and let
the test process's OpenMP threads sleep while they wait, as the ``ssmsr`` command does (``interfaces.threads``):
many tests start worker processes that share the cores with this one. When pytest-xdist runs two test processes
side by side (``make test``), each computes with one torch thread, so that the two do not fight over the cores."""

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported by any test module

MODULE_DIRECTORY = Path(__file__).resolve().parents[2] / "SSMSRRegistration"
if str(MODULE_DIRECTORY) not in sys.path:
    sys.path.insert(0, str(MODULE_DIRECTORY))


@pytest.fixture(autouse=True)
def one_torch_thread_per_xdist_worker():
    """Under pytest-xdist, one torch thread in this process for every test (a test may have changed it, e.g. through
    the command line's ``--threads``). Processes a test starts choose their own."""
    if os.environ.get("PYTEST_XDIST_WORKER") and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    yield


#: The test files that take longest (``make test`` prints the slowest tests), run first: pytest-xdist hands each of
#: its two processes a file at a time in collection order (with ``--no-loadscope-reorder``, which ``make test-main``
#: passes; by default it orders the files by their number of tests), so a long file collected last would run alone
#: at the end.
SLOWEST_FILES_FIRST = ("test_sequences_3d.py", "test_batch.py", "test_registration.py", "test_reproducibility.py",
                       "test_tracking.py", "test_alignment.py", "test_models.py", "test_physical_space.py",
                       "test_threads.py", "test_cli.py")


def pytest_collection_modifyitems(items):
    """Put the files of SLOWEST_FILES_FIRST first, in that order (a stable sort: each file keeps its own order)."""
    rank = {name: index for index, name in enumerate(SLOWEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
