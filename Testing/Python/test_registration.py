"""Multi-scale test-time training on a real image with known deformations."""

import pytest
import SimpleITK as sitk
import torch

from SSMSRRegistrationLib.imaging import sample_data
from SSMSRRegistrationLib.engine.multiscale import RegistrationSettings, register_tensors
from SSMSRRegistrationLib.common.schedule import parse_scales, scaled_size
from SSMSRRegistrationLib.engine.unet import bfloat16_supported
from SSMSRRegistrationLib.common.errors import InputError, RegistrationCancelled
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


#: Mixed precision falls back to float32 on a CPU without native bfloat16, where there is nothing to compare.
needs_cpu_bfloat16 = pytest.mark.skipif(not bfloat16_supported(torch.device("cpu")),
                                        reason="this CPU has no native bfloat16 (AVX512-BF16 or AMX)")


@pytest.fixture(scope="module")
def fixed():
    return torch.from_numpy(brain_slice())[None, None]


@pytest.fixture(scope="module")
def small_deformation(fixed):
    """A known smooth deformation (peak 4 voxels), the float32 registration of it (1/4,1/2,1 x 150 steps), and the
    truth: (moving, truth, result). Shared by the tests that check the registration and those that compare with it."""
    moving, truth = deformed_pair(fixed, amplitude=4.0, period=60.0)
    return moving, truth, run(fixed, moving, "1/4,1/2,1", 150)


def test_recovers_a_known_deformation(fixed, small_deformation):
    _, truth, result = small_deformation
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


def test_the_finest_scale_takes_its_own_number_of_steps(fixed):
    """``finest_steps``: the coarser scales train ``steps_per_scale`` steps, the finest its own; progress counts
    each scale's steps; 0 at the finest applies the coarser scale's network there, untrained further."""
    moving, _ = deformed_pair(fixed, amplitude=3.0, period=60.0)
    events = []
    settings = RegistrationSettings(scales=parse_scales("1/4,1/2,1"), steps_per_scale=8, finest_steps=2,
                                    progress_every=2)
    result = register_tensors(fixed, moving, settings, device="cpu", progress=events.append)
    assert [len(losses) for losses in result.loss_history.values()] == [8, 8, 2]
    assert events[0]["scale_steps"] == [8, 8, 2]
    fractions = [event["fraction"] for event in events[1:]]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    at_end_of_scale = {event["scale"]: event["fraction"] for event in events[1:]}
    assert at_end_of_scale == pytest.approx({"1/4": 8 / 18, "1/2": 16 / 18, "1": 1.0})

    untrained = register_tensors(fixed, moving, RegistrationSettings(
        scales=parse_scales("1/4,1/2,1"), steps_per_scale=8, finest_steps=0), device="cpu")
    assert [len(losses) for losses in untrained.loss_history.values()] == [8, 8, 0]
    inference = register_tensors(fixed, moving, RegistrationSettings(scales=parse_scales("1/4,1/2,1"), steps_per_scale=0),
                                 initial_networks=untrained.networks, device="cpu")
    assert torch.allclose(inference.displacement, untrained.displacement, atol=1e-5)
    with pytest.raises(InputError) as error:
        RegistrationSettings(finest_steps=-1).validate()
    assert error.value.setting == "finest_steps"


@pytest.mark.parametrize("schedule,message", [("1/64,1", "at least"), ("1,1/2", "increase"), ("2", "outside"),
                                              ("a/b", "not a number"), ("", "empty")])
def test_impossible_schedules_are_rejected(fixed, schedule, message):
    with pytest.raises(InputError, match=message):
        run(fixed, fixed, schedule, 1)


def test_scaled_sizes_round_and_stay_positive():
    assert scaled_size((48, 64, 48), parse_scales("1/2")[0]) == (24, 32, 24)
    assert scaled_size((241, 320), parse_scales("1/8")[0]) == (30, 40)


@needs_cpu_bfloat16
def test_mixed_precision_stays_within_tolerance_of_the_float32_reference(fixed, small_deformation):
    moving, truth, reference = small_deformation
    events = []
    settings = RegistrationSettings(scales=parse_scales("1/4,1/2,1"), steps_per_scale=150, mixed_precision=True)
    mixed = register_tensors(fixed, moving, settings, device="cpu", progress=events.append)
    assert events[0]["precision"] == "bfloat16 mixed"
    mixed_error, magnitude = endpoint_error(mixed.displacement, truth, fixed)
    reference_error = endpoint_error(reference.displacement, truth, fixed)[0]
    assert abs(mixed_error - reference_error) < 0.05 * magnitude
    assert endpoint_error(mixed.displacement, reference.displacement, fixed)[0] < 0.1 * magnitude


@needs_cpu_bfloat16
def test_mixed_precision_trains_a_3d_network_whose_bottom_level_is_two_voxels_deep():
    # 20x24x20 is padded to 32x32x32: the U-Net's bottom level is 2x2x2, where oneDNN's bfloat16 Conv3d weight
    # gradient is not finite (unet.ConvBlock runs such tiny inputs in float32).
    t1 = sample_data.crop_and_shrink(sample_data.brain_t1(), [50, 60, 60], [80, 96, 80], 4)
    volume = torch.from_numpy(sitk_array(t1))[None, None]
    fixed, moving = volume[..., 1:], volume[..., :-1]
    settings = RegistrationSettings(scales=parse_scales("1"), steps_per_scale=40, mixed_precision=True)
    result = register_tensors(fixed, moving, settings, device="cpu")
    assert all(torch.isfinite(torch.tensor(losses)).all() for losses in result.loss_history.values())
    assert torch.isfinite(result.displacement).all()


