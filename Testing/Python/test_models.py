"""Pretraining on a collection, saved models, and atlas selection (issue 7).

Real images: 2D axial slices of nilearn's ICBM152 T1 template at different levels (4 mm pixels, 48x44), each
deformed by known smooth random deformations, make the training, validation and held-out pairs.
"""

from __future__ import annotations

import csv
import json
import os
from functools import lru_cache

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SSMSRRegistrationLib.imaging import sample_data
from SSMSRRegistrationLib.interfaces.cli import EXIT_INPUT, EXIT_OK, main
from SSMSRRegistrationLib.engine.multiscale import RegistrationSettings, register_tensors, similarity
from SSMSRRegistrationLib.engine.pretraining import (TensorPairs, TrainingSettings, batch_indices,
                                                     coarse_to_fine_field, train_networks)
from SSMSRRegistrationLib.common.schedule import parse_scales
from SSMSRRegistrationLib.engine.spatial import gaussian_blur, warp
from SSMSRRegistrationLib.engine.unet import RegistrationUNet
from SSMSRRegistrationLib.common.errors import InputError, TrainingStopped
from SSMSRRegistrationLib.workflows.models import FORMAT_VERSION, load_model, save_model
from SSMSRRegistrationLib.workflows.segment import majority_vote, rank_atlases, segment
from SSMSRRegistrationLib.workflows.train import collect_pairs, train

SPACING = (4.0, 4.0)
TRAINING_LEVELS = tuple(range(50, 140, 6))  # 15 axial levels
HELD_OUT_LEVEL = 96  # not a training level
STEPS = 150


@lru_cache(maxsize=None)
def _volumes():
    return sitk.GetArrayFromImage(sample_data.brain_t1()), sitk.GetArrayFromImage(sample_data.brain_tissue_labels())


def brain(level: int) -> np.ndarray:
    """Axial slice ``level`` of the ICBM152 T1 template at 4 mm, scaled to [0, 1] (48 x 44, float32)."""
    image = _volumes()[0][level, 20:212:4, 10:186:4].astype(np.float32)
    return (image - image.min()) / (image.max() - image.min())


def tissue(level: int) -> np.ndarray:
    """Grey (1) / white (2) matter labels of the same slice (uint8)."""
    return _volumes()[1][level, 20:212:4, 10:186:4].copy()


def random_field(shape, amplitude: float, seed: int) -> torch.Tensor:
    """(1, 2, *shape) smooth random voxel field with peak |component| ``amplitude``."""
    noise = torch.randn((1, 2) + tuple(shape), generator=torch.Generator().manual_seed(seed))
    field = gaussian_blur(noise, [5.0, 5.0])
    return field * (amplitude / field.abs().max())


def deform(image: np.ndarray, field: torch.Tensor, labels: bool = False) -> np.ndarray:
    tensor = torch.from_numpy(np.ascontiguousarray(image)).float()[None, None]
    warped = warp(tensor, field, mode="nearest" if labels else "linear")[0, 0].numpy()
    return warped.astype(image.dtype) if labels else warped.astype(np.float32)


def pair(level: int, seed: int, amplitude: float = 3.0):
    """(fixed, moving) tensors: a brain slice and the same slice under a random smooth deformation."""
    fixed = brain(level)
    moving = deform(fixed, random_field(fixed.shape, amplitude, seed))
    return torch.from_numpy(fixed)[None, None], torch.from_numpy(moving)[None, None]


def write_image(path, array, spacing=SPACING, origin=(0.0, 0.0)) -> str:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    sitk.WriteImage(image, str(path))
    return str(path)


