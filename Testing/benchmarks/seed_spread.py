"""The run-to-run spread over seeds of the accuracy tests' own scenarios, which their margins come from.

Each scenario is the one a test in Testing/Python runs (same images, schedule and options), repeated with seeds
0..N-1; the table gives each seed's measures and the spread (mean, standard deviation, range) of what the test
bounds. Same seed, same inputs, same thread count: the same result (Testing/Python/test_reproducibility.py), so the
spread below is the seeds', not noise.

    python Testing/benchmarks/seed_spread.py --seeds 5 --scenarios alignment,tracking,pretraining,sequence_3d,ct_field_of_view
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "Python"))

from test_alignment import (BRAIN_OPTIONS, ct_field_of_view_band_displacement, far_labels_on_fixed, make_brain_pair,
                            mean_dice, misaligned, rotation, thick_slices)

from SSMSRRegistrationLib import register
from SSMSRRegistrationLib.workflows.provenance import cpu_model


def alignment_scenario(seed: int) -> dict:
    """test_alignment's two accuracy tests with ``seed``: the Dice of the aligned pair, of the misaligned pair after
    the default pre-alignment, their difference; on thick-slice labels (2 x 2 x 6 mm), the Dice of the anisotropic
    fixed image's registration, of the isotropic one and their difference. One torch thread, as in the test run."""
    import torch

    torch.set_num_threads(1)
    fixed, fixed_labels, moving, moving_labels = make_brain_pair()
    matrix, shift, scale = rotation((1, 2, 1), 12.0), (12.0, -8.0, 9.0), 1.07
    far, far_labels = misaligned(moving, matrix, shift, scale), misaligned(moving_labels, matrix, shift, scale)
    aligned = register(fixed, moving, moving_labels=moving_labels, seed=seed, **BRAIN_OPTIONS)
    recovered = register(fixed, far, moving_labels=far_labels, seed=seed, **BRAIN_OPTIONS)
    thick_labels = thick_slices(fixed_labels, 3, labels=True)
    anisotropic = register(thick_slices(fixed, 3), moving, moving_labels=moving_labels, seed=seed, **BRAIN_OPTIONS)
    dice_aligned = mean_dice(aligned.warped_labels, fixed_labels)
    dice_recovered = mean_dice(recovered.warped_labels, fixed_labels)
    dice_isotropic = mean_dice(thick_slices(aligned.warped_labels, 3, labels=True), thick_labels)
    dice_anisotropic = mean_dice(anisotropic.warped_labels, thick_labels)
    return {"aligned": dice_aligned, "misaligned": dice_recovered, "difference": dice_aligned - dice_recovered,
            "unregistered": mean_dice(far_labels_on_fixed(far_labels, fixed_labels), fixed_labels),
            "anisotropic": dice_anisotropic, "isotropic_thick": dice_isotropic,
            "anisotropic_difference": dice_isotropic - dice_anisotropic,
            "anisotropic_unregistered": mean_dice(far_labels_on_fixed(moving_labels, thick_labels), thick_labels)}


def tracking_scenario(seed: int) -> dict:
    """test_tracking's ``tracked`` fixture with ``seed`` and what test_identical_consecutive_frames_give_a_near_zero_field
    bounds: the duplicate pair's mean field length where the frame has texture (px), its ratio to the other pairs'
    mean, and its MSE after registration relative to the other pairs' identity MSE."""
    import tempfile

    import SimpleITK as sitk

    from test_tracking import DUPLICATE_PAIR, FRAME_INDICES, cine_image, echo_pixels, heart, textured
    from SSMSRRegistrationLib import track

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "echo.nii.gz")
        sitk.WriteImage(cine_image(heart(echo_pixels()[list(FRAME_INDICES)])), path)
        result = track(path, scales="1/4,1/2,1", steps=120, batch_size=2, device="cpu", seed=seed)
    lengths = result.displacements.norm(dim=1)
    motion = {pair: float(lengths[pair - 1][textured(result.cine.frames[pair], result.masks[pair])].mean())
              for pair in result.pairs}
    duplicate = motion.pop(DUPLICATE_PAIR)
    others_mse = np.delete(result.metrics["mse_identity"], DUPLICATE_PAIR - 1)
    return {"duplicate_px": duplicate, "ratio_to_others": duplicate / np.mean(list(motion.values())),
            "relative_mse": float(result.metrics["mse"][DUPLICATE_PAIR - 1] / others_mse.mean())}


