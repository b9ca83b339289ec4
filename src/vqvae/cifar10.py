"""CIFAR-10 in its python form, found, verified, downloaded and read without running pickles.

The official ``cifar-10-python.tar.gz`` holds ``cifar-10-batches-py/`` with five training
batches (``data_batch_1`` … ``data_batch_5``, 10,000 images each), ``test_batch`` (10,000) and
``batches.meta`` (the class names). Each batch is a pickled dict: ``data`` a uint8 array
``(10000, 3072)``, each row an image's red, green then blue plane of 32×32 pixels in row-major
order, and ``labels`` a list of ints in 0–9.

Where it is looked for, in order: ``data_dir``, ``$VQVAE_DATA_DIR`` and the per-user cache
``~/.cache/vqvae/cifar10`` (each directly and in a ``cifar10/`` subfolder), as MNIST is. In each,
an extracted ``cifar-10-batches-py/`` folder is used first (each file checked against its
published MD5), then the tarball (its SHA-256 and MD5 checked, read in place, never extracted).
When neither is there, the tarball is downloaded into the first of ``data_dir``,
``$VQVAE_DATA_DIR`` or the cache, verified before it is renamed into place.

The batches are read by an unpickler that builds only numpy arrays, dtypes and plain Python
containers: a file that names any other global is refused before anything of it runs.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import pickle
import tarfile
import urllib.error
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .data import DatasetError, ImageDataset, candidate_dirs, download_dir, download_file


@dataclass(frozen=True)
class PickledBatchesSpec:
    """A dataset in CIFAR's python form: a tarball of pickled batches and their checksums."""

    name: str
    urls: tuple[str, ...]
    archive: str  # file name of the tarball
    archive_sha256: str
    archive_md5: str
    folder: str  # the folder inside the tarball that holds the batches
    md5: dict[str, str]  # batch file name -> MD5 of the file
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    image_shape: tuple[int, int, int] = (3, 32, 32)
    system_dirs: tuple[str, ...] = ()

    def split_files(self, split: str) -> tuple[str, ...]:
        return {"train": self.train, "test": self.test}[split]


#: The official tarball. Its MD5 and the batches' are the ones the dataset's page
#: (https://www.cs.toronto.edu/~kriz/cifar.html) and torchvision publish; the SHA-256 is the one
#: Keras checks (170,498,071 bytes).
CIFAR10 = PickledBatchesSpec(
    name="cifar10",
    urls=("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
    archive="cifar-10-python.tar.gz",
    archive_sha256="6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
    archive_md5="c58f30108f718f92721af3b95e74349a",
    folder="cifar-10-batches-py",
    md5={
        "data_batch_1": "c99cafc152244af753f735de768cd75f",
        "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
        "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
        "data_batch_4": "634d18415352ddfa80567beed471001a",
        "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
        "test_batch": "40351d587109b95175f43aff81a1287e",
        "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
    },
    train=("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"),
    test=("test_batch",),
    meta="batches.meta",
)


# ---------------------------------------------------------------------------- restricted unpickling


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    # Protocol-2 pickles written by Python 3 store bytes as _codecs.encode(text, "latin1")
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, encoding)