def write_collection(folder, levels=TRAINING_LEVELS, seed=100, amplitude: float = 3.0) -> str:
    """Image files and a CSV of fixed,moving pairs (relative paths) for the given levels."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "pairs.csv", "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["fixed", "moving"])
        for index, level in enumerate(levels):
            fixed, moving = pair(level, seed + index, amplitude)
            write_image(folder / f"fixed{level}.nii.gz", fixed[0, 0].numpy())
            write_image(folder / f"moving{level}.nii.gz", moving[0, 0].numpy())
            writer.writerow([f"fixed{level}.nii.gz", f"moving{level}.nii.gz"])
    return str(folder / "pairs.csv")


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Small 2D images: one thread is as fast as two, and much faster when other processes share the cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A model pretrained through the file-based API on 12 training and 3 validation pairs.

    The deformations (up to 6 pixels) are large enough that the coarse scale's gain on the validation loss stands
    clear of the bound of the test below; with 3 pixels it was 0.004 to 0.010 and the test failed on some CPUs.
    Over training seeds 0-4 (`python Testing/benchmarks/seed_spread.py --seeds 5 --scenarios pretraining`,
    RESULTS.md): coarse gain 0.0224 +- 0.0049 (bound 0.005: the mean minus 3.5 standard deviations), fine-scale
    change -0.0204 +- 0.0078 (bound +0.002: "no worse", 2.9 sd above the mean), NCC after 80 steps pretrained minus
    from scratch +0.0042 +- 0.0022 (bound -0.002: "no worse", 2.8 sd below the mean)."""
    folder = tmp_path_factory.mktemp("collection")
    pairs_csv = write_collection(folder, amplitude=6.0)
    events = []
    result = train(pairs_csv, folder / "model.pt", scales="1/2,1", steps=STEPS, batch_size=4,
                   validation_fraction=0.2, validation_every=50, checkpoint_every=100, device="cpu",
                   progress=events.append)
    return result, events, folder


# ---------------------------------------------------------------------------------------------------------------
# Pretraining


def test_training_lowers_the_validation_loss(pretrained):
    result, events, folder = pretrained
    history = result.model.training["validation_history"]
    assert result.model.complete and result.model.training["training_pairs"] == 12
    assert result.model.training["validation_pairs"] == 3
    losses = {scale: [r["loss"] for r in history if r["scale"] == scale] for scale in ("1/2", "1")}
    assert [r["step"] for r in history] == [0, 50, 100, STEPS] * 2
    # The coarse network does most of the work on these deformations; the fine one must not make things worse.
    assert losses["1/2"][0] - losses["1/2"][-1] > 0.005, f"validation loss barely moved at scale 1/2: {losses}"
    assert losses["1"][-1] < losses["1"][0] + 0.002, f"validation loss rose at scale 1: {losses}"
    # Validated on held-out pairs: the loss at the start of scale 1 includes the trained coarse field.
    assert result.summary["validation_loss_per_scale"]["1/2"]["last"] == losses["1/2"][-1]
    kinds = [event["event"] for event in events]
    assert kinds[0] == "started" and {"progress", "validation", "checkpoint"} <= set(kinds)
    checkpoints = [event for event in events if event["event"] == "checkpoint"]
    assert [(c["scale_index"], c["step"], c["complete"]) for c in checkpoints] == [
        (0, 100, False), (1, 0, False), (1, 100, False), (1, STEPS, True)]
    assert sorted(os.listdir(folder)).count("model.pt") == 1
    assert not [name for name in os.listdir(folder) if ".partial-" in name], "temporary files left behind"


def test_pretrained_model_converges_in_fewer_steps_on_a_held_out_pair(pretrained):
    """Test-time training from the pretrained model reaches a given NCC in at most half the steps from scratch, and
    ends no worse after 80 steps than the spread allows: over ten runs (seeds 0-4, before and after the window sums
    changed in rounding only; `seed_spread.py --scenarios pretraining`, RESULTS.md) pretrained minus scratch was
    0.0020 +- 0.0043 (at least -0.0050); the bound is the mean minus 3.5 standard deviations."""
    model = load_model(pretrained[0].path)
    fixed, moving = pair(HELD_OUT_LEVEL, seed=999)
    budgets = (5, 10, 20, 40, 80)

    def ncc_after(steps, networks):
        settings = RegistrationSettings(scales=model.scales, steps_per_scale=steps)
        result = register_tensors(fixed, moving, settings, initial_networks=networks, device="cpu")
        return similarity(fixed, moving, result.displacement, 6)["ncc"]

    identity = similarity(fixed, moving, None, 6)["ncc"]
    inference = ncc_after(0, model.networks)  # the VoxelMorph-equivalent baseline
    scratch = {steps: ncc_after(steps, None) for steps in budgets}
    warm = {steps: ncc_after(steps, model.networks) for steps in budgets}
    print(f"identity {identity:.4f}, pretrained inference {inference:.4f}\nscratch {scratch}\npretrained {warm}")
    assert inference > identity + 0.015, "the pretrained networks alone do not register the held-out pair"
    target = scratch[40]
    steps_scratch = min(s for s in budgets if scratch[s] >= target)
    steps_warm = min(s for s in budgets if warm[s] >= target)
    assert steps_warm <= steps_scratch // 2, f"pretrained needs {steps_warm} steps, scratch {steps_scratch}"
    assert warm[80] >= scratch[80] - 0.014


