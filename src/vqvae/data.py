"""MNIST-format datasets (IDX files) loaded into tensors, found, verified and downloaded.

Where files are looked for, in order:

1. the directory passed as ``data_dir`` (the CLI's ``--data-dir``),
2. ``$VQVAE_DATA_DIR``,
3. system copies (Debian's ``dataset-fashion-mnist`` puts Fashion-MNIST in
   ``/usr/share/datasets/fashion-mnist``),
4. the per-user cache, ``$XDG_CACHE_HOME/vqvae/<dataset>`` (``~/.cache/vqvae/<dataset>``).

A directory is used only when it holds all four files. Each file is verified against the SHA-256
of its uncompressed content (gzipped or not, the content is what counts). A file that fails
verification is never used: the error says which file, what was wrong and how to fix it. When no
directory has the files, they are downloaded from the public mirrors into the first of
``data_dir``, ``$VQVAE_DATA_DIR`` or the cache (verified, then renamed into place, so a broken
download never leaves a partial file behind).
"""

from __future__ import annotations

import gzip
import io
import os
import struct
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .rundir import atomic_write_bytes, sha256_bytes, user_cache_dir


class DatasetError(RuntimeError):
    """The dataset could not be found, verified, downloaded or parsed."""


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    mirrors: tuple[str, ...]
    # file name -> SHA-256 of the uncompressed content
    sha256: dict[str, str]
    system_dirs: tuple[str, ...] = ()
    classes: tuple[str, ...] = tuple(str(d) for d in range(10))


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        name="mnist",
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
        sha256={
            "train-images-idx3-ubyte":
                "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            "train-labels-idx1-ubyte":
                "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            "t10k-images-idx3-ubyte":
                "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            "t10k-labels-idx1-ubyte":
                "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        },
    ),
    "fashion-mnist": DatasetSpec(
        name="fashion-mnist",
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        sha256={
            "train-images-idx3-ubyte":
                "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            "train-labels-idx1-ubyte":
                "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            "t10k-images-idx3-ubyte":
                "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            "t10k-labels-idx1-ubyte":
                "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        },
        system_dirs=("/usr/share/datasets/fashion-mnist",),
        classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                 "Sneaker", "Bag", "Ankle boot"),
    ),
}

SPLITS = {"train": "train", "test": "t10k"}


@dataclass(frozen=True)
class ImageDataset:
    """A split held in memory: ``images`` uint8 ``(N, 28, 28)``, ``labels`` int64 ``(N,)``."""

    name: str
    split: str
    images: Tensor
    labels: Tensor
    source: Path

    def __len__(self) -> int:
        return self.images.shape[0]

    def as_float(self) -> Tensor:
        """Images as float32 in [0, 1], ``(N, 28, 28)``."""
        return self.images.float().div_(255.0)


