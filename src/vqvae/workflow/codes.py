"""The discrete representation as files: images to codes and back (``vqvae encode``/``decode``),
PNG files in and out."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..models import ModelConfig
from ..rundir import atomic_write_text


def read_png_images(paths: Sequence[Path], size: int = 28, invert: bool = False) -> Tensor:
    """Grayscale PNGs as ``(N, 1, size, size)`` floats in [0, 1] (resized when needed).

    MNIST digits are light on dark; pass ``invert=True`` for dark-on-light drawings.
    """
    from PIL import Image

    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                gray = image.convert("L")
                if gray.size != (size, size):
                    gray = gray.resize((size, size), Image.Resampling.BILINEAR)
                array = np.asarray(gray, dtype=np.float32) / 255.0
        except (OSError, ValueError) as error:
            raise ValueError(f"{path}: not a readable image ({error})") from error
        images.append(1.0 - array if invert else array)
    return torch.from_numpy(np.stack(images)).unsqueeze(1)


def write_png_images(images: Tensor, directory: Path, names: Sequence[str]) -> list[Path]:
    """One 8-bit grayscale PNG per image, named ``names[i]``."""
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    array = (images.detach().float().cpu().clamp(0, 1).numpy()[:, 0] * 255).round()
    paths = []
    for image, name in zip(array.astype(np.uint8), names, strict=True):
        path = directory / name
        Image.fromarray(image, mode="L").save(path)
        paths.append(path)
    return paths


def save_codes(path: Path, codes: Tensor, config: ModelConfig, sources: Sequence[str]) -> Path:
    """Codes as JSON: readable, and carrying what is needed to check they fit a model."""
    payload = {
        "format": "vqvae-codes/1",
        "codebook_size": config.vocab_size,  # values an index takes
        "num_embeddings": config.num_embeddings,
        "code_shape": list(config.code_shape),
        "quantizer": config.quantizer,
        "sources": list(sources),
        "codes": codes.cpu().tolist(),
    }
    atomic_write_text(path, json.dumps(payload))
    return Path(path)


def load_codes(path: Path, config: ModelConfig) -> tuple[Tensor, list[str]]:
    """Codes written by :func:`save_codes` (or a ``.npy`` integer array), checked against
    ``config``."""
    path = Path(path)
    if path.suffix == ".npy":
        codes, sources = torch.from_numpy(np.load(path)).long(), []
    else:
        try:
            payload = json.loads(path.read_text())
            codes, sources = torch.tensor(payload["codes"], dtype=torch.long), payload["sources"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path}: not a codes file written by 'vqvae encode' "
                             f"({error})") from error
        if payload.get("codebook_size") != config.vocab_size:
            raise ValueError(f"{path}: codes are for a codebook of {payload.get('codebook_size')}"
                             f" codes, the model has {config.vocab_size}")
    code_shape = config.code_shape
    if codes.ndim == len(code_shape):  # the codes of one image
        codes = codes.unsqueeze(0)
    if tuple(codes.shape[1:]) != code_shape:
        raise ValueError(f"{path}: codes must have shape (N, {', '.join(map(str, code_shape))}) "
                         f"for this model, got {tuple(codes.shape)}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= config.vocab_size):
        raise ValueError(f"{path}: codes must lie in [0, {config.vocab_size})")
    return codes, sources


def save_images(images: Tensor, out: Path, columns: int = 8, title: str | None = None) -> Path:
    """``out`` ending in ``.npy``: an ``(N, H, W)`` float32 array in [0, 1]; otherwise an image
    grid of ``columns`` columns."""
    from .. import plots

    out = Path(out)
    if out.suffix == ".npy":
        out.parent.mkdir(parents=True, exist_ok=True)
        np.save(out, images[:, 0].float().cpu().numpy())
        return out
    return plots.image_grid(images, out, columns=columns, title=title)
