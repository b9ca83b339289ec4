"""Every GPU bar of the fused nearest-code search, measured in one run.

    bash benchmarks/gpu.sh                                # a CUDA machine; installs nothing
    PYTHONPATH=src python benchmarks/gpu.py --dry-run     # CPU: tiny shapes, interpreted kernels
    PYTHONPATH=src python benchmarks/gpu.py --device cpu --sections compiled   # CPU, real sizes

Sections, in order. Each case is guarded: an error is recorded in the JSON and the run goes on;
cases that would start after ``--budget-s`` are skipped and listed as such. The JSON is
rewritten after every section, so a run cut short still leaves what it measured.

1. search     nearest-code search alone at the three shapes: the chunked matmul in fp32, TF32 and
              bf16 (as the issue measured it) and the fused kernel in each precision (below
              ``APPROX_MIN_MACS`` also forced onto the approximate path); median ms, peak memory,
              the tile configuration the autotuner chose.
2. agreement  on the large case, each precision's codes against the float32 argmin (TF32 off) and
              the float64 one; the raw TF32/bf16 argmin without re-check beside them; rows
              re-checked and sent up a precision; the float64 distance gap of every disagreement
              (true near-ties have gaps near float32 rounding). Also on data far from the origin.
3. layer      forward + backward of one training call: ours (search in fp32/TF32/bf16, and the
              chunked path), the library (vector_quantize_pytorch, decay 0.8, commitment 1.0), the
              course's cdist layer and a plain matmul layer, alternating; medians, ratios.
4. memory     peak GPU memory (max_memory_allocated) of one such call on the large case: ours,
              then the library last (it needed 49 GiB on an H100; an OOM is recorded).
5. epoch      seconds per 60,000-image epoch of the course's MLP VQ-VAE at batch 128 on random
              MNIST-shaped data on the device: ours, ours with bf16 autocast, ours on the chunked
              search, the library (with and without autocast), and no quantizer.
6. compiled   the training step of that model eager and compiled as ``vqvae train --compile``
              compiles it (vqvae.compiled.compile_model: the whole model as one graph, or the
              encoder and decoder only where the quantizer cannot be traced), for ours, SimVQ,
              FSQ and the library; steady-state ms per step, and the compilation time apart
              (the warm-up steps' wall time less as many steady steps).
7. bars       the issue's bars against what was measured.

Output: markdown tables on stdout, progress on stderr, ``gpu.json`` and ``gpu.md`` under ``$OUT``
when set (else ``--out``, default benchmarks/results).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

SHAPES = [((128, 16, 16), 512), ((8, 1024, 256), 512), ((64, 4096, 256), 8192)]
DRY_SHAPES = [((2, 8, 16), 32), ((2, 16, 24), 40), ((2, 32, 32), 48)]
#: The issue's measurements on one H100 (torch 2.11, fp32): library forward + backward, ms.
ISSUE_LIBRARY_MS = {"(128, 16, 16) × 512": 3.65, "(8, 1024, 256) × 512": 3.16,
                    "(64, 4096, 256) × 8192": 138.0}
PRECISIONS = ("fp32", "tf32", "bf16")
OURS = [f"ours {p}" for p in PRECISIONS] + ["ours chunked"]


def label(shape, k) -> str:
    return f"{tuple(shape)} × {k}"


class Failed:
    """What :meth:`Run.guard` returns for a case that raised or was skipped."""

    def __bool__(self) -> bool:
        return False


FAILED = Failed()


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- bookkeeping


class Run:
    """Results, errors and the time budget of one benchmark run."""

    def __init__(self, args, device: torch.device):
        self.args = args
        self.device = device
        self.start = time.perf_counter()
        self.results: dict = {"errors": [], "skipped": []}
        self.tables: list[str] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def guard(self, section: str, case: str, fn, *args, **kwargs):
        """``fn(*args)``, or :data:`FAILED` with the error (or the skip) recorded."""
        if self.elapsed() > self.args.budget_s:
            self.results["skipped"].append({"section": section, "case": case,
                                            "reason": f"time budget of {self.args.budget_s} s"})
            log(f"skipped {section}/{case}: time budget")
            return FAILED
        try:
            return fn(*args, **kwargs)
        except Exception as error:  # recorded, and the run goes on
            self.results["errors"].append({
                "section": section, "case": case, "error": f"{type(error).__name__}: {error}",
                "traceback": traceback.format_exc()[-3000:]})
            log(f"ERROR {section}/{case}: {type(error).__name__}: {str(error)[:300]}")
            free_memory()
            return FAILED

    def table(self, title: str, lines: list[list[str]]) -> None:
        text = title + "\n\n" + markdown(lines) + "\n"
        print("\n" + text, flush=True)
        self.tables.append(text)

    def save(self) -> None:
        out = self.args.out
        out.mkdir(parents=True, exist_ok=True)
        self.results["elapsed_s"] = self.elapsed()
        (out / "gpu.json").write_text(json.dumps(self.results, indent=2, default=str))
        (out / "gpu.md").write_text("\n".join(self.tables))


def markdown(lines: list[list[str]]) -> str:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    rows = []
    for j, line in enumerate(lines):
        rows.append("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True))
                    + " |")
        if j == 0:
            rows.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(rows)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


@contextlib.contextmanager
def matmul_precision(mode: str):
    """torch's float32 matmuls: "highest" (IEEE) or "high" (TF32 allowed)."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(mode)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def peak_memory(device: torch.device, fn) -> dict:
    """Peak allocated GiB during ``fn()``: absolute, and above what was allocated before."""
    if device.type != "cuda":
        fn()
        return {"peak_gib": None, "extra_gib": None}
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"peak_gib": peak / 2**30, "extra_gib": (peak - before) / 2**30}


