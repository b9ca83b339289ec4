"""Fused nearest-code search with Triton: distances tile by tile, never the N×K matrix.

:func:`vqvae.quantizers.search.nearest_code` sends CUDA tensors here when Triton is installed.
This module imports Triton at the top, so it is only ever imported lazily, by that dispatch;
without Triton the package works on the chunked ``addmm`` path.

One program of :func:`_search_kernel` owns a block of ``BLOCK_M`` rows of ``x`` and walks the
codebook in tiles of ``BLOCK_N`` codes. For each tile it computes ``||c||² - 2 x·cᵀ`` with
``tl.dot`` (float32 accumulation) and folds the tile into a per-row running result, so the
distance matrix only ever exists as one ``(BLOCK_M, BLOCK_N)`` tile in registers.

Precision modes (the ``precision`` argument):

``"fp32"``
    IEEE float32 products and sums (no tensor-core shortcut) on inputs centred on the codebook
    mean (see below). The running result is the minimum and its index; ties go to the lowest
    index, like ``torch.argmin``.
``"tf32"``, ``"bf16"``
    Inputs rounded to TF32 (10 explicit mantissa bits, unit roundoff u = 2^-11) or bfloat16
    (7 bits, u = 2^-8) for the tensor cores, products accumulated in float32. The kernel keeps
    the ``SLOTS`` smallest approximate scores of each row (4 for TF32, 8 for bf16), with their
    indices. A re-check then returns exactly the code the float32 search would return (up to
    ties within float32 rounding):

    1. An a-priori bound ``E_k = α·‖x‖·‖c_k‖ + β·‖c_k‖² + τ·(1+‖x‖)(1+‖c_k‖)`` on
       ``|approximate score - exact score|`` (see :func:`error_bound`).
    2. ``U = min_k (approx_k + E_k)`` over the kept codes bounds the best exact score from
       above. Every code outside the kept set scores at least the largest kept value (the
       *guard*) approximately, so if ``guard - E_max > U`` none of them can be the nearest.
    3. Of the kept codes, those with ``approx_k - E_k <= U`` may be the nearest. When one is
       left, it is the answer; otherwise :func:`_recheck_kernel` computes ``Σ (x - c)²`` in
       float32 for those few and takes the smallest (lowest index on ties).
    4. Rows where the guard is inside the bound (more near-ties than slots) are searched again
       one precision up: bf16 → tf32 → fp32.

    Both ``x`` and the codebook are centred on the codebook mean first (in every mode). The
    argmin does not change, and rounding errors scale with ``‖x - μ‖·‖c - μ‖`` instead of
    ``‖x‖·‖c‖``: for data far from the origin, ``||c||²`` and ``2 x·c`` nearly cancel, and
    uncentred even float32 loses the distances (the chunked ``addmm`` path does), while the
    bound would send every row to the fallback.

    The rounding to TF32 is done explicitly (round to nearest even) before the kernel, so the
    kernel's inputs are exactly representable and the tensor cores multiply them exactly. This
    also makes the interpreter (``TRITON_INTERPRET=1``, CPU) compute the same approximate
    scores as the GPU, up to the order of float32 sums, which the bound covers.

Small problems (fewer than :data:`APPROX_MIN_MACS` multiply-adds) always use the fp32 kernel:
there the fixed cost of rounding, re-check and the fallback's host sync outweighs the savings.
"""

from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

PRECISIONS = ("fp32", "tf32", "bf16")

#: Unit roundoff of the rounded kernel inputs (round to nearest even).
UNIT_ROUNDOFF = {"fp32": 0.0, "tf32": 2.0**-11, "bf16": 2.0**-8}

#: Candidates kept per row by the approximate kernel. In a CPU simulation (float64 scores from
#: rounded inputs, N(0, 1) data, D = 256, 8192 codes) the guard falls inside the bound for
#: 0.03 % of rows with 4 TF32 slots, and for 2 % with 8 bf16 slots (22 % with 4); those rows
#: are searched again one precision up.
SLOTS = {"tf32": 4, "bf16": 8}

#: Float32 mantissa bits dropped when rounding the kernel inputs.
_DROP_BITS = {"fp32": 0, "tf32": 13, "bf16": 16}

#: Where a row whose candidates cannot be settled is searched next.
NEXT_PRECISION = {"bf16": "tf32", "tf32": "fp32"}

