"""A run's prior: its codes encoded once, the prior trained over them, the figures it makes.

Files written into the run directory: ``prior_codes.pt`` (the codes, keyed by the SHA-256 of
the weights they came from), ``prior.pt`` (after every epoch), ``prior.safetensors`` and
``prior_config.json`` (the trained prior's weights alone, read without pickle),
``prior_metrics.json`` and the ``samples_*.png`` figures.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import plots
from ..data import load_dataset
from ..prior import (
    CodePrior,
    PriorConfig,
    PriorRun,
    PriorTrainConfig,
    flatten_codes,
    load_prior,
    sample_images,
    train_prior,
)
from ..rundir import (
    atomic_torch_save,
    atomic_write_json,
    load_model,
    read_config,
    sha256_file,
    weights_file,
)
from . import runs

PRIOR_CHECKPOINT = "prior.pt"
PRIOR_METRICS = "prior_metrics.json"
PRIOR_CODES = "prior_codes.pt"



@torch.no_grad()
def encode_images(model, images: Tensor, batch_size: int = 1000) -> Tensor:
    """Codes ``(N, *code_shape)`` of images ``(N, C, H, W)``, in batches."""
    device = next(model.parameters()).device
    return torch.cat([model.encode(images[i:i + batch_size].to(device)).cpu()
                      for i in range(0, images.shape[0], batch_size)])


def dataset_image_size(dataset: str, model) -> int | None:
    """The ``image_size`` to load ``dataset`` with for ``model``: a folder is resized to the
    model's images, the other datasets have their own size."""
    from ..data import IMAGES_PREFIX

    return model.config.image_size if dataset.startswith(IMAGES_PREFIX) else None


def run_codes(run_dir: str | Path, model=None, data_dir=None, progress: bool = True) -> dict:
    """The codes of a run's training and test sets, with their labels, encoded once.

    Cached in ``RUN_DIR/prior_codes.pt`` with the SHA-256 of the weights they came from
    (``model.safetensors``, or ``checkpoint.pt`` in older runs); changed weights (a resumed run)
    make them be encoded again.
    """
    run_dir = Path(run_dir)
    checkpoint_sha256 = sha256_file(weights_file(run_dir))
    path = run_dir / PRIOR_CODES
    if path.is_file():
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a damaged cache (torch uses many exception types): encode again
            cached = {}
        if (isinstance(cached, dict) and cached.get("checkpoint_sha256") == checkpoint_sha256
                and "num_classes" in cached):
            return {k: v.long() if isinstance(v, Tensor) else v for k, v in cached.items()}
    model = model if model is not None else load_model(run_dir)
    train_config, _ = read_config(run_dir)
    data_dir = data_dir or train_config.data_dir
    codes: dict[str, Any] = {"checkpoint_sha256": checkpoint_sha256,
                             "dataset": train_config.dataset}
    for split in ("train", "test"):
        dataset = load_dataset(train_config.dataset, split, data_dir, progress=progress,
                               image_size=dataset_image_size(train_config.dataset, model))
        codes[f"{split}_codes"] = encode_images(model, dataset.as_batch())
        # None for images without labels (a folder without class subfolders)
        codes[f"{split}_labels"] = None if dataset.labels is None else dataset.labels.clone()
        codes["num_classes"] = dataset.num_classes if dataset.labels is not None else 0
        codes["classes"] = list(dataset.classes)
    # int16 on disk when the codes fit (a quarter of the size); int64 in memory
    small = model.config.vocab_size <= torch.iinfo(torch.int16).max
    atomic_torch_save(path, {k: v.to(torch.int16) if small and k.endswith("_codes") else v
                             for k, v in codes.items()})
    return codes


