"""Speed and memory of the LFQ family: ours against vector_quantize_pytorch.

Times forward + backward of one training-mode call of each case, ours and the library's in the
same process, taking turns (benchmarks/quantizer.py's alternating_medians), and prints medians
and the ratio ours / library. Then the peak extra memory of one LFQ training call at 2^18
codes, each measured in a fresh subprocess: the library forms the (tokens x 2^18)
distribution, ours only (tokens x 2^9) halves of it (see vqvae/quantizers/lfq_entropy.py).

    python benchmarks/quantizer_lfq.py                  # writes results/quantizer_lfq.json
    python benchmarks/quantizer_lfq.py --repeats 3 --no-library-memory
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # quantizer.py sits beside this file

from quantizer import alternating_medians, print_markdown, settle_allocator, write_json  # noqa: E402

import vqvae  # noqa: E402

CASES = [  # name, class name, constructor kwargs, input shape
    ("LFQ 2^16 codes, image", "LFQ", dict(codebook_size=2**16, dim=16), (1, 16, 32, 32)),
    ("ResidualLFQ 8 x 2^8", "ResidualLFQ",
     dict(dim=256, codebook_size=256, num_quantizers=8), (1, 1024, 256)),
    ("GroupedResidualLFQ 2 groups x 4 x 2^8", "GroupedResidualLFQ",
     dict(dim=256, groups=2, codebook_size=256, num_quantizers=4), (1, 1024, 256)),
]
MEMORY_SHAPES = [((1, 18, 32, 32), True), ((4, 18, 32, 32), False)]  # shape, library too?

MEMORY_SCRIPT = """
import sys, torch
which, shape = sys.argv[1], tuple(int(s) for s in sys.argv[2].split(','))
if which == 'ours':
    from vqvae import LFQ
else:
    from vector_quantize_pytorch import LFQ
torch.manual_seed(0)
layer = LFQ(codebook_size=2**18, dim=18).train()
x = torch.randn(*shape, requires_grad=True)
def status(field):
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))
# the imports peak above what stays resident; start the high-water mark from here
with open('/proc/self/clear_refs', 'w') as f:
    f.write('5')
before = status('VmRSS:')
quantized, _, loss = layer(x)
(quantized.sum() + loss).backward()
print(max(0, status('VmHWM:') - before))
"""


def time_case(cls_name: str, kwargs: dict, shape: tuple, repeats: int) -> dict[str, float]:
    import vector_quantize_pytorch as library

    torch.manual_seed(0)
    modules = {"ours": getattr(vqvae, cls_name)(**kwargs).train(),
               "library": getattr(library, cls_name)(**kwargs).train()}
    modules["ours"].load_state_dict(modules["library"].state_dict())
    x = torch.randn(*shape, requires_grad=True)
    return alternating_medians(modules, x, torch.device("cpu"), repeats, warmup=1)


def peak_memory(which: str, shape: tuple) -> float:
    """Peak extra resident memory (MiB) of one LFQ 2^18 training call (forward + backward),
    in a fresh process."""
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, which, ",".join(map(str, shape))],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 2**20


def run(repeats: int, library_memory: bool = True) -> list[dict]:
    settle_allocator()
    rows = []
    for name, cls_name, kwargs, shape in CASES:
        ms = time_case(cls_name, kwargs, shape, repeats)
        rows.append({"name": name, "shape": list(shape), "ours_ms": ms["ours"],
                     "library_ms": ms["library"], "ratio": ms["ours"] / ms["library"]})
    for shape, with_library in MEMORY_SHAPES:
        library_mib = peak_memory("library", shape) if with_library and library_memory else None
        rows.append({"name": "LFQ 2^18 codes, peak memory", "shape": list(shape),
                     "ours_peak_mib": peak_memory("ours", shape),
                     "library_peak_mib": library_mib})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-library-memory", action="store_true",
                        help="skip the library's 2^18 memory run (it needs several GiB)")
    parser.add_argument("--json", type=Path,
                        default=Path(__file__).parent / "results" / "quantizer_lfq.json")
    args = parser.parse_args()
    rows = run(args.repeats, library_memory=not args.no_library_memory)
    lines = [["case", "shape", "ours (ms)", "library (ms)", "ours / library"]]
    for r in rows:
        if "ratio" in r:
            lines.append([r["name"], str(tuple(r["shape"])), f"{r['ours_ms']:.1f}",
                          f"{r['library_ms']:.1f}", f"{r['ratio']:.3f}"])
    print_markdown(lines)
    print()
    mem = [["case", "shape", "ours peak (MiB)", "library peak (MiB)"]]
    for r in rows:
        if "ours_peak_mib" in r:
            lib = r["library_peak_mib"]
            mem.append([r["name"], str(tuple(r["shape"])), f"{r['ours_peak_mib']:.0f}",
                        "not run" if lib is None else f"{lib:.0f}"])
    print_markdown(mem)
    write_json(args.json, {"cases": rows, "repeats": args.repeats})


if __name__ == "__main__":
    main()
