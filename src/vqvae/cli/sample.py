"""``vqvae sample``: decode uniformly random codes, or prior samples, into images."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .checks import IMAGE_SUFFIXES, check_out_file, seed
from .common import (
    DEFAULT_GUIDANCE,
    UsageError,
    add_run_dir,
    add_threads_option,
    digit,
    load_run_model,
    positive_float,
    positive_int,
    set_threads,
)


def add_parser(sub) -> None:
    p = sub.add_parser("sample", help="decode random codes, or prior samples, with a trained "
                                      "model",
                       description="Decode uniformly random codes into images or, with --prior, "
                                   "codes drawn from the run's learned prior (train it with "
                                   "'vqvae prior').")
    add_run_dir(p)
    p.add_argument("--num", type=positive_int, default=64, help="images (default: 64)")
    p.add_argument("--seed", type=seed, default=0, help="(default: 0)")
    p.add_argument("--out", metavar="FILE",
                   help="a .png grid, or .npy for an (N, 28, 28) array in [0, 1] "
                        "(default: RUN_DIR/samples_random.png, or samples_prior.png)")
    add_threads_option(p)
    group = p.add_argument_group("prior")
    group.add_argument("--prior", action="store_true",
                       help="sample codes from the run's prior (RUN_DIR/prior.pt)")
    group.add_argument("--digit", type=digit, metavar="D",
                       help="generate this class, 0-9 (a conditional prior)")
    group.add_argument("--temperature", type=positive_float, metavar="T",
                       help="divide the logits by T (default: 1)")
    group.add_argument("--top-k", type=positive_int, metavar="K",
                       help="sample from the K most likely codes only (default: all)")
    group.add_argument("--guidance", type=positive_float, metavar="S",
                       help="classifier-free guidance scale: 1 samples the model as it is "
                            "(without --digit: the null label, no class at all); above 1, "
                            "codes are pushed toward the class, which without --digit is "
                            "drawn from the training label frequencies "
                            f"(default: {DEFAULT_GUIDANCE:g})")
    p.set_defaults(func=run)


def _load_run_prior(run_dir: str, device: str, model_config):
    """The run's prior, checked to be one for this model's codes."""
    from ..rundir import RunFileError, resolve_device
    from ..workflow import load_run_prior

    path = Path(run_dir) / "prior.pt"
    try:
        prior = load_run_prior(run_dir, resolve_device(device))
    except FileNotFoundError as error:
        raise UsageError(str(error)) from None
    except Exception as error:  # torch reports a damaged file with many exception types
        raise RunFileError(f"{path} is damaged or not a prior ({type(error).__name__}); train "
                           "it again with 'vqvae prior'") from None
    config = prior.config
    if config.vocab_size != model_config.vocab_size or \
            tuple(config.code_shape) != tuple(model_config.code_shape):
        raise UsageError(
            f"{path} was trained for codes of shape {tuple(config.code_shape)} from a codebook "
            f"of {config.vocab_size}, but the run's model has codes of shape "
            f"{tuple(model_config.code_shape)} from a codebook of {model_config.vocab_size}; "
            "train the prior again with 'vqvae prior'")
    return prior


def run(args: argparse.Namespace) -> int:
    from ..workflow import random_codes, save_images

    if not args.prior and (args.digit is not None or args.temperature is not None
                           or args.top_k is not None or args.guidance is not None):
        raise UsageError("--digit, --temperature, --top-k and --guidance need --prior")
    out = Path(args.out) if args.out else None
    if out is not None:
        check_out_file(out, (*IMAGE_SUFFIXES, ".npy"))
    set_threads(args)
    model = load_run_model(args.run_dir, args.device)
    device = next(model.parameters()).device
    start = time.perf_counter()
    if args.prior:
        from ..prior import sample_images

        prior = _load_run_prior(args.run_dir, args.device, model.config)
        guidance = args.guidance or DEFAULT_GUIDANCE
        try:
            images = sample_images(model, prior, args.num, args.digit, args.seed,
                                   temperature=args.temperature or 1.0, top_k=args.top_k,
                                   guidance_scale=guidance)
        except ValueError as error:
            raise UsageError(str(error)) from None
        what = ("the prior" + ("" if args.digit is None else f", digit {args.digit}")
                + ("" if guidance == 1 else f", guidance {guidance:g}"))
        default_name = "samples_prior.png" if args.digit is None else \
            f"samples_digit{args.digit}.png"
    else:
        images = model.decode(random_codes(model.config, args.num, args.seed).to(device))
        what, default_name = "uniformly random codes", "samples_random.png"
    seconds = time.perf_counter() - start
    out = save_images(images, out or Path(args.run_dir) / default_name,
                      columns=min(args.num, 8), title=f"Decoded from {what}")
    print(f"sampled {args.num} images from {what} in {seconds:.1f} s; wrote {out}")
    return 0
