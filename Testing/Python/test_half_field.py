"""Fields predicted at half resolution (``half_field_below``): the U-Net's half-resolution path, which scales of
which images take it, and the run option reaching the engine from ``register`` and ``track`` with the images'
millimetres."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import SSMSRRegistrationLib as ssmsr
from SSMSRRegistrationLib.common.errors import InputError
from SSMSRRegistrationLib.common.schedule import parse_scales
from SSMSRRegistrationLib.engine.multiscale import RegistrationSettings, register_tensors
from SSMSRRegistrationLib.engine.unet import RegistrationUNet, predict
from SSMSRRegistrationLib.workflows import working_plan
from SSMSRRegistrationLib.workflows.models import SavedModel
from test_spatial import blobs


@pytest.mark.parametrize("size", [(37, 50), (21, 30, 19)])
@pytest.mark.parametrize("mixed", [False, True])
def test_a_half_resolution_field_has_the_inputs_size_and_uses_the_same_weights(size, mixed):
    torch.manual_seed(0)
    network = RegistrationUNet(len(size))
    names = [name for name, _ in network.named_parameters()]
    pair = torch.rand((2, 2) + size)
    field = predict(network, pair, mixed, half_resolution=True)
    assert field.shape == (2, len(size)) + size and field.dtype == torch.float32
    assert torch.isfinite(field).all()
    field.square().mean().backward()
    assert [name for name, p in network.named_parameters() if p.grad is not None] == names


def test_a_half_resolution_field_is_linear_between_the_half_grids_nodes():
    """Upsampled by 2 (align_corners False), voxels 2i+1 and 2i+2 are 3/4 a_i + 1/4 a_i+1 and 1/4 a_i + 3/4 a_i+1 of
    the half grid's nodes a, so node i+1 found from voxels 2i+1, 2i+2 and from 2i+3, 2i+4 is the same: the third
    difference from every odd voxel (inside the clamped borders) is zero along every axis; at full resolution it is
    not."""
    torch.manual_seed(1)
    network = RegistrationUNet(2)
    torch.nn.init.normal_(network.flow.weight, std=0.1)  # a field far from zero
    pair = torch.rand(1, 2, 32, 48)
    with torch.no_grad():
        fields = {half: network(pair, half_resolution=half) for half in (False, True)}
    for axis in (2, 3):
        from_odd = {half: torch.diff(field, n=3, dim=axis).narrow(axis, 1, field.shape[axis] - 5)[
            (slice(None),) * axis + (slice(None, None, 2),)] for half, field in fields.items()}
        assert from_odd[True].abs().max() < 1e-5 * fields[True].abs().max()
        assert from_odd[False].abs().max() > 1e-2 * fields[False].abs().max()


@pytest.mark.parametrize("size", [(32, 48), (20, 31, 17)])
def test_a_half_resolution_field_is_the_networks_field_on_the_pair_pooled_by_2_upsampled(size):
    """Odd sides are padded by their last voxel before pooling, so each half-grid node averages 2^ndim voxels and
    sits at their centre; the field keeps the input's voxels as its unit. The field upsampled is the one over the
    pooled grid with one node more on each side (the last repeated), so the last voxel of a side interpolates
    towards that node rather than repeating the last one (``RegistrationUNet``)."""
    torch.manual_seed(2)
    network = RegistrationUNet(len(size))
    torch.nn.init.normal_(network.flow.weight, std=0.1)
    pair = torch.rand((1, 2) + size)
    padded = F.pad(pair, [p for n in reversed(size) for p in (0, n % 2)], mode="replicate")
    pooled = (F.avg_pool2d if len(size) == 2 else F.avg_pool3d)(padded, 2)
    pooled = F.pad(pooled, [0, 1] * len(size), mode="replicate")
    with torch.no_grad():
        half = network(pair, half_resolution=True)
        expected = F.interpolate(network(pooled), scale_factor=2, mode="bilinear" if len(size) == 2 else "trilinear",
                                 align_corners=False)[(slice(None), slice(None)) + tuple(slice(0, n) for n in size)]
    assert half.shape == (1, len(size)) + size
    assert torch.allclose(half, expected, atol=1e-6 * float(expected.abs().max()))


def test_the_network_costs_what_its_input_size_costs():
    """No padding to a multiple of 16: each level pools an odd side's last voxel alone, so a 24^3 pair costs
    (24/32)^3 of a 32^3 one (a 3D+t series' coarse scales are 24^3), give or take the smallest levels' rounding up."""
    network = RegistrationUNet(3)
    counts = {}
    for side in (24, 32):
        with FlopCounterMode(display=False) as counter:
            network(torch.rand(1, 2, side, side, side))
        counts[side] = counter.get_total_flops()
    assert counts[24] == pytest.approx(counts[32] * (24 / 32) ** 3, rel=0.05), counts


def test_sides_under_16_are_padded_to_16_by_their_last_voxel():
    """The coarse scales of small images (an 8^3 grid) keep the border the padding gives them: the field of an 8x8x20
    pair is the field of that pair padded to 16x16x20 by repeating its last voxels, cropped (``RegistrationUNet``)."""
    torch.manual_seed(3)
    network = RegistrationUNet(3)
    torch.nn.init.normal_(network.flow.weight, std=0.1)
    pair = torch.rand(1, 2, 8, 8, 20)
    with torch.no_grad():
        field = network(pair)
        padded = network(F.pad(pair, (0, 0, 0, 8, 0, 8), mode="replicate"))[:, :, :8, :8, :]
    assert field.shape == (1, 3, 8, 8, 20) and torch.equal(field, padded)


def test_a_3d_half_resolution_step_takes_about_an_eighth_of_the_operations(monkeypatch):
    """The network runs on the pooled grid and one node more per side: 33^3 nodes for a 64^3 pair (its own
    operations: the row ``unet.convolve`` computes twice on the CPU where a first axis is odd is left out)."""
    monkeypatch.setattr("SSMSRRegistrationLib.engine.unet.convolve", lambda conv, x: conv(x))
    network = RegistrationUNet(3)
    pair = torch.rand(1, 2, 64, 64, 64)
    counts = []
    for half in (False, True):
        with FlopCounterMode(display=False) as counter:
            network(pair, half_resolution=half).square().mean().backward()
        counts.append(counter.get_total_flops())
    assert counts[1] == pytest.approx(counts[0] * (33 / 64) ** 3, rel=0.05), counts


def test_3d_images_with_voxels_under_the_bound_predict_at_half_resolution_but_at_the_coarsest_scale():
    settings = RegistrationSettings(scales=parse_scales("1/4,1/2,1"), half_field_below=1.5, voxel_mm=1.0)
    assert [settings.half_field_at(index, 3) for index in range(3)] == [False, True, True]
    assert [settings.half_field_at(index, 2) for index in range(3)] == [False] * 3  # never in 2D
    at_bound = RegistrationSettings(scales=parse_scales("1/2,1"), half_field_below=1.5, voxel_mm=1.5)
    assert not at_bound.half_field_at(1, 3)  # not smaller: full resolution
    assert not RegistrationSettings(half_field_below=2.5).half_field_at(1, 3)  # voxels unknown: full resolution
    assert not RegistrationSettings(voxel_mm=0.5).half_field_at(1, 3)  # the engine's default, 0: never
    with pytest.raises(InputError, match="at least 0"):
        RegistrationSettings(half_field_below=-1.0).validate()


def _record_forward(monkeypatch):
    calls = []
    forward = RegistrationUNet.forward

    def recording(network, pair, half_resolution=False):
        calls.append((tuple(pair.shape[2:]), half_resolution, torch.is_grad_enabled()))
        return forward(network, pair, half_resolution)

    monkeypatch.setattr(RegistrationUNet, "forward", recording)
    return calls


def test_the_finest_scale_trains_and_predicts_at_half_resolution_repeatably(monkeypatch):
    calls = _record_forward(monkeypatch)
    fixed = blobs((24, 32, 24))
    moving = fixed.roll(2, dims=3)
    settings = RegistrationSettings(scales=parse_scales("1/2,1"), steps_per_scale=2, half_field_below=1.5,
                                    voxel_mm=1.0)
    first = register_tensors(fixed, moving, settings, device="cpu")
    assert calls == ([((12, 16, 12), False, True)] * 2 + [((12, 16, 12), False, False)]
                     + [((24, 32, 24), True, True)] * 2 + [((24, 32, 24), True, False)])
    assert torch.equal(register_tensors(fixed, moving, settings, device="cpu").displacement, first.displacement)


def _volume(spacing_mm: float, shift: int = 0) -> sitk.Image:
    image = sitk.GetImageFromArray(np.roll(blobs((24, 28, 24))[0, 0].numpy(), shift, axis=2))
    image.SetSpacing((spacing_mm,) * 3)
    return image


@pytest.mark.parametrize("spacing_mm, expected", [(1.0, True), (2.0, False)])
def test_register_and_track_compare_the_bound_with_the_images_millimetres(monkeypatch, spacing_mm, expected):
    calls = _record_forward(monkeypatch)
    options = dict(scales="1/2,1", steps=1, half_field_below=1.5, device="cpu")
    ssmsr.register(_volume(spacing_mm), _volume(spacing_mm, 2), initial="none", **options)
    ssmsr.track([_volume(spacing_mm, shift) for shift in (0, 1, 2)], **options)
    by_size = {size: {half for other, half, _ in calls if other == size} for size, _, _ in calls}
    assert by_size == {(12, 14, 12): {False}, (24, 28, 24): {expected}}  # the coarsest scale at full resolution


def test_the_time_estimate_times_half_resolution_scales_as_they_will_run(monkeypatch):
    probed = []

    def probe(ndim, voxels, device, encoder, decoder, window, mixed=False, half_resolution=False):
        probed.append((voxels, half_resolution))
        return 1e-7

    monkeypatch.setattr(working_plan, "seconds_per_voxel_step", probe)
    settings = RegistrationSettings(scales=parse_scales("1/2,1"), steps_per_scale=100, half_field_below=1.5)
    plan = working_plan.plan_working_grid(_volume(1.0), settings, torch.device("cpu"))
    assert sorted(probed) == [(12 * 14 * 12, False), (24 * 28 * 24, True)]
    assert plan.estimated_seconds == pytest.approx(100 * 1e-7 * (12 * 14 * 12 + 24 * 28 * 24))


@pytest.mark.parametrize("asked, expected", [({}, False), ({"half_field_below": 1.5}, True)])
def test_a_model_predicts_at_full_resolution_unless_asked(monkeypatch, asked, expected):
    """A model was trained predicting at full resolution (``train`` has no half-resolution fields), so a 1 mm image
    registered with it under the default preset (1.5 mm) is predicted so; asked explicitly, at half resolution."""
    network = RegistrationUNet(3)
    model = SavedModel(ndim=3, scales=parse_scales("1/2,1"), encoder_channels=network.encoder_channels,
                       decoder_channels=network.decoder_channels, smoothness_weight=10.0, ncc_window=5,
                       networks=[network.state_dict()] * 2)
    calls = _record_forward(monkeypatch)
    ssmsr.register(_volume(1.0), _volume(1.0, 2), initial="none", model=model, steps=0, device="cpu", **asked)
    assert [half for _, half, _ in calls] == [False, expected]  # one prediction per scale
