#!/usr/bin/env bash
# Every GPU bar of the fused nearest-code search in one run, and the training step eager against
# compiled (vqvae train --compile) (see benchmarks/gpu.py).
#
#     bash benchmarks/gpu.sh                        # from anywhere; results go to $OUT
#                                                   # (or benchmarks/results)
#     bash benchmarks/gpu.sh --sections compiled    # the compiled training step alone
#     bash benchmarks/gpu.sh --dry-run              # a CPU smoke run: tiny sizes
#     bash benchmarks/gpu.sh --device cpu --sections compiled --compiled-quantizers simvq,fsq
#
# Installs nothing: it needs a Python with a CUDA torch and Triton (CUDA torch wheels bring
# it); vector-quantize-pytorch is optional (without it the library's columns record the
# ImportError). Runs from the source tree (PYTHONPATH=src), so the project need not be
# installed. Extra arguments go to gpu.py (e.g. --sections search,agreement).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-benchmarks/results}"
export OUT
mkdir -p "$OUT"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"

{
    echo "== $(date -u +%FT%TZ) $(hostname)"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || true
    "$PYTHON" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1
    "$PYTHON" -c 'import triton; print("triton", triton.__version__)' 2>&1 || true
} | tee "$OUT/gpu_env.txt"

# gpu.py stops starting new cases after --budget-s (default 420 s); the timeout is a backstop.
timeout --signal=INT 560 "$PYTHON" benchmarks/gpu.py --out "$OUT" "$@" 2> >(tee "$OUT/gpu.log" >&2)
status=$?
echo "gpu.py exit status $status; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit $status
