"""The test data that the module ships (``Resources/TestData``): present, installed by CMake, read without pydicom
(Slicer's pydicom 2.4 lacks the echocardiogram cine), and exactly what ``Testing/scripts/make_test_data.py`` writes.

Runs in both environments: the project's venv (pydicom 3, where the regeneration check runs) and ``.venv-slicer``
(the packages Slicer 5.6.2 ships, pydicom 2.4.3).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from SSMSRRegistrationLib.imaging import sample_data

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "Testing" / "scripts" / "make_test_data.py"
#: Every frame set that the Slicer-side scenarios load (self-test and tests of the Slicer logic and cine).
SCENARIO_FRAME_SETS = [(0, 20), (0,), (0, 10, 20), (0, 1, 2, 3)]


def test_every_shipped_file_exists_and_cmake_installs_it():
    cmake = (ROOT / "SSMSRRegistration" / "CMakeLists.txt").read_text()
    listed = set(re.findall(r"Resources/TestData/[\w.]+", cmake))
    shipped = {f"Resources/TestData/{name}" for name in
               [sample_data.shipped_echo_frame_path(index).name for index in sample_data.SHIPPED_ECHO_FRAMES]
               + [sample_data.BRAIN_T1_CROP_FILE, sample_data.BRAIN_WHITE_MATTER_CROP_FILE]}
    for name in shipped:
        assert (ROOT / "SSMSRRegistration" / name).is_file(), f"{name} is missing: run Testing/scripts/make_test_data.py"
    assert listed == shipped, f"CMakeLists.txt installs {sorted(listed)}, the module reads {sorted(shipped)}"
    present = {f"Resources/TestData/{path.name}" for path in sample_data.TEST_DATA_DIRECTORY.iterdir()
               if path.suffix == ".nrrd"}
    assert present == shipped, f"files in Resources/TestData that nothing reads: {sorted(present - shipped)}"
    for frames in SCENARIO_FRAME_SETS:
        assert set(frames) <= set(sample_data.SHIPPED_ECHO_FRAMES)


def test_slicer_side_loaders_read_the_shipped_data_without_pydicom_or_nilearn():
    """In a process where ``import pydicom`` and ``import nilearn`` fail, the scenarios' loader gives every frame set
    they use, and the brain crop reads too."""
    pytest.importorskip("slicer")
    code = textwrap.dedent(f"""
        import sys
        sys.modules["pydicom"] = sys.modules["nilearn"] = None  # importing either now raises ImportError
        sys.path.insert(0, {str(ROOT / "SSMSRRegistration")!r})
        from SSMSRRegistrationLib.testing import scenarios, scene_helpers
        for frames in {SCENARIO_FRAME_SETS!r}:
            arrays, spacing = scene_helpers.echocardiogramFrames(frameIndices=frames)
            assert len(arrays) == len(frames)
            assert all(a.shape == (120, 160) and a.dtype.name == "float32" for a in arrays), [a.shape for a in arrays]
            assert all(0.0 <= a.min() and a.max() <= 1.0 and a.std() > 0.05 for a in arrays)
            assert abs(spacing - 1.02099) < 1e-4, spacing
        from SSMSRRegistrationLib.imaging import sample_data
        t1, whiteMatter = sample_data.shipped_brain_crop()
        assert t1.GetSize() == whiteMatter.GetSize() == (32, 40, 32) and t1.GetSpacing() == (2.0, 2.0, 2.0)
        import SimpleITK as sitk
        assert 0.05 < sitk.GetArrayFromImage(whiteMatter).mean() < 0.6
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr


def test_a_frame_that_is_not_shipped_is_named_in_the_error():
    from SSMSRRegistrationLib.common.errors import InputError

    with pytest.raises(InputError, match="Echo frame 5 is not shipped"):
        sample_data.shipped_echo_frames([0, 5])


def test_regenerating_the_test_data_gives_the_committed_files(tmp_path):
    """Needs pydicom >= 3 (the project's venv), which has the cine; about a second."""
    from SSMSRRegistrationLib.common.errors import InputError

    try:
        sample_data.echo_cine_path()
    except InputError:
        pytest.skip("no pydicom with examples_ybr_color.dcm here (pydicom < 3, as in Slicer)")
    result = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    written = sorted(path.name for path in tmp_path.iterdir())
    committed = sorted(path.name for path in sample_data.TEST_DATA_DIRECTORY.iterdir() if path.suffix == ".nrrd")
    assert written == committed
    for name in written:
        assert (tmp_path / name).read_bytes() == (sample_data.TEST_DATA_DIRECTORY / name).read_bytes(), (
            f"{name} differs from a fresh run of {SCRIPT.name}: regenerate and commit it")