def time_alternating(fns: dict, device, repeats: int, warmup: int, run: Run, section: str,
                     case: str) -> dict:
    """Median ms of each callable, taking turns so machine noise hits all alike.

    A callable that raises is dropped (its error recorded); the others go on.
    """
    live = dict(fns)
    for name, fn in list(live.items()):
        warm = run.guard(section, f"{case} / {name} (warm-up)",
                         lambda f=fn: [f() for _ in range(warmup)])
        if warm is FAILED:
            live.pop(name)
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in live}
    for _ in range(repeats):
        for name, fn in list(live.items()):
            try:
                sync(device)
                start = time.perf_counter()
                fn()
                sync(device)
                times[name].append((time.perf_counter() - start) * 1e3)
            except Exception as error:
                run.results["errors"].append({"section": section, "case": f"{case} / {name}",
                                              "error": f"{type(error).__name__}: {error}"})
                log(f"ERROR {section}/{case}/{name}: {error}")
                live.pop(name)
                free_memory()
    return {name: statistics.median(t) for name, t in times.items() if t}


# ---------------------------------------------------------------------------- section 1: search


def chunked_bf16_argmin(x, codebook, rows: int = 32768):
    """The issue's bf16 search: addmm in bf16 (bf16 scores), chunks of 32768 rows."""
    code_sq = codebook.pow(2).sum(-1).bfloat16()
    cb = codebook.bfloat16()
    out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    for start in range(0, x.shape[0], rows):
        chunk = x[start:start + rows].bfloat16()
        out[start:start + rows] = torch.addmm(code_sq, chunk, cb.t(), alpha=-2.0).argmin(-1)
    return out


def chunked_float_argmin(x, codebook, matmul: str, dtype=torch.float32, rows: int = 32768):
    """Chunked ``||c||² - 2 x·c`` argmin in ``dtype`` with torch matmul precision ``matmul``."""
    x, codebook = x.to(dtype), codebook.to(dtype)
    code_sq = codebook.pow(2).sum(-1)
    out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    with matmul_precision(matmul):
        for start in range(0, x.shape[0], rows):
            out[start:start + rows] = torch.addmm(code_sq, x[start:start + rows], codebook.t(),
                                                  alpha=-2.0).argmin(-1)
    return out


