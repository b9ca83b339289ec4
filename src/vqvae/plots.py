"""Figures as PNG files: labelled image grids and training curves (matplotlib, no display)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display is needed or used

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from torch import Tensor  # noqa: E402


def _as_images(images: Tensor | np.ndarray) -> np.ndarray:
    """Float array in [0, 1]: ``(N, H, W)`` from gray ``(N, 1, H, W)`` or ``(N, H, W)``,
    ``(N, H, W, 3)`` from colour ``(N, 3, H, W)``."""
    array = images.detach().float().cpu().numpy() if isinstance(images, Tensor) else images
    array = np.asarray(array, dtype=np.float32)
    if array.ndim == 4 and array.shape[1] == 1:
        array = array[:, 0]
    elif array.ndim == 4 and array.shape[1] == 3:
        array = array.transpose(0, 2, 3, 1)  # channels last, as matplotlib draws colour
    elif array.ndim != 3:
        raise ValueError(f"images must be (N, H, W), (N, 1, H, W) or (N, 3, H, W), got shape "
                         f"{array.shape}")
    return np.clip(array, 0.0, 1.0)


def _show(ax, image: np.ndarray) -> None:
    """One gray ``(H, W)`` or colour ``(H, W, 3)`` image, pixels as squares."""
    if image.ndim == 3:
        ax.imshow(image, interpolation="nearest")
    else:
        ax.imshow(image, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")


def _mosaic(images: np.ndarray, columns: int) -> np.ndarray:
    """The images side by side, ``columns`` a row, as one picture: white gaps of about 6% of
    an image between them and white where a row runs out. Drawn as one image instead of one
    axes each, a grid of 64 digits takes a fifth of the time (0.5 s against 0.1)."""
    count, height, width = images.shape[:3]
    rows = max(1, -(-count // columns))
    gap = max(1, round(0.06 * max(height, width)))
    shape = (rows * (height + gap) - gap, columns * (width + gap) - gap) + images.shape[3:]
    mosaic = np.ones(shape, dtype=images.dtype)
    for i, image in enumerate(images):
        top, left = (i // columns) * (height + gap), (i % columns) * (width + gap)
        mosaic[top:top + height, left:left + width] = image
    return mosaic


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path


def image_rows(rows: Sequence[Tensor | np.ndarray], labels: Sequence[str], path: Path,
               title: str | None = None) -> Path:
    """One labelled row per entry of ``rows`` (each ``(N, ...)`` with the same N)."""
    arrays = [_as_images(r) for r in rows]
    n = max(len(a) for a in arrays)
    cell = 0.9
    fig, axes = plt.subplots(len(arrays), 1, figsize=(cell * n + 1.6, cell * len(arrays) + 0.6),
                             squeeze=False, gridspec_kw={"hspace": 0.08})
    for ax, array, label in zip(axes[:, 0], arrays, labels, strict=True):
        ax.set_xticks([])  # no ticks and no frame; the y label stays
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        _show(ax, _mosaic(array, n))  # (a shorter row ends in white)
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9, labelpad=6)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def image_grid(images: Tensor | np.ndarray, path: Path, columns: int = 10,
               title: str | None = None, labels: Sequence[str] | None = None) -> Path:
    """A grid of images, ``columns`` wide, optionally with a caption under each image."""
    array = _as_images(images)
    rows = max(1, -(-len(array) // columns))
    if labels is None:  # one picture (captions need an axes per image)
        mosaic = _mosaic(array, columns)
        width = 0.9 * columns
        height = width * mosaic.shape[0] / mosaic.shape[1]  # the picture's own aspect
        fig = plt.figure(figsize=(width, height + (0.5 if title else 0.0)))
        ax = fig.add_axes((0.0, 0.0, 1.0, height / fig.get_figheight()))  # title above
        ax.axis("off")
        _show(ax, mosaic)
        if title:
            fig.suptitle(title, fontsize=10)
        return _save(fig, path)
    cell = 1.1
    fig, axes = plt.subplots(rows, columns, figsize=(cell * columns, cell * rows + 0.5),
                             squeeze=False, gridspec_kw={"wspace": 0.05, "hspace": 0.35})
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(array):
            _show(ax, array[i])
            ax.set_title(labels[i], fontsize=7, pad=2)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def training_curves(history: Sequence[dict], path: Path, title: str | None = None) -> Path:
    """Loss and reconstruction error (left), codebook perplexity (right), per epoch."""
    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.plot(epochs, [h["train_loss"] for h in history], "o-", label="train loss (total)")
    left.plot(epochs, [h["train_recon_mse"] for h in history], "o-", label="train MSE")
    left.plot(epochs, [h["test_mse"] for h in history], "o-", label="test MSE")
    left.set_yscale("log")
    left.set_xlabel("epoch")
    left.set_ylabel("loss / MSE per pixel")
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)
    right.plot(epochs, [h["train_perplexity"] for h in history], "o-", label="train")
    right.plot(epochs, [h["perplexity"] for h in history], "o-", label="test")
    right.set_xlabel("epoch")
    right.set_ylabel("codebook perplexity")
    right.grid(True, alpha=0.3)
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.set_xticks(epochs if len(epochs) <= 20 else ax.get_xticks())
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
