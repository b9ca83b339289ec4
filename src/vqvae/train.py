"""Training a VQ-VAE on a dataset of images (MNIST, a folder of one's own, ...), top to bottom.

    run = train(TrainConfig(...), ModelConfig(...))   # or resume(run_dir)

Sections: configuration, processes, data, one step, one epoch, evaluation, the loop (the files
of a run directory are read and written by :mod:`vqvae.rundir`). The whole dataset lives on the
training device and batches are index slices of one permutation per epoch, drawn from ``seed``
and the epoch number alone, so a run resumed from its checkpoint sees the same batches as an
uninterrupted one. The checkpoint also carries the optimiser, schedule and random-number state:
on CPU, a run killed after epoch k and resumed ends with the same weights, bit for bit, as a run
that was never interrupted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .compiled import compile_model
from .data import DatasetError, load_dataset
from .models import VQVAE, ModelConfig
from .quantizers import guard
from .quantizers.checks import QuantizerInputError
from .quantizers.metrics import code_counts_per_codebook, usage_from_counts
from .rundir import (
    CHECKPOINT,
    METRICS,
    WEIGHTS,
    atomic_torch_save,
    atomic_write_json,
    check_writable_dir,
    load_checkpoint,
    lock_run_dir,
    read_config,
    resolve_device,
    save_config,
    uses_bf16,
)
from .schedule import warmup_cosine

# ---------------------------------------------------------------------------- configuration


@dataclass
class TrainConfig:
    dataset: str = "mnist"
    data_dir: str | None = None
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    lr_schedule: str = "constant"  # or "cosine": linear warm-up, then cosine decay to zero
    warmup_fraction: float = 0.05
    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    # "bf16" runs encoder and decoder under autocast (the quantizer's distances stay float32);
    # "auto" does so where the hardware has native bf16 (see uses_bf16)
    precision: str = "auto"
    # torch.compile the whole model as one graph, quantizer included, where the quantizer
    # allows; else the encoder and decoder only, with a warning (see vqvae.compiled). Costs
    # seconds of compilation at the start (and once more for evaluation); for GPUs above all,
    # where it fuses the small kernels (benchmarks/train_epoch.py --compiled measures it).
    compile: bool = False
    train_subset: int | None = None  # first N training images (quick runs and tests)
    test_subset: int | None = None
    out_dir: str = "runs/latest"
    progress: bool = True
    # Under torchrun: how long a collective may wait for the other processes before the run
    # fails (so a crashed process never leaves the others hanging).
    dist_timeout_seconds: float = 300.0

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.lr > 0 and math.isfinite(self.lr), f"lr must be > 0, got {self.lr}"),
            (self.lr_schedule in ("cosine", "constant"),
             f"lr_schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}"),
            (0 <= self.warmup_fraction < 1, "warmup_fraction must be in [0, 1)"),
            (self.precision in ("auto", "fp32", "bf16"),
             f"precision must be 'auto', 'fp32' or 'bf16', got {self.precision!r}"),
            (self.train_subset is None or self.train_subset >= 1, "train_subset must be >= 1"),
            (self.test_subset is None or self.test_subset >= 1, "test_subset must be >= 1"),
            (self.dist_timeout_seconds > 0, "dist_timeout_seconds must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


# ---------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class Processes:
    """Where this process stands in a (possibly one-process) run."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_processes() -> int:
    """How many processes ``torchrun`` started for this run (``WORLD_SIZE``; 1 without it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def start_processes(config: TrainConfig) -> tuple[Processes, torch.device]:
    """Join the process group when started by ``torchrun`` (``WORLD_SIZE`` > 1).

    gloo on CPU, NCCL on CUDA (one GPU per process, ``LOCAL_RANK``). Every collective has a
    timeout of ``config.dist_timeout_seconds``, so when a process dies the others fail instead
    of hanging; ``torchrun`` also stops the remaining workers when one exits with an error.
    """
    import datetime

    import torch.distributed as dist

    if launched_processes() <= 1:
        return Processes(), resolve_device(config.device)
    device = resolve_device(config.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(seconds=config.dist_timeout_seconds))
    return Processes(dist.get_rank(), dist.get_world_size()), device


def stop_processes(processes: Processes) -> None:
    import torch.distributed as dist

    if processes.distributed and dist.is_initialized():
        dist.destroy_process_group()


def _all_reduce_sum(tensor: Tensor, processes: Processes) -> Tensor:
    if processes.distributed:
        import torch.distributed as dist

        dist.all_reduce(tensor)
    return tensor


# ---------------------------------------------------------------------------- data


@dataclass
class Data:
    train: Tensor  # (N, C, H, W) float32 in [0, 1], on the training device
    test: Tensor
    test_labels: Tensor | None  # None for images without labels
    num_classes: int = 0  # classes the labels name (0 without labels)


def load_data(config: TrainConfig, device: torch.device,
              model_config: ModelConfig | None = None) -> Data:
    """The dataset's splits as float batches on ``device``.

    With ``model_config``, the images must be what the model takes: a folder (``images:DIR``) is
    resized to its ``image_size``; a dataset of fixed size or channels that differ from the
    model's is a :class:`~vqvae.data.DatasetError` that says which setting to change.
    """
    size = model_config.image_size if model_config is not None else None
    options = {"data_dir": config.data_dir, "progress": config.progress, "image_size": size}
    train = load_dataset(config.dataset, "train", **options)
    test = load_dataset(config.dataset, "test", **options)
    if model_config is not None and train.channels != model_config.channels_in:
        raise DatasetError(
            f"{config.dataset} has {train.channels}-channel images but the model takes "
            f"channels_in={model_config.channels_in}; build it with channels_in="
            f"{train.channels} (--channels-in {train.channels})"
            + ("" if model_config.model == "conv" or train.channels == 1
               else " and model='conv' (--model conv)"))
    n_train = config.train_subset or len(train)
    n_test = config.test_subset or len(test)
    return Data(
        train=train.as_batch()[:n_train].to(device),
        test=test.as_batch()[:n_test].to(device),
        test_labels=None if test.labels is None else test.labels[:n_test],
        num_classes=train.num_classes if train.labels is not None else 0,
    )


def epoch_permutation(seed: int, epoch: int, n: int, device: torch.device) -> Tensor:
    """The order of the training images in ``epoch``: a function of seed and epoch alone."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).to(device)