def pretraining_scenario(seed: int) -> dict:
    """test_models' ``pretrained`` fixture (training seed ``seed``, one thread as there) and what its tests bound: the
    coarse scale's validation-loss gain, the fine scale's rise, and on the held-out pair the NCC after 80 steps from
    the pretrained networks minus from scratch (test-time seed ``seed``)."""
    import pathlib
    import tempfile

    import torch

    from test_models import HELD_OUT_LEVEL, STEPS, pair, write_collection
    from SSMSRRegistrationLib import train
    from SSMSRRegistrationLib.engine.multiscale import RegistrationSettings, register_tensors, similarity

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        pairs_csv = write_collection(pathlib.Path(folder) / "collection", amplitude=6.0)
        result = train(pairs_csv, os.path.join(folder, "model.pt"), scales="1/2,1", steps=STEPS, batch_size=4,
                       validation_fraction=0.2, validation_every=50, checkpoint_every=100, device="cpu", seed=seed)
    history = result.model.training["validation_history"]
    losses = {scale: [r["loss"] for r in history if r["scale"] == scale] for scale in ("1/2", "1")}
    fixed, moving = pair(HELD_OUT_LEVEL, seed=999)

    def ncc_after(networks) -> float:
        settings = RegistrationSettings(scales=result.model.scales, steps_per_scale=80, seed=seed)
        output = register_tensors(fixed, moving, settings, initial_networks=networks, device="cpu")
        return similarity(fixed, moving, output.displacement, 6)["ncc"]

    return {"coarse_gain": losses["1/2"][0] - losses["1/2"][-1], "fine_rise": losses["1"][-1] - losses["1"][0],
            "warm_minus_scratch_80": ncc_after(result.model.networks) - ncc_after(None)}


def sequence_3d_scenario(seed: int) -> dict:
    """test_sequences_3d's recovery test with ``seed``, in both modes (consecutive pairs; every frame from frame 1):
    each pair's error (mm) between the mean field in the brain and the known translation, the largest and the mean;
    the largest pair TRE (mm) of the test's landmarks; frame 0 onto the last frame through the composed consecutive
    fields; MSE after / before; the folded percentage."""
    import pathlib
    import tempfile

    import SimpleITK as sitk

    from test_sequences_3d import SHIFTS_MM, SHORT, landmarks_mm, mean_field_mm, moving_volumes, write_landmarks_ras
    from SSMSRRegistrationLib import save_tracking, track

    cine, brain = moving_volumes()
    measures = {}
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "cine.nii.gz")
        sitk.WriteImage(cine, path)
        landmarks = pathlib.Path(folder) / "landmarks.csv"
        write_landmarks_ras(landmarks_mm(cine, brain), landmarks)
        for mode, reference in (("consecutive", None), ("reference", 1)):
            result = track(path, reference=reference, landmarks=str(landmarks), seed=seed, **SHORT)
            errors = [np.linalg.norm(mean_field_mm(result.field(fixed), brain) - (SHIFTS_MM[fixed] - SHIFTS_MM[moving]))
                      for moving, fixed in result.frame_pairs]
            summary = result.summary()
            measures.update({f"{mode}_max_mm": max(errors), f"{mode}_mean_mm": float(np.mean(errors)),
                             f"{mode}_tre_max_mm": float(np.max(result.metrics["tre_mm"])),
                             f"{mode}_mse_ratio": summary["mse_after"] / summary["mse_before"],
                             f"{mode}_folded_percent": summary["max_folded_percent"]})
            if reference is None:
                last = len(SHIFTS_MM) - 1
                written = os.path.join(folder, "out")
                save_tracking(result, written, accumulated=True)
                accumulated = sitk.ReadImage(os.path.join(written, f"accumulated_{last:04d}.nii.gz"))
                measures["accumulated_mm"] = float(np.linalg.norm(mean_field_mm(accumulated, brain) - SHIFTS_MM[last]))
    return measures


def ct_field_of_view_scenario(seed: int) -> dict:
    """test_alignment's smaller CT field of view with ``seed``, one torch thread: the border band's mean displacement
    (px) registered with the field-of-view mask and padded with 0 HU, and their ratio."""
    import torch

    torch.set_num_threads(1)
    band = ct_field_of_view_band_displacement(seed)
    return {**band, "ratio": band["padded"] / band["masked"]}


SCENARIOS = {"alignment": alignment_scenario, "tracking": tracking_scenario, "pretraining": pretraining_scenario,
             "sequence_3d": sequence_3d_scenario, "ct_field_of_view": ct_field_of_view_scenario}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    args = parser.parse_args()
    import torch

    from SSMSRRegistrationLib.engine.unet import bfloat16_supported

    precision = "bfloat16 (mixed)" if bfloat16_supported(torch.device("cpu")) else "float32 (no native bfloat16)"
    print(f"# Seed spread, {cpu_model()}, {os.cpu_count()} CPUs, {precision}, {time.strftime('%Y-%m-%d %H:%M')}",
          flush=True)
    for name in args.scenarios.split(","):
        rows = []
        for seed in range(args.seeds):
            start = time.perf_counter()
            rows.append(SCENARIOS[name](seed))
            print(f"{name} seed {seed}: " + ", ".join(f"{key} {value:.4f}" for key, value in rows[-1].items())
                  + f" ({time.perf_counter() - start:.0f} s)", flush=True)
        print(f"\n| {name} | mean | sd | min | max |\n|---|---|---|---|---|")
        for key in rows[0]:
            values = np.array([row[key] for row in rows])
            print(f"| {key} | {values.mean():.4f} | {values.std(ddof=1):.4f} | {values.min():.4f} | "
                  f"{values.max():.4f} |")


if __name__ == "__main__":
    main()
