"""What calling the C CPU kernels through their torch.library custom ops costs, per call.

    PYTHONPATH=src python benchmarks/cpu_kernel_ops.py [--out benchmarks/results]

For each kernel, three ways to call it in eager mode, alternating turns (medians in µs):
``direct`` (the ctypes call, what the layers use in eager mode), ``public`` (the module's
function: the direct call behind a check for tracing) and ``op`` (``torch.ops.vqvae.*``, what a
compiled graph calls). Prints a table and writes ``cpu_kernel_ops.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from vqvae.quantizers import cpu_kernel as kernel


def cases() -> dict[str, dict]:
    torch.manual_seed(0)
    table = {}
    for rows, dim, codes in [(2048, 16, 512), (8, 16, 32)]:
        x, codebook = torch.randn(rows, dim), torch.randn(codes, dim)
        table[f"nearest_code ({rows}, {dim}) x {codes}"] = {
            "direct": lambda x=x, c=codebook: kernel._nearest_code(x, c),
            "public": lambda x=x, c=codebook: kernel.nearest_code(x, c),
            "op": lambda x=x, c=codebook: torch.ops.vqvae.nearest_code_cpu(x, c)}
    h, indices = torch.randn(2048, 16), torch.randint(0, 512, (2048,))
    table["code_statistics (2048, 16) -> 512"] = {
        "direct": lambda: kernel._code_statistics(h, indices, 512),
        "public": lambda: kernel.code_statistics(h, indices, 512),
        "op": lambda: torch.ops.vqvae.code_statistics_cpu(h, indices, 512)}
    codebook, cluster_size = torch.randn(512, 16), torch.rand(512) + 1
    counts, sums = torch.rand(512), torch.randn(512, 16)
    update = (codebook, cluster_size, counts, sums, 0.99, 1e-5, 0.0)
    table["ema_update 512 x 16"] = {
        "direct": lambda: kernel._ema_update(*update),
        "public": lambda: kernel.ema_update(*update),
        "op": lambda: torch.ops.vqvae.ema_update_cpu(*update)}
    return table


def measure(calls: dict, repeats: int, turns: int = 21) -> dict[str, float]:
    for call in calls.values():  # warm-up
        for _ in range(50):
            call()
    times = {name: [] for name in calls}
    for turn in range(turns):  # alternating order: a slow spell hits every way alike
        order = list(calls.items()) if turn % 2 else list(reversed(calls.items()))
        for name, call in order:
            start = time.perf_counter()
            for _ in range(repeats):
                call()
            times[name].append((time.perf_counter() - start) / repeats * 1e6)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    if not kernel.available():
        raise SystemExit(f"C kernels unavailable: {kernel.unavailable_reason()}")
    results = {}
    print(f"| {'call':36s} | direct µs | public µs |  op µs | op − direct µs |")
    print(f"|{'-' * 38}|----------:|----------:|-------:|---------------:|")
    for name, calls in cases().items():
        median = measure(calls, repeats=200 if "2048" in name else 2000)
        results[name] = median
        print(f"| {name:36s} | {median['direct']:9.2f} | {median['public']:9.2f} | "
              f"{median['op']:6.2f} | {median['op'] - median['direct']:14.2f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cpu_kernel_ops.json").write_text(json.dumps(
        {"unit": "microseconds per call, median", "torch": torch.__version__,
         "simd_lanes": kernel.simd_lanes(), "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
