"""What the CLI does with runs: artefacts after training, side-by-side comparison, and the
discrete representation as files (images → codes → images)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from . import plots
from .models import VQVAE, ModelConfig
from .train import Run, TrainConfig, atomic_write_bytes, atomic_write_json, train

RECONSTRUCTION_COUNT = 10
SAMPLE_COUNT = 64


def random_codes(config: ModelConfig, count: int, seed: int = 0) -> Tensor:
    """Uniformly random codes ``(count, *config.code_shape)``: every position, every code
    equally."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(config.codebook_size, (count, *config.code_shape),
                         generator=generator)


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

COMPARISON_FIELDS = ("quantizer", "test_mse", "perplexity", "used_codes", "codebook_size",
                     "seconds_per_epoch")


def compare(quantizers: Sequence[str], train_config: TrainConfig, model_config: ModelConfig,
            out_dir: Path, quantizer_options: dict[str, dict] | None = None) -> list[dict]:
    """Train each quantizer with the same data order, seed and settings; write the comparison.

    Writes ``comparison.json`` (a list of rows), ``comparison.md`` and ``comparison.png`` (the
    same test digits reconstructed by each) into ``out_dir``, one run directory per quantizer.
    """
    out_dir = Path(out_dir)
    rows, reconstructions, inputs = [], [], None
    for name in quantizers:
        options = dict((quantizer_options or {}).get(name, {}))
        config = dataclasses.replace(model_config, quantizer=name, quantizer_options=options)
        run = train(dataclasses.replace(train_config, out_dir=str(out_dir / name)), config)
        write_run_figures(run)
        rows.append({key: run.metrics[key] for key in COMPARISON_FIELDS}
                    | {"run_dir": str(run.run_dir), "quantizer_options":
                       run.model.config.quantizer_options})
        inputs = run.data.test[:RECONSTRUCTION_COUNT] if inputs is None else inputs
        reconstructions.append(reconstruct(run.model, inputs).cpu())
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "comparison.json", rows)
    atomic_write_bytes(out_dir / "comparison.md", (comparison_table(rows) + "\n").encode())
    plots.image_rows([inputs] + reconstructions,
                     ["input"] + [f"{r['quantizer']}\nMSE {r['test_mse']:.4f}" for r in rows],
                     out_dir / "comparison.png",
                     title=f"The same test images reconstructed by each quantizer "
                           f"({train_config.epochs} epochs, seed {train_config.seed})")
    return rows


def comparison_table(rows: Sequence[dict]) -> str:
    header = "| quantizer | test MSE | perplexity | used codes | s / epoch |"
    lines = [header, "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['quantizer']} | {r['test_mse']:.5f} | {r['perplexity']:.1f} | "
                     f"{r['used_codes']} / {r['codebook_size']} | {r['seconds_per_epoch']:.2f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- codes as files


def read_png_images(paths: Sequence[Path], size: int = 28, invert: bool = False) -> Tensor:
    """Grayscale PNGs as ``(N, 1, size, size)`` floats in [0, 1] (resized when needed).

    MNIST digits are light on dark; pass ``invert=True`` for dark-on-light drawings.
    """
    from PIL import Image

    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                gray = image.convert("L")
                if gray.size != (size, size):
                    gray = gray.resize((size, size), Image.Resampling.BILINEAR)
                array = np.asarray(gray, dtype=np.float32) / 255.0
        except (OSError, ValueError) as error:
            raise ValueError(f"{path}: not a readable image ({error})") from error
        images.append(1.0 - array if invert else array)
    return torch.from_numpy(np.stack(images)).unsqueeze(1)


def write_png_images(images: Tensor, directory: Path, names: Sequence[str]) -> list[Path]:
    """One 8-bit grayscale PNG per image, named ``names[i]``."""
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    array = (images.detach().float().cpu().clamp(0, 1).numpy()[:, 0] * 255).round()
    paths = []
    for image, name in zip(array.astype(np.uint8), names, strict=True):
        path = directory / name
        Image.fromarray(image, mode="L").save(path)
        paths.append(path)
    return paths


def save_codes(path: Path, codes: Tensor, config: ModelConfig, sources: Sequence[str]) -> Path:
    """Codes as JSON: readable, and carrying what is needed to check they fit a model."""
    payload = {
        "format": "vqvae-codes/1",
        "codebook_size": config.codebook_size,
        "num_embeddings": config.num_embeddings,
        "code_shape": list(config.code_shape),
        "quantizer": config.quantizer,
        "sources": list(sources),
        "codes": codes.cpu().tolist(),
    }
    atomic_write_bytes(Path(path), json.dumps(payload).encode())
    return Path(path)


def load_codes(path: Path, config: ModelConfig) -> tuple[Tensor, list[str]]:
    """Codes written by :func:`save_codes` (or a ``.npy`` integer array), checked against
    ``config``."""
    path = Path(path)
    if path.suffix == ".npy":
        codes, sources = torch.from_numpy(np.load(path)).long(), []
    else:
        try:
            payload = json.loads(path.read_text())
            codes, sources = torch.tensor(payload["codes"], dtype=torch.long), payload["sources"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path}: not a codes file written by 'vqvae encode' "
                             f"({error})") from error
        if payload.get("codebook_size") != config.codebook_size:
            raise ValueError(f"{path}: codes are for a codebook of {payload.get('codebook_size')}"
                             f" codes, the model has {config.codebook_size}")
    shape = tuple(config.code_shape)
    if codes.ndim == len(shape):
        codes = codes.unsqueeze(0)
    if tuple(codes.shape[1:]) != shape:
        raise ValueError(f"{path}: codes must have shape (N, {', '.join(map(str, shape))}), "
                         f"got {tuple(codes.shape)}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= config.codebook_size):
        raise ValueError(f"{path}: codes must lie in [0, {config.codebook_size})")
    return codes, sources
