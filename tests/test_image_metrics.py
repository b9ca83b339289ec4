"""PSNR and SSIM against direct computations and hand-worked values."""

import math

import numpy as np
import pytest
import torch

from vqvae.image_metrics import gaussian_window, mse, psnr, ssim


def direct_ssim(x: np.ndarray, y: np.ndarray, data_range=1.0, size=11, sigma=1.5,
                k1=0.01, k2=0.03) -> float:
    """SSIM of one (C, H, W) pair by the paper's formulas, window by window, in plain loops: a
    2-D Gaussian built from its formula (not separably), weighted sums written out."""
    half = size // 2
    offsets = range(-half, half + 1)
    weights = np.array([[math.exp(-(i * i + j * j) / (2 * sigma**2)) for j in offsets]
                        for i in offsets])
    weights /= weights.sum()
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    values = []
    channels, height, width = x.shape
    for c in range(channels):
        for top in range(height - size + 1):
            for left in range(width - size + 1):
                a = x[c, top:top + size, left:left + size]
                b = y[c, top:top + size, left:left + size]
                mu_a, mu_b = (weights * a).sum(), (weights * b).sum()
                var_a = (weights * (a - mu_a) ** 2).sum()
                var_b = (weights * (b - mu_b) ** 2).sum()
                cov = (weights * (a - mu_a) * (b - mu_b)).sum()
                values.append((2 * mu_a * mu_b + c1) * (2 * cov + c2)
                              / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)))
    return float(np.mean(values))


def test_ssim_matches_the_direct_computation():
    rng = np.random.default_rng(0)
    x = rng.random((3, 3, 13, 15))
    y = np.clip(x + rng.normal(0, 0.1, x.shape), 0, 1)
    y[2] = rng.random((3, 13, 15))  # unrelated: SSIM near 0
    ours = ssim(torch.from_numpy(x), torch.from_numpy(y))
    expected = [direct_ssim(x[i], y[i]) for i in range(3)]
    assert ours.dtype == torch.float64 and ours.shape == (3,)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=0, atol=1e-12)
    assert 0.5 < expected[0] < 0.99 and abs(expected[2]) < 0.2
    # other settings, a grayscale (N, H, W) batch, values on a 0-255 scale
    gray = rng.random((2, 9, 10)) * 255
    noisy = np.clip(gray + rng.normal(0, 20, gray.shape), 0, 255)
    ours = ssim(torch.from_numpy(gray), torch.from_numpy(noisy), data_range=255,
                window_size=7, sigma=1.0)
    expected = [direct_ssim(gray[i, None], noisy[i, None], 255, 7, 1.0) for i in range(2)]
    np.testing.assert_allclose(ours.numpy(), expected, rtol=0, atol=1e-12)


def test_ssim_of_constant_images_is_the_luminance_term():
    # σ = 0 everywhere, so SSIM = (2ab + C1) / (a² + b² + C1), C1 = 0.01²
    a = torch.full((1, 3, 11, 11), 0.5)
    b = torch.full((1, 3, 11, 11), 0.25)
    assert ssim(a, b).item() == pytest.approx((0.25 + 1e-4) / (0.3125 + 1e-4), abs=1e-12)
    assert ssim(a, b).item() == pytest.approx(0.80006398, abs=1e-8)


def test_identical_images_and_symmetry():
    rng = torch.Generator().manual_seed(1)
    x = torch.rand(4, 3, 16, 16, generator=rng)
    y = torch.rand(4, 3, 16, 16, generator=rng)
    assert torch.allclose(ssim(x, x), torch.ones(4, dtype=torch.float64), atol=1e-12)
    assert torch.equal(psnr(x, x), torch.full((4,), math.inf, dtype=torch.float64))
    assert torch.allclose(ssim(x, y), ssim(y, x), atol=1e-15)
    assert torch.allclose(psnr(x, y), psnr(y, x))
    # one image per value: changing image 1 changes only its value
    z = y.clone()
    z[1] = x[1]
    assert torch.equal(ssim(x, z)[[0, 2, 3]], ssim(x, y)[[0, 2, 3]])
    assert psnr(x, z)[1] == math.inf


def test_colour_ssim_is_the_mean_over_channels():
    rng = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, 12, 12, generator=rng, dtype=torch.float64)
    y = (x + 0.2 * torch.rand(2, 3, 12, 12, generator=rng, dtype=torch.float64)).clamp(0, 1)
    per_channel = torch.stack([ssim(x[:, c], y[:, c]) for c in range(3)], 1)
    assert torch.allclose(ssim(x, y), per_channel.mean(1), atol=1e-15)


def test_psnr_known_values():
    zeros = torch.zeros(2, 1, 4, 4)
    target = torch.full((2, 1, 4, 4), 0.1)
    target[1] = 0.01
    # mse 0.01 → 20 dB, mse 0.0001 → 40 dB
    assert torch.allclose(psnr(zeros, target), torch.tensor([20.0, 40.0], dtype=torch.float64))
    assert torch.allclose(mse(zeros, target), torch.tensor([0.01, 1e-4], dtype=torch.float64))
    bytes_ = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
    assert psnr(bytes_, bytes_ + 51, data_range=255).item() == pytest.approx(
        20 * math.log10(5), abs=1e-12)
    # half the pixels off by 0.2: mse 0.02
    half = torch.zeros(1, 2, 2, dtype=torch.float64)
    half[0, 0] = 0.2
    assert psnr(half, torch.zeros_like(half)).item() == pytest.approx(
        10 * math.log10(1 / 0.02), abs=1e-12)


def test_gaussian_window():
    window = gaussian_window(11, 1.5)
    assert window.sum().item() == pytest.approx(1.0, abs=1e-15)
    assert window[5] / window[4] == pytest.approx(math.exp(1 / (2 * 1.5**2)))
    assert torch.equal(window, window.flip(0))
    with pytest.raises(ValueError, match="odd"):
        gaussian_window(10)


def test_ssim_is_differentiable():
    rng = torch.Generator().manual_seed(3)
    x = torch.rand(1, 1, 11, 12, generator=rng, dtype=torch.float64, requires_grad=True)
    y = torch.rand(1, 1, 11, 12, generator=rng, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: ssim(a, y), (x,), fast_mode=True)


def test_bad_input_is_refused():
    x = torch.rand(2, 3, 16, 16)
    with pytest.raises(ValueError, match="same shape"):
        ssim(x, x[:, :1])
    with pytest.raises(ValueError, match="at least 11×11"):
        ssim(x[..., :8, :8], x[..., :8, :8])
    with pytest.raises(ValueError, match="batch"):
        psnr(x[0, 0], x[0, 0])
    with pytest.raises(ValueError, match="finite"):
        psnr(x, x.clone().index_fill_(0, torch.tensor([0]), math.nan))
    with pytest.raises(ValueError, match="data_range"):
        psnr(x, x, data_range=0)
    with pytest.raises(TypeError, match="real numbers"):
        ssim(x.bool(), x.bool())
