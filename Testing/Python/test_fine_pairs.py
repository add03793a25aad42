"""The presets' values for fine pairs (``presets.Preset.fine_pairs``): which registrations take them
(``register``'s working grid: 3D, finer than ``half_field_below``, large enough for a 1/8 scale of 16 voxels a
side) and how they combine with the pairs' values and the user's overrides."""

from fractions import Fraction

import numpy as np
import pytest
import SimpleITK as sitk

import SSMSRRegistrationLib as ssmsr
from SSMSRRegistrationLib.common.presets import PRESETS
from SSMSRRegistrationLib.common.run_config import RunConfiguration
from SSMSRRegistrationLib.workflows import register as register_workflow
from SSMSRRegistrationLib.workflows import working_plan
from test_spatial import blobs


def test_fine_pairs_take_the_presets_fine_values_before_its_pairs_and_the_users_before_both():
    balanced = RunConfiguration.of("balanced")
    pairs, fine = balanced.resolve("pair"), balanced.resolve("pair", fine=True)
    assert (pairs.scales, pairs.steps, pairs.patch_size) == ("1/4,1/2,1", 300, None)
    assert (fine.scales, fine.steps, fine.patch_size) == ("1/8,1/4,1/2,1", 150, 64)
    assert fine.smoothness_weight == pairs.smoothness_weight == 3.0  # what the fine values do not name is the pairs'
    fast = RunConfiguration.of("fast").resolve("pair", fine=True)
    assert (fast.scales, fast.steps, fast.patch_size, fast.smoothness_weight) == ("1/8,1/4,1/2,1", 80, 64, 3.0)
    assert RunConfiguration.of("fast").resolve("pair").smoothness_weight == 10.0
    assert RunConfiguration.of("balanced", steps=200).resolve("pair", fine=True).steps == 200
    assert RunConfiguration.of("paper").resolve("pair", fine=True) == RunConfiguration.of("paper").resolve("pair")
    for kind in ("cine", "volume_cine", "pretrain"):
        assert balanced.resolve(kind, fine=True) == balanced.resolve(kind)
    assert not PRESETS["paper"].fine_pairs


def _plan(monkeypatch, size, spacing_mm, **options):
    """The engine settings and run values ``register`` trains with on a blank image of ``size`` (x, y[, z])."""
    monkeypatch.setattr(working_plan, "seconds_per_voxel_step", lambda *args, **kwargs: 1e-7)
    image = sitk.Image(list(size), sitk.sitkFloat32)
    image.SetSpacing([spacing_mm] * len(size))
    resolved = register_workflow._resolve_options(None, None, None, options.pop("preset", None),
                                                  {"device": "cpu", **options})
    plan = register_workflow._plan_grid(image, resolved)
    return resolved.settings, resolved.run, plan


def test_a_1_mm_brain_sized_grid_trains_the_fine_values(monkeypatch):
    settings, run, plan = _plan(monkeypatch, (130, 150, 128), 1.0)
    assert settings.scales == (Fraction(1, 8), Fraction(1, 4), Fraction(1, 2), Fraction(1))
    assert (settings.steps_per_scale, settings.patch_size, run.steps, run.scales) == (150, 64, 150, "1/8,1/4,1/2,1")
    # Planned with the fine values: 4 scales of 150 steps, the two finest on 64^3 patches (at 1e-7 s a voxel-step).
    voxels = [16 * 19 * 16, 32 * 38 * 32, 64 ** 3, 64 ** 3]
    assert plan.estimated_seconds == pytest.approx(150 * 1e-7 * sum(voxels))


@pytest.mark.parametrize("size, spacing_mm, preset", [
    ((96, 110, 96), 1.0, "balanced"),   # a 1 mm crop: 1/8 of it would be 12 voxels a side
    ((130, 150, 128), 2.0, "balanced"),  # 2 mm voxels: over the half-field bound
    ((130, 150, 128), 1.0, "paper"),     # no fine values (and no half-resolution fields)
    ((300, 320), 1.0, "balanced"),       # 2D
])
def test_other_grids_train_the_pairs_values(monkeypatch, size, spacing_mm, preset):
    settings, run, _ = _plan(monkeypatch, size, spacing_mm, preset=preset)
    assert run == RunConfiguration.of(preset, device="cpu").resolve("pair")
    assert settings.steps_per_scale == run.steps and settings.patch_size == run.patch_size


def test_the_users_values_win_on_a_fine_grid(monkeypatch):
    settings, run, _ = _plan(monkeypatch, (130, 150, 128), 1.0, steps=200, scales="1/4,1")
    assert settings.scales == (Fraction(1, 4), Fraction(1)) and settings.steps_per_scale == 200
    assert settings.patch_size == 64  # the fine value the user did not override


def test_register_trains_a_1_mm_brain_sized_pair_with_the_fine_values_and_records_them(monkeypatch):
    """Through the API (one step a scale): the four scales train and predict, the provenance records the fine
    values, and the user's steps override reaches every scale."""
    monkeypatch.setattr(working_plan, "seconds_per_voxel_step", lambda *args, **kwargs: 1e-7)
    volume = blobs((128, 150, 130))[0, 0].numpy()
    fixed, moving = sitk.GetImageFromArray(volume), sitk.GetImageFromArray(np.roll(volume, 2, axis=2))
    events = []
    output = ssmsr.register(fixed, moving, initial="none", steps=1, device="cpu", progress=events.append)
    started = next(event for event in events if event["event"] == "started")
    assert started["scales"] == ["1/8", "1/4", "1/2", "1"] and started["scale_steps"] == [1, 1, 1, 1]
    assert started["half_field_scales"] == ["1/4", "1/2", "1"]
    settings = output.provenance["settings"]
    assert (settings["scales"], settings["steps_per_scale"], settings["patch_size"]) == (
        ["1/8", "1/4", "1/2", "1"], 1, 64)
    assert output.provenance["configuration"]["overrides"] == {"steps": 1, "device": "cpu"}
