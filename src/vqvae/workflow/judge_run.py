"""Judging a run: every set of images a run can make, scored by the judge.

:func:`judge_run` scores them; :func:`write_judge_report` writes ``judge.json`` and
``judge.md``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..data import load_dataset
from ..judge import Judge, JudgeError, JudgeReport, report_table
from ..prior import FrequencyPrior, draw_labels, sample
from ..rundir import atomic_write_json, atomic_write_text, load_model, read_config
from .prior_run import PRIOR_CHECKPOINT, encode_images, load_run_prior, run_codes
from .runs import random_codes


def unjudgeable(dataset: str, model_config) -> str | None:
    """Why a run on ``dataset`` with ``model_config`` cannot be judged, or ``None`` when it can.

    The judge is a classifier of 28×28 single-channel images of an MNIST-format dataset (one
    per dataset, trained on its labels): other datasets, sizes and colour images have none.
    """
    from ..data import DATASETS

    shape = f"{model_config.channels_in}×{model_config.image_size}×{model_config.image_size}"
    if dataset in DATASETS and model_config.channels_in == 1 and model_config.image_size == 28:
        return None
    return (f"the judge scores 28×28 single-channel images of {', '.join(sorted(DATASETS))} "
            f"with a classifier trained on that dataset; this run's images are {dataset}, "
            f"{shape}, which no judge is trained for. Its reconstruction quality is in "
            f"metrics.json (test MSE, PSNR, SSIM) and its images in the run's PNG files.")


@dataclass
class SamplingOptions:
    temperature: float = 1.0
    top_k: int | None = None
    guidance_scale: float = 1.0  # conditional samples only


def judge_run(run_dir: str | Path, judge: Judge, count: int = 10_000, seed: int = 0,
              sampling: SamplingOptions | None = None, data_dir=None,
              progress: bool = True) -> dict[str, Any]:
    """Score the sets a run can make, ``count`` images each: the real test set, its
    reconstructions, uniformly random codes, codes drawn from per-position frequencies and,
    when the run has a prior, prior samples: unconditional (the null label); with a guidance
    scale above 1, with each class drawn from the label frequencies and guided toward; and
    conditional on a digit cycling 0-9, whose ``accuracy`` is the fraction judged to be the
    digit asked for. ``sampling`` (temperature, top-k) applies to all prior samples."""
    run_dir = Path(run_dir)
    sampling = sampling or SamplingOptions()
    model = load_model(run_dir)
    train_config, model_config = read_config(run_dir)
    reason = unjudgeable(train_config.dataset, model_config)
    if reason is not None:
        raise JudgeError(f"{run_dir}: {reason}")
    if train_config.dataset != judge.dataset:
        raise JudgeError(f"{run_dir} was trained on {train_config.dataset}, the judge is for "
                         f"{judge.dataset}")
    test = load_dataset(judge.dataset, "test", data_dir or train_config.data_dir,
                        progress=False)
    real = test.as_batch()[:count]

    def decode(codes: Tensor) -> Tensor:
        with torch.no_grad():
            return torch.cat([model.decode(c) for c in codes.split(1000)])

    def say(name: str) -> None:
        if progress:
            print(f"judging {name} ...", flush=True)

    reports: dict[str, JudgeReport] = {}
    seconds: dict[str, float] = {}
    say("the real test set")
    reports["real test set"] = judge.score(real, test.labels[:count])
    say("reconstructions")
    reports["reconstructions"] = judge.score(decode(encode_images(model, real)),
                                             test.labels[:count])
    say("uniformly random codes")
    reports["random codes"] = judge.score(decode(random_codes(model_config, count, seed)))
    say("per-position frequencies")
    codes = run_codes(run_dir, model, data_dir, progress=False)
    frequency = FrequencyPrior(codes["train_codes"], model_config.vocab_size,
                               model_config.code_shape)
    reports["per-position frequencies"] = judge.score(decode(frequency.sample(count, seed)))
    if (run_dir / PRIOR_CHECKPOINT).is_file():
        prior = load_run_prior(run_dir)
        options = {"temperature": sampling.temperature, "top_k": sampling.top_k}
        say("prior samples")
        start = time.perf_counter()
        images = decode(sample(prior, count, seed=seed, **options))
        seconds["prior, null label"] = time.perf_counter() - start
        reports["prior, null label"] = judge.score(images)
        if prior.config.num_classes and sampling.guidance_scale != 1.0:
            say("prior samples, classes drawn from the label frequencies, guided")
            labels = draw_labels(prior, count, seed)
            start = time.perf_counter()
            images = decode(sample(prior, count, labels, seed=seed,
                                   guidance_scale=sampling.guidance_scale, **options))
            seconds["prior, guided"] = time.perf_counter() - start
            reports[f"prior, class drawn, guidance {sampling.guidance_scale:g}"] = \
                judge.score(images)
        if prior.config.num_classes:
            say("conditional prior samples")
            labels = torch.arange(count) % prior.config.num_classes
            start = time.perf_counter()
            images = decode(sample(prior, count, labels, seed=seed,
                                   guidance_scale=sampling.guidance_scale, **options))
            seconds["prior, digit asked for"] = time.perf_counter() - start
            name = "prior, digit asked for" + (f", guidance {sampling.guidance_scale:g}"
                                               if sampling.guidance_scale != 1.0 else "")
            reports[name] = judge.score(images, labels)
    return {"reports": reports, "sample_seconds": seconds, "sampling": asdict(sampling),
            "count": count, "seed": seed, "judge": judge.info, "run_dir": str(run_dir)}


def write_judge_report(result: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    """``out`` (JSON: the reports and how they were made) and the Markdown table beside it
    (``out`` with suffix ``.md``); returns both paths."""
    out = Path(out)
    reports = result["reports"]
    atomic_write_json(out, {**result, "reports": {k: v.to_dict() for k, v in reports.items()}})
    table = out.with_suffix(".md")
    atomic_write_text(table, report_table(reports) + "\n")
    return out, table
