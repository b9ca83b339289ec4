"""The ``vqvae`` command: parses arguments, calls the library, prints. No logic of its own.

Each command builds its parser next to its handler, in a module of this package:
``train``, ``compare``, ``codes`` (reconstruct, encode, decode), ``sample``, ``prior``,
``judge``, ``demo``, ``export``; what they share is in ``common``.

Misuse (bad options, a directory that is not a run) exits with status 2 and a message; a
failure while working (data that fails verification, a diverged run) exits with status 1.
"""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from . import codes, compare, demo, export, judge, prior, sample, train
from .common import DEFAULT_GUIDANCE, DEFAULT_THREADS, UsageError

__all__ = ["DEFAULT_GUIDANCE", "DEFAULT_THREADS", "UsageError", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vqvae",
        description="Vector Quantized VAEs: train on MNIST / Fashion-MNIST, compare quantizers, "
                    "turn images into discrete codes and back.",
        epilog="Run 'vqvae COMMAND --help' for the options of a command.")
    parser.add_argument("--version", action="version", version=f"vqvae {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    train.add_parser(sub)
    compare.add_parser(sub)
    codes.add_reconstruct(sub)
    sample.add_parser(sub)
    prior.add_parser(sub)
    codes.add_encode(sub)
    codes.add_decode(sub)
    judge.add_parser(sub)
    demo.add_parser(sub)
    export.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    from ..data import DatasetError

    try:
        return args.func(args)
    except UsageError as error:
        parser.exit(2, f"vqvae {args.command}: error: {error}\n")
    except (DatasetError, FloatingPointError) as error:
        parser.exit(1, f"vqvae {args.command}: error: {error}\n")
    except KeyboardInterrupt:
        parser.exit(130, "\ninterrupted; a run can be continued with 'vqvae train --resume "
                         "RUN_DIR'\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
