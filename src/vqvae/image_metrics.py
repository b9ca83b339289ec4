"""Image quality of reconstructions: MSE, PSNR and SSIM, for any number of channels.

Every function takes two batches of the same shape, ``(N, C, H, W)`` or ``(N, H, W)`` (one
channel), of real values on a scale whose full range is ``data_range`` (1 for images in
[0, 1], 255 for bytes), and returns one float64 value per image, ``(N,)``; average it for a
test set. The order of the two arguments does not matter.

- ``psnr = 10 · log10(data_range² / mse)`` in dB, ``mse`` over all channels and pixels of an
  image; identical images give ``inf``.
- ``ssim`` is the structural similarity of Wang, Bovik, Sheikh and Simoncelli, "Image quality
  assessment: from error visibility to structural similarity", IEEE TIP 13(4), 2004: local
  means, variances and covariance under an 11×11 Gaussian window of σ = 1.5 (normalised to sum
  1), ``K1 = 0.01``, ``K2 = 0.03``, ``C = (K·data_range)²``, variances with weights summing to 1
  (not the unbiased estimate), averaged over every position where the window lies wholly inside
  the image (their reference code's ``filter2(..., 'valid')``; no padding). A colour image's SSIM
  is the mean over its channels. (Their code also suggests shrinking images larger than 256
  pixels first; that is not part of the index and is not done here.) torchmetrics 1.9 pads the
  images by reflection and averages over every pixel instead; its map restricted to the same
  positions agrees with this to 1e-15, its mean differs by about 0.002 on 32×32 images.

Computed in float64, in chunks of images so memory stays bounded; differentiable.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

#: Images per chunk: five float64 maps of (chunk · C, H, W) are alive at once
_CHUNK = 256


def _pair(reconstruction: Tensor, target: Tensor, data_range: float) -> tuple[Tensor, Tensor]:
    """Both as float64 ``(N, C, H, W)``, after checking shapes, dtypes and values."""
    for name, x in (("reconstruction", reconstruction), ("target", target)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
        if x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"{name} must hold real numbers, got {x.dtype}")
        if x.ndim not in (3, 4):
            raise ValueError(f"{name} must be a batch (N, C, H, W) or (N, H, W), got shape "
                             f"{tuple(x.shape)}")
    if reconstruction.shape != target.shape:
        raise ValueError(f"reconstruction {tuple(reconstruction.shape)} and target "
                         f"{tuple(target.shape)} must have the same shape")
    if not (isinstance(data_range, (int, float)) and math.isfinite(data_range)
            and data_range > 0):
        raise ValueError(f"data_range must be a positive number, got {data_range!r}")
    x, y = reconstruction.double(), target.double()
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise ValueError("images must be finite (NaN or infinity found)")
    if x.ndim == 3:
        x, y = x.unsqueeze(1), y.unsqueeze(1)
    return x, y


def mse(reconstruction: Tensor, target: Tensor) -> Tensor:
    """Mean squared error of each image, ``(N,)`` float64."""
    x, y = _pair(reconstruction, target, 1.0)
    return (x - y).square().flatten(1).mean(1)


def psnr(reconstruction: Tensor, target: Tensor, data_range: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio of each image in dB, ``(N,)`` float64; ``inf`` where the
    images are identical."""
    x, y = _pair(reconstruction, target, data_range)
    error = (x - y).square().flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / error)  # error 0 → inf, as it should


def gaussian_window(size: int = 11, sigma: float = 1.5) -> Tensor:
    """The 1-D Gaussian ``exp(-x² / 2σ²)`` at ``x = -(size-1)/2 … (size-1)/2``, summing to 1.
    The 2-D window is its outer product with itself (also summing to 1)."""
    if not isinstance(size, int) or size < 1 or size % 2 == 0:
        raise ValueError(f"window size must be a positive odd integer, got {size!r}")
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma!r}")
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    window = torch.exp(-x.square() / (2 * sigma**2))
    return window / window.sum()


def _blur(maps: Tensor, window: Tensor) -> Tensor:
    """Valid-region Gaussian filtering of ``(B, 1, H, W)``, separably."""
    size = window.numel()
    maps = F.conv2d(maps, window.view(1, 1, size, 1))
    return F.conv2d(maps, window.view(1, 1, 1, size))


def ssim(reconstruction: Tensor, target: Tensor, data_range: float = 1.0,
         window_size: int = 11, sigma: float = 1.5, k1: float = 0.01,
         k2: float = 0.03) -> Tensor:
    """Structural similarity of each image, ``(N,)`` float64, 1 for identical images (see the
    module's docstring). Images must be at least ``window_size`` pixels on each side."""
    x, y = _pair(reconstruction, target, data_range)
    window = gaussian_window(window_size, sigma).to(x.device)
    n, channels, height, width = x.shape
    if height < window_size or width < window_size:
        raise ValueError(f"SSIM needs images of at least {window_size}×{window_size} pixels "
                         f"(its window), got {height}×{width}; pass a smaller window_size")
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    out = []
    for start in range(0, n, _CHUNK):
        a = x[start:start + _CHUNK].reshape(-1, 1, height, width)
        b = y[start:start + _CHUNK].reshape(-1, 1, height, width)
        mean_a, mean_b = _blur(a, window), _blur(b, window)
        var_a = _blur(a * a, window) - mean_a.square()
        var_b = _blur(b * b, window) - mean_b.square()
        cov = _blur(a * b, window) - mean_a * mean_b
        index = ((2 * mean_a * mean_b + c1) * (2 * cov + c2)
                 / ((mean_a.square() + mean_b.square() + c1) * (var_a + var_b + c2)))
        out.append(index.reshape(-1, channels, index.shape[-2] * index.shape[-1]).mean((1, 2)))
    return torch.cat(out) if out else x.new_zeros(0)