def test_engine_inference_matches_register_tensors_with_zero_steps(pretrained):
    """Pretraining warps each scale's input with exactly the field that test-time inference computes."""
    model = pretrained[0].model
    fixed, moving = pair(HELD_OUT_LEVEL, seed=5)
    networks = []
    for state in model.networks:
        network = RegistrationUNet(2)
        network.load_state_dict(state)
        networks.append(network.eval())
    ours = coarse_to_fine_field(networks, fixed, moving, model.scales)
    theirs = register_tensors(fixed, moving, RegistrationSettings(scales=model.scales, steps_per_scale=0),
                              initial_networks=model.networks, device="cpu").displacement
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_batches_are_epochs_of_a_seeded_permutation():
    first_epoch = [i for step in range(5) for i in batch_indices(3, 0, step, 10, 2)]
    assert sorted(first_epoch) == list(range(10))
    assert batch_indices(3, 0, 7, 10, 2) == batch_indices(3, 0, 7, 10, 2)
    second_epoch = [i for step in range(5, 10) for i in batch_indices(3, 0, step, 10, 2)]
    assert sorted(second_epoch) == list(range(10)) and second_epoch != first_epoch
    assert [batch_indices(3, 1, step, 10, 2) for step in range(5)] != [batch_indices(3, 0, step, 10, 2) for step in range(5)]


def test_batch_of_pairs_of_different_sizes_is_rejected_and_batch_one_trains():
    small = pair(80, 1)
    cropped = tuple(t[..., :40, :36].contiguous() for t in pair(90, 2))
    settings = TrainingSettings(scales=parse_scales("1/2,1"), steps_per_scale=2, batch_size=2, checkpoint_every=0)
    with pytest.raises(InputError, match="needs images of one size.*batch size of 1"):
        train_networks(TensorPairs([small, cropped]), None, settings)
    settings.batch_size = 1
    state = train_networks(TensorPairs([small, cropped]), None, settings)
    assert len(state.networks) == 2 and all(len(v) == 2 for v in state.loss_history.values())
    settings.batch_size = 3
    with pytest.raises(InputError, match="larger than the 2 training pairs"):
        train_networks(TensorPairs([small, cropped]), None, settings)


def test_resumed_training_equals_an_uninterrupted_run(tmp_path):
    pairs_csv = write_collection(tmp_path / "c", levels=(60, 70, 80, 90, 100), seed=7)
    options = dict(scales="1/2,1", steps=12, batch_size=2, validation_fraction=0.2, checkpoint_every=5,
                   validation_every=4, device="cpu")
    whole = train(pairs_csv, tmp_path / "whole.pt", **options)

    polls = []
    stop_after = 17  # inside the second scale

    def should_stop():
        polls.append(1)
        return len(polls) >= stop_after

    with pytest.raises(TrainingStopped, match="--resume"):
        train(pairs_csv, tmp_path / "part.pt", should_stop=should_stop, **options)
    checkpoint = load_model(tmp_path / "part.pt")
    assert not checkpoint.complete and checkpoint.resume["scale_index"] == 1 and checkpoint.resume["step"] == 4
    with pytest.raises(InputError, match="unfinished training"):
        checkpoint.check_fits(2)

    with pytest.raises(InputError, match="trained with learning rate 0.001, not 0.01"):
        train(pairs_csv, tmp_path / "part.pt", resume=tmp_path / "part.pt", learning_rate=0.01)
    other_csv = write_collection(tmp_path / "other", levels=(61, 71, 81, 91, 101), seed=7)
    with pytest.raises(InputError, match="another collection"):
        train(other_csv, tmp_path / "part.pt", resume=tmp_path / "part.pt")
    with pytest.raises(InputError, match="already exists"):
        train(pairs_csv, tmp_path / "part.pt", **options)

    resumed = train(pairs_csv, tmp_path / "part.pt", resume=tmp_path / "part.pt", device="cpu")
    assert resumed.model.complete
    for a, b in zip(whole.model.networks, resumed.model.networks):
        assert all(torch.equal(a[key], b[key]) for key in a)
    for key, values in whole.model.training["loss_history"].items():
        assert torch.equal(values, resumed.model.training["loss_history"][key])
    assert whole.model.training["validation_history"] == resumed.model.training["validation_history"]
    with pytest.raises(InputError, match="finished model"):
        train(pairs_csv, tmp_path / "part.pt", resume=tmp_path / "part.pt")


