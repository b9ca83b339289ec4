"""Run-level work: what the CLI does with a run directory, built from the library's parts.

- :mod:`.runs`: a run's figures after training; ``compare`` (several quantizers side by side)
- :mod:`.codes`: codes as files (``vqvae encode`` / ``decode``), PNG images in and out
- :mod:`.prior_run`: a run's codes encoded once, its prior trained over them, the prior's
  figures (``vqvae prior``)
- :mod:`.judge_run`: every set of images a run can make, scored by the judge (``vqvae judge``)

The library modules (models, train, prior, judge) never import this package.
"""

from .codes import load_codes, read_png_images, save_codes, save_images, write_png_images
from .judge_run import SamplingOptions, judge_run, write_judge_report
from .prior_run import (
    PRIOR_CHECKPOINT,
    PRIOR_CODES,
    PRIOR_METRICS,
    encode_images,
    load_run_prior,
    run_codes,
    train_run_prior,
    write_prior_figures,
)
from .runs import (
    COMPARISON_FIELDS,
    RECONSTRUCTION_COUNT,
    SAMPLE_COUNT,
    compare,
    comparison_table,
    random_codes,
    reconstruct,
    write_run_figures,
)

__all__ = [
    "COMPARISON_FIELDS",
    "PRIOR_CHECKPOINT",
    "PRIOR_CODES",
    "PRIOR_METRICS",
    "RECONSTRUCTION_COUNT",
    "SAMPLE_COUNT",
    "SamplingOptions",
    "compare",
    "comparison_table",
    "encode_images",
    "judge_run",
    "load_codes",
    "load_run_prior",
    "random_codes",
    "read_png_images",
    "reconstruct",
    "run_codes",
    "save_codes",
    "save_images",
    "train_run_prior",
    "write_judge_report",
    "write_png_images",
    "write_prior_figures",
    "write_run_figures",
]
