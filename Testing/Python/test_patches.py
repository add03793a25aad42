"""Training on patches: the warp of a region, the patch's shape, and where the patches are drawn."""

import pytest
import torch

from SSMSRRegistrationLib.common.errors import InputError
from SSMSRRegistrationLib.common.run_config import RunConfiguration
from SSMSRRegistrationLib.common.schedule import DEFAULT_PATCH_SIZE_3D, parse_scales
from SSMSRRegistrationLib.engine.multiscale import RegistrationSettings, register_tensors
from SSMSRRegistrationLib.engine.patches import PatchSampler, patch_shape, predict_tiled, tile_starts
from SSMSRRegistrationLib.engine.spatial import warp
from SSMSRRegistrationLib.engine.unet import RegistrationUNet
from test_spatial import blobs, smooth_field


@pytest.mark.parametrize("shape, region", [((40, 48), (slice(7, 27), slice(20, 48))),
                                           ((20, 24, 28), (slice(0, 16), slice(5, 21), slice(11, 27)))])
def test_a_region_warped_alone_equals_that_region_of_the_whole_warp(shape, region):
    image = blobs(shape)
    field = smooth_field(shape, amplitude=6.0, period=17.0)  # moves points across the region's border
    crop = (slice(None), slice(None)) + region
    corner = tuple(axis.start for axis in region)
    whole = warp(image, field)[crop]
    torch.testing.assert_close(warp(image, field[crop].contiguous(), corner=corner), whole, rtol=0, atol=1e-5)


def test_the_patch_is_clipped_to_the_grid_and_absent_where_the_grid_fits():
    assert patch_shape((100, 40, 70), 64) == (64, 40, 64)
    assert patch_shape((64, 40), 64) is None
    assert patch_shape((300, 300), 0) is None


def _draw(sampler, count):
    return [sampler.draw() for _ in range(count)]


def test_patches_lie_inside_the_grid_where_the_fixed_image_has_structure_and_repeat_with_the_seed():
    fixed = torch.zeros(1, 1, 90, 120)
    fixed[0, 0, 60:85, 5:30] = blobs((25, 25))[0, 0]  # structure in one block only
    shape = patch_shape((90, 120), 32)
    draws = _draw(PatchSampler(fixed, None, shape, torch.Generator().manual_seed(3)), 200)
    for region, corner in draws:
        assert tuple(axis.stop - axis.start for axis in region) == (32, 32)
        assert all(0 <= c and axis.stop <= n for c, axis, n in zip(corner, region, (90, 120)))
        assert region[0].start < 85 and region[0].stop > 60 and region[1].start < 30 and region[1].stop > 5
    assert len({corner for _, corner in draws}) > 20  # not one place over and over
    assert draws == _draw(PatchSampler(fixed, None, shape, torch.Generator().manual_seed(3)), 200)


def test_a_fixed_mask_restricts_the_patches_to_it():
    fixed = blobs((96, 96))
    mask = torch.zeros_like(fixed)
    mask[..., 70:90, 10:30] = 1
    for region, _ in _draw(PatchSampler(fixed, mask, (24, 24), torch.Generator().manual_seed(0)), 100):
        assert region[0].start < 90 and region[0].stop > 70 and region[1].start < 30 and region[1].stop > 10


def test_tiles_cover_every_axis_half_a_tile_apart():
    assert tile_starts(100, 48) == [0, 24, 48, 52]
    assert tile_starts(96, 48) == [0, 24, 48]
    assert tile_starts(40, 48) == [0]


@pytest.mark.parametrize("shape, tile", [((70, 90), (32, 48)), ((20, 37, 30), (16, 16, 16))])
def test_a_prediction_that_does_not_depend_on_context_is_the_same_tiled(shape, tile):
    """Blending overlapping tiles is a weighted mean: where each tile predicts the same values (a voxel-wise map),
    the tiled field is the whole image's."""
    pair = torch.cat([blobs(shape), blobs(shape).flip(-1)], dim=1).expand(2, 2, *shape).contiguous()
    pointwise = lambda tile: torch.stack([tile[:, 0] * k - tile[:, 1] for k in range(len(shape))], dim=1)  # noqa: E731
    torch.testing.assert_close(predict_tiled(pointwise, pair, tile), pointwise(pair), rtol=0, atol=1e-5)


def test_a_tiled_prediction_takes_each_voxel_mostly_from_the_tile_it_is_central_in():
    """A 'network' that predicts its tile's first corner voxel everywhere: the blended value at a voxel is a
    weighted mean of the corners of the tiles covering it, nearest that of the tile it is most central in."""
    tile = (32,)
    pair = torch.arange(64.0).view(1, 1, 64).expand(1, 2, 64).contiguous()
    field = predict_tiled(lambda part: part[:, :1, :1].expand(-1, 1, part.shape[2]), pair, tile)[0, 0]
    assert float(field[0]) == pytest.approx(0.0, abs=1e-3) and float(field[63]) == pytest.approx(32.0, abs=1e-3)
    assert abs(float(field[32]) - 16.0) < 0.5  # central in the tile starting at 16


def test_scales_larger_than_the_patch_train_on_patches_and_predict_the_whole_image_by_tiles(monkeypatch):
    """What the U-Net is run on, step by step: the whole 20x24x20 grid at scale 1/2 (it fits the 32-voxel patch), one
    32^3 patch per training step at full scale (40x48x40), then the tiles covering the whole grid; repeatable."""
    shapes = []
    forward = RegistrationUNet.forward

    def recording(network, pair, half_resolution=False):
        shapes.append((tuple(pair.shape), torch.is_grad_enabled()))
        return forward(network, pair, half_resolution)

    monkeypatch.setattr(RegistrationUNet, "forward", recording)
    fixed = blobs((40, 48, 40))
    moving = fixed.roll(2, dims=3)
    settings = RegistrationSettings(scales=parse_scales("1/2,1"), steps_per_scale=3, patch_size=32)
    first = register_tensors(fixed, moving, settings, device="cpu")
    tiles = len(tile_starts(40, 32)) ** 2 * len(tile_starts(48, 32))
    assert shapes == ([((1, 2, 20, 24, 20), True)] * 3 + [((1, 2, 20, 24, 20), False)]
                      + [((1, 2, 32, 32, 32), True)] * 3 + [((1, 2, 32, 32, 32), False)] * tiles)
    assert first.displacement.shape == (1, 3, 40, 48, 40)
    assert torch.equal(register_tensors(fixed, moving, settings, device="cpu").displacement, first.displacement)


def test_balanced_and_fast_train_large_3d_grids_on_patches_and_paper_on_the_whole_image():
    for preset, patch_3d in (("balanced", DEFAULT_PATCH_SIZE_3D), ("fast", DEFAULT_PATCH_SIZE_3D), ("paper", 0)):
        for kind in ("pair", "volume_cine"):
            settings = RegistrationSettings.from_run(RunConfiguration.of(preset).resolve(kind))
            assert (settings.patch_for(3), settings.patch_for(2)) == (patch_3d, 0), (preset, kind)
    asked = RegistrationSettings.from_run(RunConfiguration.of("paper", patch_size=64).resolve("pair"))
    assert (asked.patch_for(3), asked.patch_for(2)) == (64, 64)
    with pytest.raises(InputError, match="at least 16 voxels"):
        RunConfiguration.of("balanced", patch_size=8)