def search_shape(run: Run, shape, k) -> dict:
    from vqvae.quantizers import search, triton_search

    case = label(shape, k)
    torch.manual_seed(0)
    dim = shape[-1]
    x = torch.randn(math.prod(shape[:-1]), dim, device=run.device)
    codebook = torch.randn(k, dim, device=run.device)
    small = x.shape[0] * k * dim < triton_search.APPROX_MIN_MACS
    variants = {
        "chunked fp32": lambda: chunked_float_argmin(x, codebook, "highest"),
        "chunked tf32": lambda: chunked_float_argmin(x, codebook, "high"),
        "chunked bf16": lambda: chunked_bf16_argmin(x, codebook),
        "library search fp32": lambda: search.nearest_code(x, codebook, backend="torch"),
    }
    for p in PRECISIONS:
        variants[f"fused {p}"] = lambda p=p: triton_search.nearest_code(x, codebook, precision=p)
        if small and p != "fp32":
            variants[f"fused {p} forced"] = lambda p=p: triton_search.nearest_code(
                x, codebook, precision=p, min_approx_macs=0)
    log(f"search {case}: {len(variants)} variants")
    with matmul_precision("highest"):
        medians = time_alternating(variants, run.device, run.args.search_repeats,
                                   run.args.warmup, run, "search", case)
    memory = {name: run.guard("search", f"{case} / {name} memory", peak_memory, run.device, fn)
              for name, fn in variants.items() if name in medians}
    return {"shape": list(shape), "codebook_size": k, "median_ms": medians,
            "memory": {name: m for name, m in memory.items() if m is not FAILED},
            "autotuned_config": {p: triton_search.best_config(p, dim) for p in PRECISIONS},
            "approx_path": not small}


def section_search(run: Run, shapes) -> None:
    rows = []
    for shape, k in shapes:
        rows.append(search_shape(run, shape, k))
        free_memory()
    run.results["search"] = rows
    names = sorted({n for r in rows for n in r["median_ms"]},
                   key=lambda n: (not n.startswith("chunked"), n))
    run.table("Search alone (no backward), median ms; peak extra GiB of the large case in the "
              "last row",
              [["shape × codes"] + names] + [
                  [label(r["shape"], r["codebook_size"])]
                  + [fmt(r["median_ms"].get(n), 3) for n in names] for r in rows]
              + [["peak GiB (last shape)"] + [
                  fmt((rows[-1]["memory"].get(n) or {}).get("extra_gib"), 3) for n in names]])


# ---------------------------------------------------------------------------- section 2: agreement


def float64_argmin(x, codebook, rows: int = 16384):
    return chunked_float_argmin(x, codebook, "highest", dtype=torch.float64, rows=rows)


def squared_distance64(x, codebook, rows_idx, codes):
    xs = x[rows_idx].double()
    return (xs - codebook[codes].double()).pow(2).sum(-1)


def agreement_rows(run: Run, data_name: str, shift: float, scale: float, n: int, dim: int,
                   k: int) -> list[dict]:
    from vqvae.quantizers import triton_search

    g = torch.Generator(device=run.device).manual_seed(1)
    x = shift + scale * torch.randn(n, dim, device=run.device, generator=g)
    codebook = shift + scale * torch.randn(k, dim, device=run.device, generator=g)
    ref32 = run.guard("agreement", f"{data_name} / fp32 reference", chunked_float_argmin,
                      x, codebook, "highest")
    ref64 = run.guard("agreement", f"{data_name} / fp64 reference", float64_argmin, x, codebook)
    if ref32 is FAILED:
        return []
    methods = {
        "raw tf32 (torch, no re-check)": lambda stats: chunked_float_argmin(x, codebook, "high"),
        "raw bf16 (torch, bf16 scores)": lambda stats: chunked_bf16_argmin(x, codebook),
    }
    for p in PRECISIONS:
        methods[f"fused {p}"] = lambda stats, p=p: triton_search.nearest_code(
            x, codebook, precision=p, stats=stats)
    rows = []
    for name, method in methods.items():
        stats: dict = {}
        codes = run.guard("agreement", f"{data_name} / {name}", method, stats)
        if codes is FAILED:
            continue
        row = {"data": data_name, "method": name, "rows": n, "stats": stats}
        for ref_name, ref in (("fp32", ref32), ("fp64", ref64)):
            if ref is FAILED:
                continue
            differ = (codes != ref).nonzero().squeeze(1)
            row[f"disagree_{ref_name}"] = int(differ.numel())
            row[f"agree_{ref_name}_pct"] = 100.0 * (1 - differ.numel() / n)
            if differ.numel():
                d_codes = squared_distance64(x, codebook, differ, codes[differ])
                d_ref = squared_distance64(x, codebook, differ, ref[differ])
                gap = (d_codes - d_ref).abs() / d_ref.clamp(min=1e-30)
                row[f"max_rel_gap_{ref_name}"] = float(gap.max())
        rows.append(row)
        log(f"agreement {data_name} {name}: {row.get('disagree_fp32')} of {n} differ from fp32")
    return rows


