"""``vqvae train``: train a VQ-VAE (or continue one) and write its run directory."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import (
    TRAINING_OPTIONS,
    UsageError,
    add_config_option,
    add_training_options,
    check_new_run_dir,
    config_file_values,
    configs,
    default_out_dir,
    is_main_process,
)


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a VQ-VAE and write its run directory",
                       description="Train a VQ-VAE (the course's MLP, or the conv model for "
                                   "any image size and colour: --model conv, --dataset "
                                   "images:DIR --image-size 32). The run directory gets "
                                   "config.json, metrics.json, checkpoint.pt, model.safetensors, "
                                   "reconstructions.png, samples_random.png and curves.png.")
    add_training_options(p, quantizer=True)
    p.add_argument("--out-dir", metavar="DIR", help="run directory (default: runs/train-TIME)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue an interrupted run from its last checkpoint")
    add_config_option(p)
    add_tensorboard_option(p, "RUN_DIR/tb")
    p.set_defaults(func=run)


def add_tensorboard_option(parser: argparse.ArgumentParser, where: str) -> None:
    parser.add_argument("--tensorboard", action="store_true",
                        help=f"also log every epoch to TensorBoard event files in {where} "
                             "(needs the tensorboard package: pip install 'vqvae[tensorboard]')")


def tensorboard_logger(args: argparse.Namespace, log_dir: Path, logger_class: str = "Training"):
    """The ``on_epoch_end`` logger ``--tensorboard`` asks for (``None`` without it); a missing
    tensorboard package is a :class:`UsageError` before any training starts."""
    if not getattr(args, "tensorboard", False):
        return None
    from .. import tensorboard_log

    try:
        tensorboard_log.check_available()
    except ImportError as error:
        raise UsageError(str(error)) from None
    return getattr(tensorboard_log, f"{logger_class}Logger")(log_dir)


def print_metrics(metrics: dict, run_dir: Path, figures: dict) -> None:
    print(f"\nrun directory: {run_dir}")
    print(f"  test MSE          {metrics['test_mse']:.5f}  (per pixel, pixels in [0, 1])")
    if metrics.get("test_psnr") is not None:
        print(f"  PSNR / SSIM       {metrics['test_psnr']:.2f} dB / {metrics['test_ssim']:.4f}")
    several = metrics.get("num_quantizers", 1) * metrics.get("groups", 1) > 1
    per = "  (per codebook, averaged)" if several else ""
    used = metrics["used_codes"]
    used = f"{used}" if isinstance(used, int) else f"{used:.1f}"
    print(f"  perplexity        {metrics['perplexity']:.1f}{per}")
    print(f"  used codes        {used} / {metrics['codebook_size']}{per}")
    print(f"  seconds per epoch {metrics['seconds_per_epoch']:.2f}  (median)")
    print("images:")
    for path in figures.values():
        print(f"  {path}")
    print(f"metrics: {run_dir / 'metrics.json'}")


def run(args: argparse.Namespace) -> int:
    from ..train import resume, train
    from ..workflow import write_run_figures

    if args.resume:
        given = [f"--{k.replace('_', '-')}" for k in TRAINING_OPTIONS + ("config",)
                 if getattr(args, k, None) is not None]
        if given or args.out_dir:
            raise UsageError(f"--resume continues a run with the settings it started with; "
                             f"remove {' '.join(given + (['--out-dir'] if args.out_dir else []))}")
        overrides = {"progress": not args.no_progress}
        if args.data_dir:
            overrides["data_dir"] = args.data_dir
        logger = tensorboard_logger(args, Path(args.resume) / "tb")
        try:
            result = resume(args.resume, on_epoch_end=logger, **overrides)
        except FileNotFoundError as error:
            raise UsageError(str(error)) from None
    else:
        out_dir = args.out_dir or config_file_values(args)[0].get("out_dir") \
            or default_out_dir("train")
        train_config, model_config = configs(args, out_dir)
        logger = tensorboard_logger(args, Path(train_config.out_dir) / "tb")
        if is_main_process():
            check_new_run_dir(Path(train_config.out_dir))
            print(f"training the {model_config.model} VQ-VAE ({model_config.quantizer} "
                  f"quantizer, {model_config.bits_per_image:g} bits per image) on "
                  f"{train_config.dataset} for {train_config.epochs} epochs -> "
                  f"{train_config.out_dir}")
        result = train(train_config, model_config, on_epoch_end=logger)
    if logger is not None:
        logger.close()
    if result.processes.is_main:
        figures = write_run_figures(result)
        print_metrics(result.metrics, result.run_dir, figures)
    return 0
