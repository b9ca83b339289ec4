"""TensorBoard event files for a run: one record per epoch, written beside the JSON metrics.

    logger = TrainingLogger(run_dir / "tb")           # vqvae train --tensorboard
    train(train_config, model_config, on_epoch_end=logger)

``metrics.json`` stays the record; the event files are a view of it that TensorBoard draws
(``tensorboard --logdir RUN/tb``). Per epoch a VQ-VAE run gets every number of that epoch's
``metrics.json`` entry as a scalar (``train/…`` and ``test/…``), the code-usage histogram of
the test set, and the first test images above their reconstructions; a prior gets its epoch's
NLL and seconds. Only the process that calls the logger writes: the trainer calls it on rank 0.
The ``tensorboard`` package is an optional extra (``pip install 'vqvae[tensorboard]'``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

TB_DIR = "tb"
PRIOR_TB_DIR = "tb/prior"
RECONSTRUCTION_COUNT = 8

#: metrics.json's per-epoch keys and the scalar tag each is drawn under
SCALAR_TAGS = {
    "train_loss": "train/loss",
    "train_recon_mse": "train/recon_mse",
    "train_vq_loss": "train/vq_loss",
    "train_perplexity": "train/perplexity",
    "train_used_codes": "train/used_codes",
    "test_mse": "test/mse",
    "perplexity": "test/perplexity",
    "used_codes": "test/used_codes",
    "seconds": "time/seconds_per_epoch",
}


def check_available() -> None:
    """Raise ``ImportError`` with what to install when TensorBoard's writer cannot be used."""
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise ImportError("--tensorboard needs the tensorboard package: pip install "
                          "'vqvae[tensorboard]' (or pip install tensorboard)") from None


class _Writer:
    """A SummaryWriter opened on first use, so a process that never logs creates no files."""

    def __init__(self, log_dir: str | Path):
        self.log_dir = Path(log_dir)
        self._writer = None

    @property
    def writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.log_dir))
        return self._writer

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


@torch.no_grad()
def code_indices(model, images: Tensor, batch_size: int = 1000) -> Tensor:
    """Every code index the model gives ``images``, flat, int64, on the CPU (the encoder and
    quantizer only: the decoder is not needed for codes). Indexes the quantizer's output by
    position, ``quantized, indices, loss``, the registry's contract: some quantizers return a
    plain tuple."""
    return torch.cat([model.quantizer(model.encoder(images[i:i + batch_size]))[1]
                      .reshape(-1).cpu() for i in range(0, images.shape[0], batch_size)])


@torch.no_grad()
def reconstruction_grid(model, images: Tensor) -> Tensor:
    """``(C, 2·H, N·W)`` in [0, 1]: ``images`` ``(N, C, H, W)`` in a row, their
    reconstructions in the row below."""
    reconstruction = model(images).reconstruction.float().clamp(0, 1)
    rows = [torch.cat(list(batch.float().cpu()), dim=-1) for batch in (images, reconstruction)]
    return torch.cat(rows, dim=-2)


class TrainingLogger:
    """``on_epoch_end`` for :func:`vqvae.train.train`: writes one epoch's record to ``log_dir``.

    Drawing the histogram and images runs the model in eval mode under ``no_grad`` and inside a
    forked random state, so a logged run trains exactly as an unlogged one.
    """

    def __init__(self, log_dir: str | Path, images: int = RECONSTRUCTION_COUNT):
        self._writer = _Writer(log_dir)
        self.images = images

    @property
    def log_dir(self) -> Path:
        return self._writer.log_dir

    def __call__(self, epoch: int, metrics: dict[str, Any], run=None) -> None:
        writer = self._writer.writer
        step = epoch + 1
        entry = metrics["epochs"][-1]
        for key, tag in SCALAR_TAGS.items():
            if key in entry:
                writer.add_scalar(tag, entry[key], step)
        if run is not None:
            self._draw(writer, run, step)
        writer.flush()

    def _draw(self, writer, run, step: int) -> None:
        model, test = run.model, run.data.test
        devices = [test.device] if test.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            was_training = model.training
            model.eval()
            try:
                indices = code_indices(model, test).double()
                vocab = model.config.vocab_size
                # one bucket per code value: bucket k counts the uses of code k
                bins = torch.arange(vocab + 1, dtype=torch.float64) - 0.5
                writer.add_histogram("test/code_usage", indices.numpy(), step,
                                     bins=bins.numpy())
                grid = reconstruction_grid(model, test[:self.images])
                writer.add_image("test/reconstructions", grid, step, dataformats="CHW")
            finally:
                model.train(was_training)

    def close(self) -> None:
        self._writer.close()


class PriorLogger:
    """``on_epoch_end`` for :func:`vqvae.prior.train_prior`: each number of an epoch's history
    entry (``train_nll``, ``val_nll``, ``seconds``, …) as a scalar ``prior/KEY``."""

    def __init__(self, log_dir: str | Path):
        self._writer = _Writer(log_dir)

    @property
    def log_dir(self) -> Path:
        return self._writer.log_dir

    def __call__(self, epoch: int, entry: dict[str, Any]) -> None:
        writer = self._writer.writer
        for key, value in entry.items():
            if key != "epoch" and isinstance(value, (int, float)):
                writer.add_scalar(f"prior/{key}", value, epoch + 1)
        writer.flush()

    def close(self) -> None:
        self._writer.close()
