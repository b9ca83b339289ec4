"""``vqvae prior``: train an autoregressive prior over a run's codes, and draw its figures."""

from __future__ import annotations

import argparse
from pathlib import Path

from .checks import check_out_dir, probability, seed
from .common import (
    DEFAULT_GUIDANCE,
    UsageError,
    add_run_dir,
    add_threads_option,
    load_run_model,
    positive_float,
    positive_int,
    set_threads,
)
from .train import add_tensorboard_option, tensorboard_logger


def add_parser(sub) -> None:
    p = sub.add_parser("prior", help="train an autoregressive prior over a run's codes",
                       description="Encode the run's training set to codes (once) and train a "
                                   "causal Transformer over the code sequences, conditioned on "
                                   "the label (with a null label, so it samples without one "
                                   "too). Writes prior.pt, prior_metrics.json, "
                                   "samples_prior.png, samples_random.png, samples_by_digit.png "
                                   "and samples_compare.png into RUN_DIR.")
    add_run_dir(p)
    p.add_argument("--epochs", type=positive_int, default=4, help="(default: 4)")
    p.add_argument("--batch-size", type=positive_int, default=256, help="(default: 256)")
    p.add_argument("--lr", type=positive_float, default=2e-3,
                   help="peak learning rate of AdamW (default: 2e-3)")
    p.add_argument("--dim", type=positive_int, default=128, help="width (default: 128)")
    p.add_argument("--depth", type=positive_int, default=2, help="layers (default: 2)")
    p.add_argument("--heads", type=positive_int, default=4, help="(default: 4)")
    p.add_argument("--dropout", type=probability, default=0.0,
                   help="a rate in [0, 1) (default: 0)")
    p.add_argument("--unconditional", action="store_true", help="ignore the labels")
    p.add_argument("--train-subset", type=positive_int, metavar="N",
                   help="train on the first N training code sequences only")
    p.add_argument("--seed", type=seed, default=0, help="(default: 0)")
    add_threads_option(p)
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="bf16 autocast for training; auto uses it where the CPU has native "
                        "bf16 (default: auto)")
    p.add_argument("--data-dir", metavar="DIR", help="where the dataset is")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_tensorboard_option(p, "RUN_DIR/tb/prior")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..prior import PriorTrainConfig
    from ..tensorboard_log import PRIOR_TB_DIR
    from ..workflow import train_run_prior, write_prior_figures

    set_threads(args)
    model = load_run_model(args.run_dir, "cpu")
    check_out_dir(args.run_dir)  # the prior and its figures go there
    logger = tensorboard_logger(args, Path(args.run_dir) / PRIOR_TB_DIR, "Prior")
    try:
        train_config = PriorTrainConfig(epochs=args.epochs, batch_size=args.batch_size,
                                        lr=args.lr, seed=args.seed, precision=args.precision,
                                        device=args.device, train_subset=args.train_subset,
                                        progress=not args.no_progress)
    except ValueError as error:
        raise UsageError(str(error)) from None
    overrides = {"dim": args.dim, "depth": args.depth, "heads": args.heads,
                 "dropout": args.dropout}
    print(f"training a {args.depth}-layer, {args.dim}-wide prior over the codes "
          f"{model.config.code_shape} of {args.run_dir} for {args.epochs} epochs")
    try:
        result = train_run_prior(args.run_dir, overrides, train_config, data_dir=args.data_dir,
                                 conditional=not args.unconditional, on_epoch_end=logger)
    except ValueError as error:
        raise UsageError(str(error)) from None
    finally:
        if logger is not None:
            logger.close()
    figures = write_prior_figures(args.run_dir, model, result.prior, seed=args.seed,
                                  guidance_scale=DEFAULT_GUIDANCE if not args.unconditional
                                  else 1.0)
    m = result.metrics
    print(f"\nprior: {m['parameters']:,} parameters, trained in {m['train_seconds']:.0f} s "
          f"({m['train_cpu_seconds']:.0f} s of CPU time; {m['precision']}, {m['threads']} "
          f"threads)")
    print(f"  held-out NLL per code   {m['val_nll']:.4f} nats (unconditional)")
    if "val_nll_conditional" in m:
        print(f"                          {m['val_nll_conditional']:.4f} nats (given the label)")
    print(f"  per-position frequency  {m['val_nll_frequency_baseline']:.4f} nats")
    print("images:")
    for path in figures.values():
        print(f"  {path}")
    print(f"checkpoint: {Path(args.run_dir) / 'prior.pt'}, weights: "
          f"{Path(args.run_dir) / 'prior.safetensors'}, metrics: "
          f"{Path(args.run_dir) / 'prior_metrics.json'}")
    return 0