#: Below this many multiply-adds (N·K·D) the approximate modes run the exact fp32 kernel. A
#: guess from launch counts (about 20 small launches and one host sync against a float32
#: kernel at ~30 TFLOP/s); ``benchmarks/gpu.py`` times both sides of it.
APPROX_MIN_MACS = 2**32

_INT32_MAX = 2**31 - 1
_BIG = tl.constexpr(_INT32_MAX)  # the kernels may only read globals that are constexpr


# ---------------------------------------------------------------------------- kernels


@triton.jit
def _prepare_kernel(src_ptr, center_ptr, dst_ptr, sq_ptr, M, D,
                    DROP_BITS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """``dst = round(src - center)`` row by row, and ``sq = ||src - center||²`` (unrounded).

    The rounding drops ``DROP_BITS`` of the 23 float32 mantissa bits, to nearest even (13 gives
    TF32 in a float32 ``dst``, 16 gives bfloat16 in a bfloat16 ``dst``). It is done on the bits
    rather than by a cast, so that the interpreter, whose float32 → bfloat16 cast truncates and
    flushes subnormals, rounds exactly like the GPU.
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < M
    row_off = rows.to(tl.int64)[:, None] * D
    offs_d = tl.arange(0, BLOCK_D)
    sq = tl.zeros((BLOCK_R,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        ok = row_ok[:, None] & (dd < D)[None, :]
        v = tl.load(src_ptr + row_off + dd[None, :], mask=ok, other=0.0)
        v = v - tl.load(center_ptr + dd, mask=dd < D, other=0.0)[None, :]
        v = tl.where(ok, v, 0.0)
        sq += tl.sum(v * v, axis=1)
        if DROP_BITS > 0:
            # Inf passes unchanged and NaN becomes the canonical quiet NaN; a carry out of the
            # mantissa correctly bumps the exponent (up to Inf past the largest finite value).
            bits = v.to(tl.int32, bitcast=True)
            half = (1 << (DROP_BITS - 1)) - 1
            rounded = (bits + half + ((bits >> DROP_BITS) & 1)) & -(1 << DROP_BITS)
            special = (bits & 0x7F800000) == 0x7F800000
            bits = tl.where(special, tl.where(v != v, 0x7FC00000, bits), rounded)
            if DROP_BITS == 16:
                # the top half is the bfloat16 (a cast would flush subnormals in the interpreter)
                out = (bits >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
            else:
                out = bits.to(tl.float32, bitcast=True)
        else:
            out = v
        tl.store(dst_ptr + row_off + dd[None, :], out, mask=ok)
    tl.store(sq_ptr + rows, sq, mask=row_ok)


@triton.jit(do_not_specialize=["N", "SIZE_CLASS"])
def _search_kernel(x_ptr, c_ptr, c_sq_ptr, out_v_ptr, out_i_ptr, N, K, D, SIZE_CLASS,
                   SLOTS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   RESIDENT: tl.constexpr, UPCAST: tl.constexpr):
    """Per row of ``x``: the ``SLOTS`` smallest ``c_sq - 2 x·c`` (values and indices).

    ``SLOTS == 1`` keeps only the index of the minimum. ``RESIDENT`` loads the row block of
    ``x`` once (``BLOCK_D >= D``); otherwise each code tile loops over ``D`` in chunks.
    ``UPCAST`` converts bfloat16 tiles to float32 before ``tl.dot`` (exactly): the interpreter's
    dot cannot multiply bfloat16. ``SIZE_CLASS`` is unused by the kernel: it is part of the
    autotuner's key, so that tiles tuned for a few hundred rows are not reused for a million.
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * D
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    if RESIDENT:
        x_blk = tl.load(x_rows + offs_d[None, :], mask=row_ok[:, None] & (offs_d < D)[None, :],
                        other=0.0)  # (BLOCK_M, BLOCK_D)
        if UPCAST:
            x_blk = x_blk.to(tl.float32)

    # SLOTS == 1: running minimum and its index
    best_v = tl.full((BLOCK_M,), float("inf"), tl.float32)
    best_i = tl.zeros((BLOCK_M,), tl.int32)
    # SLOTS > 1: an unordered set of the SLOTS smallest (value, index) pairs, and the position of
    # its largest pair (the one an insertion replaces). Sentinels: value inf, index K + slot.
    slots = tl.arange(0, SLOTS)
    set_v = tl.full((BLOCK_M, SLOTS), float("inf"), tl.float32)
    set_i = K + tl.zeros((BLOCK_M, SLOTS), tl.int32) + slots[None, :]
    worst_v = tl.full((BLOCK_M,), float("inf"), tl.float32)
    worst_pos = tl.full((BLOCK_M,), SLOTS - 1, tl.int32)

    for n0 in range(0, K, BLOCK_N):
        cols = n0 + offs_n
        col_ok = cols < K
        c_rows = c_ptr + cols.to(tl.int64)[:, None] * D
        if RESIDENT:
            c_blk = tl.load(c_rows + offs_d[None, :], mask=col_ok[:, None] & (offs_d < D)[None, :],
                            other=0.0)  # (BLOCK_N, BLOCK_D)
            if UPCAST:
                c_blk = c_blk.to(tl.float32)
            acc = tl.dot(x_blk, tl.trans(c_blk), input_precision=DOT_PRECISION)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + offs_d
                a = tl.load(x_rows + dd[None, :], mask=row_ok[:, None] & (dd < D)[None, :],
                            other=0.0)
                b = tl.load(c_rows + dd[None, :], mask=col_ok[:, None] & (dd < D)[None, :],
                            other=0.0)
                if UPCAST:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)
        c_sq = tl.load(c_sq_ptr + cols, mask=col_ok, other=float("inf"))
        s = c_sq[None, :] - 2.0 * acc  # (BLOCK_M, BLOCK_N); inf beyond the codebook

        m = tl.min(s, axis=1)
        if SLOTS == 1:
            # lowest column holding the minimum; strict < keeps earlier tiles on ties
            idx = tl.min(tl.where(s == m[:, None], cols[None, :], _BIG), axis=1)
            better = m < best_v
            best_v = tl.where(better, m, best_v)
            best_i = tl.where(better, idx, best_i)
        else:
            # Take the tile's smallest values one at a time while any row still has one below
            # its worst kept value. Pairs arrive in (value, index) order (columns increase from
            # tile to tile, and within a tile equal values leave lowest column first), so a strict
            # < keeps the lowest indices on ties. After the first tiles most rows insert nothing,
            # and the loop runs once or twice per tile.
            pending = tl.max((m < worst_v).to(tl.int32), axis=0)
            while pending > 0:
                idx = tl.min(tl.where(s == m[:, None], cols[None, :], _BIG), axis=1)
                hit = (slots[None, :] == worst_pos[:, None]) & (m < worst_v)[:, None]
                set_v = tl.where(hit, m[:, None], set_v)
                set_i = tl.where(hit, idx[:, None], set_i)
                # the new worst pair: largest value, then largest index
                worst_v = tl.max(set_v, axis=1)
                is_worst = set_v == worst_v[:, None]
                worst_i = tl.max(tl.where(is_worst, set_i, -1), axis=1)
                worst_pos = tl.max(
                    tl.where(is_worst & (set_i == worst_i[:, None]), slots[None, :], -1), axis=1)
                s = tl.where(cols[None, :] == idx[:, None], float("inf"), s)
                m = tl.min(s, axis=1)
                pending = tl.max((m < worst_v).to(tl.int32), axis=0)

    if SLOTS == 1:
        tl.store(out_i_ptr + rows, best_i, mask=row_ok)
    else:
        out = rows.to(tl.int64)[:, None] * SLOTS + slots[None, :]
        tl.store(out_v_ptr + out, set_v, mask=row_ok[:, None])
        tl.store(out_i_ptr + out, set_i, mask=row_ok[:, None])


