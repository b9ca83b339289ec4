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
    """``"auto"`` is CUDA when torch sees a GPU, else the CPU; asking for CUDA without one is an
    error that says what to do instead."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but torch sees no CUDA device; "
                         "use --device cpu (or auto)")
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


def read_config(run_dir: str | os.PathLike) -> tuple[TrainConfig, ModelConfig]:
    """The training and model settings a run started with."""
    from .models import ModelConfig
    from .train import TrainConfig

    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {run_dir} is not a run directory")
    values = json.loads(path.read_text())
    return TrainConfig(**values["train"]), ModelConfig.from_dict(values["model"])


def load_checkpoint(run_dir: str | os.PathLike, map_location="cpu") -> dict:
    """The checkpoint of a run, loaded with ``weights_only=True`` (no code is executed)."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the run has not finished an epoch yet")
    return torch.load(path, map_location=map_location, weights_only=True)


def weights_file(run_dir: str | os.PathLike) -> Path:
    """The file a run's trained weights are read from: ``model.safetensors`` when the run has
    one, else ``checkpoint.pt`` (runs written before the weights had a file of their own)."""
    run_dir = Path(run_dir)
    return run_dir / WEIGHTS if (run_dir / WEIGHTS).is_file() else run_dir / CHECKPOINT


def load_model(run_dir: str | os.PathLike, device: str | torch.device = "cpu") -> VQVAE:
    """The trained model of a run directory, in eval mode: from ``model.safetensors`` and
    ``config.json`` (JSON and safetensors only, no unpickling) when the run has them, else from
    ``checkpoint.pt``."""
    from .models import VQVAE, ModelConfig

    if (Path(run_dir) / WEIGHTS).is_file():
        return VQVAE.from_pretrained(run_dir, device=device)
    checkpoint = load_checkpoint(run_dir, map_location=device)
    model = VQVAE(ModelConfig.from_dict(checkpoint["model_config"]))
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval()
