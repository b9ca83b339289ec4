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

Besides the IDX datasets, :func:`load_dataset` reads ``"cifar10"`` (:mod:`vqvae.cifar10`, found
and downloaded the same way) and ``"images:DIR"``, a folder of your own PNG/JPEG files
(:mod:`vqvae.image_folder`). Every source gives an :class:`ImageDataset`: uint8 images
``(N, C, H, W)``, int64 labels (``None`` when the images have none) and the names of the classes.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import struct
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .rundir import atomic_file, sha256_bytes, user_cache_dir


class DatasetError(RuntimeError):
    """The dataset could not be found, verified, downloaded or parsed."""


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    mirrors: tuple[str, ...]
    # file name -> SHA-256 of the uncompressed content
    sha256: dict[str, str]
    system_dirs: tuple[str, ...] = ()
    # Names of the classes, label i is classes[i]: the one place the number of classes comes
    # from. Labels outside ``range(len(classes))`` are refused when the files are loaded.
    classes: tuple[str, ...] = ()


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
        classes=tuple("0123456789"),
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
    """A split held in memory.

    ``images`` are uint8 ``(N, C, H, W)`` (C = 1 for MNIST, 3 for CIFAR-10), ``labels`` int64
    ``(N,)`` in ``range(num_classes)``, or ``None`` for images without labels (a folder of
    images with no class subfolders); ``classes`` names the classes, label ``i`` is
    ``classes[i]``.
    """

    name: str
    split: str
    images: Tensor
    labels: Tensor | None
    source: Path
    classes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise DatasetError(f"{self.name}: images must be uint8 (N, C, H, W), got "
                               f"{self.images.dtype} {tuple(self.images.shape)}")
        if self.labels is None:
            return
        if self.labels.shape != (self.images.shape[0],):
            raise DatasetError(f"{self.name}: {self.images.shape[0]} images but labels of shape "
                               f"{tuple(self.labels.shape)}")
        if self.labels.numel() and (int(self.labels.min()) < 0
                                    or int(self.labels.max()) >= len(self.classes)):
            raise DatasetError(
                f"{self.name}: labels run from {int(self.labels.min())} to "
                f"{int(self.labels.max())}, outside the {len(self.classes)} classes "
                f"{list(self.classes)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        """Number of classes (0 for images without labels)."""
        return len(self.classes)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        """Side of the (square) images in pixels."""
        return self.images.shape[-1]

    def as_batch(self) -> Tensor:
        """Images as float32 in [0, 1], ``(N, C, H, W)``: what the models take."""
        return self.images.float().div_(255.0)

    def as_float(self) -> Tensor:
        """Single-channel images as float32 in [0, 1], ``(N, H, W)``."""
        if self.channels != 1:
            raise DatasetError(
                f"{self.name} has {self.channels} channels; as_float() gives (N, H, W) for "
                "single-channel images only, use as_batch() for (N, C, H, W)")
        return self.as_batch()[:, 0]


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


def _what_is(path: Path) -> str | None:
    """What stands at ``path`` when it is not a regular file a dataset can be read from."""
    import stat

    if not os.path.lexists(path) or path.is_file():
        return None
    if path.is_symlink() and not path.exists():
        return f"a dangling symbolic link (to {os.readlink(path)})"
    mode = path.stat().st_mode
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _check_not_special(spec: DatasetSpec, data_dir) -> None:
    """A directory, dangling link or FIFO where an IDX file should be is named, rather than
    being passed over and reported later as a failed download."""
    for directory in candidate_dirs(spec, data_dir):
        for stem in spec.sha256:
            for name in (stem + ".gz", stem):
                what = _what_is(directory / name)
                if what is not None:
                    raise DatasetError(f"{directory / name} is {what}, not an IDX file of "
                                       f"{spec.name}; remove it or point --data-dir at the "
                                       "four files")


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


def download_dir(spec: DatasetSpec, data_dir=None) -> Path:
    """Where missing files are downloaded: ``data_dir``, else ``$VQVAE_DATA_DIR``, else the
    per-user cache."""
    if data_dir is not None:
        return Path(data_dir)
    env = os.environ.get("VQVAE_DATA_DIR")
    return Path(env) if env else user_cache_dir(spec.name)


def find_dataset_dir(spec: DatasetSpec, data_dir=None) -> Path | None:
    """The first candidate directory that holds all four files (not yet verified)."""
    for directory in candidate_dirs(spec, data_dir):
        if all(_find_file(directory, stem) for stem in spec.sha256):
            return directory
    return None


# ---------------------------------------------------------------------------- download


def download_file(url: str, destination: Path, verify: Callable[[Path], None],
                  progress: bool) -> None:
    """Download ``url`` to ``destination`` with a progress bar, atomically.

    The bytes go to a temporary file beside ``destination``; ``verify(tmp)`` raises
    :class:`DatasetError` when they are not the expected file, and only then is the file renamed
    into place. A failed or interrupted download leaves nothing behind.
    """
    from tqdm import tqdm

    with atomic_file(destination, suffix=".part") as tmp:
        with open(tmp, "wb") as out, urllib.request.urlopen(url, timeout=30) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=destination.name,
                      disable=not progress, leave=False) as bar:
                while chunk := response.read(1 << 16):
                    out.write(chunk)
                    bar.update(len(chunk))
        verify(tmp)


def _idx_verifier(url: str, expected_sha256: str) -> Callable[[Path], None]:
    def verify(path: Path) -> None:
        raw = read_file_bytes(path)
        if sha256_bytes(raw) != expected_sha256:
            raise DatasetError(f"{url}: downloaded content does not match its known SHA-256")
        parse_idx(raw, url)

    return verify


def download(spec: DatasetSpec, directory: Path, progress: bool = True) -> None:
    """Download the four files of ``spec`` into ``directory``, verified, atomically."""
    for stem, digest in spec.sha256.items():
        if _find_file(directory, stem):
            continue
        errors = []
        for mirror in spec.mirrors:
            url = f"{mirror}{stem}.gz"
            try:
                download_file(url, directory / f"{stem}.gz", _idx_verifier(url, digest),
                              progress)
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


#: Prefix of a folder of one's own images: ``images:DIR``.
IMAGES_PREFIX = "images:"
#: Every name :func:`load_dataset` takes, besides ``images:DIR``.
DATASET_NAMES = (*DATASETS, "cifar10")


def check_dataset_name(name: str) -> str:
    """``name`` when :func:`load_dataset` knows it, else a :class:`DatasetError` listing the
    choices. Fit for argparse's ``type=``: it checks the name only, reads no files."""
    if name in DATASET_NAMES:
        return name
    if name.startswith(IMAGES_PREFIX):
        if not name[len(IMAGES_PREFIX):]:
            raise DatasetError("images: needs a folder, as in images:path/to/photos")
        return name
    raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)} "
                       f"or {IMAGES_PREFIX}DIR (a folder of PNG/JPEG files)")