@triton.jit(do_not_specialize=["N"])
def _recheck_kernel(x_ptr, c_ptr, cand_ptr, keep_ptr, out_ptr, N, D,
                    SLOTS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per row, the kept candidate with the smallest float32 ``Σ (x - c)²``; lowest index on ties.

    Rows without a kept candidate (or with only NaN distances) get ``2**31 - 1``.
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * D
    offs_d = tl.arange(0, BLOCK_D)
    best_d = tl.full((BLOCK_R,), float("inf"), tl.float32)
    best_i = tl.full((BLOCK_R,), _BIG, tl.int32)
    for j in range(SLOTS):  # not unrolled: 8 unrolled slots spill registers
        slot = rows.to(tl.int64) * SLOTS + j
        cand = tl.load(cand_ptr + slot, mask=row_ok, other=0)
        keep = tl.load(keep_ptr + slot, mask=row_ok, other=0) != 0
        c_rows = c_ptr + cand.to(tl.int64)[:, None] * D
        dist = tl.zeros((BLOCK_R,), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            ok = keep[:, None] & (dd < D)[None, :]
            diff = tl.load(x_rows + dd[None, :], mask=ok, other=0.0) \
                - tl.load(c_rows + dd[None, :], mask=ok, other=0.0)
            dist += tl.sum(diff * diff, axis=1)
        better = keep & ((dist < best_d) | ((dist == best_d) & (cand < best_i)))
        best_d = tl.where(better, dist, best_d)
        best_i = tl.where(better, cand, best_i)
    tl.store(out_ptr + rows, best_i, mask=row_ok)


#: Whether the kernels were defined for Triton's interpreter (CPU tensors, no GPU needed): the
#: ``triton.jit`` decorator reads ``TRITON_INTERPRET`` when this module is imported.
INTERPRETED = type(_search_kernel).__name__ == "InterpretedFunction"


# ---------------------------------------------------------------------------- tile configs

# (BLOCK_M, BLOCK_N, BLOCK_D or None for "all of D", num_warps, num_stages). Guesses in the
# shape of Triton's matmul and attention tutorials, checked offline for shared memory and
# register spills with benchmarks/triton_compile.py; the autotuner picks per (D, mode, dtype).
_CUDA_CONFIGS = [
    (128, 64, None, 8, 2),
    (64, 64, None, 4, 3),
    (128, 128, 32, 8, 3),
    (64, 128, 64, 4, 3),
    (128, 64, 64, 8, 3),
    (64, 64, 32, 4, 3),
]
_SHARED_MEMORY_BUDGET = 200 * 1024
# IEEE float32 dots are FMA loops holding both operand tiles in registers: with more than 32
# columns of D per step they spill tens of kilobytes (sm_80 and sm_90, D = 256).
_IEEE_MAX_BLOCK_D = 32


def _block_d(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))


def _prune_configs(configs, named_args, **kwargs):
    """Fix ``BLOCK_D`` from ``D`` and drop configurations that would overflow shared memory
    (by lowering ``num_stages``) or spill (IEEE dots with wide ``BLOCK_D``)."""
    dim = named_args["D"]
    itemsize = named_args["x_ptr"].element_size()
    ieee = kwargs.get("DOT_PRECISION") == "ieee"
    kept, seen = [], set()
    for config in configs:
        bm, bn = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
        resident = config.kwargs["RESIDENT"]
        bd = _block_d(dim) if resident else min(config.kwargs["BLOCK_D"], _block_d(dim))
        if ieee and bd > _IEEE_MAX_BLOCK_D:
            if resident:
                continue
            bd = _IEEE_MAX_BLOCK_D
        stages = config.num_stages
        while stages > 1:
            per_stage = (bn if resident else bm + bn) * bd * itemsize
            fixed = bm * bd * itemsize if resident else 0
            if fixed + stages * per_stage <= _SHARED_MEMORY_BUDGET:
                break
            stages -= 1
        key = (bm, bn, bd, resident, config.num_warps, stages)
        if key in seen:
            continue
        seen.add(key)
        kept.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd,
                                   "RESIDENT": resident},
                                  num_warps=config.num_warps, num_stages=stages))
    return kept


