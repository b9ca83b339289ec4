"""What several commands share: argument types, the training options, run-directory checks."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from pathlib import Path

#: Classifier-free guidance of prior samples unless --guidance says otherwise. Measured on a
#: conv run (3,000 samples each, by the judge): 1.5 gave IS 9.45, FD 13, 97.2% of digits as
#: asked; 2 gave IS 9.68, FD 22, 98.7%; 2.5 gave IS 9.75, FD 36, 99.0%. 2 keeps a margin on
#: every bar.
DEFAULT_GUIDANCE = 2.0

#: torch CPU threads of the prior's commands unless --threads says otherwise: on a busy machine
#: a second thread spins waiting for a core the neighbours hold (README, "Development", has the
#: timings).
DEFAULT_THREADS = 1


class UsageError(Exception):
    """The command line asks for something that cannot be done; exit status 2."""


# ---------------------------------------------------------------------------- argument types


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {value}")
    return value


def key_value(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip().replace("-", "_"), value


def index_list(text: str) -> list[int]:
    """``0-9``, ``3,5,7`` or a mix: ``0-4,10``."""
    indices: list[int] = []
    try:
        for part in text.split(","):
            if "-" in part:
                lo, hi = part.split("-", 1)
                indices += list(range(int(lo), int(hi) + 1))
            else:
                indices.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected indices like 0-9 or 1,5,7, got {text!r}") \
            from None
    if not indices or min(indices) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative indices, got {text!r}")
    return indices


def dataset_name(text: str) -> str:
    """A name :func:`vqvae.data.load_dataset` takes (``mnist``, ``images:DIR``, ...)."""
    from ..data import DatasetError, check_dataset_name

    try:
        return check_dataset_name(text)
    except DatasetError as error:  # argparse reports only its own error types
        raise argparse.ArgumentTypeError(str(error)) from None


def digit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not 0 <= value <= 9:
        raise argparse.ArgumentTypeError(f"expected a digit from 0 to 9, got {text!r}")
    return value


# ---------------------------------------------------------------------------- training options

TRAINING_OPTIONS = ("model", "channels", "quantizer", "vector_dim", "num_embeddings",
                    "codebook_size", "hidden_dim", "num_quantizers", "groups",
                    "quantizer_option", "epochs", "batch_size", "lr", "lr_schedule", "seed",
                    "device", "precision", "compile", "dataset", "train_subset",
                    "test_subset", "image_size", "channels_in")


def quantizer_help() -> str:
    """One clause per listed quantizer, from the registry."""
    from .. import registry

    return "; ".join(f"{e.name}: {e.help}" for e in registry.entries())


def add_training_options(parser: argparse.ArgumentParser, *, quantizer: bool) -> None:
    """The model, training and data options of ``train`` and ``compare``; ``--quantizer`` too
    when ``quantizer`` (``compare`` takes a list instead)."""
    from .. import registry
    from ..data import DATASET_NAMES
    from ..models import MODELS, ModelConfig
    from ..train import TrainConfig
    from .checks import seed

    model, train = ModelConfig(), TrainConfig()
    group = parser.add_argument_group("model")
    group.add_argument("--model", choices=sorted(MODELS),
                       help=f"mlp: the course's MLP, one code per position; conv: a "
                            f"convolutional model with a 7×7 grid of codes (default: "
                            f"{model.model})")
    group.add_argument("--channels", type=positive_int, metavar="C",
                       help=f"width of the conv model (default: {model.channels})")
    group.add_argument("--vector-dim", type=positive_int, metavar="D",
                       help=f"size of each code vector (default: {model.vector_dim})")
    group.add_argument("--num-embeddings", type=positive_int, metavar="N",
                       help=f"code positions per image (default: {model.num_embeddings})")
    group.add_argument("--codebook-size", type=positive_int, metavar="K",
                       help=f"codes in the codebook (default: {model.codebook_size})")
    group.add_argument("--hidden-dim", type=positive_int, metavar="H",
                       help=f"width of the MLP's hidden layers (default: {model.hidden_dim})")
    group.add_argument("--num-quantizers", type=positive_int, metavar="L",
                       help=f"depths of a residual quantizer "
                            f"({', '.join(registry.takers('num_quantizers'))}): L codes per "
                            f"position (default: {model.num_quantizers})")
    group.add_argument("--groups", type=positive_int, metavar="G",
                       help=f"feature groups of a grouped residual quantizer "
                            f"({', '.join(registry.takers('groups'))}); must divide "
                            f"--vector-dim (default: {model.groups})")
    group.add_argument("-o", "--quantizer-option", type=key_value, action="append",
                       metavar="KEY=VALUE",
                       help="an option of the quantizer, e.g. -o decay=0.95 -o "
                            "rotation_trick=true (repeatable; values are JSON)")
    group = parser.add_argument_group("training")
    group.add_argument("--epochs", type=positive_int, help=f"(default: {train.epochs})")
    group.add_argument("--batch-size", type=positive_int, help=f"(default: {train.batch_size})")
    group.add_argument("--lr", type=positive_float,
                       help=f"peak learning rate of Adam (default: {train.lr})")
    group.add_argument("--lr-schedule", choices=("cosine", "constant"),
                       help=f"cosine: {train.warmup_fraction * 100:.0f}%% warm-up, then cosine "
                            f"decay to zero (default: {train.lr_schedule})")
    group.add_argument("--seed", type=seed, help=f"random seed (default: {train.seed})")
    group.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: auto)")
    group.add_argument("--precision", choices=("auto", "fp32", "bf16"),
                       help="bf16 runs encoder and decoder under autocast (the quantizer's "
                            "distances stay float32); auto does so where the hardware has "
                            "native bf16 (default: auto)")
    group.add_argument("--compile", action="store_true", default=None,
                       help="torch.compile the whole model, quantizer included, as one graph "
                            "(the encoder and decoder only, with a warning, for a quantizer "
                            "that cannot be traced): seconds of compilation first, then fused "
                            "kernels, on GPU above all")
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", type=dataset_name, metavar="NAME",
                       help=f"{', '.join(DATASET_NAMES)}, or images:DIR for a folder of "
                            f"PNG/JPEG files (class subfolders give labels) "
                            f"(default: {train.dataset})")
    group.add_argument("--image-size", type=positive_int, metavar="S",
                       help="side of the images in pixels: a folder's images are resized and "
                            "cropped to it (the conv model takes multiples of 4); default: the "
                            "dataset's own (28 for MNIST, 32 for CIFAR-10; a folder needs it)")
    group.add_argument("--channels-in", type=positive_int, metavar="C",
                       help="channels of the images, 1 (gray) or 3 (RGB, the conv model only); "
                            "default: read from the data, which must agree when it is given")
    group.add_argument("--data-dir", metavar="DIR",
                       help="directory with the four IDX files, looked at before "
                            "$VQVAE_DATA_DIR and the cache; downloads go here if missing")
    group.add_argument("--train-subset", type=positive_int, metavar="N",
                       help="train on the first N training images only")
    group.add_argument("--test-subset", type=positive_int, metavar="N",
                       help="evaluate on the first N test images only")
    if quantizer:
        parser.add_argument("--quantizer", choices=registry.names(),
                            help=f"{quantizer_help()} (default: {model.quantizer})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def configs(args: argparse.Namespace, out_dir: str):
    """The ``TrainConfig`` and ``ModelConfig`` the options ask for; bad values are a
    :class:`UsageError`."""
    from ..models import VQVAE, ModelConfig
    from ..train import TrainConfig

    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    file_train, file_model = config_file_values(args)
    given = {k: v for k, v in vars(args).items() if v is not None}
    # the image shape read from the data fills in what neither the flags nor --config give
    shape = {k: v for k, v in data_shape(args).items() if k not in file_model or k in given}
    given.update(shape)
    model_kwargs = {**file_model, **{k: v for k, v in given.items() if k in model_fields}}
    if model_kwargs.get("quantizer") != file_model.get("quantizer"):
        # the file's options belong to its own quantizer, not the one the flag asks for
        model_kwargs.pop("quantizer_options", None)
    if args.quantizer_option:
        model_kwargs["quantizer_options"] = {**model_kwargs.get("quantizer_options", {}),
                                             **dict(args.quantizer_option)}
    train_kwargs = {**file_train, **{k: v for k, v in given.items() if k in train_fields}}
    train_kwargs.update(out_dir=out_dir,
                        progress=not args.no_progress and file_train.get("progress", True))
    from .checks import check_memory, check_quantizer_options

    if args.quantizer_option:
        check_quantizer_options(model_kwargs.get("quantizer") or ModelConfig.quantizer,
                                model_kwargs["quantizer_options"])
    try:
        train_config, model_config = TrainConfig(**train_kwargs), ModelConfig(**model_kwargs)
    except (TypeError, ValueError) as error:
        raise UsageError(str(error)) from None
    check_memory(model_config, train_config)  # before the model is built
    try:
        VQVAE(model_config)  # the quantizer checks its options when it is built
    except (TypeError, ValueError) as error:
        raise UsageError(str(error)) from None
    return train_config, model_config


def add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE",
                        help="read the settings from a JSON file laid out like a run's "
                             "config.json ({\"train\": {...}, \"model\": {...}}); flags "
                             "given on the command line override it")


def config_file_values(args: argparse.Namespace) -> tuple[dict, dict]:
    """The ``train`` and ``model`` settings of ``--config FILE`` (empty without one)."""
    if not getattr(args, "config", None):
        return {}, {}
    from .config_file import read_config_file

    return read_config_file(args.config)


def data_shape(args: argparse.Namespace) -> dict[str, int]:
    """``image_size`` and ``channels_in`` the command line leaves out, read from the dataset:
    MNIST-format files have 28×28 single-channel images, a folder the channels of its files (it
    needs ``--image-size``). ``--channels-in`` that the data do not have is a UsageError."""
    from ..data import IMAGES_PREFIX, DatasetError, load_dataset

    if not hasattr(args, "image_size"):
        return {}
    dataset = getattr(args, "dataset", None) or "mnist"
    folder = dataset.startswith(IMAGES_PREFIX)
    if folder and args.image_size is None:
        raise UsageError(f"--dataset {dataset} needs --image-size: the side its images are "
                         f"resized and cropped to")
    try:
        test = load_dataset(dataset, "test", getattr(args, "data_dir", None),
                            progress=False, image_size=args.image_size)
    except (DatasetError, ValueError) as error:
        raise UsageError(str(error)) from None
    if args.channels_in is not None and args.channels_in != test.channels:
        raise UsageError(f"--channels-in {args.channels_in}, but {dataset} has "
                         f"{test.channels}-channel images; leave it out to read it from the data")
    shape = {"image_size": args.image_size or test.image_size,
             "channels_in": args.channels_in or test.channels}
    if shape["channels_in"] != 1 and (getattr(args, "model", None) or "mlp") != "conv":
        raise UsageError(f"{dataset} has {shape['channels_in']}-channel images: the MLP takes "
                         f"gray images only; train the conv model (--model conv)")
    return shape


# ---------------------------------------------------------------------------- run directories


def default_out_dir(prefix: str) -> str:
    # Under torchrun the processes may start a second apart: name the run after the rendezvous
    # id when there is one, so every process agrees on the directory.
    stamp = os.environ.get("TORCHELASTIC_RUN_ID")
    if not stamp or stamp == "none":
        stamp = time.strftime("%Y%m%d-%H%M%S")
    return str(Path("runs") / f"{prefix}-{stamp}")


def is_main_process() -> bool:
    """Rank 0 under torchrun, or a plain single process."""
    return int(os.environ.get("RANK", "0")) == 0


def check_new_run_dir(path: Path) -> None:
    """``path`` can take a new run: writable, not in use by a training (else
    :class:`~vqvae.rundir.RunLocked`, naming its pid), holding no run."""
    from ..rundir import CHECKPOINT, CONFIG, LOCK, lock_run_dir
    from .checks import check_out_dir

    check_out_dir(path)
    if (path / LOCK).exists():
        with lock_run_dir(path):  # RunLocked while another training holds it
            pass
    if (path / CONFIG).exists() or (path / CHECKPOINT).exists():
        started = "" if (path / CHECKPOINT).exists() else \
            " (it ended before its first checkpoint; --resume starts it again from scratch)"
        raise UsageError(f"{path} already holds a run{started}; continue it with --resume "
                         f"{path}, or choose another --out-dir")


def add_run_dir(parser: argparse.ArgumentParser, device: bool = True) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by vqvae train")
    if device:
        parser.add_argument("--device", default="cpu", help="(default: cpu)")


def add_image_sources(parser: argparse.ArgumentParser) -> None:
    """``--indices`` or ``--images`` (see :func:`source_images`)."""
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--indices", type=index_list, metavar="LIST",
                     help="test-set images, e.g. 0-9 or 3,14,15 (default: 0-9)")
    src.add_argument("--images", type=Path, nargs="+", metavar="PNG",
                     help="PNG files (grayscale, resized to 28×28)")
    parser.add_argument("--invert", action="store_true",
                        help="invert PNGs drawn dark on light (MNIST is light on dark)")
    parser.add_argument("--data-dir", metavar="DIR", help="where the dataset is")


def load_run_model(run_dir: str, device: str):
    from ..rundir import load_model, resolve_device

    try:
        return load_model(run_dir, resolve_device(device))
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(str(error)) from None


def source_images(args, model):
    """Images named on the command line: test-set indices or PNG files, and their names."""
    from ..data import load_dataset
    from ..rundir import read_config
    from ..workflow import read_png_images

    if args.images:
        from .checks import check_input_files

        check_input_files(args.images, "--images")
        try:
            images = read_png_images(args.images, model.config.image_size, invert=args.invert,
                                     channels=model.config.channels_in)
        except ValueError as error:
            raise UsageError(str(error)) from None
        return images, [str(p) for p in args.images]
    train_config, _ = read_config(Path(args.run_dir))
    from ..workflow.prior_run import dataset_image_size

    test = load_dataset(train_config.dataset, "test", args.data_dir or train_config.data_dir,
                        progress=False,
                        image_size=dataset_image_size(train_config.dataset, model))
    indices = args.indices or list(range(10))
    if max(indices) >= len(test):
        raise UsageError(f"test-set index {max(indices)} out of range (0-{len(test) - 1})")
    images = test.as_batch()[indices]
    return images, [f"{train_config.dataset}-test[{i}]" for i in indices]


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=positive_int, default=DEFAULT_THREADS,
                        help=f"torch CPU threads (default: {DEFAULT_THREADS}: on a busy "
                             "machine one thread is much faster than two)")


def set_threads(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