def load_dataset(name: str | DatasetSpec = "mnist", split: str = "train", data_dir=None,
                 download_missing: bool = True, progress: bool = True,
                 image_size: int | None = None, channels: int | None = None) -> ImageDataset:
    """Load a split of a dataset into memory, verified.

    Args:
        name: ``"mnist"``, ``"fashion-mnist"``, ``"cifar10"``, ``"images:DIR"`` (a folder of
            PNG/JPEG files, see :mod:`vqvae.image_folder`) or a :class:`DatasetSpec`.
        split: ``"train"`` or ``"test"`` (MNIST: 60,000 and 10,000 images; CIFAR-10: 50,000
            and 10,000; a folder: a fixed 90% / 10% of its files).
        data_dir: directory looked at first (not used by ``images:DIR``).
        download_missing: download from the public mirrors when no directory has the files.
        image_size: side of the images. A folder's images are resized and cropped to it (it
            must be given); the other datasets have a fixed size (28, 32) and refuse another.
        channels: 1 or 3 to convert the images (3 → 1 by ITU-R 601-2 luma, as Pillow's "L"; 1 →
            3 by repeating); ``None`` keeps the dataset's own (a folder: 3 unless every file is
            grayscale).
    """
    if not isinstance(name, DatasetSpec):
        check_dataset_name(name)
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; choose 'train' or 'test'")
    if channels not in (None, 1, 3):
        raise DatasetError(f"channels must be 1, 3 or None (the dataset's own), got {channels!r}")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise DatasetError(f"image_size must be a positive integer, got {image_size!r}")
    if isinstance(name, str) and name.startswith(IMAGES_PREFIX):
        from .image_folder import load_image_folder

        return load_image_folder(name[len(IMAGES_PREFIX):], split, image_size, channels,
                                 progress=progress)
    if name == "cifar10":
        from .cifar10 import load_cifar10

        dataset = load_cifar10(split, data_dir, download_missing, progress)
    else:
        dataset = _load_idx(name, split, data_dir, download_missing, progress)
    if image_size is not None and image_size != dataset.image_size:
        raise DatasetError(
            f"{dataset.name} images are {dataset.image_size}×{dataset.image_size}; "
            f"image_size={image_size} is not offered (a folder of images, images:DIR, is "
            "resized to any size)")
    return with_channels(dataset, channels)


def to_channels(images: Tensor, channels: int) -> Tensor:
    """uint8 ``(N, C, H, W)`` with C in {1, 3} converted to ``channels`` channels.

    3 → 1 is Pillow's "L" conversion, ITU-R 601-2 luma ``(299 R + 587 G + 114 B) / 1000``, in
    its fixed-point form so the results are the same bytes; 1 → 3 repeats the channel.
    """
    have = images.shape[1]
    if have == channels:
        return images
    if (have, channels) == (1, 3):
        return images.expand(-1, 3, -1, -1).contiguous()
    if (have, channels) == (3, 1):
        weights = torch.tensor([19595, 38470, 7471], dtype=torch.int32).view(1, 3, 1, 1)
        luma = (images.int() * weights).sum(1, keepdim=True).add_(1 << 15)
        return luma.bitwise_right_shift_(16).to(torch.uint8)
    raise DatasetError(f"cannot convert images of {have} channels to {channels}")


def with_channels(dataset: ImageDataset, channels: int | None) -> ImageDataset:
    """``dataset`` with its images converted to ``channels`` (``None``: as they are)."""
    if channels is None or channels == dataset.channels:
        return dataset
    return dataclasses.replace(dataset, images=to_channels(dataset.images, channels))


def _load_idx(name: str | DatasetSpec, split: str, data_dir, download_missing: bool,
              progress: bool) -> ImageDataset:
    spec = name if isinstance(name, DatasetSpec) else DATASETS[name]
    name = spec.name
    if not spec.classes:
        raise DatasetError(f"{name}: its DatasetSpec names no classes (DatasetSpec.classes, "
                           "label i being classes[i])")
    directory = find_dataset_dir(spec, data_dir)
    if directory is None:
        _check_not_special(spec, data_dir)
        looked = "\n".join(f"  {d}" for d in candidate_dirs(spec, data_dir))
        if not download_missing:
            raise DatasetError(f"{name} not found; looked in:\n{looked}")
        target = download_dir(spec, data_dir)
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
    return ImageDataset(name, split, torch.from_numpy(images.copy()).unsqueeze(1),
                        torch.from_numpy(labels.astype(np.int64)), directory, spec.classes)