def section_agreement(run: Run, shape, k) -> None:
    n, dim = math.prod(shape[:-1]), shape[-1]
    results = []
    datasets = {"N(0, 1)": (0.0, 1.0), "offset: 1 + 0.1·N(0, 1)": (1.0, 0.1)}
    for data_name, (shift, scale) in datasets.items():
        results += agreement_rows(run, data_name, shift, scale, n, dim, k)
        free_memory()
    run.results["agreement"] = results

    def stat(row, key):  # summed over the cascade (bf16 rows sent up are counted again)
        counts = [v for name, v in row["stats"].items() if name.endswith(key)]
        return str(sum(counts)) if counts else "-"

    run.table(f"Codes against the float32 argmin (TF32 off) and float64, {n} × {dim} vectors, "
              f"{k} codes; rel. gap = float64 distance gap of the worst disagreement",
              [["data", "method", "agree fp32 %", "differ fp32", "rel. gap fp32",
                "differ fp64", "re-checked rows", "rows sent up"]] + [
                  [r["data"], r["method"], fmt(r.get("agree_fp32_pct"), 4),
                   str(r.get("disagree_fp32", "-")), fmt(r.get("max_rel_gap_fp32"), 9)
                   if r.get("max_rel_gap_fp32") is not None else "-",
                   str(r.get("disagree_fp64", "-")), stat(r, "rechecked"), stat(r, "fallback")]
                  for r in results])


# ---------------------------------------------------------------------------- section 3: layer


class WithSearch(torch.nn.Module):
    """A layer whose nearest-code searches run with the given precision and backend."""

    def __init__(self, layer, precision: str | None, backend: str):
        super().__init__()
        self.layer, self.precision, self.backend = layer, precision, backend

    def forward(self, x):
        from vqvae.quantizers.search import search_settings

        with search_settings(precision=self.precision, backend=self.backend):
            return self.layer(x)


def make_layer(name: str, dim: int, k: int):
    from quantizer import CourseLayer, MatmulLayer

    from vqvae import VectorQuantize

    if name.startswith("ours"):
        layer = VectorQuantize(dim=dim, codebook_size=k, decay=0.8, commitment_weight=1.0)
        mode = name.split()[1]
        return WithSearch(layer, None if mode == "chunked" else mode,
                          "torch" if mode == "chunked" else "triton")
    if name == "library":
        from vector_quantize_pytorch import VectorQuantize as LibraryVQ

        return LibraryVQ(dim=dim, codebook_size=k, decay=0.8, commitment_weight=1.0)
    if name == "course cdist":
        return CourseLayer(dim, k)
    if name == "plain matmul":
        return MatmulLayer(dim, k)
    raise ValueError(name)


LAYERS = OURS + ["library", "course cdist", "plain matmul"]


def train_step(layer, x) -> None:
    x.grad = None
    quantized, _, loss = layer(x)
    (quantized.sum() + loss).backward()


def layer_shape(run: Run, shape, k, repeats: int) -> dict:
    case = label(shape, k)
    torch.manual_seed(0)
    layers = {}
    for name in LAYERS:
        layer = run.guard("layer", f"{case} / {name} (build)", make_layer, name, shape[-1], k)
        if layer is not FAILED:
            layers[name] = layer.to(run.device).train()
    x = torch.randn(shape, device=run.device, requires_grad=True)
    log(f"layer {case}: {len(layers)} layers × {repeats} repeats")
    fns = {name: (lambda layer=layer: train_step(layer, x)) for name, layer in layers.items()}
    medians = time_alternating(fns, run.device, repeats, run.args.warmup, run, "layer", case)
    library = medians.get("library")
    return {"shape": list(shape), "codebook_size": k, "median_ms": medians,
            "ratio_to_library": {n: m / library for n, m in medians.items()} if library else {},
            "repeats": repeats, "issue_library_ms": ISSUE_LIBRARY_MS.get(case)}


