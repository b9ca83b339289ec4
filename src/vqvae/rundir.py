"""A run directory and the files around it: where things are, how they are written and read.

A run directory holds ``config.json``, ``checkpoint.pt`` (everything a resumed run needs),
``model.safetensors`` (the weights alone) and ``metrics.json`` (written by :mod:`vqvae.train`),
and whatever later commands add (the prior's files, the judge's report).
Every file is written atomically (a reader sees the old content or all of the new, never a
part), checksums are SHA-256 of file contents, and per-user caches live under
``$XDG_CACHE_HOME/vqvae/`` (``~/.cache/vqvae/`` without it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # the model and training modules import this one
    from .models import VQVAE, ModelConfig
    from .train import TrainConfig

CHECKPOINT = "checkpoint.pt"
CONFIG = "config.json"
METRICS = "metrics.json"
#: The trained weights alone (safetensors), written beside the checkpoint after every epoch
WEIGHTS = "model.safetensors"

# ---------------------------------------------------------------------------- writing


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary file beside ``path`` to fill; renamed onto ``path`` when the block ends
    without an error, removed otherwise. ``path`` holds its old content or all of the new."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=path.name + ".", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check_writable_dir(path: str | os.PathLike) -> None:
    """``PermissionError``/``NotADirectoryError`` naming the problem unless ``path`` is, or can
    be made, a directory this process can write in: checked before expensive work starts."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a directory", str(path))
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing != path and not existing.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"cannot create {path} under a file",
                                 str(existing))
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, "not writable", str(existing))


def atomic_write_bytes(path: str | os.PathLike, payload: bytes) -> None:
    """Write ``path`` so that it holds either its old content or all of the new: never a part."""
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=2) + "\n")


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


# ---------------------------------------------------------------------------- checksums


def sha256_bytes(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 of a file's content, read in 1 MiB pieces (checkpoints can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------- caches


def user_cache_dir(*parts: str) -> Path:
    """``$XDG_CACHE_HOME/vqvae/PARTS...`` (``~/.cache/vqvae/...`` when it is unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base, "vqvae", *parts)


# ---------------------------------------------------------------------------- devices


def resolve_device(name: str | torch.device) -> torch.device:
    """``"auto"`` is CUDA when torch sees a GPU, else the CPU. A name torch does not know, or a
    device this machine lacks (CUDA without a GPU, ``cuda:7`` on a machine with two, MPS off a
    Mac), is a ``ValueError`` that says what to use instead."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device {str(name)!r} is not a device name; use cpu, cuda, cuda:N or "
                         "auto") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {str(name)!r} was asked for, but torch sees no CUDA "
                             "device; use --device cpu (or auto)")
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {str(name)!r} was asked for, but torch sees {count} CUDA "
                             f"device(s): cuda:0 to cuda:{count - 1}")
    elif device.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ValueError(f"device {str(name)!r} was asked for, but this machine has no MPS "
                             "(Apple GPU); use --device cpu (or auto)")
    elif device.type != "cpu":
        raise ValueError(f"device {str(name)!r} is not supported; use cpu, cuda, cuda:N or auto")
    elif device.index not in (None, 0):
        raise ValueError(f"device {str(name)!r}: there is one CPU device, 'cpu'")
    return device


def uses_bf16(precision: str, device: torch.device) -> bool:
    """Whether ``precision`` means bf16 autocast on ``device``.

    ``"auto"`` picks bf16 where matrix products run natively in bf16: CUDA devices that support
    it, and CPUs with AVX512-BF16 or AMX (oneDNN's check); README, "Development", says what it
    gains.
    """
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# ---------------------------------------------------------------------------- a run's files


def save_config(run_dir: Path, train_config: TrainConfig, model_config: ModelConfig) -> None:
    atomic_write_json(Path(run_dir) / CONFIG, {"model": model_config.to_dict(),
                                               "train": dataclasses.asdict(train_config)})


class RunFileError(Exception):
    """A file of a run directory exists but cannot be used (damaged, foreign, non-finite)."""


def _not_a_run(run_dir: Path) -> FileNotFoundError:
    if not run_dir.exists():
        return FileNotFoundError(f"{run_dir} not found: the directory does not exist")
    if not run_dir.is_dir():
        return FileNotFoundError(f"{run_dir} is not a directory")
    return FileNotFoundError(f"{run_dir / CONFIG} not found: {run_dir} is not a run directory")


def read_config(run_dir: str | os.PathLike) -> tuple[TrainConfig, ModelConfig]:
    """The training and model settings a run started with.

    A missing directory or ``config.json`` is a ``FileNotFoundError``; a ``config.json`` that
    is not JSON, lacks a section or holds unknown keys or wrong types is a
    :class:`RunFileError` naming the file.
    """
    from .models import ModelConfig
    from .train import TrainConfig

    run_dir = Path(run_dir)
    path = run_dir / CONFIG
    if not path.is_file():
        raise _not_a_run(run_dir)
    try:
        values = json.loads(path.read_bytes())
        if not isinstance(values, dict) or not isinstance(values.get("train"), dict) \
                or not isinstance(values.get("model"), dict):
            raise ValueError("expected an object with 'train' and 'model' objects")
        _check_fields("train", values["train"], TrainConfig)
        _check_fields("model", values["model"], ModelConfig)
        train_config = TrainConfig(**values["train"])
        model_config = ModelConfig.from_dict(values["model"])
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:
        raise RunFileError(f"{path} is damaged or not written by vqvae train "
                           f"({type(error).__name__}: {error})") from None
    return train_config, model_config


