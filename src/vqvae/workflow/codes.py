"""The discrete representation as files: images to codes and back (``vqvae encode``/``decode``),
PNG files in and out."""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..models import ModelConfig
from ..rundir import atomic_write_text


def read_png_images(paths: Sequence[Path], size: int = 28, invert: bool = False,
                    channels: int = 1, max_pixels: int | None = None) -> Tensor:
    """PNG/JPEG files as ``(N, channels, size, size)`` floats in [0, 1]: shorter side resized,
    centre-cropped (:func:`vqvae.image_folder.read_image`).

    A file whose header announces more than ``max_pixels`` pixels (Pillow's
    ``MAX_IMAGE_PIXELS`` unless told) is refused before it is decoded. A file that cannot be
    used is a ``ValueError`` naming it and saying why. MNIST digits are light on dark; pass
    ``invert=True`` for dark-on-light drawings.
    """
    from PIL import Image

    from ..image_folder import UnreadableImage, read_image

    limit = max_pixels or Image.MAX_IMAGE_PIXELS or 89_478_485
    images = []
    for path in paths:
        try:
            with warnings.catch_warnings():  # the size is refused below, with its reason
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                array = read_image(Path(path), size, channels, limit)
        except UnreadableImage as error:
            raise ValueError(f"{path}: not a usable image ({error})") from None
        array = np.moveaxis(array, -1, 0).astype(np.float32) / 255.0
        images.append(1.0 - array if invert else array)
    return torch.from_numpy(np.stack(images))


def to_array(images: Tensor) -> np.ndarray:
    """Images ``(N, C, H, W)`` as a float32 array in [0, 1]: ``(N, H, W)`` for one channel (as
    MNIST is stored), channels last ``(N, H, W, C)`` otherwise (as image libraries take them)."""
    array = images.detach().float().cpu().clamp(0, 1).numpy()
    return array[:, 0] if array.shape[1] == 1 else np.moveaxis(array, 1, -1)


def write_png_images(images: Tensor, directory: Path, names: Sequence[str]) -> list[Path]:
    """One 8-bit PNG per image ``(N, C, H, W)``, named ``names[i]``: grayscale for one channel,
    RGB for three."""
    from PIL import Image

    channels = images.shape[1]
    if images.ndim != 4 or channels not in (1, 3):
        raise ValueError(f"PNG files take images (N, 1 or 3, H, W), got {tuple(images.shape)}")
    directory.mkdir(parents=True, exist_ok=True)
    array = to_array(images)
    paths = []
    for image, name in zip((array * 255).round().astype(np.uint8), names, strict=True):
        path = directory / name
        Image.fromarray(image, mode="L" if channels == 1 else "RGB").save(path)
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
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as error:
            raise ValueError(f"{path}: not a readable .npy array ({error})") from None
        codes, sources = _integer_codes(array, path), []
    else:
        try:
            payload = json.loads(path.read_text())
            codes, sources = _integer_codes(payload["codes"], path), payload["sources"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            if "integer" in str(error):
                raise

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


def _integer_codes(values, path: Path) -> Tensor:
    """``values`` (a nested list or an array) as int64, refusing floats and booleans rather
    than rounding them: ``1.7`` is not a code."""
    array = np.asarray(values)
    if array.dtype.kind not in "iu" and not (array.size == 0 and array.dtype.kind == "f"):
        raise ValueError(f"{path}: codes must be integers, got {array.dtype} values"
                         + (f" such as {array.flat[0].item()!r}" if array.size else ""))
    return torch.from_numpy(array.astype(np.int64))


def save_images(images: Tensor, out: Path, columns: int = 8, title: str | None = None) -> Path:
    """``out`` ending in ``.npy``: a float32 array in [0, 1], ``(N, H, W)`` for one channel and
    ``(N, H, W, C)`` for colour (see :func:`to_array`); otherwise an image grid of ``columns``
    columns."""
    from .. import plots

    out = Path(out)
    if out.suffix == ".npy":
        out.parent.mkdir(parents=True, exist_ok=True)
        np.save(out, to_array(images))
        return out
    if out.suffix.lower() in ("", ".png"):
        return plots.image_grid(images, out, columns=columns, title=title)
    # Another image format: the grid drawn as PNG, written in the format the suffix names
    import tempfile

    from PIL import Image

    from ..rundir import atomic_file

    with tempfile.TemporaryDirectory() as scratch:
        drawn = plots.image_grid(images, Path(scratch) / "grid.png", columns=columns,
                                 title=title)
        with Image.open(drawn) as image:
            image = image.convert("RGB")
            with atomic_file(out) as tmp:
                image.save(tmp, format=Image.registered_extensions()[out.suffix.lower()])
    return out