def section_layer(run: Run, shapes) -> None:
    rows = []
    for i, (shape, k) in enumerate(shapes):
        large = i == len(shapes) - 1
        rows.append(layer_shape(run, shape, k,
                                run.args.large_repeats if large else run.args.repeats))
        free_memory()
    run.results["layer"] = rows
    run.table("Forward + backward of one training call, median ms (× library in brackets); "
              "the issue's library time on an H100 in the last column",
              [["shape × codes"] + LAYERS + ["issue: library"]] + [
                  [label(r["shape"], r["codebook_size"])]
                  + [(f"{r['median_ms'][n]:.2f}"
                      + (f" ({r['ratio_to_library'][n]:.2f}×)" if n in r["ratio_to_library"]
                         and n != "library" else "")) if n in r["median_ms"] else "error"
                     for n in LAYERS] + [fmt(r["issue_library_ms"])] for r in rows])


# ---------------------------------------------------------------------------- section 4: memory


def layer_memory(run: Run, name: str, shape, k) -> dict:
    torch.manual_seed(0)
    layer = make_layer(name, shape[-1], k).to(run.device).train()
    x = torch.randn(shape, device=run.device, requires_grad=True)
    if name.startswith("ours"):
        train_step(layer, x)  # compile (and autotune) outside the measurement
    return peak_memory(run.device, lambda: train_step(layer, x))


def section_memory(run: Run, shape, k) -> None:
    rows = []
    for name in OURS + ["library"]:  # the library last: it may need ~49 GiB
        log(f"memory {label(shape, k)} {name}")
        free_memory()
        result = run.guard("memory", name, layer_memory, run, name, shape, k)
        free_memory()
        rows.append({"layer": name, "shape": list(shape), "codebook_size": k,
                     **(result or {"peak_gib": None, "extra_gib": None, "error": True})})
        # (result is FAILED, which is falsy, when the case raised: an OOM of the library)
    run.results["memory"] = rows
    run.table(f"Peak GPU memory of one forward + backward, {label(shape, k)} "
              "(absolute, and above what was allocated before the call)",
              [["layer", "peak GiB", "extra GiB"]] + [
                  [r["layer"], fmt(r["peak_gib"], 3) if not r.get("error") else "error",
                   fmt(r["extra_gib"], 3) if not r.get("error") else "error"] for r in rows])


# ---------------------------------------------------------------------------- section 5: epoch


EPOCH_VARIANTS = [  # (name, quantizer, autocast, search backend)
    ("no quantizer", "none", False, None),
    ("ours", "ours", False, "triton"),
    ("ours, bf16 autocast", "ours", True, "triton"),
    ("ours, chunked search", "ours", False, "torch"),
    ("ours, bf16 autocast, compiled", "ours", True, "triton"),  # vqvae train --compile
    ("library", "lucidrains", False, None),
    ("library, bf16 autocast", "lucidrains", True, None),
]


def make_model(run: Run, quantizer: str, autocast: bool, compiled: bool = False):
    """``(model, optimizer)``; with ``compiled``, the model compiled as ``vqvae train
    --compile`` does (its ``forward.mode`` says whether as one graph)."""
    from vqvae.compiled import compile_model
    from vqvae.models import VQVAE, ModelConfig
    from vqvae.train import TrainConfig, make_optimizer

    torch.manual_seed(0)
    config = TrainConfig(batch_size=run.args.batch_size, device=run.device.type,
                         precision="bf16" if autocast else "fp32")
    options = {} if run.args.epoch_codebook_size is None else \
        {"codebook_size": run.args.epoch_codebook_size}
    model = VQVAE(ModelConfig(quantizer=quantizer, **options)).to(run.device)
    if compiled:
        compile_model(model, backend=run.args.compile_backend)
    return model, make_optimizer(model, config, run.device)


def train_steps(model, optimizer, data, start: int, steps: int, batch_size: int,
                autocast: bool, backend: str | None) -> None:
    """``steps`` calls of vqvae.train.train_step, the step of ``vqvae train``."""
    from vqvae.quantizers.search import search_settings
    from vqvae.train import train_step

    n = data.shape[0]
    context = torch.autocast(data.device.type, dtype=torch.bfloat16, enabled=autocast)
    with search_settings(backend=backend):
        for i in range(start, start + steps):
            train_step(model, optimizer, data[(i * batch_size) % (n - batch_size):][:batch_size],
                       context)