# ---------------------------------------------------------------------------- IDX parsing

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def parse_idx(raw: bytes, source: str = "<bytes>") -> np.ndarray:
    """Parse the bytes of an IDX file (uncompressed) into an array."""
    if len(raw) < 4:
        raise DatasetError(f"{source}: too short to be an IDX file ({len(raw)} bytes)")
    zero, dtype_code, ndim = raw[0] << 8 | raw[1], raw[2], raw[3]
    if zero != 0 or dtype_code not in _IDX_DTYPES or ndim == 0:
        raise DatasetError(
            f"{source}: not an IDX file (magic bytes {raw[:4].hex()}, expected 0000 followed by "
            "a type code 08-0e and the number of dimensions)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{source}: truncated header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[dtype_code])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DatasetError(
            f"{source}: truncated or padded: header says shape {shape} ({expected} bytes of "
            f"data), the file has {len(raw) - header}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def read_file_bytes(path: Path) -> bytes:
    """The uncompressed content of an IDX file, gzipped (``.gz``) or not."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
        if head == b"\x1f\x8b":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as error:
        raise DatasetError(f"{path}: cannot be read ({error}); delete it and try again") from error


# ---------------------------------------------------------------------------- finding files


def candidate_dirs(spec: DatasetSpec, data_dir: str | os.PathLike | None) -> list[Path]:
    dirs = []
    if data_dir is not None:
        dirs.append(Path(data_dir))
    env = os.environ.get("VQVAE_DATA_DIR")
    if env:
        dirs.append(Path(env))
    dirs += [Path(d) for d in spec.system_dirs]
    dirs.append(user_cache_dir(spec.name))
    # a dataset may sit in <dir>/<dataset>/ as well as directly in <dir>
    expanded = []
    for d in dirs:
        expanded += [d, d / spec.name]
    return list(dict.fromkeys(expanded))


def _find_file(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def load_verified(path: Path, expected_sha256: str) -> np.ndarray:
    raw = read_file_bytes(path)
    digest = sha256_bytes(raw)
    if digest != expected_sha256:
        raise DatasetError(
            f"{path} failed verification: the SHA-256 of its content is {digest}, expected "
            f"{expected_sha256}. The file is corrupt, truncated or not the file of that name. "
            "Delete it so that it is downloaded again, or point --data-dir / $VQVAE_DATA_DIR at "
            "a good copy.")
    return parse_idx(raw, str(path))


def find_dataset_dir(spec: DatasetSpec, data_dir=None) -> Path | None:
    """The first candidate directory that holds all four files (not yet verified)."""
    for directory in candidate_dirs(spec, data_dir):
        if all(_find_file(directory, stem) for stem in spec.sha256):
            return directory
    return None


# ---------------------------------------------------------------------------- download


def _download_one(url: str, destination: Path, expected_sha256: str, progress: bool) -> None:
    from tqdm import tqdm

    out = io.BytesIO()  # the files are megabytes: verified in memory, then written atomically
    with urllib.request.urlopen(url, timeout=30) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=destination.name,
                  disable=not progress, leave=False) as bar:
            while chunk := response.read(1 << 16):
                out.write(chunk)
                bar.update(len(chunk))
    payload = out.getvalue()
    try:
        raw = gzip.decompress(payload) if payload[:2] == b"\x1f\x8b" else payload
    except (OSError, EOFError) as error:
        raise DatasetError(f"{url}: downloaded content cannot be read ({error})") from error
    if sha256_bytes(raw) != expected_sha256:
        raise DatasetError(f"{url}: downloaded content does not match its known SHA-256")
    parse_idx(raw, url)
    atomic_write_bytes(destination, payload)


def download(spec: DatasetSpec, directory: Path, progress: bool = True) -> None:
    """Download the four files of ``spec`` into ``directory``, verified, atomically."""
    for stem, digest in spec.sha256.items():
        if _find_file(directory, stem):
            continue
        errors = []
        for mirror in spec.mirrors:
            url = f"{mirror}{stem}.gz"
            try:
                _download_one(url, directory / f"{stem}.gz", digest, progress)
                break
            except (urllib.error.URLError, OSError, DatasetError) as error:
                errors.append(f"  {url}: {getattr(error, 'reason', error)}")
        else:
            raise DatasetError(
                f"could not download {spec.name} file {stem}.gz into {directory}:\n"
                + "\n".join(errors)
                + "\nIf this machine is offline, copy the four IDX files (.gz or not) into a "
                "directory and pass it with --data-dir or $VQVAE_DATA_DIR.")


# ---------------------------------------------------------------------------- loading


def load_dataset(name: str | DatasetSpec = "mnist", split: str = "train", data_dir=None,
                 download_missing: bool = True, progress: bool = True) -> ImageDataset:
    """Load a split of an MNIST-format dataset into memory, verified.

    Args:
        name: ``"mnist"``, ``"fashion-mnist"`` or a :class:`DatasetSpec`.
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000).
        data_dir: directory looked at first.
        download_missing: download from the public mirrors when no directory has the files.
    """
    if isinstance(name, DatasetSpec):
        spec = name
    elif name in DATASETS:
        spec = DATASETS[name]
    else:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; choose 'train' or 'test'")
    name = spec.name
    directory = find_dataset_dir(spec, data_dir)
    if directory is None:
        looked = "\n".join(f"  {d}" for d in candidate_dirs(spec, data_dir))
        if not download_missing:
            raise DatasetError(f"{name} not found; looked in:\n{looked}")
        target = next(iter(candidate_dirs(spec, data_dir)))
        if data_dir is None and not os.environ.get("VQVAE_DATA_DIR"):
            target = user_cache_dir(spec.name)
        try:
            download(spec, target, progress=progress)
        except DatasetError as error:
            raise DatasetError(f"{name} not found; looked in:\n{looked}\n{error}") from None
        directory = target
    prefix = SPLITS[split]
    images_path = _find_file(directory, f"{prefix}-images-idx3-ubyte")
    labels_path = _find_file(directory, f"{prefix}-labels-idx1-ubyte")
    images = load_verified(images_path, spec.sha256[f"{prefix}-images-idx3-ubyte"])
    labels = load_verified(labels_path, spec.sha256[f"{prefix}-labels-idx1-ubyte"])
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DatasetError(f"{directory}: images {images.shape} and labels {labels.shape} "
                           "do not describe one set of 28×28 images")
    return ImageDataset(name, split, torch.from_numpy(images.copy()),
                        torch.from_numpy(labels.astype(np.int64)), directory)
