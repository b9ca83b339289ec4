"""Every quantizer class of ours through ``torch.compile(fullgraph=True)``: a few training steps
(forward + backward + SGD, state updates included) and an eval call, each checked against the
same calls made eagerly with deferred checks (the algorithm a compiled call runs).

Prints a table and writes JSON: per class, whether training and eval compiled as one graph,
the compile time of the first training call, steady-state compiled and eager step times, and
whether the indices agreed (and the largest output difference). Random draws (k-means seeding,
restarts, sampling, dropout) come from another stream under inductor, so those classes are set
up here without them; the equality tests in ``tests/test_compile_*.py`` cover them with the
``aot_eager`` backend.

    python benchmarks/compile_all.py                         # inductor
    python benchmarks/compile_all.py --backend aot_eager --only VectorQuantize,ResidualVQ
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import vqvae  # noqa: E402
from vqvae.quantizers import guard  # noqa: E402

SEQ = (4, 64, 16)  # (batch, tokens, dim)
CHANNEL_FIRST = {"HierarchicalVQ": (4, 16, 32)}  # (batch, dim, length)


def makers() -> dict:
    """Small deterministic configurations of every class (no random draws after construction)."""
    v = vqvae
    return {
        "VectorQuantize (EMA)": lambda: v.VectorQuantize(dim=16, codebook_size=64),
        "VectorQuantize (learnable)": lambda: v.VectorQuantize(
            dim=16, codebook_size=64, learnable_codebook=True, ema_update=False),
        "VectorQuantize (cosine)": lambda: v.VectorQuantize(dim=16, codebook_size=64,
                                                            use_cosine_sim=True),
        "VectorQuantize (heads=4, C kernel dims)": lambda: v.VectorQuantize(
            dim=16, codebook_size=64, heads=4, separate_codebook_per_head=True),
        "ResidualVQ": lambda: v.ResidualVQ(dim=16, codebook_size=64, num_quantizers=3),
        "GroupedResidualVQ": lambda: v.GroupedResidualVQ(dim=16, codebook_size=64,
                                                         num_quantizers=2, groups=2),
        "FSQ": lambda: v.FSQ(levels=[8, 5, 5], dim=16),
        "ResidualFSQ": lambda: v.ResidualFSQ(levels=[8, 5, 5], dim=16, num_quantizers=2),
        "GroupedResidualFSQ": lambda: v.GroupedResidualFSQ(levels=[8, 5, 5], dim=16, groups=2,
                                                           num_quantizers=2),
        "FSP": lambda: v.FSP(levels=[8, 5, 5], dim=16, quantize_rate=1.0),
        "LatentQuantize": lambda: v.LatentQuantize(levels=[8, 5, 5], dim=16),
        "LFQ": lambda: v.LFQ(dim=16, codebook_size=512, entropy_loss_weight=0.1),
        "ResidualLFQ": lambda: v.ResidualLFQ(dim=16, codebook_size=256, num_quantizers=2),
        "GroupedResidualLFQ": lambda: v.GroupedResidualLFQ(dim=16, codebook_size=256, groups=2,
                                                           num_quantizers=2),
        "SimVQ": lambda: v.SimVQ(dim=16, codebook_size=128),
        "ResidualSimVQ": lambda: v.ResidualSimVQ(dim=16, codebook_size=128, num_quantizers=2),
        "RandomProjectionQuantizer": lambda: v.RandomProjectionQuantizer(
            dim=16, codebook_size=64, codebook_dim=8),
        "HierarchicalVQ": lambda: v.HierarchicalVQ(dim=16, codebook_size=64, scales=(1, 2, 4),
                                                   kmeans_init=False),
        "Sequential": lambda: v.Sequential(nn.Linear(16, 16), v.FSQ(levels=[8, 5, 5], dim=16),
                                           nn.Linear(16, 16)),
        "Sequential (SimVQ)": lambda: v.Sequential(nn.Linear(16, 16),
                                                   v.SimVQ(dim=16, codebook_size=128)),
    }


def call(module, x):
    """A uniform view of each class's forward: (output, indices, a loss or None)."""
    if isinstance(getattr(module, "_orig_mod", module), vqvae.RandomProjectionQuantizer):
        return None, module(x), None  # indices only
    out = module(x)
    if isinstance(out, torch.Tensor):
        return out, None, None
    quantized, indices = out[0], out[1]
    loss = out[2] if len(out) > 2 and isinstance(out[2], torch.Tensor) else None
    return quantized, indices, loss


