"""Seconds per training epoch of the course's MLP VQ-VAE: no quantizer, ours, the library's.

Each variant runs ``vqvae.train.train_step`` (the step of ``vqvae train``: same optimiser,
batch size, data layout) on MNIST-sized data; "no quantizer" is the ``none`` quantizer. The
variants take turns in rounds of ``--steps`` steps within one process, so machine noise hits all
alike; the table gives the median time per step scaled to a 60,000-image epoch, and each
variant's ratio to the network without a quantizer.

    python benchmarks/train_epoch.py                      # CPU
    python benchmarks/train_epoch.py --device cuda --precision bf16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from vqvae.models import VQVAE, ModelConfig
from vqvae.rundir import uses_bf16
from vqvae.train import TrainConfig, make_optimizer, train_step

sys.path.insert(0, str(Path(__file__).parent))
from quantizer import print_markdown, settle_allocator, sync  # noqa: E402


def make_variant(name: str, device: torch.device, config: TrainConfig):
    torch.manual_seed(0)
    quantizer = "none" if name == "no quantizer" else name
    model = VQVAE(ModelConfig(quantizer=quantizer)).to(device)
    return model, make_optimizer(model, config, device)


def run_steps(model, optimizer, data, start, steps, batch_size, autocast):
    n = data.shape[0]
    for i in range(start, start + steps):
        train_step(model, optimizer, data[(i * batch_size) % (n - batch_size):][:batch_size],
                   autocast)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="as vqvae train's --precision (default: auto)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50, help="steps per round")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--variants", default="no quantizer,ours,lucidrains")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/train_epoch.json"))
    args = parser.parse_args()

    device = torch.device(args.device)
    config = TrainConfig(batch_size=args.batch_size, precision=args.precision, device=args.device)
    settle_allocator()  # as vqvae train leaves it after loading the dataset
    data = torch.rand(20_000, 1, 28, 28, device=device)  # MNIST-shaped; speed only
    bf16 = uses_bf16(args.precision, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    names = [v.strip() for v in args.variants.split(",")]
    variants = {name: make_variant(name, device, config) for name in names}
    per_step: dict[str, list[float]] = {name: [] for name in names}
    for model, optimizer in variants.values():  # warm-up (and k-means initialisation)
        run_steps(model, optimizer, data, 0, 10, args.batch_size, autocast)
    for r in range(args.rounds):
        for name, (model, optimizer) in variants.items():
            sync(device)
            start = time.perf_counter()
            run_steps(model, optimizer, data, (r + 1) * args.steps, args.steps,
                      args.batch_size, autocast)
            sync(device)
            per_step[name].append((time.perf_counter() - start) / args.steps)

    steps_per_epoch = -(-60_000 // args.batch_size)
    epoch = {name: statistics.median(t) * steps_per_epoch for name, t in per_step.items()}
    base = epoch.get("no quantizer")
    rows = [{"variant": name, "seconds_per_epoch": s,
             "ratio_to_no_quantizer": s / base if base else None} for name, s in epoch.items()]
    print(f"\nSeconds per 60,000-image epoch, batch {args.batch_size}, {device.type}, "
          f"{'bf16' if bf16 else 'fp32'}, median of {args.rounds} rounds of {args.steps} steps "
          f"(torch {torch.__version__}, {torch.get_num_threads()} threads):\n")
    print_markdown([["variant", "s / epoch", "× no quantizer"]] + [
        [r["variant"], f"{r['seconds_per_epoch']:.2f}",
         f"{r['ratio_to_no_quantizer']:.3f}" if r["ratio_to_no_quantizer"] else "-"]
        for r in rows])
    if "ours" in epoch and "lucidrains" in epoch:
        print(f"\nours / lucidrains: {epoch['ours'] / epoch['lucidrains']:.3f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rows": rows, "device": device.type,
                                     "precision": "bf16" if bf16 else "fp32",
                                     "batch_size": args.batch_size,
                                     "torch": torch.__version__,
                                     "threads": torch.get_num_threads()}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
