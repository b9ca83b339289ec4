"""Seconds per training epoch of the course's MLP VQ-VAE: no quantizer, ours, the library's,
eager and (``--compiled``) compiled as ``vqvae train --compile`` compiles it.

Each variant runs ``vqvae.train.train_step`` (the step of ``vqvae train``: same optimiser,
batch size, data layout) on MNIST-sized data; "no quantizer" is the ``none`` quantizer. The
variants take turns in rounds of ``--steps`` steps within one process, so machine noise hits all
alike; the table gives the median time per step scaled to a 60,000-image epoch, and each
variant's ratio to the network without a quantizer.

With ``--compiled`` every quantizer also runs compiled (:func:`vqvae.compiled.compile_model`:
the whole model as one graph, or the encoder and decoder only where the quantizer cannot be
traced; the "graph" column says which). Compilation is reported apart from the steady state:
"warm-up s" is the wall time of the ``--warmup`` first steps, where the compiler runs (and
k-means initialises, and a compiled model compiles again after it), and "compile s" that less
the same number of steady steps. The step times exclude it.

    python benchmarks/train_epoch.py                      # CPU
    python benchmarks/train_epoch.py --variants "no quantizer,fsq,simvq,ours,lucidrains" \\
        --compiled --rounds 5 --steps 30
    python benchmarks/train_epoch.py --device cuda --precision bf16 --compiled
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from vqvae.compiled import compile_model
from vqvae.models import VQVAE, ModelConfig
from vqvae.rundir import uses_bf16
from vqvae.train import TrainConfig, make_optimizer, train_step

sys.path.insert(0, str(Path(__file__).parent))
from quantizer import print_markdown, settle_allocator, sync  # noqa: E402

COMPILED = " compiled"


def make_variant(name: str, device: torch.device, config: TrainConfig):
    """``(model, optimizer, compiled forward or None)`` of a variant; the same initial weights
    for a quantizer's eager and compiled variants."""
    torch.manual_seed(0)
    base = name.removesuffix(COMPILED)
    quantizer = "none" if base == "no quantizer" else base
    model = VQVAE(ModelConfig(quantizer=quantizer)).to(device)
    forward = compile_model(model) if name.endswith(COMPILED) else None
    return model, make_optimizer(model, config, device), forward


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
    parser.add_argument("--warmup", type=int, default=10,
                        help="steps before the timed rounds (compilation, k-means init)")
    parser.add_argument("--variants", default="no quantizer,ours,lucidrains",
                        help="quantizer names (and 'no quantizer'), comma-separated")
    parser.add_argument("--compiled", action="store_true",
                        help="also time each variant compiled as vqvae train --compile does")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/train_epoch.json"))
    args = parser.parse_args()

    device = torch.device(args.device)
    config = TrainConfig(batch_size=args.batch_size, precision=args.precision, device=args.device)
    settle_allocator()  # as vqvae train leaves it after loading the dataset
    data = torch.rand(20_000, 1, 28, 28, device=device)  # MNIST-shaped; speed only
    bf16 = uses_bf16(args.precision, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    names = [v.strip() for v in args.variants.split(",")]
    if args.compiled:
        names = [n for name in names for n in (name, name + COMPILED)]
    variants = {name: make_variant(name, device, config) for name in names}
    per_step: dict[str, list[float]] = {name: [] for name in names}
    warmup_seconds: dict[str, float] = {}
    for name, (model, optimizer, _) in variants.items():
        sync(device)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a fallback is reported in the table instead
            run_steps(model, optimizer, data, 0, args.warmup, args.batch_size, autocast)
        sync(device)
        warmup_seconds[name] = time.perf_counter() - start
        print(f"warm-up {name}: {warmup_seconds[name]:.1f} s", file=sys.stderr, flush=True)
    for r in range(args.rounds):
        for name, (model, optimizer, _) in variants.items():
            sync(device)
            start = time.perf_counter()
            run_steps(model, optimizer, data, args.warmup + r * args.steps, args.steps,
                      args.batch_size, autocast)
            sync(device)
            per_step[name].append((time.perf_counter() - start) / args.steps)

    steps_per_epoch = -(-60_000 // args.batch_size)
    step = {name: statistics.median(t) for name, t in per_step.items()}
    base = step.get("no quantizer")
    rows = []
    for name, (_, _, forward) in variants.items():
        eager = step.get(name.removesuffix(COMPILED))
        rows.append({
            "variant": name, "seconds_per_epoch": step[name] * steps_per_epoch,
            "ms_per_step": step[name] * 1e3,
            "ratio_to_no_quantizer": step[name] / base if base else None,
            "graph": None if forward is None else forward.mode,
            "fallback_reason": None if forward is None else forward.reason,
            "ratio_to_eager": step[name] / eager if forward is not None and eager else None,
            "warmup_seconds": warmup_seconds[name],
            "compile_seconds": warmup_seconds[name] - args.warmup * step[name]
            if forward is not None else None,
        })
    print(f"\nSeconds per 60,000-image epoch, batch {args.batch_size}, {device.type}, "
          f"{'bf16' if bf16 else 'fp32'}, median of {args.rounds} rounds of {args.steps} steps "
          f"after {args.warmup} warm-up steps (torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads):\n")
    print_markdown([["variant", "graph", "ms / step", "s / epoch", "× no quantizer",
                     "compiled / eager", "warm-up s", "compile s"]] + [
        [r["variant"], r["graph"] or "eager", f"{r['ms_per_step']:.2f}",
         f"{r['seconds_per_epoch']:.2f}",
         f"{r['ratio_to_no_quantizer']:.3f}" if r["ratio_to_no_quantizer"] else "-",
         f"{r['ratio_to_eager']:.3f}" if r["ratio_to_eager"] else "-",
         f"{r['warmup_seconds']:.1f}",
         f"{r['compile_seconds']:.1f}" if r["compile_seconds"] is not None else "-"]
        for r in rows])
    for r in rows:
        if r["fallback_reason"]:
            print(f"  {r['variant']}: encoder and decoder only: {r['fallback_reason']}")
    for suffix in ("", COMPILED):
        ours, library = step.get("ours" + suffix), step.get("lucidrains" + suffix)
        if ours and library:
            print(f"ours / lucidrains{suffix}: {ours / library:.3f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rows": rows, "device": device.type,
                                     "precision": "bf16" if bf16 else "fp32",
                                     "batch_size": args.batch_size, "rounds": args.rounds,
                                     "steps_per_round": args.steps, "warmup_steps": args.warmup,
                                     "torch": torch.__version__,
                                     "threads": torch.get_num_threads()}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