def objective(out) -> torch.Tensor | None:
    quantized, _, loss = out
    total = None
    if quantized is not None and quantized.requires_grad:
        total = quantized.square().mean()
    if loss is not None and loss.requires_grad:
        total = loss.sum() if total is None else total + loss.sum()
    return total


def steps(module, xs, optimiser, first: int = 0):
    outs, times = [], []
    for i, x in enumerate(xs, start=first):
        torch.manual_seed(100 + i)  # eager and compiled runs draw the same numbers (aot_eager)
        start = time.perf_counter()
        with guard.input_checks("deferred"):
            out = call(module, x.clone().requires_grad_())
        loss = objective(out)
        if loss is not None:
            loss.backward()
        if optimiser is not None:
            optimiser.step()
            optimiser.zero_grad()
        times.append(time.perf_counter() - start)
        outs.append(out)
    return outs, times


def same_indices(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, tuple | list):  # one tensor per level (HierarchicalVQ)
        return len(a) == len(b) and all(same_indices(x, y) for x, y in zip(a, b, strict=True))
    return torch.equal(a, b)


def max_diff(outs_a, outs_b) -> float:
    diffs = [float((a[0].detach() - b[0].detach()).abs().max())
             for a, b in zip(outs_a, outs_b, strict=True)
             if a[0] is not None and b[0] is not None]
    return max(diffs) if diffs else 0.0


def measure(name, make, backend: str, n_steps: int) -> dict:
    torch._dynamo.reset()
    torch.manual_seed(0)
    try:
        eager = make().train()
    except Exception as error:  # noqa: BLE001 - a configuration error is a row, not a crash
        return {"quantizer": name, "train": f"not built: {error}"}
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True, backend=backend)
    gen = torch.Generator().manual_seed(1)
    shape = CHANNEL_FIRST.get(name, SEQ)
    xs = [torch.randn(*shape, generator=gen) for _ in range(n_steps)]
    opt = [torch.optim.SGD(m.parameters(), lr=0.01) if list(m.parameters()) else None
           for m in (eager, compiled_module)]
    row = {"quantizer": name}
    try:
        start = time.perf_counter()
        first, _ = steps(compiled, xs[:1], opt[1])
        row["compile_s"] = time.perf_counter() - start
        rest, compiled_times = steps(compiled, xs[1:], opt[1], first=1)
        row["train"] = "ok"
    except Exception as error:  # noqa: BLE001 - the table reports what failed
        row["train"] = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
        return row
    eager_outs, eager_times = steps(eager, xs, opt[0])
    compiled_outs = first + rest
    row["train_indices_equal"] = all(same_indices(a[1], b[1])
                                     for a, b in zip(eager_outs, compiled_outs, strict=True))
    row["train_max_output_diff"] = max_diff(eager_outs, compiled_outs)
    row["eager_ms"] = 1e3 * statistics.median(eager_times[1:])
    row["compiled_ms"] = 1e3 * statistics.median(compiled_times)
    eager.eval()
    compiled_module.eval()
    x = torch.randn(*shape, generator=gen)
    try:
        with torch.no_grad(), guard.input_checks("deferred"):
            got = call(compiled, x)
            expected = call(eager, x)
        row["eval"] = "ok"
        row["eval_indices_equal"] = same_indices(expected[1], got[1])
    except Exception as error:  # noqa: BLE001
        row["eval"] = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--steps", type=int, default=6, help="training steps per class")
    parser.add_argument("--only", default=None, help="comma-separated class names")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" /
                        "compile_all.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    table = makers()
    names = list(table) if args.only is None else [
        n for n in table if any(n.startswith(o) for o in args.only.split(","))]
    rows = []
    print(f"torch {torch.__version__}, backend {args.backend}, "
          f"{torch.get_num_threads()} threads")
    print("| quantizer | train | eval | compile s | indices = eager | max |Δ| | eager ms | "
          "compiled ms |")
    print("|---|---|---|---:|---|---:|---:|---:|")
    for name in names:
        row = measure(name, table[name], args.backend, args.steps)
        rows.append(row)
        equal = (f"{row.get('train_indices_equal')} / {row.get('eval_indices_equal')}"
                 if row["train"] == "ok" else "-")
        print(f"| {name} | {row['train']} | {row.get('eval', '-')} | "
              f"{row.get('compile_s', float('nan')):.1f} | {equal} | "
              f"{row.get('train_max_output_diff', float('nan')):.1e} | "
              f"{row.get('eager_ms', float('nan')):.2f} | "
              f"{row.get('compiled_ms', float('nan')):.2f} |", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"backend": args.backend, "torch": torch.__version__,
                                    "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    failed = [r["quantizer"] for r in rows if r["train"] != "ok" or r.get("eval") != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
