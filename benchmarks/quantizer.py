"""Speed and memory of one VectorQuantize call: ours against vector_quantize_pytorch.

Times forward + backward of one training-mode call (EMA codebook, decay=0.8,
commitment_weight=1.0) of each layer, in the same process, alternating between them so that
machine noise hits both alike, and prints medians and the ratio ours / library. Two simple
baselines are timed beside them: the course's layer (``torch.cdist`` + argmin + straight-through,
learnable codebook) and a plain matmul layer (``addmm`` + argmin + straight-through, no codebook
update). A second table times two calls off the common path (a padding mask; eight heads
on an image feature map), ours against the library. A third gives the peak extra memory of one
call on a (65536, 256) batch against 8192 codes, each measured in a fresh subprocess.

The speed table is printed twice: first with glibc's allocator as a new process has it
("fresh": large temporaries come from fresh mmaps, page faults on every call), then "settled",
as a training run leaves it after loading its data (see settle_allocator). The library's
small-shape time differs by 2.5x between the two; ours does not.

    python benchmarks/quantizer.py                 # CPU, and CUDA when present
    python benchmarks/quantizer.py --device cpu --repeats 30 --json out.json
    python benchmarks/quantizer.py --families none      # VectorQuantize only
    python benchmarks/quantizer.py --families fsq,lfq   # and these families' tables

After these tables come the families' (``--families``, default all: fsq, lfq, simvq): the
``run(repeats)`` of benchmarks/quantizer_fsq.py, quantizer_lfq.py and quantizer_simvq.py, ours
against the library class by class, written into the same JSON under ``families``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vqvae import VectorQuantize

CPU_SHAPES = [((128, 16, 16), 512), ((8, 1024, 256), 512)]
#: Options beyond the common path, ours against the library with the same arguments:
#: name -> (constructor options, input shape, whether the call gets a padding mask).
OPTION_CASES = {
    "masked": (dict(dim=64, codebook_size=512), (8, 1024, 64), True),
    # the README's multi-head call (codebook_dim=32: 8 heads of 32 make up dim, so no
    # projection), with its shared codebook
    "heads=8 image": (dict(dim=256, codebook_size=512, codebook_dim=32, heads=8,
                           accept_image_fmap=True), (8, 256, 16, 16), False),
}
CUDA_SHAPES = CPU_SHAPES + [((64, 4096, 256), 8192)]
MEMORY_CASE = ((65536, 256), 8192)


class CourseLayer(torch.nn.Module):
    """The seed's VectorQuantize: cdist + argmin + straight-through, learnable codebook."""

    def __init__(self, dim: int, codebook_size: int):
        super().__init__()
        self.codebook = torch.nn.Parameter(torch.rand(codebook_size, dim))

    def forward(self, x):
        codes = torch.cdist(x, self.codebook).argmin(dim=-1)
        quantized = self.codebook[codes]
        loss = F.mse_loss(x, quantized.detach()) + F.mse_loss(x.detach(), quantized)
        return (quantized - x).detach() + x, codes, loss


class MatmulLayer(torch.nn.Module):
    """A lower bound: addmm + argmin + straight-through, nothing else."""

    def __init__(self, dim: int, codebook_size: int):
        super().__init__()
        self.register_buffer("codebook", torch.randn(codebook_size, dim))

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        with torch.no_grad():
            d = torch.addmm(self.codebook.pow(2).sum(-1), flat, self.codebook.t(), alpha=-2)
            codes = d.argmin(-1)
        quantized = self.codebook[codes].view_as(x)
        return (quantized - x).detach() + x, codes, F.mse_loss(x, quantized)


def make_layers(dim: int, codebook_size: int) -> dict[str, torch.nn.Module]:
    from vector_quantize_pytorch import VectorQuantize as LibraryVQ

    return {
        "ours": VectorQuantize(dim=dim, codebook_size=codebook_size, decay=0.8,
                               commitment_weight=1.0),
        "library": LibraryVQ(dim=dim, codebook_size=codebook_size, decay=0.8,
                             commitment_weight=1.0),
        # both layers above use the rotation trick (the library's default for dim > 1); this
        # is the straight-through estimator the MLP model uses
        "ours ST": VectorQuantize(dim=dim, codebook_size=codebook_size, decay=0.8,
                                  commitment_weight=1.0, rotation_trick=False),
        "course cdist": CourseLayer(dim, codebook_size),
        "plain matmul": MatmulLayer(dim, codebook_size),
    }


class WithMask(torch.nn.Module):
    """Calls ``layer(x, mask=mask)``: a padding mask (each sequence a random length)."""

    def __init__(self, layer: torch.nn.Module, mask: torch.Tensor):
        super().__init__()
        self.layer = layer
        self.register_buffer("mask", mask)

    def forward(self, x):
        return self.layer(x, mask=self.mask)


