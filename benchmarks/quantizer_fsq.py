"""Speed of the FSQ family: ours against vector_quantize_pytorch, in one process.

Times forward + backward of one training-mode call of each quantizer (the output summed, plus
the returned loss where there is one), the two implementations taking turns in a shuffled
order so that machine noise hits both alike, and prints medians and the ratio ours / library.
Both sides get the same weights. The cases:

    fsq      FSQ levels [8, 5, 5, 5], dim 256, at (8, 1024, 256)
    fsq64    the same at dim 64, (8, 1024, 64)
    fsq512   FSQ levels [8, 8, 8, 5, 5, 5] (64000 codes: no code table), dim 512, at
             (4, 1024, 512)
    rfsq     ResidualFSQ levels [8, 5, 5, 3], 8 layers, dim 256, at (1, 1024, 256) (README)
    grfsq    GroupedResidualFSQ as rfsq in 2 groups, at (1, 1024, 256)
    latent   LatentQuantize levels [5, 5, 8], dim 16, at (1, 16, 32, 32) (README)
    latent8  the same at (8, 16, 32, 32), a batch of feature maps
    latent64 LatentQuantize levels [8, 8, 8, 8], dim 64, at (8, 64, 32, 32)
    fsp      FSP levels [8, 5, 5, 5], normal CDF, quantize_rate 0.5, at (1, 1024, 4) (README)
    fsp256   FSP as fsp with projections from dim 256, at (8, 1024, 256)
    fspimg   FSP as fsp, channel first, dim 64, at (8, 64, 32, 32), kurtosis loss

    python benchmarks/quantizer_fsq.py                     # CPU
    python benchmarks/quantizer_fsq.py --repeats 50 --threads 1   # adds thread CPU time
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from vqvae import FSP, FSQ, GroupedResidualFSQ, LatentQuantize, ResidualFSQ

sys.path.insert(0, str(Path(__file__).parent))
from quantizer import print_markdown, settle_allocator, write_json  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "quantizer_fsq.json"
RESIDUAL = dict(dim=256, levels=[8, 5, 5, 3], num_quantizers=8)
FSP_README = dict(levels=[8, 5, 5, 5], act_name="normal", quantize_rate=0.5, vector_norm="var")
CASES: dict[str, tuple[Callable, str, dict, tuple[int, ...]]] = {
    "fsq": (FSQ, "FSQ", dict(levels=[8, 5, 5, 5], dim=256), (8, 1024, 256)),
    "fsq64": (FSQ, "FSQ", dict(levels=[8, 5, 5, 5], dim=64), (8, 1024, 64)),
    "fsq512": (FSQ, "FSQ", dict(levels=[8, 8, 8, 5, 5, 5], dim=512), (4, 1024, 512)),
    "rfsq": (ResidualFSQ, "ResidualFSQ", RESIDUAL, (1, 1024, 256)),
    "grfsq": (GroupedResidualFSQ, "GroupedResidualFSQ", dict(RESIDUAL, groups=2),
              (1, 1024, 256)),
    "latent": (LatentQuantize, "LatentQuantize", dict(levels=[5, 5, 8], dim=16),
               (1, 16, 32, 32)),
    "latent8": (LatentQuantize, "LatentQuantize", dict(levels=[5, 5, 8], dim=16),
                (8, 16, 32, 32)),
    "latent64": (LatentQuantize, "LatentQuantize", dict(levels=[8, 8, 8, 8], dim=64),
                 (8, 64, 32, 32)),
    "fsp": (FSP, "FSP", FSP_README, (1, 1024, 4)),
    "fsp256": (FSP, "FSP", dict(FSP_README, dim=256), (8, 1024, 256)),
    "fspimg": (FSP, "FSP", dict(FSP_README, dim=64, channel_first=True, vector_norm="kurt"),
               (8, 64, 32, 32)),
}


def make_pair(case: str) -> dict[str, torch.nn.Module]:
    import vector_quantize_pytorch

    ours_cls, library_name, options, _ = CASES[case]
    torch.manual_seed(0)
    library = getattr(vector_quantize_pytorch, library_name)(**options)
    ours = ours_cls(**options)
    ours.load_state_dict(library.state_dict())
    return {"ours": ours.train(), "library": library.train()}


def step(module: torch.nn.Module, x: torch.Tensor) -> None:
    """One training call: forward, then backward of the summed output (+ loss if returned)."""
    out = module(x)
    total = out[0].sum()
    if len(out) > 2 and isinstance(out[2], torch.Tensor):
        total = total + out[2].sum()
    total.backward()


def alternating_medians(modules: dict[str, torch.nn.Module], x: torch.Tensor, repeats: int,
                        warmup: int) -> dict[str, dict[str, float]]:
    """Median ms per call of each module, wall clock and this thread's CPU time, the modules
    taking turns in an order shuffled every round (as benchmarks/quantizer.py does; its timer
    assumes a 3-tuple return). CPU time leaves out the time the process waits for a core, so
    on a shared machine it is the steadier figure; it counts all the work only with one
    thread."""
    wall: dict[str, list[float]] = {name: [] for name in modules}
    cpu: dict[str, list[float]] = {name: [] for name in modules}
    for module in modules.values():
        for _ in range(warmup):
            step(module, x)
    names = list(modules)
    order = random.Random(0)
    for _ in range(repeats):
        order.shuffle(names)
        for name in names:
            x.grad = None
            start, start_cpu = time.perf_counter(), time.thread_time()
            step(modules[name], x)
            cpu[name].append(time.thread_time() - start_cpu)
            wall[name].append(time.perf_counter() - start)
    return {name: {"wall": statistics.median(wall[name]) * 1e3,
                   "cpu": statistics.median(cpu[name]) * 1e3} for name in modules}


def run(repeats: int = 30, cases: list[str] | None = None) -> list[dict]:
    """One row per case: name, shape, ours_ms, library_ms, ratio (ours / library, wall clock),
    and with one thread also ours_cpu_ms, library_cpu_ms, cpu_ratio (thread CPU time)."""
    rows = []
    one_thread = torch.get_num_threads() == 1
    for case in cases or list(CASES):
        shape = CASES[case][3]
        x = torch.randn(*shape, requires_grad=True)
        times = alternating_medians(make_pair(case), x, repeats, warmup=3)
        ours, library = times["ours"], times["library"]
        row = {"name": case, "shape": list(shape), "ours_ms": round(ours["wall"], 3),
               "library_ms": round(library["wall"], 3),
               "ratio": round(ours["wall"] / library["wall"], 3)}
        if one_thread:
            row.update(ours_cpu_ms=round(ours["cpu"], 3), library_cpu_ms=round(library["cpu"], 3),
                       cpu_ratio=round(ours["cpu"] / library["cpu"], 3))
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=None)
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    settle_allocator()
    rows = run(args.repeats, args.cases)
    cpu = "cpu_ratio" in rows[0]
    lines = [["case", "shape", "ours ms", "library ms", "ours / library"]
             + (["ours cpu ms", "library cpu ms", "cpu ratio"] if cpu else [])]
    for r in rows:
        line = [r["name"], "x".join(map(str, r["shape"])), f"{r['ours_ms']:.2f}",
                f"{r['library_ms']:.2f}", f"{r['ratio']:.2f}"]
        if cpu:
            line += [f"{r['ours_cpu_ms']:.2f}", f"{r['library_cpu_ms']:.2f}",
                     f"{r['cpu_ratio']:.2f}"]
        lines.append(line)
    print_markdown(lines)
    write_json(args.json, {"device": "cpu", "repeats": args.repeats,
                           "threads": torch.get_num_threads(), "rows": rows})


if __name__ == "__main__":
    main()
