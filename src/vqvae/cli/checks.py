"""Checks the commands make before any expensive work: numbers, devices, directories, output
files, quantizer options and the memory a training would need. Each failure is a
:class:`~vqvae.cli.common.UsageError` saying what was expected."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any

from .common import UsageError

#: ``torch.manual_seed`` takes any integer in [-2⁶³, 2⁶⁴); seeds are asked for in [0, 2⁶⁴).
SEED_LIMIT = 2**64

#: Suffixes an image grid is written as (by Pillow from the PNG drawn), and ``.npy``.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

#: The fraction of the available memory a training may plan to use: the estimate is rough,
#: and the rest of the machine needs some.
MEMORY_MARGIN = 0.9


# ---------------------------------------------------------------------------- argument types


def seed(text: str) -> int:
    """An argparse type: an integer seed in [0, 2⁶⁴)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"a seed must lie in [0, 2^64), got {value}")
    return value


def probability(text: str) -> float:
    """An argparse type: a number in [0, 1) (a dropout rate)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:  # also false for NaN
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text}")
    return value


def check_finite_options(args: argparse.Namespace) -> None:
    """Every float option (and ``-o`` value) finite: a NaN or Inf is never a useful setting."""
    for name, value in vars(args).items():
        if name == "quantizer_option":  # (key, value) pairs of -o
            for key, option_value in value or []:
                _check_finite(f"-o {key}", option_value)
        else:
            _check_finite(f"--{name.replace('_', '-')}", value)


def _check_finite(option: str, value: Any) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise UsageError(f"{option}: expected a finite number, got {value}")
    if isinstance(value, list | tuple):
        for item in value:
            _check_finite(option, item)
    elif isinstance(value, dict):
        for item in value.values():
            _check_finite(option, item)


# ---------------------------------------------------------------------------- places


def check_data_dir(args: argparse.Namespace) -> None:
    """An explicit ``--data-dir`` must be a directory: a typo must not fall back silently to
    ``$VQVAE_DATA_DIR`` or the cache."""
    data_dir = getattr(args, "data_dir", None)
    if data_dir is not None and not Path(data_dir).is_dir():
        what = "does not exist" if not Path(data_dir).exists() else "is not a directory"
        raise UsageError(f"--data-dir {data_dir} {what}")


def check_device(args: argparse.Namespace) -> None:
    """``--device`` names a device this machine has."""
    from ..rundir import resolve_device

    device = getattr(args, "device", None)
    if device is not None:
        try:
            resolve_device(device)
        except ValueError as error:
            raise UsageError(str(error)) from None


def check_out_dir(path: str | os.PathLike) -> None:
    """``path`` is, or can be made, a directory this process can write in."""
    from ..rundir import check_writable_dir

    try:
        check_writable_dir(path)
    except OSError as error:
        raise UsageError(f"cannot write into {path}: {error.filename}: {error.strerror}") \
            from None


def check_out_file(path: str | os.PathLike, suffixes: tuple[str, ...] | None = None,
                   option: str = "--out") -> Path:
    """``path`` can be written: its suffix is one of ``suffixes`` (when given), it is not a
    directory, and its directory can be made and written in."""
    path = Path(path)
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise UsageError(f"{option} {path}: unknown suffix {path.suffix or '(none)'!r}; use "
                         f"one of {', '.join(suffixes)}")
    if path.is_dir():
        raise UsageError(f"{option} {path} is a directory; name a file")
    check_out_dir(path.parent)
    return path


def check_input_files(paths, option: str) -> None:
    """Each of ``paths`` is an existing, non-empty regular file."""
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise UsageError(f"{option} {path}: no such file")
        if not path.is_file():
            raise UsageError(f"{option} {path}: not a regular file")
        if path.stat().st_size == 0:
            raise UsageError(f"{option} {path}: the file is empty")


# ---------------------------------------------------------------------------- quantizer options


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "bool (true or false)"
    if isinstance(value, float):
        return "float (a number)"
    if isinstance(value, int):
        return "int"
    if isinstance(value, list | tuple):
        return "list (a JSON array)"
    return type(value).__name__


def check_quantizer_options(quantizer: str, options: dict[str, Any]) -> None:
    """Each ``-o KEY=VALUE`` whose key the quantizer's registry entry has a default for must
    have the default's type (an int does for a float); options without a default are left to
    the quantizer's own checks."""
    from .. import registry

    try:
        defaults = registry.get(quantizer).defaults
    except ValueError as error:
        raise UsageError(str(error)) from None
    for key, value in options.items():
        default = defaults.get(key)
        if default is None:
            continue
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, list | tuple):
            ok = isinstance(value, list | tuple)
        else:
            ok = isinstance(value, type(default))
        if not ok:
            raise UsageError(f"-o {key}: expected a {_type_name(default)} like {default!r}, "
                             f"got {value!r} ({type(value).__name__})")


# ---------------------------------------------------------------------------- memory


def available_memory_bytes(device) -> int | None:
    """Free memory of ``device``: ``MemAvailable`` of /proc/meminfo (else ``os.sysconf``) for
    the CPU, the driver's free memory for a GPU; ``None`` when it cannot be told."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def estimate_training_bytes(model_config, train_config) -> int:
    """A rough count of the bytes a training holds at once, from the configs alone (nothing is
    allocated: the networks are built on the ``meta`` device):

    - the encoder's and decoder's parameters ×4 (weights, gradients, Adam's two moments);
    - the codebooks ×4 (codes, EMA sums or gradients, and moments), 4 bytes a value;
    - the dataset on the device, float32 (MNIST's 70,000 images unless a subset is asked);
    - one batch's activations: the encoder's output ×8 (quantizer temporaries, gradients),
      the images ×8, the hidden layers ×8, and the distances of the code search.
    """
    import torch

    from ..models import MODELS

    encoder, decoder = MODELS[model_config.model]
    with torch.device("meta"):
        networks = sum(p.numel() for m in (encoder(model_config), decoder(model_config))
                       for p in m.parameters())
    positions = math.prod(model_config.position_shape)
    vocab = model_config.codebook_size
    codebooks = model_config.codebooks_per_position
    batch = train_config.batch_size
    pixels = model_config.channels_in * model_config.image_size**2
    hidden = model_config.hidden_dim if model_config.model != "conv" else \
        model_config.channels * model_config.image_size**2 // 4
    images = (train_config.train_subset or 60_000) + (train_config.test_subset or 10_000)
    parameters = 4 * networks + 4 * vocab * model_config.vector_dim * codebooks
    activations = batch * (8 * positions * model_config.vector_dim + 8 * pixels + 8 * hidden
                           + 2 * positions * min(vocab, 1 << 16))
    return 4 * (parameters + activations + images * pixels)


def check_memory(model_config, train_config) -> None:
    """Refuse a training whose estimated memory (:func:`estimate_training_bytes`) exceeds what
    its device has free, before anything is allocated."""
    from ..rundir import resolve_device

    try:
        device = resolve_device(train_config.device)
    except ValueError as error:
        raise UsageError(str(error)) from None
    needed = estimate_training_bytes(model_config, train_config)
    available = available_memory_bytes(device)
    if available is not None and needed > MEMORY_MARGIN * available:
        raise UsageError(
            f"this training needs about {_mib(needed)} of memory (codebook "
            f"{model_config.codebook_size} × {model_config.vector_dim}, batch "
            f"{train_config.batch_size}), more than the {_mib(available)} {device.type} "
            "has free; choose a smaller --codebook-size, --vector-dim or --batch-size")


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"
