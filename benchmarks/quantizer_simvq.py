"""Speed of SimVQ, ResidualSimVQ, RandomProjectionQuantizer and HierarchicalVQ: ours against
vector_quantize_pytorch.

Times one training-mode call, forward + backward of ``quantized.sum() + loss.sum()``, of each
implementation at the library README's calls, in the same process, the two taking turns in a
shuffled order each round (see ``alternating_medians`` in quantizer.py), and prints medians and
the ratio ours / library. SimVQ and ResidualSimVQ run with the library's weights loaded into ours.
RandomProjectionQuantizer has nothing to train: its indices call is timed forward only, and its
cross-entropy call (``indices=`` given) forward + backward to the input.

    python benchmarks/quantizer_simvq.py                 # CPU
    python benchmarks/quantizer_simvq.py --repeats 30 --device cuda
    python benchmarks/quantizer_simvq.py --only SimVQ      # the cases whose name has "SimVQ"
    python benchmarks/quantizer_simvq.py --only SimVQ --shape 4,256,256 --codes 4096
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantizer import print_markdown, settle_allocator, sync, write_json  # noqa: E402

import vqvae  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "quantizer_simvq.json"


def train_step(layer: torch.nn.Module, x: torch.Tensor) -> None:
    quantized, _, loss = layer(x)[:3]
    (quantized.sum() + loss.sum()).backward()


def indices_step(layer: torch.nn.Module, x: torch.Tensor) -> None:
    layer(x)


def cross_entropy_step(layer: torch.nn.Module, x: torch.Tensor, targets: torch.Tensor) -> None:
    layer(x, indices=targets).backward()


def alternating(calls: dict[str, Callable[[], None]], device: torch.device, repeats: int,
                warmup: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall-clock and per-thread CPU milliseconds of each call, the calls taking turns
    in a shuffled order. The CPU time (``time.thread_time``) counts only this thread's work, so
    with one torch thread it is the whole call's cost and barely moves when other processes
    share the machine; on a GPU or with several threads it undercounts and only wall time
    means anything."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    cpu: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():
        for _ in range(warmup):
            call()
    names = list(calls)
    order = random.Random(0)
    for _ in range(repeats):
        order.shuffle(names)
        for name in names:
            sync(device)
            start, start_cpu = time.perf_counter(), time.thread_time()
            calls[name]()
            sync(device)
            cpu[name].append(time.thread_time() - start_cpu)
            times[name].append(time.perf_counter() - start)
    return ({name: statistics.median(t) * 1e3 for name, t in times.items()},
            {name: statistics.median(t) * 1e3 for name, t in cpu.items()})


def cases(device: torch.device, shape: tuple[int, ...] = (1, 1024, 512), codes: int = 1024):
    """``(name, shape, ours, library, step)`` per benchmark case, built lazily. ``shape`` (its
    last axis the dimension) and ``codes`` set the SimVQ and ResidualSimVQ calls."""
    import vector_quantize_pytorch as lib

    dim = shape[-1]

    def simvq():
        reference = lib.SimVQ(dim=dim, codebook_size=codes, rotation_trick=True)
        ours = vqvae.SimVQ(dim=dim, codebook_size=codes, rotation_trick=True)
        ours.load_state_dict(reference.state_dict())
        return ours, reference

    def residual():
        reference = lib.ResidualSimVQ(dim=dim, num_quantizers=4, codebook_size=codes,
                                      rotation_trick=True)
        ours = vqvae.ResidualSimVQ(dim=dim, num_quantizers=4, codebook_size=codes,
                                   rotation_trick=True)
        ours.load_state_dict(reference.state_dict())
        return ours, reference

    def projection():
        options = dict(dim=512, num_codebooks=16, codebook_dim=256, codebook_size=1024)
        return vqvae.RandomProjectionQuantizer(**options), lib.RandomProjectionQuantizer(**options)

    def projection_one():
        options = dict(dim=512, num_codebooks=1, codebook_dim=256, codebook_size=1024)
        return vqvae.RandomProjectionQuantizer(**options), lib.RandomProjectionQuantizer(**options)

    def hierarchical():
        options = dict(dim=256, codebook_size=1024, scales=(1, 2, 4, 8, 16),
                       accept_image_fmap=True)
        return vqvae.HierarchicalVQ(**options), lib.HierarchicalVQ(**options)

    return [
        (f"SimVQ {codes} codes, dim {dim}", shape, simvq, train_step),
        (f"ResidualSimVQ 4 x {codes} codes, dim {dim}", shape, residual, train_step),
        ("RandomProjectionQuantizer 16 x 1024 codes, 256-d, indices", (1, 1024, 512),
         projection, indices_step),
        ("RandomProjectionQuantizer 1 x 1024 codes, 256-d, indices", (1, 1024, 512),
         projection_one, indices_step),
        ("RandomProjectionQuantizer 1 x 1024 codes, 256-d, cross-entropy", (1, 1024, 512),
         projection_one, cross_entropy_step),
        ("HierarchicalVQ scales 1..16, 1024 codes, dim 256", (1, 256, 16, 16), hierarchical,
         train_step),
    ]


def run(repeats: int = 20, device: str = "cpu", warmup: int = 3,
        only: str | None = None, shape: tuple[int, ...] = (1, 1024, 512),
        codes: int = 1024) -> list[dict]:
    """One row per case: name, shape, ours_ms, library_ms, ratio (ours / library).
    ``only``: run the cases whose name contains this text; ``shape`` and ``codes``: the SimVQ
    and ResidualSimVQ calls (see :func:`cases`)."""
    dev = torch.device(device)
    settle_allocator()
    rows = []
    for name, case_shape, build, step in cases(dev, shape, codes):
        if only is not None and only not in name:
            continue
        torch.manual_seed(0)
        ours, reference = (m.to(dev).train() for m in build())
        x = torch.randn(case_shape, device=dev, requires_grad=step is not indices_step)
        if step is cross_entropy_step:
            with torch.no_grad():
                targets = reference(x.detach())
            calls = {"ours": partial(step, ours, x, targets),
                     "library": partial(step, reference, x, targets)}
        else:
            calls = {"ours": partial(step, ours, x), "library": partial(step, reference, x)}
        # the library's 16-codebook call takes seconds (see its row), a few turns suffice
        turns = min(repeats, 3) if "16 x" in name else repeats
        medians, cpu = alternating(calls, dev, turns, 1 if "16 x" in name else warmup)
        row = {"name": name, "shape": list(case_shape), "device": dev.type,
               "ours_ms": medians["ours"], "library_ms": medians["library"],
               "ratio": medians["ours"] / medians["library"], "repeats": turns}
        if dev.type == "cpu" and torch.get_num_threads() == 1:
            row.update(ours_cpu_ms=cpu["ours"], library_cpu_ms=cpu["library"],
                       cpu_ratio=cpu["ours"] / cpu["library"])
        rows.append(row)
        del ours, reference, calls
    return rows


def print_table(rows: list[dict]) -> None:
    with_cpu = all("cpu_ratio" in row for row in rows)
    header = ["case", "shape", "ours ms", "library ms", "ours / library"]
    if with_cpu:
        header += ["ours CPU ms", "library CPU ms", "CPU ours / library"]
    lines = [header]
    for row in rows:
        line = [row["name"], "x".join(map(str, row["shape"])), f"{row['ours_ms']:.2f}",
                f"{row['library_ms']:.2f}", f"{row['ratio']:.2f}"]
        if with_cpu:
            line += [f"{row['ours_cpu_ms']:.2f}", f"{row['library_cpu_ms']:.2f}",
                     f"{row['cpu_ratio']:.2f}"]
        lines.append(line)
    print_markdown(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=RESULTS)
    parser.add_argument("--only", help="run the cases whose name contains this text")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads (default: torch's); with 1 the table adds "
                             "per-thread CPU time, steadier than wall time on a shared machine")
    parser.add_argument("--shape", default="1,1024,512",
                        help="input shape of the SimVQ and ResidualSimVQ calls, comma-separated, "
                             "the last axis the dimension (default 1,1024,512)")
    parser.add_argument("--codes", type=int, default=1024,
                        help="codebook size of the SimVQ and ResidualSimVQ calls (default 1024)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = tuple(int(n) for n in args.shape.split(","))
    rows = run(args.repeats, args.device, only=args.only, shape=shape, codes=args.codes)
    print_table(rows)
    write_json(args.json, {"rows": rows})


if __name__ == "__main__":
    main()