def time_option_case(name: str, device: torch.device, repeats: int, warmup: int) -> dict:
    from vector_quantize_pytorch import VectorQuantize as LibraryVQ

    options, shape, masked = OPTION_CASES[name]
    torch.manual_seed(0)
    layers = {"ours": VectorQuantize(**options), "library": LibraryVQ(**options)}
    if masked:
        lengths = torch.randint(shape[1] // 2, shape[1] + 1, (shape[0],))
        mask = torch.arange(shape[1])[None] < lengths[:, None]
        layers = {k: WithMask(v, mask) for k, v in layers.items()}
    layers = {k: v.to(device).train() for k, v in layers.items()}
    x = torch.randn(shape, device=device, requires_grad=True)
    medians = alternating_medians(layers, x, device, repeats, warmup)
    return {"device": device.type, "case": name, "options": {k: v for k, v in options.items()},
            "shape": list(shape), "median_ms": medians,
            "ratio_ours_over_library": medians["ours"] / medians["library"],
            "repeats": repeats}


def settle_allocator() -> None:
    """Put glibc's allocator in the state a training run leaves it in.

    glibc serves large allocations with fresh mmaps (page faults on every call) until a freed
    mmapped block under 32 MB raises its threshold; a training run frees such blocks while it
    loads its data. Without this, layers with large temporaries (the library's) pay for page
    faults that training does not: up to 1.8x their steady time, seen here.
    """
    torch.empty(24 * 2**20, dtype=torch.uint8).fill_(0)  # allocated, touched, freed


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step(layer: torch.nn.Module, x: torch.Tensor) -> None:
    quantized, _, loss = layer(x)
    (quantized.sum() + loss.sum()).backward()  # the library's residual layers: a loss per layer


def alternating_medians(modules: dict[str, torch.nn.Module], x: torch.Tensor,
                        device: torch.device, repeats: int, warmup: int) -> dict[str, float]:
    """Median milliseconds of one training call of each module on ``x``, the modules taking
    turns so that drift in the machine's speed hits all of them alike.

    The order is shuffled every round (fixed seed): a call right after the library's finds its
    data evicted from the caches and runs up to 1.7x slower here, so no module should always
    follow the same one.
    """
    times: dict[str, list[float]] = {name: [] for name in modules}
    for module in modules.values():
        for _ in range(warmup):
            step(module, x)
    sync(device)
    names = list(modules)
    order = random.Random(0)
    for _ in range(repeats):
        order.shuffle(names)
        for name in names:
            module = modules[name]
            x.grad = None
            sync(device)
            start = time.perf_counter()
            step(module, x)
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def time_shape(shape, codebook_size, device, repeats, warmup) -> dict:
    torch.manual_seed(0)
    layers = {name: layer.to(device).train() for name, layer in
              make_layers(shape[-1], codebook_size).items()}
    x = torch.randn(shape, device=device, requires_grad=True)
    medians = alternating_medians(layers, x, device, repeats, warmup)
    return {
        "device": device.type,
        "shape": list(shape),
        "codebook_size": codebook_size,
        "median_ms": medians,
        "ratio_ours_over_library": medians["ours"] / medians["library"],
        "repeats": repeats,
    }


MEMORY_SCRIPT = r"""
import resource, sys, torch
sys.path.insert(0, {bench_dir!r})
from quantizer import make_layers, step, sync
name, device = sys.argv[1], torch.device(sys.argv[2])
(rows, dim), k = {case!r}
torch.manual_seed(0)
layer = make_layers(dim, k)[name].to(device).train()
x = torch.randn(rows, dim, device=device, requires_grad=True)
def rss():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * 4096
sync(device)
if device.type == 'cuda':
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
else:
    before = rss()
step(layer, x)
sync(device)
if device.type == 'cuda':
    peak = torch.cuda.max_memory_allocated(device)
else:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(max(0, peak - before))
"""


def peak_memory(name: str, device: torch.device) -> float:
    """Peak memory of one forward + backward above what was allocated before it, in GiB."""
    script = MEMORY_SCRIPT.format(bench_dir=str(Path(__file__).parent), case=MEMORY_CASE)
    out = subprocess.run([sys.executable, "-c", script, name, str(device)],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 2**30


def print_speed_table(rows: list[dict]) -> None:
    names = list(rows[0]["median_ms"])
    header = ["device", "shape × codes"] + [f"{n} (ms)" for n in names] + ["ours / library"]
    lines = [header]
    for r in rows:
        lines.append([r["device"], f"{tuple(r['shape'])} × {r['codebook_size']}"]
                     + [f"{r['median_ms'][n]:.2f}" for n in names]
                     + [f"{r['ratio_ours_over_library']:.3f}"])
    print_markdown(lines)


def cpu_search() -> str:
    """Which nearest-code search our layers use on CPU for short vectors."""
    from vqvae.quantizers import cpu_kernel

    if cpu_kernel.available():
        return (f"C kernel ({cpu_kernel.simd_lanes()} SIMD lanes, vectors of up to "
                f"{cpu_kernel.MAX_DIM} dimensions), addmm beyond")
    return f"addmm (C kernel unavailable: {cpu_kernel.unavailable_reason()})"


def write_json(path: Path, result: dict) -> None:
    """Write ``result`` with the environment it was measured in, and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    environment = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                   "machine": platform.machine(), "processor": platform.processor(),
                   "load_average": os.getloadavg(), "cpu_search": cpu_search()}
    path.write_text(json.dumps({**result, **environment}, indent=2))
    print(f"\nwrote {path}")


def print_markdown(lines: list[list[str]]) -> None:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    for j, line in enumerate(lines):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |")
        if j == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


FAMILIES = ("fsq", "lfq", "simvq")


def family_list(text: str) -> list[str]:
    """``fsq,lfq``, ``all`` or ``none``."""
    if text in ("all", ""):
        return list(FAMILIES)
    if text == "none":
        return []
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown families {unknown}; choose from "
                                         f"{list(FAMILIES)}, all or none")
    return names


def run_families(families: list[str], repeats: int) -> dict[str, list[dict]]:
    """Each family's benchmark module's ``run(repeats)`` rows, its tables printed."""
    import importlib

    sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling scripts
    results = {}
    for family in families:
        print(f"timing the {family} family", file=sys.stderr)
        rows = importlib.import_module(f"quantizer_{family}").run(repeats)
        print(f"\n{family.upper()} family, ours against the library, median of {repeats}:\n")
        print_family_tables(rows)
        results[family] = rows
    return results


def print_family_tables(rows: list[dict]) -> None:
    """Timing rows (``ratio``) in one table, peak-memory rows (``ours_peak_mib``) in another."""
    timed = [r for r in rows if "ratio" in r]
    if timed:
        print_markdown([["case", "shape", "ours ms", "library ms", "ours / library"]] + [
            [r["name"], "x".join(map(str, r["shape"])), f"{r['ours_ms']:.2f}",
             f"{r['library_ms']:.2f}", f"{r['ratio']:.2f}"] for r in timed])
    memory = [r for r in rows if "ours_peak_mib" in r]
    if memory:
        print()
        print_markdown([["case", "shape", "ours peak (MiB)", "library peak (MiB)"]] + [
            [r["name"], "x".join(map(str, r["shape"])), f"{r['ours_peak_mib']:.0f}",
             "not run" if r["library_peak_mib"] is None else f"{r['library_peak_mib']:.0f}"]
            for r in memory])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--allocator", choices=["both", "fresh", "settled"], default="both",
                        help="glibc allocator state to time in (see settle_allocator): fresh, "
                             "a process that has not yet freed a large block; settled, after "
                             "one; both (default) times fresh first, then settled")
    parser.add_argument("--device", choices=["all", "cpu", "cuda"], default="all")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/quantizer.json"))
    parser.add_argument("--families", type=family_list, default=list(FAMILIES),
                        metavar="LIST", help="families timed after VectorQuantize: comma-"
                        "separated from fsq, lfq, simvq, or all, or none (default: all)")
    args = parser.parse_args()

    devices = []
    if args.device in ("all", "cpu"):
        devices.append(torch.device("cpu"))
    if args.device in ("all", "cuda") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))

    speed = {}
    states = ["fresh", "settled"] if args.allocator == "both" else [args.allocator]
    for state in states:
        if state == "settled":
            settle_allocator()  # irreversible: fresh is timed first
        rows = []
        for device in devices:
            for shape, k in CPU_SHAPES if device.type == "cpu" else CUDA_SHAPES:
                rows.append(time_shape(shape, k, device, args.repeats, args.warmup))
                print(f"timed {device.type} {shape} × {k}, {state} allocator", file=sys.stderr)
        print(f"\nForward + backward of one training call, median of {args.repeats} "
              f"(torch {torch.__version__}, {torch.get_num_threads()} threads, {state} "
              f"allocator; our CPU search: {cpu_search()}):\n")
        print_speed_table(rows)
        speed[state] = rows

    options = [time_option_case(name, device, args.repeats, args.warmup)
               for device in devices for name in OPTION_CASES]
    print(f"\nOptions, forward + backward of one training call, median of {args.repeats}:\n")
    print_markdown([["device", "case", "input", "ours (ms)", "library (ms)", "ours / library"]]
                   + [[r["device"], r["case"], str(tuple(r["shape"])),
                       f"{r['median_ms']['ours']:.2f}", f"{r['median_ms']['library']:.2f}",
                       f"{r['ratio_ours_over_library']:.3f}"] for r in options])

    memory = []
    if not args.skip_memory:
        for device in devices:
            for name in ("ours", "library"):
                memory.append({"device": device.type, "layer": name,
                               "case": [list(MEMORY_CASE[0]), MEMORY_CASE[1]],
                               "peak_extra_gib": peak_memory(name, device)})
        print(f"\nPeak memory of one forward + backward, {MEMORY_CASE[0]} batch × "
              f"{MEMORY_CASE[1]} codes, above what was allocated before the call:\n")
        print_markdown([["device", "layer", "peak (GiB)"]] + [
            [m["device"], m["layer"], f"{m['peak_extra_gib']:.3f}"] for m in memory])

    families = run_families(args.families, args.repeats)
    write_json(args.json, {"speed": speed, "options": options, "memory": memory,
                           "families": families})


if __name__ == "__main__":
    main()