def _allowed_globals() -> dict[tuple[str, str], object]:
    # Take numpy's reconstructors from numpy itself (they moved from numpy.core to numpy._core in
    # numpy 2; files written by either, or by Python 2, name one or the other).
    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]
    frombuffer = np.ndarray.__reduce_ex__(np.zeros(1), 5)[0]
    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{package}.numeric", "_frombuffer")] = frombuffer
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, dtypes and builtin containers, and nothing else.

    Strings of Python 2 pickles are decoded as latin-1 (``bytes`` of arrays survive intact).
    """

    _allowed = _allowed_globals()

    def __init__(self, file, source: str):
        super().__init__(file, encoding="latin1")
        self.source = source

    def find_class(self, module: str, name: str):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise DatasetError(
                f"{self.source}: refused to unpickle {module}.{name}; a CIFAR batch holds only "
                "numpy arrays, lists and strings. The file is not a CIFAR batch: delete it and "
                "download the dataset again.") from None


def unpickle_batch(raw: bytes, source: str) -> dict:
    """The dict of a pickled batch, built by :class:`RestrictedUnpickler`."""
    try:
        value = RestrictedUnpickler(io.BytesIO(raw), source).load()
    except DatasetError:
        raise
    except Exception as error:  # a damaged pickle can fail in many ways
        raise DatasetError(f"{source}: not a readable pickle ({type(error).__name__}: {error})"
                           ) from error
    if not isinstance(value, dict):
        raise DatasetError(f"{source}: holds a {type(value).__name__}, expected a dict")
    # Python 2 pickles read with encoding="latin1" have str keys; bytes keys come from files
    # pickled with bytes keys, which hold the same thing
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in value.items()}


def parse_batch(raw: bytes, source: str, image_shape: tuple[int, int, int],
                num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, C, H, W)`` uint8 and labels ``(N,)`` int64 of one pickled batch."""
    batch = unpickle_batch(raw, source)
    data, labels = batch.get("data"), batch.get("labels")
    pixels = int(np.prod(image_shape))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != pixels:
        got = (f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray)
               else type(data).__name__)
        raise DatasetError(f"{source}: 'data' must be a uint8 array (N, {pixels}), got {got}")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as error:
        raise DatasetError(f"{source}: 'labels' is not a list of integers") from error
    if labels.shape != (data.shape[0],):
        raise DatasetError(f"{source}: {data.shape[0]} images but labels of shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(f"{source}: labels outside 0–{num_classes - 1}")
    return data.reshape(-1, *image_shape), labels


def parse_meta(raw: bytes, source: str) -> tuple[str, ...]:
    """The class names of ``batches.meta``."""
    names = unpickle_batch(raw, source).get("label_names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise DatasetError(f"{source}: 'label_names' must be a non-empty list of strings")
    return tuple(names)


# ---------------------------------------------------------------------------- finding and verifying


def md5_hex(raw: bytes) -> str:
    return hashlib.md5(raw, usedforsecurity=False).hexdigest()


def _file_digests(path: Path) -> tuple[str, str]:
    sha256, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha256.update(chunk)
            md5.update(chunk)
    return sha256.hexdigest(), md5.hexdigest()


def verify_archive(spec: PickledBatchesSpec, path: Path, source: str | None = None) -> None:
    """Raise :class:`DatasetError` unless ``path`` is the tarball of ``spec`` (SHA-256 and MD5)."""
    try:
        sha256, md5 = _file_digests(path)
    except OSError as error:
        raise DatasetError(f"{path}: cannot be read ({error})") from error
    if sha256 != spec.archive_sha256 or md5 != spec.archive_md5:
        raise DatasetError(
            f"{source or path} failed verification: SHA-256 {sha256} and MD5 {md5}, expected "
            f"{spec.archive_sha256} and {spec.archive_md5}. The file is corrupt, truncated or "
            "not the file of that name. Delete it so that it is downloaded again, or point "
            "--data-dir / $VQVAE_DATA_DIR at a good copy.")


def _checked(spec: PickledBatchesSpec, name: str, raw: bytes, source: str) -> bytes:
    digest = md5_hex(raw)
    if digest != spec.md5[name]:
        raise DatasetError(
            f"{source} failed verification: its MD5 is {digest}, expected {spec.md5[name]}. "
            "Delete it so that the dataset is read from its tarball or downloaded again.")
    return raw


def find_source(spec: PickledBatchesSpec, data_dir=None) -> Path | None:
    """The first extracted batches folder or tarball of ``spec`` (not yet verified)."""
    for directory in candidate_dirs(spec, data_dir):
        folder = directory / spec.folder
        if all((folder / name).is_file() for name in spec.md5):
            return folder
        if (directory / spec.archive).is_file():
            return directory / spec.archive
    return None


def read_members(spec: PickledBatchesSpec, source: Path, names: tuple[str, ...]) -> dict:
    """The verified bytes of batch files ``names``, from a folder or the tarball."""
    if source.is_dir():
        out = {}
        for name in names:
            path = source / name
            try:
                raw = path.read_bytes()
            except OSError as error:
                raise DatasetError(f"{path}: cannot be read ({error})") from error
            out[name] = _checked(spec, name, raw, str(path))
        return out
    verify_archive(spec, source)
    out = {}
    try:
        with tarfile.open(source, "r:gz") as tar:
            for name in names:
                member = f"{spec.folder}/{name}"
                try:
                    handle = tar.extractfile(member)
                except KeyError:
                    handle = None
                if handle is None:
                    raise DatasetError(f"{source}: has no file {member}")
                out[name] = _checked(spec, name, handle.read(), f"{source}:{member}")
    except (tarfile.TarError, OSError, EOFError) as error:
        raise DatasetError(f"{source}: cannot be read as a tar.gz ({error})") from error
    return out


def download(spec: PickledBatchesSpec, directory: Path, progress: bool = True) -> Path:
    """Download the tarball of ``spec`` into ``directory``, verified, atomically."""
    errors = []
    for url in spec.urls:
        try:
            download_file(url, directory / spec.archive,
                          lambda path, url=url: verify_archive(spec, path, url), progress)
            return directory / spec.archive
        except (urllib.error.URLError, OSError, DatasetError) as error:
            errors.append(f"  {url}: {getattr(error, 'reason', error)}")
    raise DatasetError(
        f"could not download {spec.archive} into {directory}:\n" + "\n".join(errors)
        + f"\nIf this machine is offline, copy {spec.archive} (or the extracted {spec.folder}/ "
        "folder) into a directory and pass it with --data-dir or $VQVAE_DATA_DIR.")


def load_cifar10(split: str = "train", data_dir=None, download_missing: bool = True,
                 progress: bool = True, spec: PickledBatchesSpec = CIFAR10) -> ImageDataset:
    """Load a split of CIFAR-10 (or a dataset of the same form, ``spec``), verified."""
    if split not in ("train", "test"):
        raise DatasetError(f"unknown split {split!r}; choose 'train' or 'test'")
    source = find_source(spec, data_dir)
    if source is None:
        looked = "\n".join(f"  {d}" for d in candidate_dirs(spec, data_dir))
        if not download_missing:
            raise DatasetError(f"{spec.name} not found; looked in:\n{looked}")
        try:
            source = download(spec, download_dir(spec, data_dir), progress=progress)
        except DatasetError as error:
            raise DatasetError(f"{spec.name} not found; looked in:\n{looked}\n{error}") from None
    files = spec.split_files(split)
    raw = read_members(spec, source, (spec.meta, *files))
    classes = parse_meta(raw[spec.meta], f"{source}/{spec.meta}")
    batches = [parse_batch(raw[name], f"{source}/{name}", spec.image_shape, len(classes))
               for name in files]
    images = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    return ImageDataset(spec.name, split, torch.from_numpy(images), torch.from_numpy(labels),
                        source, classes)

