"""Speed of the residual quantizers: ours against vector_quantize_pytorch, in one process.

Times forward + backward of one training-mode call of each quantizer, alternating between them
so that machine noise hits all alike, and prints medians and the ratio ours / library. Both
sides get the same settings: EMA codebooks (decay=0.8), commitment_weight=1.0, 512 codes per
layer, straight-through gradients (the library's default rotation trick is switched off, as
ours is off by default), no k-means and no dead-code restarts. The cases:

    rvq     ResidualVQ, 4 layers
    rqvae   ResidualVQ, 4 layers, one shared codebook, stochastic sampling (temperature 0.1)
    grvq    GroupedResidualVQ, 2 groups of 4 layers
    beam    ResidualVQ, 4 layers, beam search with a beam of 4 paths

One VectorQuantize layer of ours is timed beside them as a yardstick: a 4-layer stack cannot
cost much less than four of it.

    python benchmarks/residual.py                  # CPU, and CUDA when present
    python benchmarks/residual.py --device cpu --repeats 30 --json out.json
    python benchmarks/residual.py --device cpu --threads 1     # a busy machine
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from vqvae import GroupedResidualVQ, ResidualVQ, VectorQuantize

sys.path.insert(0, str(Path(__file__).parent))
from quantizer import (  # noqa: E402
    alternating_medians,
    print_markdown,
    settle_allocator,
    write_json,
)

SHAPES = [((8, 1024, 256), 512), ((128, 16, 16), 512)]
LAYERS = 4
COMMON = dict(decay=0.8, commitment_weight=1.0)
CASES = {
    "rvq": dict(),
    "rqvae": dict(shared_codebook=True, stochastic_sample_codes=True, sample_codebook_temp=0.1),
    "grvq": dict(groups=2),
    "beam": dict(beam_size=4),
}


def make_pair(case: str, dim: int, codebook_size: int) -> dict[str, torch.nn.Module]:
    from vector_quantize_pytorch import GroupedResidualVQ as LibraryGRVQ
    from vector_quantize_pytorch import ResidualVQ as LibraryRVQ

    options = dict(CASES[case])
    groups = options.pop("groups", None)
    if groups is None:
        ours = ResidualVQ(dim, codebook_size, LAYERS, **COMMON, **options)
        library = LibraryRVQ(dim=dim, codebook_size=codebook_size, num_quantizers=LAYERS,
                             rotation_trick=False, **COMMON, **options)
    else:
        ours = GroupedResidualVQ(dim, codebook_size, LAYERS, groups=groups, **COMMON, **options)
        library = LibraryGRVQ(dim=dim, codebook_size=codebook_size, num_quantizers=LAYERS,
                              groups=groups, rotation_trick=False, **COMMON, **options)
    return {"ours": ours, "library": library}


def time_shape(shape, codebook_size, device, repeats, warmup, cases) -> list[dict]:
    torch.manual_seed(0)
    dim = shape[-1]
    modules = {"one VectorQuantize": VectorQuantize(dim, codebook_size, **COMMON)}
    for case in cases:
        for side, module in make_pair(case, dim, codebook_size).items():
            modules[f"{case} {side}"] = module
    modules = {name: module.to(device).train() for name, module in modules.items()}
    x = torch.randn(shape, device=device, requires_grad=True)
    medians = alternating_medians(modules, x, device, repeats, warmup)
    rows = []
    for case in cases:
        ours, library = medians[f"{case} ours"], medians[f"{case} library"]
        rows.append({"device": device.type, "shape": list(shape), "codebook_size": codebook_size,
                     "layers": LAYERS, "case": case, "ours_ms": ours, "library_ms": library,
                     "ratio_ours_over_library": ours / library,
                     "one_vector_quantize_ms": medians["one VectorQuantize"],
                     "repeats": repeats})
    return rows


def main() -> None:
    settle_allocator()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["all", "cpu", "cuda"], default="all")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--cases", default=",".join(CASES),
                        help=f"comma-separated, from {', '.join(CASES)} (default: all)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice). On a busy machine "
                             "each multi-threaded op can wait for a descheduled thread, which "
                             "buries the compute in scheduling stalls; 1 thread avoids them")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/residual.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown or not cases:
        parser.error(f"unknown case(s) {unknown}; choose from {', '.join(CASES)}")

    devices = []
    if args.device in ("all", "cpu"):
        devices.append(torch.device("cpu"))
    if args.device in ("all", "cuda") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))

    rows = []
    for device in devices:
        for shape, k in SHAPES:
            rows += time_shape(shape, k, device, args.repeats, args.warmup, cases)
            print(f"timed {device.type} {shape} × {k}", file=sys.stderr)
    print(f"\nForward + backward of one training call, {LAYERS} layers, median of "
          f"{args.repeats} (torch {torch.__version__}, {torch.get_num_threads()} threads):\n")
    lines = [["device", "shape × codes", "quantizer", "ours (ms)", "library (ms)",
              "ours / library", "one VectorQuantize (ms)"]]
    for r in rows:
        lines.append([r["device"], f"{tuple(r['shape'])} × {r['codebook_size']}", r["case"],
                      f"{r['ours_ms']:.2f}", f"{r['library_ms']:.2f}",
                      f"{r['ratio_ours_over_library']:.3f}", f"{r['one_vector_quantize_ms']:.2f}"])
    print_markdown(lines)

    write_json(args.json, {"speed": rows})


if __name__ == "__main__":
    main()