# ---------------------------------------------------------------------------- one step


def make_optimizer(model: VQVAE, config: TrainConfig, device: torch.device):
    # The fused Adam kernel does the same arithmetic in one pass per step (CPU and CUDA).
    fused = device.type in ("cpu", "cuda")
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, fused=fused)
    return optimizer


def lr_factor(config: TrainConfig, step: int, total_steps: int) -> float:
    """Multiplier of ``config.lr`` at ``step``: 1, or :func:`~vqvae.schedule.warmup_cosine`."""
    if config.lr_schedule == "constant":
        return 1.0
    return warmup_cosine(step, total_steps, config.warmup_fraction)


def steps_per_epoch(n: int, batch_size: int) -> int:
    return -(-n // batch_size)


class StepOutput(NamedTuple):
    loss: Tensor  # scalar, detached: recon_mse + vq_loss
    recon_mse: Tensor  # scalar, detached
    vq_loss: Tensor  # scalar, detached
    indices: Tensor  # (B, *code_shape) codes of the batch


def _restore_buffers(model, buffers: dict[str, Tensor]) -> None:
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])


def train_step(model, optimizer, batch: Tensor, autocast=None,
               loss_scale: float = 1.0) -> StepOutput:
    """One optimiser step on ``batch`` ``(B, C, H, W)``: forward (under ``autocast``), loss
    ``MSE + vq_loss``, backward of ``loss · loss_scale``, ``optimizer.step()``.

    ``loss_scale`` weights a process's shard of a global batch (see :func:`train_epoch`). The
    reconstruction loss is taken in float32 whatever the autocast.
    """
    # The quantizer updates its buffers (EMA codebook statistics) inside forward: keep a copy,
    # so that a step refused below leaves the model as it was
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    with autocast if autocast is not None else contextlib.nullcontext():
        reconstruction, indices, vq_loss = model(batch)
    recon = F.mse_loss(reconstruction.float(), batch)
    loss = recon + vq_loss
    finite = bool(torch.isfinite(loss))
    try:
        # calls a quantizer refused on the device (see quantizers/guard.py) are reported at
        # this read-back, the one the step already has; their report names the cause
        guard.raise_deferred(model)
    except QuantizerInputError:
        _restore_buffers(model, buffers)
        raise
    if not finite:
        _restore_buffers(model, buffers)
        raise FloatingPointError(
            f"non-finite loss ({float(loss)}: reconstruction {float(recon)}, quantizer "
            f"{float(vq_loss)}) on a batch whose largest magnitude is "
            f"{float(batch.detach().abs().max()):.3g}; nothing was updated. Check the inputs "
            "(scaled to [0, 1]?) and lower the learning rate")
    optimizer.zero_grad(set_to_none=True)
    (loss * loss_scale if loss_scale != 1.0 else loss).backward()
    optimizer.step()
    return StepOutput(loss.detach(), recon.detach(), vq_loss.detach(), indices)


