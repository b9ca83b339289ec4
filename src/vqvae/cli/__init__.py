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


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (the usage is one ``--help`` away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
    from ..rundir import RunFileError, RunLocked
    from .checks import check_data_dir, check_device, check_finite_options

    try:
        check_finite_options(args)
        check_data_dir(args)
        check_device(args)
        return args.func(args)
    except UsageError as error:
        parser.exit(2, f"vqvae {args.command}: error: {_one_line(error)}\n")
    except (DatasetError, FloatingPointError, RunFileError, RunLocked) as error:
        parser.exit(1, f"vqvae {args.command}: error: {_one_line(error)}\n")
    except OSError as error:
        parser.exit(1, f"vqvae {args.command}: error: {describe_os_error(error)}\n")
    except KeyboardInterrupt:
        parser.exit(130, "\ninterrupted; a run can be continued with 'vqvae train --resume "
                         "RUN_DIR'\n")
    return 0


def _one_line(error: BaseException) -> str:
    """The message on one line: a multi-line message keeps its lines, joined."""
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip())


def describe_os_error(error: OSError) -> str:
    """An operating-system error as one line; a full disk says so in words."""
    import errno

    where = f"{error.filename}: " if error.filename else ""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"disk full: {where}{error.strerror or error} (files already written, such as "
                "the last checkpoint, are intact; free some space and resume)")
    return f"{where}{error.strerror or error}"


if __name__ == "__main__":
    sys.exit(main())
