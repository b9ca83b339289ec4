"""A run's figures after training, and training several quantizers side by side."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from .. import plots
from ..models import VQVAE, ModelConfig
from ..rundir import atomic_write_json, atomic_write_text
from ..train import Run, TrainConfig, launched_processes, train

RECONSTRUCTION_COUNT = 10
SAMPLE_COUNT = 64


def random_codes(config: ModelConfig, count: int, seed: int = 0) -> Tensor:
    """Uniformly random codes ``(count, *code_shape)``: every position (and depth, and group),
    every code equally."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(config.vocab_size, (count, *config.code_shape), generator=generator)


@torch.no_grad()
def reconstruct(model: VQVAE, images: Tensor) -> Tensor:
    model.eval()
    return model(images).reconstruction.float()


def write_run_figures(run: Run) -> dict[str, Path]:
    """``reconstructions.png``, ``samples_random.png`` and ``curves.png`` in the run directory."""
    model, metrics, run_dir = run.model, run.metrics, run.run_dir
    device = next(model.parameters()).device
    label = f"{metrics['quantizer']} on {metrics['dataset']}"
    inputs = run.data.test[:RECONSTRUCTION_COUNT]
    paths = {
        "reconstructions": plots.image_rows(
            [inputs, reconstruct(model, inputs)], ["input", "reconstruction"],
            run_dir / "reconstructions.png",
            title=f"Test images and their reconstructions ({label}, "
                  f"test MSE {metrics['test_mse']:.4f})"),
        "samples_random": plots.image_grid(
            model.decode(random_codes(model.config, SAMPLE_COUNT).to(device)),
            run_dir / "samples_random.png", columns=8,
            title=f"Decoded from uniformly random codes ({label})"),
        "curves": plots.training_curves(metrics["epochs"], run_dir / "curves.png",
                                        title=label),
    }
    return paths


# ---------------------------------------------------------------------------- compare

COMPARISON_FIELDS = ("quantizer", "test_mse", "test_psnr", "test_ssim", "perplexity",
                     "used_codes", "codebook_size", "num_quantizers", "groups", "bits_per_image",
                     "seconds_per_epoch")


def in_turns(train_config: TrainConfig) -> bool:
    """Whether :func:`compare` trains its quantizers an epoch each in turn: one process (under
    ``torchrun`` every turn would restart the process group) and no ``torch.compile`` (every
    turn would compile again, inside the epoch's time)."""
    return train_config.epochs > 1 and not train_config.compile and launched_processes() <= 1


def compare(quantizers: Sequence[str], train_config: TrainConfig, model_config: ModelConfig,
            out_dir: Path, quantizer_options: dict[str, dict] | None = None) -> list[dict]:
    """Train each quantizer with the same data order, seed and settings; write the comparison.

    Writes ``comparison.json`` (a list of rows), ``comparison.md`` and ``comparison.png`` (the
    same test digits reconstructed by each) into ``out_dir``, one run directory per quantizer.

    Where :func:`in_turns` says so the quantizers take turns, an epoch each (every turn resumes
    its run from the checkpoint the last one wrote, which gives the model an uninterrupted run
    gives): their seconds per epoch are then measured side by side, and a machine that slows
    down or speeds up during the comparison (other work, its clock) weighs on all of them
    alike instead of on whichever trained at the time. Elsewhere one after another.
    """
    out_dir = Path(out_dir)
    configs = []
    for name in quantizers:
        options = dict((quantizer_options or {}).get(name, {}))
        configs.append((dataclasses.replace(train_config, out_dir=str(out_dir / name)),
                        dataclasses.replace(model_config, quantizer=name,
                                            quantizer_options=options)))
    if in_turns(train_config):
        for epoch in range(1, train_config.epochs):
            for config, quantizer_config in configs:
                train(config, quantizer_config, pause_after=epoch,
                      resume_from=Path(config.out_dir) if epoch > 1 else None)
        resume_from = [Path(config.out_dir) for config, _ in configs]
    else:
        resume_from = [None] * len(configs)
    rows, reconstructions, inputs = [], [], None
    for (config, quantizer_config), start in zip(configs, resume_from, strict=True):
        run = train(config, quantizer_config, resume_from=start)
        write_run_figures(run)
        rows.append({key: run.metrics.get(key) for key in COMPARISON_FIELDS}
                    | {"run_dir": str(run.run_dir), "quantizer_options":
                       run.model.config.quantizer_options})
        inputs = run.data.test[:RECONSTRUCTION_COUNT] if inputs is None else inputs
        reconstructions.append(reconstruct(run.model, inputs).cpu())
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "comparison.json", rows)
    atomic_write_text(out_dir / "comparison.md", comparison_table(rows) + "\n")
    plots.image_rows([inputs] + reconstructions,
                     ["input"] + [f"{r['quantizer']}\nMSE {r['test_mse']:.4f}" for r in rows],
                     out_dir / "comparison.png",
                     title=f"The same test images reconstructed by each quantizer "
                           f"({train_config.epochs} epochs, seed {train_config.seed})")
    return rows


def comparison_table(rows: Sequence[dict]) -> str:
    """Markdown table of :func:`compare` rows. With several codebooks per position (residual
    quantizers), perplexity and used codes are per codebook, averaged."""
    header = ("| quantizer | bits / image | test MSE | PSNR (dB) | SSIM | perplexity | "
              "used codes | s / epoch |")
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        used = r["used_codes"]
        used = f"{used}" if isinstance(used, int) else f"{used:.1f}"
        bits = r.get("bits_per_image")
        bits = "" if bits is None else f"{bits:g}"
        psnr, ssim = r.get("test_psnr"), r.get("test_ssim")  # absent from older runs
        psnr = "" if psnr is None else f"{psnr:.2f}"
        ssim = "" if ssim is None else f"{ssim:.4f}"
        lines.append(f"| {r['quantizer']} | {bits} | {r['test_mse']:.5f} | {psnr} | {ssim} | "
                     f"{r['perplexity']:.1f} | {used} / {r['codebook_size']} | "
                     f"{r['seconds_per_epoch']:.2f} |")
    return "\n".join(lines)