@functools.cache
def _tuned_search_kernel():
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd or 0,
                              "RESIDENT": bd is None}, num_warps=warps, num_stages=stages)
               for bm, bn, bd, warps, stages in _CUDA_CONFIGS]
    options = {"configs": configs, "key": ["D", "SLOTS", "DOT_PRECISION", "SIZE_CLASS"],
               "prune_configs_by": {"early_config_prune": _prune_configs}}

    def bench(fn, quantiles):  # short: tuning happens once per key, inside the first call
        return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)

    try:
        return triton.autotune(do_bench=bench, **options)(_search_kernel)
    except TypeError:  # Triton before 3.2 has no do_bench argument
        return triton.autotune(warmup=5, rep=20, **options)(_search_kernel)


def _interpreter_config(dim: int) -> dict:
    """Small tiles for the interpreter: few numpy calls, and tails are exercised by tests."""
    bd = _block_d(dim)
    return {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_D": min(bd, 32), "RESIDENT": bd <= 32}


def size_class(rows: int, codes: int) -> int:
    """Coarse problem size for the autotuner's key: factors of 4 in rows and in codes."""
    return (max(rows, 1).bit_length() // 2) * 64 + max(codes, 1).bit_length() // 2


def best_config(precision: str, dim: int) -> list[dict]:
    """What the autotuner chose for this mode and ``dim``, per size class it has seen (CUDA)."""
    if INTERPRETED:
        return []
    tuner = _tuned_search_kernel()
    slots = SLOTS.get(precision, 1)
    dot = "ieee" if precision == "fp32" else "tf32"
    return [{"size_class": key[3], **config.kwargs, "num_warps": config.num_warps,
             "num_stages": config.num_stages}
            for key, config in getattr(tuner, "cache", {}).items()
            if tuple(key[:3]) == (dim, slots, dot)]


# ---------------------------------------------------------------------------- launches


def _launch_options() -> dict:
    # Fused multiply-adds are fine for the bound (one rounding instead of two); saying so
    # explicitly keeps Triton 3.9 from warning that its default will change.
    return {} if INTERPRETED else {"enable_fp_fusion": True}


def _check_device(t: Tensor) -> None:
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and INTERPRETED:
        return
    if t.device.type == "cpu":
        raise RuntimeError(
            "the Triton search runs CPU tensors only in Triton's interpreter: set "
            "TRITON_INTERPRET=1 before vqvae.quantizers.triton_search is first imported")
    raise RuntimeError(f"the Triton search needs CUDA tensors, got device {t.device}")


def _device_guard(t: Tensor):
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def _launch_search(x: Tensor, codebook: Tensor, c_sq: Tensor, slots: int, dot_precision: str,
                   config: dict | None) -> tuple[Tensor | None, Tensor]:
    n, dim = x.shape
    k = codebook.shape[0]
    out_i = torch.empty((n, slots) if slots > 1 else (n,), dtype=torch.int32, device=x.device)
    out_v = torch.empty((n, slots), dtype=torch.float32, device=x.device) if slots > 1 \
        else out_i  # unused by the kernel when slots == 1
    args = (x, codebook, c_sq, out_v, out_i, n, k, dim, size_class(n, k))
    meta = {"SLOTS": slots, "DOT_PRECISION": dot_precision,
            "UPCAST": INTERPRETED and x.dtype == torch.bfloat16}
    if config is None and INTERPRETED:
        config = _interpreter_config(dim)
    if config is not None:
        config = dict(config)
        options = {key: config.pop(key) for key in ("num_warps", "num_stages") if key in config}
        grid = (triton.cdiv(n, config["BLOCK_M"]),)
        _search_kernel[grid](*args, **meta, **config, **options, **_launch_options())
    else:
        kernel = _tuned_search_kernel()
        kernel[lambda meta_: (triton.cdiv(n, meta_["BLOCK_M"]),)](*args, **meta,
                                                                  **_launch_options())
    return (out_v if slots > 1 else None), out_i


def prepare(rows: Tensor, center: Tensor, precision: str) -> tuple[Tensor, Tensor]:
    """``(round(rows - center), ||rows - center||²)``: the kernel input and float32 norms².

    ``precision`` ``"tf32"`` rounds to TF32 (kept in a float32 tensor), ``"bf16"`` casts to
    bfloat16, ``"fp32"`` only centres. The squared norms are of the unrounded centred rows.
    """
    m, dim = rows.shape
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    out = torch.empty((m, dim), dtype=dtype, device=rows.device)
    sq = torch.empty(m, dtype=torch.float32, device=rows.device)
    block_r = 32
    _prepare_kernel[(triton.cdiv(m, block_r),)](
        rows, center, out, sq, m, dim, DROP_BITS=_DROP_BITS[precision], BLOCK_R=block_r,
        BLOCK_D=min(64, _block_d(dim)), **_launch_options())
    return out, sq


def _recheck(x: Tensor, codebook: Tensor, candidates: Tensor, keep: Tensor) -> Tensor:
    n, dim = x.shape
    out = torch.empty(n, dtype=torch.int32, device=x.device)
    block_r = 32
    _recheck_kernel[(triton.cdiv(n, block_r),)](
        x, codebook, candidates, keep.view(torch.uint8), out, n, dim,
        SLOTS=candidates.shape[1], BLOCK_R=block_r, BLOCK_D=min(64, _block_d(dim)),
        **_launch_options())
    return out


# ---------------------------------------------------------------------------- error bound


class ErrorBound(NamedTuple):
    """``|approx_k - s_k| <= alpha·a·b + beta·b² + tau·(1 + a)(1 + b)``, ``a = ‖x-μ‖, b = ‖c_k-μ‖``.

    ``s_k = ‖c_k-μ‖² - 2 (x-μ)·(c_k-μ)`` is the exact centred score (``‖x - c_k‖²`` less a row
    constant) and ``approx_k`` the kernel's float32 value from rounded inputs.
    """

    alpha: float
    beta: float
    tau: float


def error_bound(precision: str, dim: int) -> ErrorBound:
    """A-priori bound on the score error of the approximate modes (see :class:`ErrorBound`).

    Sources, for ``a = ‖x-μ‖`` and ``b = ‖c_k-μ‖``, float32 unit roundoff ``2^-24``:

    - inputs: the centring subtraction (``2^-24``) then rounding to TF32/bf16 (``u``) give
      relative errors below ``u' = u + 2^-23`` per element, so the dot product is off by at
      most ``(2u' + u'²) Σ|x_i c_i| <= (2u' + u'²)·a·b`` (Cauchy-Schwarz); the score doubles it.
    - the float32 sum of ``dim`` exact products, in any order: ``γ·Σ|x̃_i c̃_i|`` with
      ``γ = n·2^-23 / (1 - n·2^-23)``, ``n = dim + 2``, twice the textbook unit, to cover
      accumulators that truncate instead of rounding (tensor cores).
    - ``‖c-μ‖²`` in float32 (``γ·b²``) and the last subtraction (``2^-24`` of its operands).
    - the norms ``a``, ``b`` are float32 results themselves: everything is inflated by
      ``1 + 2γ``.
    - underflow and flushed subnormals: an absolute ``τ = dim·2^-120`` per unit of norm, far
      above the worst case ``dim·2^-126``-ish and far below anything that matters.
    """
    if precision not in SLOTS:
        raise ValueError(f"no error bound for precision {precision!r}: use 'tf32' or 'bf16'")
    u = UNIT_ROUNDOFF[precision] + 2.0**-23
    n = dim + 2
    gamma = n * 2.0**-23 / (1 - n * 2.0**-23)
    alpha = 2 * (2 * u + u * u) + 2 * gamma * (1 + u) ** 2 + 2.0**-22 * (1 + u) ** 2
    beta = gamma + 2.0**-22
    inflate = 1 + 2 * gamma
    return ErrorBound(alpha * inflate, beta * inflate, dim * 2.0**-120)


class Candidates(NamedTuple):
    """The approximate kernel's output for each row, and what the bound needs."""

    values: Tensor  # (N, SLOTS) float32 approximate centred scores, unordered
    indices: Tensor  # (N, SLOTS) int32; >= K where the codebook has fewer than SLOTS codes
    x_norm: Tensor  # (N,) ‖x - μ‖
    code_norm: Tensor  # (K,) ‖c - μ‖


def candidates(x: Tensor, codebook: Tensor, precision: str, *,
               config: dict | None = None) -> Candidates:
    """Run the approximate kernel: the ``SLOTS[precision]`` best codes of each row."""
    center = codebook.mean(0)  # (D,)
    xq, x_sq = prepare(x, center, precision)
    cq, c_sq = prepare(codebook, center, precision)
    values, indices = _launch_search(xq, cq, c_sq, SLOTS[precision], "tf32", config)
    return Candidates(values, indices, x_sq.sqrt(), c_sq.sqrt())


# ---------------------------------------------------------------------------- search


def _check_inputs(x: Tensor, codebook: Tensor, precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if x.ndim != 2 or codebook.ndim != 2 or x.shape[1] != codebook.shape[1]:
        raise ValueError(f"expected x (N, D) and codebook (K, D), got shapes {tuple(x.shape)} "
                         f"and {tuple(codebook.shape)}")
    if codebook.shape[0] == 0:
        raise ValueError("the codebook is empty")
    if codebook.shape[0] >= _INT32_MAX - 16:
        raise ValueError(f"codebook of {codebook.shape[0]} codes: indices must fit in int32")
    if x.device != codebook.device:
        raise ValueError(f"x is on {x.device} and the codebook on {codebook.device}")
    for name, t in (("x", x), ("codebook", codebook)):
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"{name} must be float16, bfloat16 or float32 for the Triton search, "
                             f"got {t.dtype}")
    _check_device(x)


def _count(stats: dict | None, key: str, mask_or_count) -> None:
    if stats is not None:
        value = mask_or_count if isinstance(mask_or_count, int) else int(mask_or_count.sum())
        stats[key] = stats.get(key, 0) + value


@torch.no_grad()
def nearest_code(x: Tensor, codebook: Tensor, *, precision: str = "tf32",
                 min_approx_macs: int | None = None, stats: dict | None = None,
                 config: dict | None = None) -> Tensor:
    """``(N,)`` int64 index of the nearest codebook row for each row of ``x``, fused on the GPU.

    Args:
        x: ``(N, D)``, float16/bfloat16/float32 (computed in float32).
        codebook: ``(K, D)``, same device.
        precision: ``"fp32"``, ``"tf32"`` or ``"bf16"`` (see the module docstring). Every mode
            returns the float32 answer up to float32 near-ties.
        min_approx_macs: problems with fewer multiply-adds ``N·K·D`` use the fp32 kernel.
            Default: :data:`APPROX_MIN_MACS` (read at call time).
        stats: if a dict, counts of rows (``"<mode>_rows"``), of rows re-checked in float32
            (``"<mode>_rechecked"``) and of rows sent one precision up (``"<mode>_fallback"``)
            are added to it (this costs host syncs).
        config: fixed tile sizes (``BLOCK_M``, ``BLOCK_N``, ``BLOCK_D``, ``RESIDENT``, optional
            ``num_warps``/``num_stages``) instead of the autotuner's; for tests.
    """
    _check_inputs(x, codebook, precision)
    x = x.float().contiguous()
    codebook = codebook.float().contiguous()
    n, dim = x.shape
    if n == 0:
        return torch.empty(0, dtype=torch.long, device=x.device)
    if min_approx_macs is None:
        min_approx_macs = APPROX_MIN_MACS
    with _device_guard(x):
        if precision != "fp32" and n * codebook.shape[0] * dim < min_approx_macs:
            precision = "fp32"
        _count(stats, f"{precision}_rows", n)
        if precision == "fp32":
            # centred like the approximate modes: for data far from the origin ||c||² and
            # 2 x·c are large and nearly cancel, and float32 would lose the distances in them
            center = codebook.mean(0)  # (D,)
            xc, _ = prepare(x, center, "fp32")
            cc, c_sq = prepare(codebook, center, "fp32")
            return _launch_search(xc, cc, c_sq, 1, "ieee", config)[1].long()
        return _approximate(x, codebook, precision, min_approx_macs, stats, config)


def _approximate(x: Tensor, codebook: Tensor, precision: str, min_approx_macs: int,
                 stats: dict | None, config: dict | None) -> Tensor:
    k = codebook.shape[0]
    found = candidates(x, codebook, precision, config=config)
    values, indices = found.values, found.indices  # (N, S)
    alpha, beta, tau = error_bound(precision, x.shape[1])

    valid = indices < k
    code_norm = found.code_norm[torch.where(valid, indices, 0).long()]  # (N, S)
    x_norm = found.x_norm[:, None]  # (N, 1)
    err = (alpha * x_norm + beta * code_norm) * code_norm + tau * (1 + x_norm) * (1 + code_norm)
    upper = (values + err).amin(1)  # >= the exact score of the best kept code
    # Codes outside the set score >= guard approximately, so >= guard - err_out exactly
    guard = values.amax(1)
    b = found.code_norm.max()
    err_out = (alpha * found.x_norm + beta * b) * b + tau * (1 + found.x_norm) * (1 + b)
    complete = guard - err_out > upper  # (N,) False also for NaN
    possible = valid & (values - err <= upper[:, None])  # (N, S)
    count = possible.sum(1)

    # One possible code: it is the answer. Several: compare them in float32.
    result = indices.gather(1, possible.int().argmax(1, keepdim=True)).squeeze(1)
    several = complete & (count > 1)
    rechecked = _recheck(x, codebook, indices, possible & several[:, None])
    result = torch.where(several, rechecked, result)
    fallback = ~complete | (count == 0) | (result >= k)
    _count(stats, f"{precision}_rechecked", several)
    _count(stats, f"{precision}_fallback", fallback)

    rows = fallback.nonzero().squeeze(1)  # host sync: the only one
    if rows.numel():
        again = nearest_code(x[rows], codebook, precision=NEXT_PRECISION[precision],
                             min_approx_macs=min_approx_macs, stats=stats, config=config)
        result[rows] = again.to(result.dtype)
    return result.long()
