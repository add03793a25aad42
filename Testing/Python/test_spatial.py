"""Warping, resizing, composition and the U-Net's shapes."""

import math

import pytest
import torch

from SSMSRRegistrationLib.engine.spatial import compose, resize_field, resize_image, voxel_grid, warp
from SSMSRRegistrationLib.engine.unet import RegistrationUNet


def smooth_field(shape, amplitude, period, phase=0.0):
    """A smooth (1, ndim, *shape) voxel field made of sines."""
    grid = voxel_grid(shape)[0]
    channels = []
    for k in range(len(shape)):
        other = grid[(k + 1) % len(shape)]
        channels.append(amplitude * torch.sin(2 * math.pi * other / period + phase + k))
    return torch.stack(channels)[None]


def blobs(shape):
    """A smooth test image with structure everywhere."""
    grid = voxel_grid(shape)[0]
    image = sum(torch.cos(2 * math.pi * grid[k] / (13 + 4 * k)) for k in range(len(shape)))
    return image[None, None]


@pytest.mark.parametrize("shape", [(40, 48), (20, 24, 28)])
def test_composed_field_reproduces_sequential_warps(shape):
    moving = blobs(shape)
    coarse = smooth_field(shape, 2.5, 30.0)
    residual = smooth_field(shape, 1.5, 17.0, phase=1.0)
    sequential = warp(warp(moving, coarse), residual)
    once = warp(moving, compose(coarse, residual))
    paper_order = warp(moving, coarse + warp(residual, coarse))  # Eq. 5 as printed: u_c(p) + r(p + u_c(p))
    inner = (slice(None), slice(None)) + tuple(slice(6, -6) for _ in shape)
    error = (once - sequential)[inner].abs().mean()
    paper_error = (paper_order - sequential)[inner].abs().mean()
    # What remains is interpolation error (the image is interpolated once instead of twice).
    assert error < 0.04 * sequential[inner].abs().mean()
    assert paper_error > 5 * error


def test_zero_field_is_identity_and_nearest_keeps_labels():
    labels = (torch.arange(30 * 34).reshape(1, 1, 30, 34) % 5).float()
    assert torch.allclose(warp(labels, torch.zeros(1, 2, 30, 34)), labels, atol=1e-5)
    moved = warp(labels, smooth_field((30, 34), 2.0, 20.0), mode="nearest")
    assert set(moved.unique().tolist()) <= set(range(5))


def test_integer_shift_moves_the_image_by_that_many_voxels():
    image = blobs((32, 36))
    shift = torch.zeros(1, 2, 32, 36)
    shift[:, 1] = 3.0  # sample three voxels further along x
    assert torch.allclose(warp(image, shift)[..., :-3], image[..., 3:], atol=1e-5)


def test_resize_field_rescales_voxel_units():
    field = torch.ones(1, 3, 33, 17, 9) * torch.tensor([1.0, 2.0, 4.0]).view(1, 3, 1, 1, 1)
    small = resize_field(field, (17, 9, 5))
    expected = torch.tensor([1.0 * 16 / 32, 2.0 * 8 / 16, 4.0 * 4 / 8])
    assert torch.allclose(small[0, :, 3, 3, 3], expected)


def test_resize_image_maps_coarse_voxels_onto_aligned_corners():
    ramp = voxel_grid((41, 41))[0, 1][None, None]  # value = x index
    small = resize_image(ramp, (11, 11))
    # Coarse voxel i sits on fine voxel i * 40 / 10; a linear ramp survives the anti-aliasing blur inside.
    for i in (2, 5, 8):
        assert small[0, 0, 5, i].item() == pytest.approx(4.0 * i, abs=1e-3)


@pytest.mark.parametrize("shape", [(37, 51), (13, 22, 19)])
def test_unet_accepts_any_size_and_starts_near_identity(shape):
    torch.manual_seed(0)
    network = RegistrationUNet(len(shape))
    output = network(torch.rand(2, 2, *shape))
    assert output.shape == (2, len(shape)) + shape
    assert output.abs().max() < 1e-2
