"""Compile the Triton search kernels for a GPU without having one: shared memory, registers, spills.

Triton compiles ahead of time for any CUDA target (its wheel carries ``ptxas``), so this runs on a
CPU-only machine. It catches what the interpreter cannot (the interpreter runs the kernels as
Python: no ``constexpr`` rules, no register or shared-memory limits) and shows, for every tile
configuration the autotuner may try, how much shared memory it needs and whether registers
spill. It measures nothing about speed: that is ``benchmarks/gpu.py``'s job on a real GPU.

    python benchmarks/triton_compile.py                     # sm_80 and sm_90, D = 16 and 256
    python benchmarks/triton_compile.py --arch 90 --dim 256 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from vqvae.quantizers import triton_search as ts

sys.path.insert(0, str(Path(__file__).parent))
from quantizer import print_markdown  # noqa: E402

_ALIGNED = [["tt.divisibility", 16]]


def _signature(names_types: list[tuple[str, str]], constexprs: dict, divisible: set[str]):
    signature = {name: kind for name, kind in names_types}
    signature.update({name: "constexpr" for name in constexprs})
    attrs = {(i,): _ALIGNED for i, (name, kind) in enumerate(names_types)
             if kind.startswith("*") or name in divisible}
    return signature, attrs


def search_kernel_source(precision: str, dim: int, config: dict) -> ASTSource:
    """The search kernel as ``triton_search`` launches it for this mode and ``dim``."""
    element = "bf16" if precision == "bf16" else "fp32"
    slots = ts.SLOTS.get(precision, 1)
    args = [("x_ptr", f"*{element}"), ("c_ptr", f"*{element}"), ("c_sq_ptr", "*fp32"),
            ("out_v_ptr", "*fp32" if slots > 1 else "*i32"), ("out_i_ptr", "*i32"),
            ("N", "i32"), ("K", "i32"), ("D", "i32"), ("SIZE_CLASS", "i32")]
    constexprs = {"SLOTS": slots, "DOT_PRECISION": "ieee" if precision == "fp32" else "tf32",
                  **{k: config[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_D", "RESIDENT")},
                  "UPCAST": False}
    divisible = {"K"} | ({"D"} if dim % 16 == 0 else set())
    signature, attrs = _signature(args, constexprs, divisible)
    return ASTSource(ts._search_kernel, signature, constexprs, attrs)


def prepare_kernel_source(precision: str, dim: int) -> ASTSource:
    out = "bf16" if precision == "bf16" else "fp32"
    args = [("src_ptr", "*fp32"), ("center_ptr", "*fp32"), ("dst_ptr", f"*{out}"),
            ("sq_ptr", "*fp32"), ("M", "i32"), ("D", "i32")]
    constexprs = {"DROP_BITS": ts._DROP_BITS[precision], "BLOCK_R": 32,
                  "BLOCK_D": min(64, ts._block_d(dim))}
    signature, attrs = _signature(args, constexprs, {"D"} if dim % 16 == 0 else set())
    return ASTSource(ts._prepare_kernel, signature, constexprs, attrs)


def recheck_kernel_source(precision: str, dim: int) -> ASTSource:
    args = [("x_ptr", "*fp32"), ("c_ptr", "*fp32"), ("cand_ptr", "*i32"), ("keep_ptr", "*u8"),
            ("out_ptr", "*i32"), ("N", "i32"), ("D", "i32")]
    constexprs = {"SLOTS": ts.SLOTS[precision], "BLOCK_R": 32,
                  "BLOCK_D": min(64, ts._block_d(dim))}
    signature, attrs = _signature(args, constexprs, {"D"} if dim % 16 == 0 else set())
    return ASTSource(ts._recheck_kernel, signature, constexprs, attrs)


def _ptxas_stats(ptx: str, arch: int) -> dict:
    """Registers and spills, from ``ptxas -v`` (the wheel's newer ptxas first: Triton 3.9
    writes PTX that the older one it also carries rejects)."""
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    suffix = "a" if arch >= 90 else ""
    text = ""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.ptx"
        path.write_text(ptx)
        for ptxas in (bin_dir / "ptxas-blackwell", bin_dir / "ptxas"):
            if not ptxas.exists():
                continue
            out = subprocess.run([str(ptxas), f"--gpu-name=sm_{arch}{suffix}", "-v", str(path),
                                  "-o", os.devnull], capture_output=True, text=True)
            text = out.stdout + out.stderr
            if out.returncode == 0:
                break
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores", text)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_store_bytes": int(spills.group(1)) if spills else None}


def compile_source(source: ASTSource, arch: int, num_warps: int = 4, num_stages: int = 3,
                   with_ptxas_stats: bool = True) -> dict:
    """Compile for ``sm_<arch>``; return shared memory, registers, spills and seconds."""
    start = time.perf_counter()
    kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages,
                                     "enable_fp_fusion": True})
    result = {"shared_bytes": kernel.metadata.shared,
              "compile_s": time.perf_counter() - start}
    if with_ptxas_stats:
        result.update(_ptxas_stats(kernel.asm["ptx"], arch))
    return result


class _Named(dict):
    """Stands in for the autotuner's ``named_args`` (only ``D`` and the dtype of ``x``)."""


