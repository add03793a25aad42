"""Multi-scale test-time training on a real image with known deformations."""

import pytest
import torch

from SSMSRRegistrationLib.engine.multiscale import RegistrationSettings, register_tensors
from SSMSRRegistrationLib.engine.schedule import parse_scales, scaled_size
from SSMSRRegistrationLib.errors import InputError, RegistrationCancelled
from realimages import brain_slice, deformed_pair


def endpoint_error(estimated, truth, fixed):
    """Mean endpoint error (voxels) inside the head, away from the border."""
    inner = (slice(None),) + (slice(8, -8),) * 2
    error = (estimated - truth).norm(dim=1)[inner]
    head = fixed[:, 0][inner] > 0.1
    return float(error[head].mean()), float(truth.norm(dim=1)[inner][head].mean())


def run(fixed, moving, scales, steps, **kwargs):
    settings = RegistrationSettings(scales=parse_scales(scales), steps_per_scale=steps, **kwargs)
    return register_tensors(fixed, moving, settings, device="cpu")


@pytest.fixture(scope="module")
def fixed():
    return torch.from_numpy(brain_slice())[None, None]


def test_recovers_a_known_deformation(fixed):
    moving, truth = deformed_pair(fixed, amplitude=4.0, period=60.0)
    result = run(fixed, moving, "1/4,1/2,1", 150)
    error, magnitude = endpoint_error(result.displacement, truth, fixed)
    assert magnitude > 2.0
    assert error < 0.3 * magnitude
    losses = result.loss_history["1"]
    assert losses[-1] < losses[0]


def test_multiscale_beats_single_scale_on_a_large_deformation(fixed):
    moving, truth = deformed_pair(fixed, amplitude=12.0, period=120.0)
    multi = endpoint_error(run(fixed, moving, "1/4,1/2,1", 150).displacement, truth, fixed)[0]
    single, magnitude = endpoint_error(run(fixed, moving, "1", 150).displacement, truth, fixed)
    assert magnitude > 6.0
    assert multi < 0.4 * magnitude
    assert multi < 0.5 * single


def test_same_seed_gives_the_same_field_and_weights_reproduce_it(fixed):
    moving, _ = deformed_pair(fixed, amplitude=3.0, period=60.0)
    first = run(fixed, moving, "1/2,1", 15, seed=7)
    second = run(fixed, moving, "1/2,1", 15, seed=7)
    assert torch.equal(first.displacement, second.displacement)
    inference = register_tensors(fixed, moving, RegistrationSettings(scales=parse_scales("1/2,1"), steps_per_scale=0),
                                 initial_networks=first.networks, device="cpu")
    assert torch.allclose(inference.displacement, first.displacement, atol=1e-5)
    assert len(first.displacements_per_scale) == 2


def test_progress_reports_and_cancel(fixed):
    events = []
    run_settings = RegistrationSettings(scales=parse_scales("1/2,1"), steps_per_scale=20, progress_every=5)
    register_tensors(fixed, fixed, run_settings, device="cpu", progress=events.append)
    assert events[0]["event"] == "started" and events[0]["image_size"] == [88, 96]
    steps = [(e["scale"], e["step"]) for e in events[1:]]
    assert steps == [("1/2", 5), ("1/2", 10), ("1/2", 15), ("1/2", 20), ("1", 5), ("1", 10), ("1", 15), ("1", 20)]
    assert events[-1]["fraction"] == 1.0
    with pytest.raises(RegistrationCancelled):
        register_tensors(fixed, fixed, run_settings, device="cpu", should_stop=lambda: True)


@pytest.mark.parametrize("schedule,message", [("1/64,1", "at least"), ("1,1/2", "increase"), ("2", "outside"),
                                              ("a/b", "not a number"), ("", "empty")])
def test_impossible_schedules_are_rejected(fixed, schedule, message):
    with pytest.raises(InputError, match=message):
        run(fixed, fixed, schedule, 1)


def test_scaled_sizes_round_and_stay_positive():
    assert scaled_size((48, 64, 48), parse_scales("1/2")[0]) == (24, 32, 24)
    assert scaled_size((241, 320), parse_scales("1/8")[0]) == (30, 40)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_and_cpu_agree(fixed):
    moving, truth = deformed_pair(fixed, amplitude=4.0, period=60.0)
    on_cpu = run(fixed, moving, "1/2,1", 60)
    settings = RegistrationSettings(scales=parse_scales("1/2,1"), steps_per_scale=60)
    on_gpu = register_tensors(fixed, moving, settings, device="cuda")
    assert on_gpu.device.startswith("cuda")
    cpu_error = endpoint_error(on_cpu.displacement, truth, fixed)[0]
    gpu_error = endpoint_error(on_gpu.displacement.cpu(), truth, fixed)[0]
    assert abs(cpu_error - gpu_error) < 0.1
    assert (on_gpu.displacement.cpu() - on_cpu.displacement).abs().mean() < 0.1