def section_epoch(run: Run) -> None:
    args = run.args
    data = torch.rand(args.epoch_images, 1, 28, 28, device=run.device)  # MNIST-shaped
    variants = {}
    for name, quantizer, autocast, backend in EPOCH_VARIANTS:
        built = run.guard("epoch", f"{name} (build)", make_model, run, quantizer, autocast,
                          name.endswith("compiled"))
        if built is not FAILED:
            variants[name] = (*built, autocast, backend)
    for name, (model, optimizer, autocast, backend) in list(variants.items()):
        warm = run.guard("epoch", f"{name} (warm-up)", train_steps, model, optimizer, data, 0,
                         args.epoch_warmup, args.batch_size, autocast, backend)
        if warm is FAILED:
            variants.pop(name)
    per_step: dict[str, list[float]] = {name: [] for name in variants}
    log(f"epoch: {len(variants)} variants × {args.epoch_rounds} rounds of {args.epoch_steps} "
        "steps")
    for r in range(args.epoch_rounds):
        for name, (model, optimizer, autocast, backend) in list(variants.items()):
            sync(run.device)
            start = time.perf_counter()
            ok = run.guard("epoch", f"{name} (round {r})", train_steps, model, optimizer, data,
                           args.epoch_warmup + r * args.epoch_steps, args.epoch_steps,
                           args.batch_size, autocast, backend)
            sync(run.device)
            if ok is FAILED:
                variants.pop(name)
                continue
            per_step[name].append((time.perf_counter() - start) / args.epoch_steps)
    steps_per_epoch = -(-60_000 // args.batch_size)
    epoch = {n: statistics.median(t) * steps_per_epoch for n, t in per_step.items() if t}
    base = epoch.get("no quantizer")
    rows = [{"variant": n, "seconds_per_epoch": s,
             "ratio_to_no_quantizer": s / base if base else None,
             "ratio_to_library": s / epoch["library"] if "library" in epoch else None}
            for n, s in epoch.items()]
    run.results["epoch"] = {"rows": rows, "batch_size": args.batch_size,
                            "steps_per_epoch": steps_per_epoch, "rounds": args.epoch_rounds,
                            "steps_per_round": args.epoch_steps}
    run.table(f"Seconds per 60,000-image epoch, course MLP VQ-VAE, batch {args.batch_size}, "
              f"median of {args.epoch_rounds} rounds of {args.epoch_steps} steps",
              [["variant", "s / epoch", "× no quantizer", "× library"]] + [
                  [r["variant"], fmt(r["seconds_per_epoch"], 3),
                   fmt(r["ratio_to_no_quantizer"], 3), fmt(r["ratio_to_library"], 3)]
                  for r in rows])


# ---------------------------------------------------------------------------- section 6: compiled


def graph_mode(model) -> str:
    forward = model.__dict__.get("forward")
    return getattr(forward, "mode", "eager")


def section_compiled(run: Run) -> None:
    """Eager against compiled training steps, per quantizer; compilation timed apart."""
    args = run.args
    data = torch.rand(args.epoch_images, 1, 28, 28, device=run.device)  # MNIST-shaped
    quantizers = [q.strip() for q in args.compiled_quantizers.split(",") if q.strip()]
    variants, warmup_s = {}, {}
    for quantizer in quantizers:
        for compiled in (False, True):
            name = f"{quantizer}{', compiled' if compiled else ''}"
            built = run.guard("compiled", f"{name} (build)", make_model, run, quantizer, False,
                              compiled)
            if built is FAILED:
                continue
            sync(run.device)
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a fallback is recorded as the graph mode
                warm = run.guard("compiled", f"{name} (warm-up)", train_steps, *built, data, 0,
                                 args.compiled_warmup, args.batch_size, False, None)
            sync(run.device)
            if warm is not FAILED:
                variants[name] = built
                warmup_s[name] = time.perf_counter() - start
                log(f"compiled: {name} warm-up {warmup_s[name]:.1f} s "
                    f"({graph_mode(built[0])})")
    per_step: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(args.epoch_rounds):
        for name, (model, optimizer) in list(variants.items()):
            sync(run.device)
            start = time.perf_counter()
            ok = run.guard("compiled", f"{name} (round {r})", train_steps, model, optimizer,
                           data, args.compiled_warmup + r * args.epoch_steps, args.epoch_steps,
                           args.batch_size, False, None)
            sync(run.device)
            if ok is FAILED:
                variants.pop(name)
                continue
            per_step[name].append((time.perf_counter() - start) / args.epoch_steps)
    ms = {n: statistics.median(t) * 1e3 for n, t in per_step.items() if t}
    rows = []
    for quantizer in quantizers:
        eager, compiled = ms.get(quantizer), ms.get(f"{quantizer}, compiled")
        model = variants.get(f"{quantizer}, compiled", (None,))[0]
        forward = model.__dict__.get("forward") if model is not None else None
        rows.append({
            "quantizer": quantizer, "eager_ms": eager, "compiled_ms": compiled,
            "ratio": compiled / eager if eager and compiled else None,
            "graph": graph_mode(model) if model is not None else None,
            "fallback_reason": getattr(forward, "reason", None),
            "compile_s": warmup_s[f"{quantizer}, compiled"]
            - args.compiled_warmup * compiled / 1e3 if compiled else None,
            "eager_warmup_s": warmup_s.get(quantizer)})
    run.results["compiled"] = {"rows": rows, "batch_size": args.batch_size,
                               "backend": args.compile_backend, "rounds": args.epoch_rounds,
                               "steps_per_round": args.epoch_steps,
                               "warmup_steps": args.compiled_warmup}
    run.table(f"Training step of the course MLP VQ-VAE, batch {args.batch_size}, fp32: eager "
              f"against compiled ({args.compile_backend}), median ms of {args.epoch_rounds} rounds "
              f"of {args.epoch_steps} steps; compile s = warm-up less as many steady steps",
              [["quantizer", "graph", "eager ms", "compiled ms", "compiled / eager",
                "compile s"]] + [
                  [r["quantizer"], r["graph"] or "-", fmt(r["eager_ms"], 3),
                   fmt(r["compiled_ms"], 3), fmt(r["ratio"], 3), fmt(r["compile_s"], 1)]
                  for r in rows])


# ---------------------------------------------------------------------------- section 7: bars


def section_bars(run: Run, shapes) -> None:
    from vqvae.quantizers.search import search_defaults

    default = search_defaults()["precision"]
    res = run.results
    bars = []
    layer = {label(r["shape"], r["codebook_size"]): r for r in res.get("layer", [])}
    large = label(*shapes[-1])
    for p in PRECISIONS:
        ms = layer.get(large, {}).get("median_ms", {}).get(f"ours {p}")
        bars.append({"bar": f"{large} fwd+bwd, ours {p}", "measured": ms, "target": "<= 10 ms",
                     "met": ms is not None and ms <= 10.0})
    for shape, k in shapes[:-1]:
        ratio = layer.get(label(shape, k), {}).get("ratio_to_library", {}).get(f"ours {default}")
        bars.append({"bar": f"{label(shape, k)} ours {default} / library", "measured": ratio,
                     "target": "<= 0.5", "met": ratio is not None and ratio <= 0.5})
    library_peak = next((m["peak_gib"] for m in res.get("memory", [])
                         if m["layer"] == "library"), None)
    for m in res.get("memory", []):
        if m["layer"].startswith("ours"):
            bars.append({"bar": f"peak memory {large}, {m['layer']} (library: "
                                f"{fmt(library_peak)} GiB)",
                         "measured": m["peak_gib"], "target": "<= 4 GiB",
                         "met": m["peak_gib"] is not None and m["peak_gib"] <= 4.0})
    for a in res.get("agreement", []):
        if not a["method"].startswith("fused"):
            continue
        # The issue's bar is against the float32 argmin. Far from the origin the (uncentred)
        # float32 argmin is itself off by rounding, so there the judge is float64.
        ref = "fp32" if a["data"] == "N(0, 1)" else "fp64"
        if f"agree_{ref}_pct" in a:
            pct = a[f"agree_{ref}_pct"]
            bars.append({"bar": f"codes = {'float32' if ref == 'fp32' else 'float64'} argmin, "
                                f"{a['method']}, {a['data']}",
                         "measured": pct, "target": ">= 99.99 %", "met": pct >= 99.99})
    for b in bars:  # nothing measured (a failed case, or memory on CPU): not judged
        if b["measured"] is None:
            b["met"] = None
    res["bars"] = bars
    res["default_precision"] = default
    run.table("The issue's bars (default search precision: " + default + ")",
              [["bar", "measured", "target", "met"]] + [
                  [b["bar"], fmt(b["measured"], 4 if "codes" in b["bar"] else 3), b["target"],
                   {True: "yes", False: "NO", None: "-"}[b["met"]]] for b in bars])


# ---------------------------------------------------------------------------- main


def environment(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version,
            "machine": platform.machine(), "device": str(device),
            "float32_matmul_precision": torch.get_float32_matmul_precision()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError as error:
        info["triton"] = f"not importable: {error}"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                    gpu_memory_gib=props.total_memory / 2**30)
    try:
        from importlib.metadata import version

        import vector_quantize_pytorch  # noqa: F401

        info["vector_quantize_pytorch"] = version("vector-quantize-pytorch")
    except Exception as error:
        info["vector_quantize_pytorch"] = f"not importable: {error}"
    return info


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes and few repeats; on CPU the kernels are interpreted")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: $OUT, else benchmarks/results)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="cases that would start later than this are skipped")
    parser.add_argument("--sections",
                        default="search,agreement,layer,memory,epoch,compiled,bars")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto: cuda when available; cpu runs the sections on the CPU "
                             "(the Triton kernels interpreted: for --sections epoch,compiled)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--large-repeats", type=int, default=10)
    parser.add_argument("--search-repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epoch-images", type=int, default=60_000)
    parser.add_argument("--epoch-warmup", type=int, default=20)
    parser.add_argument("--epoch-rounds", type=int, default=5)
    parser.add_argument("--epoch-steps", type=int, default=100)
    parser.add_argument("--epoch-codebook-size", type=int, default=None,
                        help="default: the course model's 512")
    parser.add_argument("--compiled-quantizers", default="ours,simvq,fsq,lucidrains",
                        help="quantizers of the compiled section")
    parser.add_argument("--compiled-warmup", type=int, default=10,
                        help="steps before the timed rounds of the compiled section (where the "
                             "compiler runs, and again after k-means initialisation)")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend (default: inductor; aot_eager with "
                             "--dry-run, which checks the graphs without generating code)")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = Path(os.environ["OUT"]) if os.environ.get("OUT") \
            else Path("benchmarks/results")
    if args.dry_run:
        args.repeats = args.large_repeats = args.search_repeats = 2
        args.warmup = 1
        args.batch_size, args.epoch_codebook_size = 8, 32
        args.epoch_images, args.epoch_warmup = 64, 1
        args.epoch_rounds, args.epoch_steps = 2, 1
        args.compiled_warmup = 3  # the k-means recompile is on the second step
    if args.compile_backend is None:
        args.compile_backend = "aot_eager" if args.dry_run else "inductor"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if torch.cuda.is_available() and args.device != "cpu":
        device = torch.device("cuda")
    elif args.dry_run or args.device == "cpu":
        device = torch.device("cpu")
        # before Triton is first imported: the interpreter runs the kernels on CPU tensors
        os.environ.setdefault("TRITON_INTERPRET", "1")
    else:
        print("no CUDA device: run with --dry-run (or --device cpu) to check the script on "
              "CPU", file=sys.stderr)
        return 2
    shapes = DRY_SHAPES if args.dry_run else SHAPES
    run = Run(args, device)
    run.results["environment"] = environment(device)
    run.results["shapes"] = [[list(s), k] for s, k in shapes]
    run.results["dry_run"] = args.dry_run
    log(f"device {run.results['environment'].get('gpu', device)}; output {args.out}")

    if args.dry_run:  # tiny shapes: take the approximate paths anyway
        from vqvae.quantizers import triton_search

        triton_search.APPROX_MIN_MACS = 0
    sections = [s.strip() for s in args.sections.split(",")]
    steps = {
        "search": lambda: section_search(run, shapes),
        "agreement": lambda: section_agreement(run, *shapes[-1]),
        "layer": lambda: section_layer(run, shapes),
        "memory": lambda: section_memory(run, *shapes[-1]),
        "epoch": lambda: section_epoch(run),
        "compiled": lambda: section_compiled(run),
        "bars": lambda: section_bars(run, shapes),
    }
    for name in sections:
        log(f"section {name} (elapsed {run.elapsed():.0f} s)")
        run.guard(name, "section", steps[name])
        run.save()
    log(f"done in {run.elapsed():.0f} s; {len(run.results['errors'])} error(s), "
        f"{len(run.results['skipped'])} skipped; wrote {args.out / 'gpu.json'} and "
        f"{args.out / 'gpu.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