def test_folder_collection_holds_out_whole_images(tmp_path):
    for level in (60, 70, 80, 90, 100, 110):
        write_image(tmp_path / f"scan{level}.nii.gz", brain(level))
    (tmp_path / "notes.txt").write_text("not an image")
    collection = collect_pairs(str(tmp_path), validation_fraction=0.3, seed=1)
    training_images = {p for pair_ in collection.training for p in pair_}
    validation_images = {p for pair_ in collection.validation for p in pair_}
    assert len(training_images) == 4 and len(validation_images) == 2
    assert not training_images & validation_images
    assert len(collection.training) == 12 and len(collection.validation) == 2
    with pytest.raises(InputError, match="too few to hold out"):
        collect_pairs(str(tmp_path), validation_fraction=0.9)


def test_bad_pairs_files_are_reported_with_line_numbers(tmp_path):
    write_image(tmp_path / "a.nii.gz", brain(80))
    (tmp_path / "missing.csv").write_text("fixed,moving\na.nii.gz,b.nii.gz\n")
    with pytest.raises(InputError, match=r"line 2: 'b.nii.gz'"):
        collect_pairs(str(tmp_path / "missing.csv"))
    (tmp_path / "three.csv").write_text("a.nii.gz,a.nii.gz,a.nii.gz\n")
    with pytest.raises(InputError, match="line 1: expected two paths"):
        collect_pairs(str(tmp_path / "three.csv"))


def test_sigterm_stops_the_training_command_with_a_resumable_checkpoint(tmp_path):
    import signal
    import subprocess
    import sys
    from pathlib import Path

    pairs_csv = write_collection(tmp_path / "c", levels=(60, 75, 90), seed=5)
    model_path = tmp_path / "model.pt"
    module_directory = str(Path(__file__).resolve().parents[2] / "SSMSRRegistration")
    environment = dict(os.environ, PYTHONPATH=module_directory + os.pathsep + os.environ.get("PYTHONPATH", ""),
                       OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, "-m", "SSMSRRegistrationLib", "train", pairs_csv, "-o", str(model_path),
                                "--steps", "100000", "--validation-fraction", "0", "--device", "cpu",
                                "--progress", "jsonl"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=environment)
    for line in process.stdout:
        if json.loads(line)["event"] == "progress":
            break
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    error = json.loads(stdout.splitlines()[-1])
    assert error["event"] == "error" and error["kind"] == "cancelled" and "--resume" in error["message"]
    checkpoint = load_model(model_path)
    assert checkpoint.resume["scale_index"] == 0 and checkpoint.resume["step"] >= 1
    assert len(checkpoint.training["loss_history"]["1/2"]) == checkpoint.resume["step"]


# ---------------------------------------------------------------------------------------------------------------
# The model file


def test_saved_model_loads_with_identical_outputs(pretrained, tmp_path):
    result = pretrained[0]
    loaded = load_model(result.path)
    assert (loaded.ndim, loaded.scales, loaded.ncc_window, loaded.smoothness_weight) == (2, parse_scales("1/2,1"), 6, 10.0)
    assert loaded.encoder_channels == result.model.encoder_channels
    raw = torch.load(result.path, weights_only=True, map_location="cpu")
    assert raw["format"] == "ssmsr-model" and raw["format_version"] == FORMAT_VERSION and raw["resume"] is None
    assert raw["training"]["steps_per_scale"] == STEPS and len(raw["training"]["loss_history"]["1"]) == STEPS

    fixed, moving = pair(HELD_OUT_LEVEL, seed=3)
    settings = RegistrationSettings(scales=loaded.scales, steps_per_scale=0)
    before = register_tensors(fixed, moving, settings, initial_networks=result.model.networks, device="cpu")
    copy_path = save_model(loaded, tmp_path / "copy.pt")
    after = register_tensors(fixed, moving, settings, initial_networks=load_model(copy_path).networks, device="cpu")
    assert torch.equal(before.displacement, after.displacement)
    assert before.displacement.abs().max() > 0.5, "the pretrained model predicts (almost) no displacement"


