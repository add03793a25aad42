"""Local NCC (paper Eq. 2) against a direct computation, gradients, constant regions, and the loss (Eq. 1)."""

import itertools

import numpy as np
import pytest
import torch

from SSMSRRegistrationLib.engine.losses import (NCC_EPSILON, _box_mean, gradient_smoothness, local_ncc, local_ncc_map,
                                                registration_loss)


def direct_ncc_map(fixed: np.ndarray, warped: np.ndarray, window: int) -> np.ndarray:
    """Eq. 2 per voxel with explicit loops over the window (clipped at the image border)."""
    before, after = window // 2, (window - 1) // 2
    out = np.zeros(fixed.shape)
    for p in itertools.product(*[range(n) for n in fixed.shape]):
        box = tuple(slice(max(0, c - before), min(n, c + after + 1)) for c, n in zip(p, fixed.shape))
        i, j = fixed[box].astype(np.float64), warped[box].astype(np.float64)
        count = i.size
        di, dj = i - i.mean(), j - j.mean()
        cross = (di * dj).sum()
        # NCC_EPSILON guards the product of the variances (means), i.e. count^2 * eps for the sums.
        out[p] = cross ** 2 / ((di ** 2).sum() * (dj ** 2).sum() + NCC_EPSILON * count ** 2)
    return out


@pytest.mark.parametrize("shape,window", [((9, 11), 5), ((9, 11), 6), ((6, 7, 8), 3), ((6, 7, 8), 4)])
def test_ncc_matches_direct_computation(shape, window):
    rng = np.random.default_rng(1)
    fixed = rng.random(shape)
    warped = 0.6 * fixed + 0.4 * rng.random(shape)
    fast = local_ncc_map(torch.tensor(fixed)[None, None], torch.tensor(warped)[None, None], window)
    reference = direct_ncc_map(fixed, warped, window)
    np.testing.assert_allclose(fast[0, 0].numpy(), reference, rtol=1e-4, atol=1e-5)


def test_ncc_is_one_for_identical_images_and_lower_for_noise():
    rng = np.random.default_rng(2)
    image = torch.tensor(rng.random((1, 1, 24, 24)), dtype=torch.float32)
    noise = torch.tensor(rng.random((1, 1, 24, 24)), dtype=torch.float32)
    assert local_ncc(image, image, 5).item() == pytest.approx(1.0, abs=1e-3)
    assert local_ncc(image, noise, 5).item() < 0.3


def test_gradients_flow_and_constant_regions_give_no_nan():
    image = torch.zeros(1, 1, 20, 20)
    image[..., 10:, :] = 1.0  # two constant halves
    warped = image.clone().requires_grad_(True)
    field = torch.zeros(1, 2, 20, 20, requires_grad=True)
    loss = -local_ncc(image, warped, 5) + gradient_smoothness(field + 0.1 * torch.rand(1, 2, 20, 20))
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(warped.grad).all() and torch.isfinite(field.grad).all()
    assert local_ncc(torch.ones(1, 1, 8, 8), torch.ones(1, 1, 8, 8), 3).item() == 0.0
    textured = torch.rand(1, 1, 20, 20, requires_grad=True)
    (-local_ncc(image + 0.1 * torch.rand(1, 1, 20, 20), textured, 5)).backward()
    assert textured.grad.abs().sum() > 0


def test_mask_restricts_the_similarity():
    rng = np.random.default_rng(3)
    fixed = torch.tensor(rng.random((1, 1, 20, 20)), dtype=torch.float32)
    warped = fixed.clone()
    warped[..., :, 10:] = torch.tensor(rng.random((1, 1, 20, 10)), dtype=torch.float32)
    left = torch.zeros_like(fixed)
    left[..., :, :6] = 1
    assert local_ncc(fixed, warped, 3, left).item() == pytest.approx(1.0, abs=1e-3)
    assert local_ncc(fixed, warped, 3).item() < 0.8


def test_smoothness_is_zero_for_a_translation_and_positive_otherwise():
    assert gradient_smoothness(torch.ones(1, 3, 5, 6, 7) * 2.0).item() == 0.0
    assert gradient_smoothness(torch.rand(1, 3, 5, 6, 7)).item() > 0.0


def test_the_mse_term_adds_its_weight_times_the_mean_squared_difference_inside_the_mask():
    rng = np.random.default_rng(5)
    fixed = rng.random((1, 1, 12, 14))
    warped = rng.random((1, 1, 12, 14))
    field = rng.normal(size=(1, 2, 12, 14))
    mask = np.zeros((1, 1, 12, 14))
    mask[..., 2:9, 3:11] = 1
    as_tensors = [torch.tensor(array, dtype=torch.float32) for array in (fixed, warped, field, mask)]
    paper = registration_loss(*as_tensors[:3], 5, 3.0, as_tensors[3]).item()
    with_mse = registration_loss(*as_tensors[:3], 5, 3.0, as_tensors[3], mse_weight=300.0).item()
    inside = ((fixed - warped) ** 2)[mask > 0].mean()
    assert with_mse - paper == pytest.approx(300.0 * inside, rel=1e-4)
    assert registration_loss(*as_tensors[:3], 5, 3.0, as_tensors[3], mse_weight=0.0).item() == paper


@pytest.mark.parametrize("shape,window", [((7, 9), 5), ((7, 9), 6), ((4, 5, 6), 3), ((3, 4, 5), 8)])
def test_window_mean_gradient_matches_finite_differences(shape, window):
    """The window sums' hand-written backward (their adjoint) against finite differences, in float64 (the NCC itself
    runs in float32); the last case's window is wider than the image."""
    values = torch.rand((2, 3) + shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda stack: _box_mean(stack, window), (values.requires_grad_(),))
