"""``benchmarks/gpu.py --dry-run``: the GPU benchmark's every section runs on CPU.

The GPU run is rare and short (one try, a few minutes of device time), so a syntax or logic
error found there wastes it. The dry run takes the same code paths on tiny shapes, with the
Triton kernels interpreted; its numbers mean nothing, its JSON must be complete.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.slow
def test_dry_run_writes_every_section(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--dry-run"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert result["dry_run"] and result["environment"]["device"] == "cpu"
    assert result["errors"] == [] and result["skipped"] == []

    assert len(result["search"]) == 3
    for row in result["search"]:
        assert {"chunked fp32", "fused fp32", "fused tf32", "fused bf16"} <= set(row["median_ms"])
    layers = {"ours fp32", "ours tf32", "ours bf16", "ours chunked", "library", "course cdist",
              "plain matmul"}
    for row in result["layer"]:
        assert set(row["median_ms"]) == layers
        assert row["ratio_to_library"]["library"] == pytest.approx(1.0)
    assert {m["layer"] for m in result["memory"]} == layers - {"course cdist", "plain matmul"}
    assert {r["variant"] for r in result["epoch"]["rows"]} == {
        "no quantizer", "ours", "ours, bf16 autocast", "ours, chunked search",
        "ours, bf16 autocast, compiled", "library",
        "library, bf16 autocast"}

    compiled = {r["quantizer"]: r for r in result["compiled"]["rows"]}
    assert set(compiled) == {"ours", "simvq", "fsq", "lucidrains"}
    for row in compiled.values():
        assert row["eager_ms"] > 0 and row["compiled_ms"] > 0 and row["compile_s"] is not None
    # SimVQ and FSQ compile as one graph; the library's code cannot be traced into one
    assert compiled["simvq"]["graph"] == compiled["fsq"]["graph"] == "whole"
    assert compiled["lucidrains"]["graph"] == "parts" and compiled["lucidrains"]["fallback_reason"]

    fused = [a for a in result["agreement"] if a["method"].startswith("fused")]
    assert len(fused) == 6  # three precisions, two data sets
    assert all(a["disagree_fp64"] == 0 for a in fused)
    code_bars = [b for b in result["bars"] if b["bar"].startswith("codes")]
    assert len(code_bars) == 6 and all(b["met"] for b in code_bars)

    tables = (tmp_path / "gpu.md").read_text()
    assert "eager against compiled" in tables
    assert "Forward + backward" in tables and "Forward + backward" in run.stdout