# ---------------------------------------------------------------------------- one epoch


@dataclass
class EpochStats:
    loss: float
    recon_mse: float
    vq_loss: float
    perplexity: float
    used_codes: int
    seconds: float


def train_epoch(model, optimizer, data: Data, config: TrainConfig, epoch: int,
                device: torch.device, processes: Processes = Processes()) -> EpochStats:
    """One pass over the training set. ``model`` may be wrapped in DistributedDataParallel.

    Under several processes each global batch of ``batch_size`` images is split into
    contiguous shards, one per process; each shard's loss is weighted by its share of the
    batch, so DDP's gradient average is the gradient of the global batch's mean loss.
    """
    from tqdm import tqdm

    model.train()
    vqvae = getattr(model, "module", model)
    n = data.train.shape[0]
    per_epoch = steps_per_epoch(n, config.batch_size)
    total_steps = per_epoch * config.epochs
    order = epoch_permutation(config.seed, epoch, n, device)
    sums = torch.zeros(3, device=device)  # loss, recon, vq: summed on device, read once
    counts = new_code_counts(vqvae.config, device)  # (codebooks per position, K)
    vocab, codebook_dims = vqvae.config.vocab_size, len(vqvae.config.codebook_axes)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                              enabled=uses_bf16(config.precision, device))
    # A bar on a terminal; in a log (stderr not a terminal) the per-epoch line says enough
    bar = tqdm(range(per_epoch), desc=f"epoch {epoch + 1}/{config.epochs}", leave=False,
               disable=not (config.progress and processes.is_main and sys.stderr.isatty()),
               dynamic_ncols=True)
    start = time.perf_counter()
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = config.lr * lr_factor(config, epoch * per_epoch + step, total_steps)
        index = order[step * config.batch_size:(step + 1) * config.batch_size]
        share = 1.0
        if processes.distributed:
            global_size = index.shape[0]
            index = index.tensor_split(processes.world_size)[processes.rank]
            share = index.shape[0] * processes.world_size / global_size
        step_output = train_step(model, optimizer, data.train[index], autocast, share)
        with torch.no_grad():
            sums += torch.stack([step_output.loss, step_output.recon_mse,
                                 step_output.vq_loss.float()])
            counts += code_counts_per_codebook(step_output.indices, vocab, codebook_dims,
                                               check=False)
        if config.progress and processes.is_main and (step % 25 == 0 or step == per_epoch - 1):
            usage = usage_from_counts(counts)
            mean = (sums / (step + 1)).tolist()
            bar.set_postfix(loss=f"{mean[0]:.4f}", mse=f"{mean[1]:.4f}",
                            ppl=f"{usage.perplexity:.0f}", refresh=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    bar.close()
    _all_reduce_sum(sums, processes)
    _all_reduce_sum(counts, processes)
    mean = (sums / (per_epoch * processes.world_size)).tolist()
    usage = usage_from_counts(counts)
    if not all(math.isfinite(v) for v in mean):
        raise FloatingPointError(f"training diverged in epoch {epoch + 1}: loss {mean[0]}")
    return EpochStats(mean[0], mean[1], mean[2], usage.perplexity, usage.used_codes, seconds)


def new_code_counts(config: ModelConfig, device: torch.device) -> Tensor:
    """Zero code histograms, one row per codebook of a position (depths × groups)."""
    return torch.zeros(config.codebooks_per_position, config.vocab_size, dtype=torch.long,
                       device=device)


#: Test images SSIM is averaged over (the first ones): its 11×11 windows in float64 cost about
#: 6 ms an image on a busy 2-core machine, a minute for MNIST's 10,000 at every epoch.
SSIM_IMAGES = 1000


@torch.no_grad()
def evaluate(model: VQVAE, images: Tensor, batch_size: int = 1000,
             ssim_images: int = SSIM_IMAGES) -> dict[str, float]:
    """Test MSE per pixel (pixels in [0, 1]), PSNR in dB (the mean over the images of each
    image's PSNR), SSIM (the mean over the first ``ssim_images``; see
    :mod:`vqvae.image_metrics`) and codebook usage on ``images`` (per codebook, averaged over
    the codebooks of a residual quantizer: see ``quantizers.metrics``)."""
    from .image_metrics import psnr, ssim

    model.eval()
    squared_error = torch.zeros((), dtype=torch.float64, device=images.device)
    psnr_sum = ssim_sum = 0.0
    counts = new_code_counts(model.config, images.device)
    for start in range(0, images.shape[0], batch_size):
        batch = images[start:start + batch_size]
        reconstruction, indices, _ = model(batch)
        reconstruction = reconstruction.float()
        squared_error += (reconstruction - batch).pow(2).sum().double()
        psnr_sum += float(psnr(reconstruction, batch).sum())
        if start < ssim_images:
            head = slice(0, ssim_images - start)
            ssim_sum += float(ssim(reconstruction[head], batch[head]).sum())
        counts += code_counts_per_codebook(indices, model.config.vocab_size,
                                           len(model.config.codebook_axes))
    usage = usage_from_counts(counts)
    n = images.shape[0]
    return {"test_mse": float(squared_error) / images.numel(), "test_psnr": psnr_sum / n,
            "test_ssim": ssim_sum / min(n, ssim_images), "perplexity": usage.perplexity,
            "used_codes": usage.used_codes}


# ---------------------------------------------------------------------------- the loop


@dataclass
class Run:
    run_dir: Path
    model: VQVAE
    metrics: dict[str, Any]
    data: Data
    processes: Processes = Processes()


def _rng_state(device: torch.device) -> dict[str, Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _summary(history: list[dict], model_config: ModelConfig, train_config: TrainConfig) -> dict:
    last = history[-1]
    return {
        "test_mse": last["test_mse"],
        "test_psnr": last.get("test_psnr"),
        "test_ssim": last.get("test_ssim"),
        "perplexity": last["perplexity"],
        "used_codes": last["used_codes"],
        "codebook_size": model_config.vocab_size,  # values an index takes
        "num_quantizers": model_config.num_quantizers,
        "groups": model_config.groups,
        "bits_per_image": model_config.bits_per_image,
        "seconds_per_epoch": statistics.median(h["seconds"] for h in history),
        "epochs_done": len(history),
        "epochs": history,
        "quantizer": model_config.quantizer,
        "dataset": train_config.dataset,
    }


def train(train_config: TrainConfig, model_config: ModelConfig, *,
          resume_from: Path | None = None, on_epoch_end=None,
          pause_after: int | None = None) -> Run:
    """Train (or, with ``resume_from``, continue) a run; returns the trained model and metrics.

    ``pause_after``: stop once that many epochs are done (of ``train_config.epochs``, which
    keeps setting the learning-rate schedule): the run is left to be resumed, and ends as
    an uninterrupted one would.

    Started by ``torchrun``, every process trains its shard of each batch under
    DistributedDataParallel and only rank 0 writes the run directory.
    ``on_epoch_end(epoch, metrics)`` is called on rank 0 after each epoch's checkpoint and
    ``model.safetensors`` are written (with ``run=`` the :class:`Run` so far, model in eval mode,
    when it takes that keyword).
    """
    processes, device = start_processes(train_config)
    try:
        return _train(train_config, model_config, resume_from, on_epoch_end, processes, device,
                      pause_after)
    finally:
        stop_processes(processes)


def _train(train_config, model_config, resume_from, on_epoch_end, processes, device,
           pause_after) -> Run:
    run_dir = Path(resume_from or train_config.out_dir)
    if not processes.is_main:
        return _train_in(run_dir, train_config, model_config, resume_from, on_epoch_end,
                         processes, device, pause_after)
    check_writable_dir(run_dir)  # before the data is loaded
    with lock_run_dir(run_dir):
        if resume_from is not None and not (run_dir / CHECKPOINT).is_file():
            print(f"note: {run_dir} has no checkpoint yet (the run ended before its first "
                  "epoch did): starting it from scratch with its settings", flush=True)
        return _train_in(run_dir, train_config, model_config, resume_from, on_epoch_end,
                         processes, device, pause_after)


def _train_in(run_dir, train_config, model_config, resume_from, on_epoch_end, processes,
              device, pause_after) -> Run:
    data = load_data(train_config, device, model_config)

    torch.manual_seed(train_config.seed)
    model = VQVAE(model_config).to(device)
    optimizer = make_optimizer(model, train_config, device)
    if train_config.compile:
        compile_model(model)
    history: list[dict] = []
    if resume_from is not None and (run_dir / CHECKPOINT).is_file():
        checkpoint = load_checkpoint(run_dir, map_location=device)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        history = json.loads(checkpoint["history"])
        _set_rng_state(checkpoint["rng"], device)
    elif processes.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(run_dir, train_config, model_config)

    trained = model
    if processes.distributed:
        from torch.nn.parallel import DistributedDataParallel

        # Quantizers keep their buffers (codebooks, EMA statistics) equal across processes by
        # all-reducing their statistics, so DDP need not broadcast buffers at every forward.
        # (The option's name changed in torch 2.13.)
        no_buffer_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in \
            inspect.signature(DistributedDataParallel.__init__).parameters \
            else {"broadcast_buffers": False}
        trained = DistributedDataParallel(model, **no_buffer_sync)

    last = train_config.epochs if pause_after is None else min(pause_after, train_config.epochs)
    for epoch in range(len(history), last):
        stats = train_epoch(trained, optimizer, data, train_config, epoch, device, processes)
        if not processes.is_main:
            continue
        evaluation = evaluate(model, data.test)
        history.append({"epoch": epoch + 1, "train_loss": stats.loss,
                        "train_recon_mse": stats.recon_mse, "train_vq_loss": stats.vq_loss,
                        "train_perplexity": stats.perplexity,
                        "train_used_codes": stats.used_codes, "seconds": stats.seconds,
                        "processes": processes.world_size,
                        "precision": "bf16" if uses_bf16(train_config.precision, device)
                        else "fp32", **evaluation})
        atomic_torch_save(run_dir / CHECKPOINT, {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "model_config": model_config.to_dict(),
            "train_config": json.dumps(dataclasses.asdict(train_config)),
            "history": json.dumps(history),
            "rng": _rng_state(device),
        })
        # The weights alone, for every command that only needs the model (no pickle there)
        model.save_pretrained(run_dir)
        metrics = _summary(history, model_config, train_config)
        atomic_write_json(run_dir / METRICS, metrics)
        if train_config.progress:
            last = history[-1]
            print(f"epoch {epoch + 1}/{train_config.epochs}: train loss {last['train_loss']:.5f}"
                  f"  test MSE {last['test_mse']:.5f}  perplexity {last['perplexity']:.1f}"
                  f"  codes {last['used_codes']}  {last['seconds']:.1f} s", flush=True)
        if on_epoch_end is not None:
            _call_epoch_end(on_epoch_end, epoch, metrics,
                            Run(run_dir, model, metrics, data, processes))
    metrics = _summary(history, model_config, train_config) if processes.is_main else {}
    return Run(run_dir, model.eval(), metrics, data, processes)


def _call_epoch_end(callback, epoch: int, metrics: dict, run: Run) -> None:
    """``callback(epoch, metrics)``, with ``run=`` (model, data, directory) too when the
    callback takes it: loggers that draw images or histograms need the model."""
    try:
        takes_run = "run" in inspect.signature(callback).parameters
    except (TypeError, ValueError):  # a builtin or C callable: no signature to read
        takes_run = False
    if takes_run:
        callback(epoch, metrics, run=run)
    else:
        callback(epoch, metrics)


def resume(run_dir: str | Path, *, on_epoch_end=None, **overrides) -> Run:
    """Continue the run in ``run_dir`` from its last checkpoint, with the settings it started with.

    ``overrides`` may change settings that do not affect the result (``progress``, ``data_dir``).
    """
    run_dir = Path(run_dir)
    if not (run_dir / CHECKPOINT).is_file() and (run_dir / WEIGHTS).is_file():
        # Epochs were finished (their weights are there), so starting again from scratch would
        # throw them away: the checkpoint was removed or lost, not never written.
        raise FileNotFoundError(f"{run_dir / CHECKPOINT} not found, but {WEIGHTS} is: the run "
                                "finished epochs and its checkpoint is gone, so it cannot be "
                                "resumed (its weights still load for encode, sample, ...)")
    train_config, model_config = read_config(run_dir)
    allowed = {"progress", "data_dir"}
    if set(overrides) - allowed:
        raise ValueError(f"a resumed run keeps its settings; cannot change "
                         f"{sorted(set(overrides) - allowed)}")
    train_config = dataclasses.replace(train_config, **overrides)
    return train(train_config, model_config, resume_from=run_dir, on_epoch_end=on_epoch_end)
