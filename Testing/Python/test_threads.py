"""Threads of a run: passive waiting and a thread count from the CPU affinity (and container quota), chosen before
torch starts, unless the user says otherwise; ``--threads`` overrides."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from SSMSRRegistrationLib.common.errors import InputError
from SSMSRRegistrationLib.interfaces.threads import available_cores, configure_threads

MODULE_DIRECTORY = str(Path(__file__).resolve().parents[2] / "SSMSRRegistration")

RUN_AND_REPORT = """
import os, sys
import numpy as np, SimpleITK as sitk
from SSMSRRegistrationLib.interfaces.cli import main
image = sitk.GetImageFromArray(np.random.default_rng(0).random((40, 48)).astype(np.float32))
sitk.WriteImage(image, sys.argv[1] + "/f.nii.gz")
code = main(["register", sys.argv[1] + "/f.nii.gz", sys.argv[1] + "/f.nii.gz", "-o", sys.argv[1] + "/u.nii.gz",
             "--scales", "1", "--steps", "1", "--device", "cpu", "--progress", "none", *sys.argv[2:]])
import torch
print(code, os.environ.get("OMP_WAIT_POLICY"), os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads())
"""


def run(tmp_path, *options, environment=None, cores=None):
    env = {key: value for key, value in os.environ.items() if not key.startswith("OMP_")}
    env.update(environment or {}, PYTHONPATH=MODULE_DIRECTORY)
    preexec = (lambda: os.sched_setaffinity(0, cores)) if cores is not None else None
    result = subprocess.run([sys.executable, "-c", RUN_AND_REPORT, str(tmp_path), *options], env=env,
                            capture_output=True, text=True, timeout=300, preexec_fn=preexec)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_a_new_run_waits_passively_with_the_cores_it_may_use(tmp_path):
    assert run(tmp_path) == ["0", "PASSIVE", str(available_cores()), str(available_cores())]
    assert run(tmp_path, cores={0}) == ["0", "PASSIVE", "1", "1"]


def test_the_users_choices_win(tmp_path):
    assert run(tmp_path, "--threads", "3") == ["0", "PASSIVE", "3", "3"]
    assert run(tmp_path, environment={"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "1"}) == ["0", "ACTIVE", "1", "1"]


def test_a_thread_count_below_one_is_refused(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    with pytest.raises(InputError, match="--threads must be at least 1"):
        configure_threads(0)