def train_run_prior(run_dir: str | Path, config_overrides: dict | None = None,
                    train_config: PriorTrainConfig | None = None, data_dir=None,
                    conditional: bool = True, on_epoch_end=None) -> PriorRun:
    """Train a prior over the codes of a run; writes ``prior.pt``, ``prior.safetensors``,
    ``prior_config.json`` and ``prior_metrics.json`` into the run directory. The test set's
    codes are the held-out set. The prior is conditioned on the dataset's ``num_classes``
    labels when ``conditional`` and the images have labels; otherwise it is unconditional.
    ``on_epoch_end`` goes to :func:`~vqvae.prior.train_prior`."""
    run_dir = Path(run_dir)
    # An earlier prior's weights must not outlive the prior.pt this training overwrites
    for name in (CodePrior.weights_name, CodePrior.config_name):
        (run_dir / name).unlink(missing_ok=True)
    model = load_model(run_dir)
    train_config = train_config or PriorTrainConfig()
    codes = run_codes(run_dir, model, data_dir, progress=train_config.progress)
    # Conditioned on the dataset's classes; images without labels train an unconditional prior
    conditional = conditional and codes["train_labels"] is not None and codes["num_classes"] > 0
    shape = model.config.code_shape
    config = PriorConfig(vocab_size=model.config.vocab_size, code_shape=shape,
                         num_classes=codes["num_classes"] if conditional else 0,
                         **(config_overrides or {}))
    train_tokens = flatten_codes(codes["train_codes"], shape)
    test_tokens = flatten_codes(codes["test_codes"], shape)
    run = train_prior(train_tokens, codes["train_labels"] if conditional else None, config,
                      train_config, val_tokens=test_tokens,
                      val_labels=codes["test_labels"] if conditional else None,
                      checkpoint=run_dir / PRIOR_CHECKPOINT, on_epoch_end=on_epoch_end)
    run.prior.save_pretrained(run_dir)
    run.metrics["dataset"] = codes["dataset"]
    run.metrics["classes"] = [str(c) for c in codes["classes"]]
    atomic_write_json(run_dir / PRIOR_METRICS, run.metrics)
    return run


def class_names(run_dir: Path, num_classes: int) -> list[str]:
    """The names of the classes the run's prior was trained on (a folder's subfolders), from
    ``prior_metrics.json`` (plain JSON: nothing unpickled); the class numbers when it has none."""
    path = Path(run_dir) / PRIOR_METRICS
    if path.is_file():
        try:
            classes = json.loads(path.read_text()).get("classes")
        except (OSError, ValueError, AttributeError):
            classes = None
        if isinstance(classes, list) and len(classes) == num_classes:
            return [str(c) for c in classes]
    return [str(d) for d in range(num_classes)]


def load_run_prior(run_dir: str | Path, device: str | torch.device = "cpu") -> CodePrior:
    """A run's prior, in eval mode: from ``prior.safetensors`` (no unpickling) when the run has
    it, else from ``prior.pt``."""
    run_dir = Path(run_dir)
    if (run_dir / CodePrior.weights_name).is_file():
        return CodePrior.from_pretrained(run_dir, device=device)
    return load_prior(run_dir / PRIOR_CHECKPOINT, device)


def write_prior_figures(run_dir: str | Path, model, prior: CodePrior, seed: int = 0,
                        guidance_scale: float = 1.0, **sampling) -> dict[str, Path]:
    """Figures of a run's prior, 64 images where it is a grid of 8 columns:
    ``samples_prior.png`` (the sampler as :func:`sample_images` runs it with these options)
    beside ``samples_random.png`` (uniformly random codes), ``samples_compare.png`` (random
    codes, the null label and the guided sampler, a row each) and ``samples_by_digit.png`` (a
    row per class, when the prior is conditional)."""
    run_dir = Path(run_dir)
    if not prior.config.num_classes:
        guidance_scale = 1.0  # a prior without labels has no class to guide toward
    device = next(model.parameters()).device
    count = runs.SAMPLE_COUNT  # read at call time: tests make it smaller
    random_images = model.decode(runs.random_codes(model.config, count, seed).to(device))
    prior_images = sample_images(model, prior, count, seed=seed,
                                 guidance_scale=guidance_scale, **sampling)
    how = "" if guidance_scale == 1 else f", class drawn, guidance {guidance_scale:g}"
    paths = {
        "samples_random": plots.image_grid(random_images, run_dir / "samples_random.png",
                                           columns=8, title="Decoded from uniformly random "
                                                            "codes"),
        "samples_prior": plots.image_grid(prior_images, run_dir / "samples_prior.png",
                                          columns=8, title="Decoded from codes sampled from "
                                                           f"the learned prior{how}"),
    }
    rows, labels = [random_images[:12]], ["random codes"]
    if guidance_scale != 1:
        rows.append(sample_images(model, prior, 12, seed=seed, **sampling))
        labels.append("prior,\nnull label")
    rows.append(prior_images[:12])
    labels.append("prior" + how.replace(", class", ",\nclass"))
    paths["samples_compare"] = plots.image_rows(rows, labels, run_dir / "samples_compare.png",
                                                title="Uniformly random codes vs the prior")
    if prior.config.num_classes:
        rows = [sample_images(model, prior, 10, digit=d, seed=seed + d,
                              guidance_scale=guidance_scale, **sampling)
                for d in range(prior.config.num_classes)]
        paths["samples_by_digit"] = plots.image_rows(
            rows, class_names(run_dir, prior.config.num_classes),
            run_dir / "samples_by_digit.png",
            title=f"Prior samples asked for each class (guidance {guidance_scale:g})")
    return paths
