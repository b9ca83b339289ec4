"""``vqvae judge``: score a run's images (or image arrays) with the judge classifier."""

from __future__ import annotations

import argparse
from pathlib import Path

from .checks import check_input_files, check_out_file, seed
from .common import (
    DEFAULT_GUIDANCE,
    UsageError,
    add_threads_option,
    positive_float,
    positive_int,
    set_threads,
)


def add_parser(sub) -> None:
    p = sub.add_parser("judge", help="score images with a trained classifier (IS, FD, ...)",
                       description="Score sets of images with a small classifier trained once "
                                   "and cached: classifier Inception Score, mean confidence and "
                                   "the fraction above 0.9, Fréchet distance of its penultimate "
                                   "features to the test set (FD), predicted-class histogram. "
                                   "Given a RUN_DIR: the real test set, reconstructions, "
                                   "uniformly random codes, per-position code frequencies and "
                                   "(with a prior) prior samples, unconditional and conditional. "
                                   "Prints a table; writes RUN_DIR/judge.json and judge.md.")
    p.add_argument("run_dir", metavar="RUN_DIR", nargs="?",
                   help="a directory written by vqvae train")
    p.add_argument("--images", type=Path, nargs="+", metavar="NPY",
                   help="also score these (N, 28, 28) arrays in [0, 1]")
    p.add_argument("--num", type=positive_int, default=10_000,
                   help="images per set (default: 10000)")
    p.add_argument("--seed", type=seed, default=0, help="(default: 0)")
    p.add_argument("--dataset", choices=("mnist", "fashion-mnist"),
                   help="the judge's dataset (default: the run's, or mnist)")
    p.add_argument("--data-dir", metavar="DIR", help="where the dataset is")
    p.add_argument("--judge-path", metavar="PT",
                   help="the judge's weights (default: in the per-user cache)")
    p.add_argument("--retrain-judge", action="store_true", help="train the judge again")
    p.add_argument("--temperature", type=positive_float, default=1.0,
                   help="prior sampling temperature (default: 1)")
    p.add_argument("--top-k", type=positive_int, help="prior top-k sampling (default: off)")
    p.add_argument("--guidance", type=positive_float, default=DEFAULT_GUIDANCE,
                   help="classifier-free guidance scale of the class-drawn and digit-asked "
                        f"prior samples; 1 skips the class-drawn set (default: "
                        f"{DEFAULT_GUIDANCE:g})")
    p.add_argument("--out", metavar="JSON", help="(default: RUN_DIR/judge.json)")
    p.add_argument("--no-progress", action="store_true", help="no progress output")
    add_threads_option(p)
    p.set_defaults(func=run)


def _dataset(args: argparse.Namespace) -> str:
    """The judge's dataset: the run's (``--dataset`` must agree), or ``--dataset``, or mnist."""
    from ..rundir import read_config
    from ..workflow.judge_run import unjudgeable

    dataset = args.dataset
    if args.run_dir is not None:
        try:
            run_train, run_model = read_config(Path(args.run_dir))
        except FileNotFoundError as error:
            raise UsageError(str(error)) from None
        run_dataset = run_train.dataset
        reason = unjudgeable(run_dataset, run_model)
        if reason is not None:
            raise UsageError(f"{args.run_dir}: {reason}")
        if dataset is not None and dataset != run_dataset:
            raise UsageError(f"{args.run_dir} was trained on {run_dataset}, not {dataset}")
        dataset = run_dataset
    return dataset or "mnist"


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from ..judge import JudgeError, load_or_train_judge, report_table
    from ..workflow import SamplingOptions, judge_run, write_judge_report

    if args.run_dir is None and not args.images:
        raise UsageError("give a RUN_DIR, or --images FILE.npy to score")
    # What can be checked is checked before the judge is trained (minutes on a CPU)
    check_input_files(args.images or [], "--images")
    if args.out:
        check_out_file(args.out)
    elif args.run_dir is not None:
        from .checks import check_out_dir

        check_out_dir(args.run_dir)
    set_threads(args)
    dataset = _dataset(args)
    try:
        judge = load_or_train_judge(dataset, args.judge_path, args.data_dir,
                                    retrain=args.retrain_judge, progress=not args.no_progress)
    except JudgeError as error:
        raise UsageError(str(error)) from None
    print(f"judge: {judge.info['path']} ({judge.info['test_accuracy']:.2%} test accuracy on "
          f"{dataset})")
    result: dict = {"reports": {}}
    if args.run_dir is not None:
        sampling = SamplingOptions(args.temperature, args.top_k, args.guidance)
        result = judge_run(args.run_dir, judge, args.num, args.seed, sampling, args.data_dir,
                           progress=not args.no_progress)
    for path in args.images or []:
        try:
            result["reports"][str(path)] = judge.score(np.load(path))
        except (OSError, ValueError) as error:
            raise UsageError(f"{path}: {error}") from None
    print()
    print(report_table(result["reports"]))
    for name, seconds in result.get("sample_seconds", {}).items():
        print(f"sampling {args.num} images ({name}) took {seconds:.1f} s")
    out = Path(args.out) if args.out else (
        Path(args.run_dir) / "judge.json" if args.run_dir else None)
    if out is not None:
        json_path, table_path = write_judge_report(result, out)
        print(f"wrote {json_path} and {table_path}")
    return 0