class _Like:
    def __init__(self, itemsize: int):
        self._itemsize = itemsize

    def element_size(self) -> int:
        return self._itemsize


def search_configs(precision: str, dim: int) -> list[dict]:
    """The configurations the autotuner would try (after pruning) for this mode and ``dim``."""
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd or 0,
                              "RESIDENT": bd is None}, num_warps=w, num_stages=s)
               for bm, bn, bd, w, s in ts._CUDA_CONFIGS]
    named = _Named(D=dim, x_ptr=_Like(2 if precision == "bf16" else 4))
    dot = "ieee" if precision == "fp32" else "tf32"
    return [{**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
            for c in ts._prune_configs(configs, named, DOT_PRECISION=dot)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--dim", type=int, nargs="+", default=[16, 256])
    parser.add_argument("--quick", action="store_true",
                        help="one configuration per mode: the smallest tiles")
    parser.add_argument("--json", type=Path,
                        default=Path("benchmarks/results/triton_compile.json"))
    args = parser.parse_args()
    if ts.INTERPRETED:
        raise SystemExit("unset TRITON_INTERPRET: this script compiles the kernels for CUDA")

    rows = []
    for arch in args.arch:
        for dim in args.dim:
            for precision in ts.PRECISIONS:
                configs = search_configs(precision, dim)
                if args.quick:
                    configs = [min(configs, key=lambda c: c["BLOCK_M"] * c["BLOCK_N"]
                                   * c["BLOCK_D"])]
                for config in configs:
                    source = search_kernel_source(precision, dim, config)
                    row = {"arch": arch, "dim": dim, "precision": precision, "kernel": "search",
                           "config": config}
                    try:
                        row.update(compile_source(source, arch, config["num_warps"],
                                                  config["num_stages"]))
                    except Exception as error:  # report and go on: one config may not fit
                        row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
                    rows.append(row)
                    print(f"sm_{arch} D={dim} {precision} {config}: "
                          f"{row.get('error') or 'ok'}", file=sys.stderr)
                helpers = [("prepare", prepare_kernel_source(precision, dim))]
                if precision != "fp32":
                    helpers.append(("recheck", recheck_kernel_source(precision, dim)))
                for name, source in helpers:
                    row = {"arch": arch, "dim": dim, "precision": precision, "kernel": name,
                           "config": {}}
                    try:
                        row.update(compile_source(source, arch))
                    except Exception as error:
                        row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
                    rows.append(row)

    def describe(config: dict) -> str:
        if not config:
            return "-"
        d = "all" if config["RESIDENT"] else config["BLOCK_D"]
        return (f"{config['BLOCK_M']}×{config['BLOCK_N']}, D {d}, "
                f"w{config['num_warps']} s{config['num_stages']}")

    print(f"\nTriton {triton.__version__}: kernels compiled ahead of time (no GPU needed)\n")
    print_markdown([["arch", "D", "mode", "kernel", "tiles", "shared KiB", "registers",
                     "spill bytes", "compile s"]] + [
        [f"sm_{r['arch']}", str(r["dim"]), r["precision"], r["kernel"], describe(r["config"]),
         f"{r['shared_bytes'] / 1024:.0f}" if "shared_bytes" in r else "error",
         str(r.get("registers", "-")), str(r.get("spill_store_bytes", "-")),
         f"{r['compile_s']:.1f}" if "compile_s" in r else r.get("error", "")[:60]]
        for r in rows])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"triton": triton.__version__, "rows": rows}, indent=2))
    print(f"\nwrote {args.json}")
    if any("error" in r for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
