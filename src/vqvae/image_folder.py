"""A folder of one's own PNG/JPEG images as a dataset (``images:DIR``): read, split and cached.

Files. Every ``.png``, ``.jpg`` and ``.jpeg`` (any case) under the folder, at any depth; names
that start with ``.`` are passed over. When the folder has subfolders that hold images, the
first-level subfolder of a file is its class: the sorted subfolder names are classes 0, 1, …,
and images lying directly in the folder are skipped with a warning. With no such subfolders the
images have no labels (``labels`` is ``None``).

Pixels. Each image is decoded with Pillow, turned upright by its EXIF orientation, resized so
that its shorter side is ``image_size`` (bicubic, antialiased) and centre-cropped to a square.
Channels: 3 (RGB) unless every file is grayscale (modes 1, L, LA, I, I;16 or a palette of
grays), then 1; ``channels=1`` or ``3`` forces one. Transparency is dropped (Pillow's
conversion); 16-bit grays are scaled to 8 bits.

Refused files. A file whose header announces more than ``max_pixels`` pixels (Pillow's
``MAX_IMAGE_PIXELS`` unless told, about 89 million) is refused before it is decoded, so a small
file that would inflate to gigabytes (a decompression bomb) costs nothing. Files that cannot be
read are named in one :class:`ImageFolderWarning` and skipped; when none is left the error says
why each failed.

Split. A file belongs to the test split when the first 8 bytes of the SHA-256 of its relative
path (``/`` separators, UTF-8), as an integer, fall below ``test_fraction`` × 2⁶⁴ (10% by
default). The split of a file depends on its path alone: adding or removing files never moves
another one. (When a folder is so small that a split would be empty, the file with the smallest
hash is moved to the test split, or the one with the largest to the training split.)

Cache. The decoded images are kept in ``~/.cache/vqvae/images/`` (``$XDG_CACHE_HOME``) as a
``torch.save`` of plain tensors, lists and strings, read back with ``weights_only=True``. Its
key covers every file's relative path, size and modification time, the image size, the
channels asked for and ``max_pixels``: any change rebuilds it. It is written atomically, and the
cache it replaces (same folder and settings, older files) is removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .data import DatasetError, ImageDataset, user_cache_dir

EXTENSIONS = (".png", ".jpg", ".jpeg")
TEST_FRACTION = 0.1
CACHE_VERSION = 1
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
# How many unreadable files a warning names one by one
_NAMED_IN_WARNING = 50


class ImageFolderWarning(UserWarning):
    """Some files of an image folder were skipped."""


class UnreadableImage(Exception):
    """One file could not be used; the message says why."""


@dataclass(frozen=True)
class ImageFile:
    relative: str  # POSIX path under the folder
    path: Path
    size: int
    mtime_ns: int


# ---------------------------------------------------------------------------- finding files


def scan(root: Path) -> tuple[list[ImageFile], list[str], list[str]]:
    """Image files under ``root`` sorted by relative path, the class names (sorted first-level
    subfolders holding images; empty when there are none), and the files skipped for lying
    beside class folders."""
    files = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in names:
            if name.startswith(".") or not name.lower().endswith(EXTENSIONS):
                continue
            path = Path(directory) / name
            try:
                stat = path.stat()
            except OSError:
                continue  # vanished or a broken link: not an image of the folder
            files.append(ImageFile(path.relative_to(root).as_posix(), path, stat.st_size,
                                   stat.st_mtime_ns))
    files.sort(key=lambda f: f.relative)
    classes = sorted({f.relative.split("/")[0] for f in files if "/" in f.relative})
    if not classes:
        return files, [], []
    loose = [f.relative for f in files if "/" not in f.relative]
    return [f for f in files if "/" in f.relative], classes, loose


# ---------------------------------------------------------------------------- decoding


def _is_gray(image) -> bool:
    if image.mode in _GRAY_MODES:
        return True
    if image.mode in ("P", "PA"):
        palette = image.getpalette() or []
        return all(palette[i] == palette[i + 1] == palette[i + 2]
                   for i in range(0, len(palette) - 2, 3))
    return False


def _to_mode(image, mode: str):
    """``image`` in mode "L" or "RGB"; 16-bit grays are scaled, not clipped, to 8 bits."""
    from PIL import Image

    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), "L")
    return image if image.mode == mode else image.convert(mode)


def read_image(path: Path, image_size: int, channels: int | None,
               max_pixels: int) -> np.ndarray:
    """One file as uint8 ``(image_size, image_size, C)``, shorter side resized, centre-cropped.

    ``channels``: 1 or 3, or ``None`` for 1 when the file is grayscale and 3 otherwise.
    Raises :class:`UnreadableImage` saying why the file cannot be used.
    """
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            width, height = image.size
            # Only the header has been read: refuse a bomb before decoding a pixel
            if width * height > max_pixels:
                raise UnreadableImage(f"{width}×{height} pixels, more than the {max_pixels} "
                                      "allowed (a decompression bomb?)")
            if channels is None:
                channels = 1 if _is_gray(image) else 3
            mode = "L" if channels == 1 else "RGB"
            if image.format == "JPEG":
                image.draft(image.mode, (image_size, image_size))  # decode at a reduced scale
            image = ImageOps.exif_transpose(image)
            image = _to_mode(image, mode)
            width, height = image.size
            side = min(width, height)
            left, top = (width - side) / 2, (height - side) / 2
            image = image.resize((image_size, image_size), Image.Resampling.BICUBIC,
                                 box=(left, top, left + side, top + side))
            array = np.asarray(image, dtype=np.uint8)
    except UnreadableImage:
        raise
    except Exception as error:  # Pillow signals damaged files with many exception types
        raise UnreadableImage(f"{type(error).__name__}: {error}") from error
    return array.reshape(image_size, image_size, channels)


def decode_all(files: list[ImageFile], image_size: int, channels: int | None,
               max_pixels: int, progress: bool) -> tuple[np.ndarray, list[int], list[str]]:
    """Decode ``files``: images ``(N, C, S, S)``, the indices of the files decoded and
    ``"relative: reason"`` for each file skipped."""
    from PIL import Image
    from tqdm import tqdm

    def one(file: ImageFile):
        try:
            return read_image(file.path, image_size, channels, max_pixels)
        except UnreadableImage as error:
            return str(error)

    workers = max(1, min(8, os.cpu_count() or 1))
    with warnings.catch_warnings():
        # Our own pixel limit decides; Pillow's warning below its hard limit would be noise
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with ThreadPoolExecutor(workers) as pool:
            results = list(tqdm(pool.map(one, files), total=len(files), unit="image",
                                desc="decoding images", disable=not progress, leave=False))
    kept, arrays, skipped = [], [], []
    for i, (file, result) in enumerate(zip(files, results, strict=True)):
        if isinstance(result, str):
            skipped.append(f"{file.relative}: {result}")
        else:
            kept.append(i)
            arrays.append(result)
    if not arrays:
        return np.zeros((0, channels or 1, image_size, image_size), np.uint8), kept, skipped
    # Unless told otherwise, a folder is grayscale only when every file is
    width = channels or max(a.shape[-1] for a in arrays)
    stacked = np.stack([np.broadcast_to(a, (image_size, image_size, width)) for a in arrays])
    return np.ascontiguousarray(stacked.transpose(0, 3, 1, 2)), kept, skipped


# ---------------------------------------------------------------------------- split


def path_fraction(relative: str) -> float:
    """Where a file's path hashes to in [0, 1): the key of the train/test split."""
    digest = hashlib.sha256(relative.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def in_test_split(paths: list[str], test_fraction: float = TEST_FRACTION) -> Tensor:
    """Boolean ``(N,)``: which of ``paths`` are in the test split (see the module's docstring)."""
    keys = [path_fraction(p) for p in paths]
    mask = torch.tensor([k < test_fraction for k in keys], dtype=torch.bool)
    if len(paths) >= 2 and 0 < test_fraction < 1:
        if not mask.any():
            mask[min(range(len(keys)), key=keys.__getitem__)] = True
        elif mask.all():
            mask[max(range(len(keys)), key=keys.__getitem__)] = False
    return mask


# ---------------------------------------------------------------------------- cache


def _cache_paths(root: Path, files: list[ImageFile], image_size: int, channels: int | None,
                 max_pixels: int, cache_dir: Path) -> tuple[Path, str]:
    settings = json.dumps([str(root.resolve()), image_size, channels, max_pixels])
    folder_key = hashlib.sha256(settings.encode()).hexdigest()[:16]
    content = json.dumps([CACHE_VERSION, image_size, channels, max_pixels,
                          [(f.relative, f.size, f.mtime_ns) for f in files]])
    content_key = hashlib.sha256(content.encode()).hexdigest()[:24]
    return cache_dir / f"{folder_key}-{content_key}.pt", folder_key


def _read_cache(path: Path) -> dict | None:
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return None
    except Exception as error:  # a damaged cache is rebuilt, never trusted
        warnings.warn(f"{path}: unreadable cache ({error}); rebuilding it",
                      ImageFolderWarning, stacklevel=3)
        return None
    keys = {"version", "images", "labels", "paths", "classes", "skipped"}
    if (not isinstance(value, dict) or set(value) != keys or value["version"] != CACHE_VERSION
            or not isinstance(value["images"], Tensor)
            or value["images"].shape[0] != len(value["paths"])):
        return None
    return value


def _write_cache(path: Path, value: dict, folder_key: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(value, f)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        for old in path.parent.glob(f"{folder_key}-*.pt"):
            if old != path:
                old.unlink(missing_ok=True)
    except OSError as error:  # no cache costs time, not correctness
        warnings.warn(f"could not write the image cache {path} ({error})", ImageFolderWarning,
                      stacklevel=3)


# ---------------------------------------------------------------------------- loading


def _warn_skipped(root: Path, skipped: list[str], total: int) -> None:
    named = "\n".join(f"  {s}" for s in skipped[:_NAMED_IN_WARNING])
    more = len(skipped) - _NAMED_IN_WARNING
    if more > 0:
        named += f"\n  … and {more} more"
    warnings.warn(f"{root}: skipped {len(skipped)} of {total} image files:\n{named}",
                  ImageFolderWarning, stacklevel=4)


def build(root: Path, files: list[ImageFile], classes: list[str], image_size: int,
          channels: int | None, max_pixels: int, progress: bool) -> dict:
    """Decode the folder: the dict that is cached."""
    images, kept, skipped = decode_all(files, image_size, channels, max_pixels, progress)
    paths = [files[i].relative for i in kept]
    labels = None
    if classes:
        ids = {name: i for i, name in enumerate(classes)}
        labels = torch.tensor([ids[p.split("/")[0]] for p in paths], dtype=torch.int64)
    return {"version": CACHE_VERSION, "images": torch.from_numpy(images), "labels": labels,
            "paths": paths, "classes": classes, "skipped": skipped}


def load_image_folder(root: str | os.PathLike, split: str = "train",
                      image_size: int | None = None, channels: int | None = None,
                      progress: bool = True, cache_dir: str | os.PathLike | None = None,
                      max_pixels: int | None = None,
                      test_fraction: float = TEST_FRACTION) -> ImageDataset:
    """A split of the images under ``root`` (see the module's docstring for every rule).

    Args:
        image_size: side of the square images returned (required).
        channels: 1 or 3 to force grayscale or RGB; ``None``: 1 when every file is grayscale.
        cache_dir: where decoded images are kept (default ``~/.cache/vqvae/images``).
        max_pixels: files announcing more pixels are refused (default Pillow's limit).
        test_fraction: share of the files in the test split.
    """
    from PIL import Image

    root = Path(root)
    if split not in ("train", "test"):
        raise DatasetError(f"unknown split {split!r}; choose 'train' or 'test'")
    if image_size is None:
        raise DatasetError(f"images:{root} needs an image size (image_size=, --image-size): "
                           "the images are resized and cropped to it")
    if not isinstance(image_size, int) or image_size < 1:
        raise DatasetError(f"image_size must be a positive integer, got {image_size!r}")
    if channels not in (None, 1, 3):
        raise DatasetError(f"channels must be 1, 3 or None, got {channels!r}")
    if not 0 <= test_fraction <= 1:
        raise DatasetError(f"test_fraction must lie in [0, 1], got {test_fraction}")
    if not root.is_dir():
        raise DatasetError(f"images:{root}: not a directory")
    max_pixels = int(max_pixels if max_pixels is not None else Image.MAX_IMAGE_PIXELS)

    files, classes, loose = scan(root)
    if not files:
        raise DatasetError(f"images:{root}: no {'/'.join(EXTENSIONS)} files found")
    cache_path, folder_key = _cache_paths(
        root, files, image_size, channels, max_pixels,
        Path(cache_dir) if cache_dir is not None else user_cache_dir("images"))
    value = _read_cache(cache_path)
    if value is None:
        value = build(root, files, classes, image_size, channels, max_pixels, progress)
        if value["paths"]:
            _write_cache(cache_path, value, folder_key)
    skipped = [f"{p}: lies beside the class folders {classes}, so it has no class"
               for p in loose] + value["skipped"]
    if skipped:
        _warn_skipped(root, skipped, len(files) + len(loose))
    if not value["paths"]:
        reasons = "\n".join(f"  {s}" for s in value["skipped"][:10])
        raise DatasetError(f"images:{root}: none of the {len(files)} image files could be "
                           f"read:\n{reasons}")
    mask = in_test_split(value["paths"], test_fraction)
    if split == "train":
        mask = ~mask
    if not mask.any():
        raise DatasetError(f"images:{root}: the {split} split is empty ({len(value['paths'])} "
                           "readable images; a train/test split needs at least 2)")
    labels = value["labels"][mask] if value["labels"] is not None else None
    return ImageDataset(f"images:{root}", split, value["images"][mask].contiguous(), labels,
                        root, tuple(value["classes"]))
