"""The Triton kernels compile for a real GPU target, checked without a GPU.

The interpreter tests (``test_triton_search.py``) run the kernels as Python, which accepts code
the GPU compiler rejects (a non-constexpr global, an unsupported dot) and knows nothing of
registers or shared memory. Here ``benchmarks/triton_compile.py --quick`` compiles every kernel
ahead of time for sm_90 (H100), in one configuration per mode, in a fresh process: Triton picks
interpreter or compiler when it is imported, and this test session's Triton is interpreted.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed")

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    out = tmp_path / "compile.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "triton_compile.py"),
                          "--arch", "90", "--dim", "256", "--quick", "--json", str(out)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    kernels = {(r["precision"], r["kernel"]) for r in rows}
    assert kernels == {("fp32", "search"), ("tf32", "search"), ("bf16", "search"),
                       ("fp32", "prepare"), ("tf32", "prepare"), ("tf32", "recheck"),
                       ("bf16", "prepare"), ("bf16", "recheck")}
    for row in rows:
        assert "error" not in row, row
        assert row["shared_bytes"] <= 228 * 1024, row  # an H100 block's shared memory
        assert row["spill_store_bytes"] == 0, row
        assert row["registers"] <= 255, row


def test_configs_are_pruned_to_fit():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("triton_compile",
                                                      ROOT / "benchmarks" / "triton_compile.py")
        script = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(script)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    for precision in ("fp32", "tf32", "bf16"):
        configs = script.search_configs(precision, 256)
        assert len(configs) >= 3
        for config in configs:
            if precision == "fp32":  # IEEE dots spill with wide D steps
                assert not config["RESIDENT"] and config["BLOCK_D"] <= 32
            element = 2 if precision == "bf16" else 4
            x_tile = config["BLOCK_M"] * config["BLOCK_D"] * element
            c_tile = config["BLOCK_N"] * config["BLOCK_D"] * element
            shared = x_tile + config["num_stages"] * c_tile if config["RESIDENT"] \
                else config["num_stages"] * (x_tile + c_tile)
            assert shared <= 200 * 1024 or config["num_stages"] == 1
    # D = 16: every configuration's D step is 16, and duplicates are merged
    small = script.search_configs("tf32", 16)
    assert all(c["BLOCK_D"] == 16 for c in small)
    assert len({tuple(sorted(c.items())) for c in small}) == len(small)