def sitk_array(image):
    array = sitk.GetArrayFromImage(image).astype("float32")
    return (array - array.min()) / (array.max() - array.min())


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


def test_the_mixed_precision_path_runs_on_any_cpu_on_a_tiny_input():
    """CI's CPUs may lack native bfloat16 (then ``register_tensors`` uses float32): the bfloat16 forward and backward
    of ``unet.predict`` still run there (emulated), on a tiny input, close to the float32 pass."""
    from SSMSRRegistrationLib.engine.unet import RegistrationUNet, predict, use_mixed_precision

    torch.manual_seed(0)
    network = RegistrationUNet(2)
    torch.nn.init.normal_(network.flow.weight, std=0.05)  # a visible output instead of the near-zero start
    pair = torch.rand(1, 2, 32, 32)
    reference = predict(network, pair)
    convolutionInputs = []
    hook = network.encoder[0].register_forward_hook(lambda module, inputs, output: convolutionInputs.append(output))
    mixed_network = use_mixed_precision(network)
    mixed = predict(mixed_network, pair, mixed_precision=True)
    hook.remove()
    assert convolutionInputs[0].dtype == torch.bfloat16 and mixed.dtype == torch.float32
    assert (mixed - reference).abs().max() < 0.05 * reference.abs().max()
    mixed.square().mean().backward()
    gradients = [parameter.grad for parameter in mixed_network.parameters()]
    assert all(gradient is not None and torch.isfinite(gradient).all() for gradient in gradients)
    assert all(gradient.dtype == torch.float32 for gradient in gradients)


@pytest.mark.parametrize("shape", [(16, 20, 12), (17, 20, 12)])
def test_a_3d_training_step_through_convolve_matches_the_plain_convolution(monkeypatch, shape):
    """``unet.convolve`` sends a single CPU volume to oneDNN as two slabs in a batch (overlapping by a row where the
    first axis is odd, as at the first three levels of a 17-voxel side): the loss and every gradient of a 3D U-Net step agree
    with PyTorch's own convolution of the whole volume up to float rounding."""
    from SSMSRRegistrationLib.engine import unet
    from SSMSRRegistrationLib.engine.losses import registration_loss
    from SSMSRRegistrationLib.engine.spatial import warp

    torch.manual_seed(0)
    network = unet.RegistrationUNet(3)
    torch.nn.init.normal_(network.flow.weight, std=0.05)
    fixed_volume, moving_volume = torch.rand((1, 1) + shape), torch.rand((1, 1) + shape)

    def step():
        network.zero_grad()
        field = network(torch.cat([moving_volume, fixed_volume], dim=1))
        loss = registration_loss(fixed_volume, warp(moving_volume, field), field, 5, 10.0)
        loss.backward()
        return loss.item(), field.detach(), [p.grad.clone() for p in network.parameters()]

    slab_loss, slab_field, slab_gradients = step()
    monkeypatch.setattr(unet, "convolve", lambda conv, x: conv(x))
    plain_loss, plain_field, plain_gradients = step()
    assert slab_loss == pytest.approx(plain_loss, rel=1e-5)
    assert torch.allclose(slab_field, plain_field, rtol=1e-4, atol=1e-5)
    for slab, plain in zip(slab_gradients, plain_gradients):
        assert (slab - plain).norm() <= 1e-4 * plain.norm()


def test_a_float32_batch_of_volumes_predicts_the_same_field_channels_last():
    """``unet.predict`` runs a float32 batch of 3D pairs on the CPU channels-last (faster with oneDNN): the field and
    every gradient agree with the same network on the batch as given, up to float rounding."""
    from SSMSRRegistrationLib.engine.unet import RegistrationUNet, predict

    torch.manual_seed(0)
    network = RegistrationUNet(3)
    torch.nn.init.normal_(network.flow.weight, std=0.05)
    pair = torch.rand(3, 2, 16, 20, 12)

    def step(forward):
        network.zero_grad()
        field = forward(pair)
        field.square().mean().backward()
        return field.detach(), [p.grad.clone() for p in network.parameters()]

    fast_field, fast_gradients = step(lambda x: predict(network, x))
    plain_field, plain_gradients = step(network)
    assert fast_field.is_contiguous()
    assert torch.allclose(fast_field, plain_field, rtol=1e-4, atol=1e-5)
    for fast, plain in zip(fast_gradients, plain_gradients):
        assert (fast - plain).norm() <= 1e-4 * plain.norm()


@pytest.mark.parametrize("shape", [(1, 3, 7, 6, 5), (1, 3, 8, 6, 5), (2, 3, 8, 6, 5), (1, 3, 2, 6, 5)])
def test_convolve_gives_the_convolution_of_the_whole_volume(shape):
    """Split along an odd or even first axis, or unchanged (a too thin first axis, a batch already above one): the
    convolution of the whole input."""
    from SSMSRRegistrationLib.engine.unet import convolve

    torch.manual_seed(0)
    conv = torch.nn.Conv3d(3, 4, kernel_size=3, padding=1)
    x = torch.rand(shape)
    assert torch.allclose(convolve(conv, x), conv(x), atol=1e-6)
