"""``vqvae compare``: train several quantizers side by side and tabulate them."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from .common import (
    UsageError,
    add_config_option,
    add_training_options,
    check_new_run_dir,
    configs,
    default_out_dir,
)

DEFAULT_QUANTIZERS = "ours,lucidrains,naive"


def add_parser(sub) -> None:
    from .. import registry

    p = sub.add_parser("compare", help="train several quantizers side by side",
                       description="Train each quantizer with the same data order and seed; "
                                   "print a table and write comparison.json, comparison.md and "
                                   "comparison.png (the same test digits reconstructed by each). "
                                   "In one process and without --compile the quantizers take "
                                   "turns, an epoch each (each resuming its run: the same models "
                                   "as one run after another), so that their seconds per epoch "
                                   "are measured under the same conditions.")
    p.add_argument("--quantizers", default=DEFAULT_QUANTIZERS,
                   help=f"comma-separated, from {', '.join(registry.names())} "
                        f"(default: {DEFAULT_QUANTIZERS})")
    add_training_options(p, quantizer=False)
    p.add_argument("--out-dir", metavar="DIR", help="(default: runs/compare-TIME)")
    add_config_option(p)  # its model's quantizer and options give way to --quantizers
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import registry
    from ..workflow import compare, comparison_table

    names = [n.strip() for n in args.quantizers.split(",") if n.strip()]
    unknown = [n for n in names if n not in registry.names()]
    if unknown or not names:
        raise UsageError(f"unknown quantizer(s) {unknown}; choose from {registry.names()}")
    if args.quantizer_option:
        raise UsageError("compare trains each quantizer with its own defaults; "
                         "-o/--quantizer-option applies to 'vqvae train' only")
    out_dir = Path(args.out_dir or default_out_dir("compare"))
    for name in names:
        check_new_run_dir(out_dir / name)
    args.quantizer = names[0]  # the shared settings must fit a quantizer of the list
    train_config, model_config = configs(args, str(out_dir))
    for name in names:  # refuse a mismatch (e.g. --num-quantizers for 'ours') before training
        try:
            dataclasses.replace(model_config, quantizer=name, quantizer_options={})
        except ValueError as error:
            raise UsageError(str(error)) from None
    rows = compare(names, train_config, model_config, out_dir)
    print()
    print(comparison_table(rows))
    print(f"\nwrote {out_dir / 'comparison.json'}, {out_dir / 'comparison.md'} and "
          f"{out_dir / 'comparison.png'}")
    return 0