def test_truncated_foreign_and_incompatible_files_are_rejected(pretrained, tmp_path):
    good = pretrained[0].path
    data = open(good, "rb").read()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="not a readable PyTorch file.*truncated"):
        load_model(tmp_path / "truncated.pt")
    (tmp_path / "notes.pt").write_text("these are not weights\n")
    with pytest.raises(InputError, match="not a PyTorch file"):
        load_model(tmp_path / "notes.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(InputError, match="empty file"):
        load_model(tmp_path / "empty.pt")
    torch.save({"weights": torch.randn(3, 3), "epoch": 4}, tmp_path / "foreign.pt")
    with pytest.raises(InputError, match="not an SSMSR model"):
        load_model(tmp_path / "foreign.pt")
    torch.save({"format": "ssmsr-model", "payload": torch.nn.Linear(2, 2)}, tmp_path / "pickled.pt")
    with pytest.raises(InputError, match="Python objects other than tensors"):
        load_model(tmp_path / "pickled.pt")
    with pytest.raises(InputError, match="does not exist"):
        load_model(tmp_path / "absent.pt")

    raw = torch.load(good, weights_only=True)
    torch.save({**raw, "format_version": FORMAT_VERSION + 1}, tmp_path / "newer.pt")
    with pytest.raises(InputError, match="update SSMSR"):
        load_model(tmp_path / "newer.pt")
    torch.save({**raw, "config": {**raw["config"], "encoder_channels": [8, 16, 16, 16]}}, tmp_path / "channels.pt")
    with pytest.raises(InputError, match="wrong shape"):
        load_model(tmp_path / "channels.pt")
    broken = [dict(state) for state in raw["networks"]]
    broken[1]["flow.bias"] = torch.full_like(broken[1]["flow.bias"], float("nan"))
    torch.save({**raw, "networks": broken}, tmp_path / "nan.pt")
    with pytest.raises(InputError, match="diverged"):
        load_model(tmp_path / "nan.pt")

    model = load_model(good)
    with pytest.raises(InputError, match="trained on 2D images but the images to register are 3D"):
        model.check_fits(3)
    with pytest.raises(InputError, match="trained for the scales 1/2,1, not 1/4,1/2,1"):
        model.check_fits(2, parse_scales("1/4,1/2,1"))


def test_register_with_a_model_from_the_command_line(pretrained, tmp_path, capsys):
    """`ssmsr register --model M --steps 0` is pure inference; a wrong schedule or a foreign file exits with 2."""
    model_path = pretrained[0].path
    fixed, moving = pair(HELD_OUT_LEVEL, seed=11)
    fixed_path = write_image(tmp_path / "fixed.nii.gz", fixed[0, 0].numpy())
    moving_path = write_image(tmp_path / "moving.nii.gz", moving[0, 0].numpy())
    code = main(["register", fixed_path, moving_path, "-o", str(tmp_path / "field.nii.gz"), "--model", model_path,
                 "--steps", "0", "--device", "cpu", "--progress", "jsonl"])
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == EXIT_OK, events[-1]
    metrics = events[-1]["metrics"]
    assert metrics["ncc_after"] > metrics["ncc_before"] + 0.015 and metrics["model"] == model_path

    code = main(["register", fixed_path, moving_path, "-o", str(tmp_path / "f2.nii.gz"), "--model", model_path,
                 "--scales", "1/4,1/2,1", "--progress", "jsonl"])
    error = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert code == EXIT_INPUT and "leave --scales out" in error["message"] and "set it to 1/2,1" in error["message"]
    (tmp_path / "bad.pt").write_text("junk")
    code = main(["register", fixed_path, moving_path, "-o", str(tmp_path / "f3.nii.gz"), "--model",
                 str(tmp_path / "bad.pt"), "--progress", "jsonl"])
    assert code == EXIT_INPUT and not (tmp_path / "f3.nii.gz").exists()


def test_train_command_writes_a_model_and_resumes(tmp_path, capsys):
    pairs_csv = write_collection(tmp_path / "c", levels=(60, 75, 90, 105), seed=3)
    model_path = str(tmp_path / "model.pt")
    code = main(["train", pairs_csv, "-o", model_path, "--scales", "1/2,1", "--steps", "6", "--batch", "2",
                 "--validation-fraction", "0.25", "--device", "cpu", "--progress", "jsonl"])
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == EXIT_OK, events[-1]
    assert events[0]["event"] == "started" and events[0]["pairs"] == 3 and events[0]["validation_pairs"] == 1
    assert events[-1]["event"] == "finished" and events[-1]["outputs"] == {"model": model_path}
    assert events[-1]["metrics"]["complete"] and events[-1]["metrics"]["final_validation_loss"] < 0
    assert load_model(model_path).complete
    code = main(["train", pairs_csv, "-o", model_path, "--steps", "6", "--progress", "jsonl"])
    assert code == EXIT_INPUT and "already exists" in json.loads(capsys.readouterr().out.splitlines()[-1])["message"]
    code = main(["train", pairs_csv, "-o", str(tmp_path / "m2.pt"), "--batch", "9", "--steps", "2", "--progress", "jsonl"])
    assert code == EXIT_INPUT and "--batch" in json.loads(capsys.readouterr().out.splitlines()[-1])["message"]


# ---------------------------------------------------------------------------------------------------------------
# Atlas selection and registration-based segmentation


def test_majority_vote_ties_go_to_the_best_ranked_atlas():
    best = np.array([[1, 1, 3, 5]])
    second = np.array([[2, 2, 2, 6]])
    third = np.array([[3, 2, 2, 7]])
    # voxel 0: all differ -> best; voxel 1: 2 vs 1 -> 2; voxel 2: two votes for 2 beat the best's 3; voxel 3: best.
    np.testing.assert_array_equal(majority_vote([best, second, third]), [[1, 2, 2, 5]])
    np.testing.assert_array_equal(majority_vote([best, second]), [[1, 1, 3, 5]])
    np.testing.assert_array_equal(majority_vote([second, best]), [[2, 2, 2, 6]])


def test_atlas_selection_picks_the_matching_atlas_on_another_grid():
    """Target: level 96, deformed. Atlases: levels 60, 130 and 96 (the answer), the last on a shifted, finer grid."""
    target_array = deform(brain(HELD_OUT_LEVEL), random_field(brain(HELD_OUT_LEVEL).shape, 2.0, 21))
    target = sitk.GetImageFromArray(target_array)
    target.SetSpacing(SPACING)
    atlases = []
    for level in (60, 130):
        atlas = sitk.GetImageFromArray(brain(level))
        atlas.SetSpacing(SPACING)
        atlases.append(atlas)
    # Level 96 resampled onto a 2 mm grid that starts 20 mm further along x: same anatomy, other grid.
    matching = sitk.GetImageFromArray(brain(HELD_OUT_LEVEL))
    matching.SetSpacing(SPACING)
    reference = sitk.Image(70, 90, sitk.sitkFloat32)
    reference.SetSpacing((2.0, 2.0))
    reference.SetOrigin((20.0, 0.0))
    atlases.append(sitk.Resample(matching, reference, sitk.Transform(), sitk.sitkLinear, 0.0))
    order = rank_atlases(target, atlases, ["level 60", "level 130", "level 96"], window=6)
    assert order[0][0] == 2, order
    assert order[0][1] > order[1][1] + 0.05


@pytest.fixture()
def atlas_case(tmp_path):
    """Target (level 96 deformed by a known field) with its true labels, and three atlases on disk."""
    field = random_field(brain(HELD_OUT_LEVEL).shape, 3.0, 77)
    target = write_image(tmp_path / "target.nii.gz", deform(brain(HELD_OUT_LEVEL), field))
    truth = deform(tissue(HELD_OUT_LEVEL), field, labels=True)
    atlases = {}
    for level in (70, HELD_OUT_LEVEL, 120):
        atlases[level] = (write_image(tmp_path / f"atlas{level}.nii.gz", brain(level)),
                          write_image(tmp_path / f"atlas{level}-labels.nii.gz", tissue(level)))
    return target, truth, atlases, tmp_path


def mean_dice(a, b, labels=(1, 2)) -> float:
    return float(np.mean([2 * np.sum((a == k) & (b == k)) / max(np.sum(a == k) + np.sum(b == k), 1) for k in labels]))


def test_segment_command_propagates_the_best_atlas_labels(atlas_case, capsys):
    target, truth, atlases, folder = atlas_case
    output = folder / "out" / "labels.nii.gz"
    output.parent.mkdir()
    arguments = ["segment", target, "-o", str(output), "--scales", "1/2,1", "--steps", "60", "--device", "cpu",
                 "--progress", "jsonl"]
    for level in (120, 70, HELD_OUT_LEVEL):  # the right atlas is given last
        arguments += ["--atlas", *atlases[level]]
    code = main(arguments)
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == EXIT_OK, events[-1]
    finished = events[-1]
    sidecar = folder / "out" / "labels.provenance.json"
    assert finished["event"] == "finished" and finished["outputs"] == {"labels": str(output), "provenance": str(sidecar)}
    ranking = finished["metrics"]["ranking"]
    assert ranking[0]["atlas"] == atlases[HELD_OUT_LEVEL][0] and [r["registered"] for r in ranking] == [True, False, False]
    assert [r["rank"] for r in ranking] == [1, 2, 3] and ranking[0]["nlcc"] > ranking[1]["nlcc"]
    assert any(event["event"] == "ranking" for event in events)

    result = sitk.ReadImage(str(output))
    assert result.GetSize() == (44, 48) and result.GetSpacing() == SPACING
    propagated = sitk.GetArrayFromImage(result)
    unregistered = tissue(HELD_OUT_LEVEL)  # the best atlas's labels, already on the target grid
    dice_before, dice_after = mean_dice(unregistered, truth), mean_dice(propagated, truth)
    print(f"Dice of the best atlas unregistered {dice_before:.3f}, propagated {dice_after:.3f}")
    assert dice_after > dice_before + 0.03
    assert sorted(os.listdir(output.parent)) == ["labels.nii.gz", "labels.provenance.json"]
    # The provenance alone reruns it, to the same bytes.
    assert main(["rerun", str(sidecar), "-o", str(folder / "again"), "--progress", "none"]) == EXIT_OK
    assert (folder / "again" / "labels.nii.gz").read_bytes() == output.read_bytes()


def test_segment_top_k_fuses_by_majority_and_reports_bad_options(atlas_case, capsys):
    target, truth, atlases, folder = atlas_case
    pairs = [atlases[level] for level in (70, HELD_OUT_LEVEL, 120)]
    events = []
    result = segment(target, pairs, top_k=3, scales="1/2,1", steps=20, device="cpu", progress=events.append)
    assert [entry["registered"] for entry in result.ranking] == [True, True, True]
    assert [event["index"] for event in events if event["event"] == "atlas"] == [0, 1, 2]
    fractions = [event["fraction"] for event in events if event["event"] == "progress"]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    fused = sitk.GetArrayFromImage(result.labels)
    assert set(np.unique(fused)) <= {0, 1, 2} and mean_dice(fused, truth) > 0.5

    code = main(["segment", target, "--atlas", *pairs[0], "-o", str(folder / "x.nii.gz"), "--top-k", "2",
                 "--progress", "jsonl"])
    assert code == EXIT_INPUT and "--top-k" in json.loads(capsys.readouterr().out.splitlines()[-1])["message"]
    probability = write_image(folder / "prob.nii.gz", tissue(70).astype(np.float32) / 3.0)
    code = main(["segment", target, "--atlas", pairs[0][0], probability, "-o", str(folder / "x.nii.gz"),
                 "--progress", "jsonl"])
    assert code == EXIT_INPUT and "non-integer" in json.loads(capsys.readouterr().out.splitlines()[-1])["message"]
    assert not (folder / "x.nii.gz").exists()