def _check_fields(section: str, values: dict, cls) -> None:
    """``ValueError`` for a key ``cls`` lacks, or a value whose type differs from the field's
    default (an int is taken for a float; ``None`` defaults take anything)."""
    defaults = cls()
    fields = {f.name for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key not in fields:
            raise ValueError(f"unknown key {section}.{key}")
        default = getattr(defaults, key)
        if default is None or value is None and key.endswith("subset"):
            continue
        expected = float if type(default) is float else type(default)
        ok = isinstance(value, int | float) and not isinstance(value, bool) \
            if expected is float else type(value) is expected
        if not ok:
            raise ValueError(f"{section}.{key} should be of type {expected.__name__}, "
                             f"got {value!r}")


#: What a checkpoint written by :mod:`vqvae.train` holds.
CHECKPOINT_KEYS = ("model", "optimizer", "model_config", "history", "rng")


def load_checkpoint(run_dir: str | os.PathLike, map_location="cpu") -> dict:
    """The checkpoint of a run, loaded with ``weights_only=True`` (no code is executed).

    A missing one is a ``FileNotFoundError``; a truncated, empty or foreign file (a plain state
    dict, another project's checkpoint) is a :class:`RunFileError` naming it.
    """
    run_dir = Path(run_dir)
    path = run_dir / CHECKPOINT
    if not path.is_file():
        if not (run_dir / CONFIG).is_file():
            raise _not_a_run(run_dir)
        raise FileNotFoundError(f"{path} not found: the run has not finished an epoch yet")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch reports damage with many exception types
        raise RunFileError(f"{path} is damaged (truncated, empty or not a torch file: "
                           f"{type(error).__name__}); resume from a copy, or start the run "
                           "again") from None
    if not isinstance(checkpoint, dict) or not all(k in checkpoint for k in CHECKPOINT_KEYS):
        what = "a plain state dict" if isinstance(checkpoint, dict) and checkpoint and all(
            isinstance(v, torch.Tensor) for v in checkpoint.values()) else "another program's file"
        raise RunFileError(f"{path} is not a vqvae checkpoint ({what}; expected the keys "
                           f"{', '.join(CHECKPOINT_KEYS)})")
    return checkpoint


def check_finite_state(state: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
    """:class:`RunFileError` naming the first floating tensor of ``state`` with a NaN or Inf."""
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() \
                and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise RunFileError(f"{source}: {key} holds {bad} non-finite value(s) (NaN or Inf); "
                               "the model cannot be used")


def weights_file(run_dir: str | os.PathLike) -> Path:
    """The file a run's trained weights are read from: ``model.safetensors`` when the run has
    one, else ``checkpoint.pt`` (runs written before the weights had a file of their own)."""
    run_dir = Path(run_dir)
    return run_dir / WEIGHTS if (run_dir / WEIGHTS).is_file() else run_dir / CHECKPOINT


def load_model(run_dir: str | os.PathLike, device: str | torch.device = "cpu") -> VQVAE:
    """The trained model of a run directory, in eval mode: from ``model.safetensors`` and
    ``config.json`` (JSON and safetensors only, no unpickling) when the run has them, else from
    ``checkpoint.pt``. Weights that do not fit their model, or hold a NaN or Inf, are a
    :class:`RunFileError`."""
    from .models import VQVAE, ModelConfig

    if (Path(run_dir) / WEIGHTS).is_file():
        from safetensors import SafetensorError

        try:
            model = VQVAE.from_pretrained(run_dir, device=device)
        except (RuntimeError, ValueError, TypeError, KeyError, OSError, SafetensorError) as error:
            raise RunFileError(f"{Path(run_dir) / WEIGHTS} cannot be loaded "
                               f"({type(error).__name__}: {str(error).splitlines()[0]})") from None
        check_finite_state(model.state_dict(), Path(run_dir) / WEIGHTS)
        return model
    checkpoint = load_checkpoint(run_dir, map_location=device)
    path = Path(run_dir) / CHECKPOINT
    check_finite_state(checkpoint["model"], path)
    try:
        model = VQVAE(ModelConfig.from_dict(checkpoint["model_config"]))
        model.load_state_dict(checkpoint["model"])
    except (RuntimeError, ValueError, TypeError, KeyError, AttributeError) as error:
        raise RunFileError(f"{path} does not fit the model it names "
                           f"({type(error).__name__}: {str(error).splitlines()[0]})") from None
    return model.to(device).eval()


# ---------------------------------------------------------------------------- locks

LOCK = ".lock"


class RunLocked(Exception):
    """Another process holds the run directory's lock."""


@contextlib.contextmanager
def lock_run_dir(run_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold ``RUN_DIR/.lock`` (an ``fcntl.flock``) for the block: one training per directory.

    The lock file holds the owner's pid; the kernel releases the lock when its process ends,
    however it ends, so a killed run never leaves a stale lock. A second process gets
    :class:`RunLocked` naming the owner's pid.
    """
    import fcntl

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise RunLocked(f"{run_dir} is in use by another training (pid {owner}); wait "
                            "for it to end, or choose another --out-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock
