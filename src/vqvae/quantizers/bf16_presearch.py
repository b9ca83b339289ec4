"""Nearest-code search on CPU by a bfloat16 pre-search and an exact float32 re-check.

On CPUs with native bfloat16 dot products (``avx512_bf16`` / ``amx_bf16``) torch's bfloat16
matmul runs about four times faster than the float32 one. The pre-search forms the distances
``d̃ = ||c||² - 2 x·c`` (less the row constant ``||x||²``) from bfloat16-rounded vectors in one
``addmm``, bounds their error per row, and keeps every code whose ``d̃`` lies within twice that
bound of the row's minimum: a superset of the codes that can be nearest in exact arithmetic
(and of those the float32 search can return, whose own rounding the bound also covers). A row
with one candidate has its answer; the others are re-checked in float32 over their candidates.

Error bound of row ``n`` over all codes (``u = 2⁻⁸`` the bfloat16 unit roundoff, ``x̃, c̃`` the
rounded vectors, ``γ = D·2⁻²⁴/(1 - D·2⁻²⁴)`` for float32 accumulation, ``s = x·c``)::

    |x̃·c̃ - x·c| ≤ ||x̃ - x||·max||c̃|| + ||x||·max||c̃ - c|| + γ·||x̃||·max||c̃||  =: a
    rounding ||c||² to bfloat16, 2·s to bfloat16 and the output:
        u·||c||² + 2u·|s̃| + u·|d̃|       (whatever order the matmul rounds in)

with the measured rounding errors (not their worst case). ``|s̃|`` of any code that can pass the
test is bounded from the row minimum and the extreme code norms (see ``_margin``), so the bound
is one number per row and the test is one compare over the ``(N, K)`` block.

Only used where :func:`usable` says so; elsewhere (AVX2-only CPUs, small searches, GPUs, other
dtypes) callers use the float32 search: on CPU, for vectors longer than the C kernel's and big
enough products, with the distance products through oneDNN (:func:`nearest_code_f32`).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from .onednn_linear import linear, routed
from .search import (
    ARGMIN_BLOCK,
    DEFAULT_BLOCK_BYTES,
    blockwise_argmin,
    nearest_code,
    search_defaults,
)
from .tracing import tracing

UNIT = 2.0 ** -8  # bfloat16 unit roundoff (8 significant bits, round to nearest)
# below this many distances the float32 search is as fast as the two-stage one
MIN_WORK = 1 << 18
# candidate pairs re-checked per gather (see _pair_dots): two buffers of PAIR_CHUNK vectors stay
# in L2; 256 rather than 64 saves the Python loop 3/4 of its turns (1900 pairs of 256-d
# vectors, BEST-RQ's 1024 x 1024 search: 4.3 ms against 4.9 ms for the whole search)
PAIR_CHUNK = 256
# up to the C kernel's widest vectors the float32 search is cheap and the bf16 error bound loose
# (a trained SimVQ codebook of 16-d codes: 135 ms through the two stages, 0.8 ms in float32)
MIN_DIM = 33
# more candidates than this per row on average: the re-check would cost more than the float32
# search, so the rows of that block are searched in float32 instead
MAX_CANDIDATES_PER_ROW = 8
# codes per tile of the candidate test (_tile_candidates): the tile minima are one SIMD-friendly
# amin, and a row's candidates fall in one or two tiles
TILE = 64


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU has bfloat16 dot-product instructions (and torch runs AVX-512 code)."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AVX512_BF16", "AMX"):
        return False
    try:
        with open("/proc/cpuinfo") as info:
            flags = info.read().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def usable(x: Tensor, codebook: Tensor) -> bool:
    """The two-stage search applies: float32 CPU inputs, a big enough search, native bf16, and
    not while ``torch.compile``/``torch.export`` traces (the candidate lists have data-dependent
    sizes, which one graph cannot hold)."""
    return (x.device.type == "cpu" and codebook.device.type == "cpu" and not tracing()
            and x.dtype == torch.float32 and codebook.dtype == torch.float32
            and x.ndim == 2 and x.shape[0] * codebook.shape[0] >= MIN_WORK
            and x.shape[1] >= MIN_DIM and native_bf16())


def _margin(x: Tensor, x16: Tensor, codebook: Tensor, c16: Tensor, code_sq: Tensor,
            low: Tensor) -> Tensor:
    """``(N,)``: a code is a candidate for row ``n`` when ``d̃ ≤ low + margin``."""
    dim = x.shape[1]
    gamma = dim * 2.0 ** -24 / (1 - dim * 2.0 ** -24)
    nx = torch.linalg.vector_norm(x, dim=-1)
    dx = torch.linalg.vector_norm(x16.float() - x, dim=-1)
    nc = float(torch.linalg.vector_norm(codebook, dim=-1).max())
    dc = float(torch.linalg.vector_norm(c16.float() - codebook, dim=-1).max())
    a = dx * (nc + dc) + nx * dc + gamma * (nx + dx) * (nc + dc)
    csq_max, csq_min = float(code_sq.max()), float(code_sq.min())
    u = UNIT / (1 - UNIT)  # |t - bf16(t)| ≤ u·|bf16(t)|
    # the error of one entry: e ≤ 2a + u·csq_max + 2u'|s̃| + u(csq_max + 2|s̃|) ≤ b + 4u|s̃|,
    # u' = u(1 + u) < 2u covering the rounding of s before it is doubled
    b = 2 * a + 2 * u * csq_max
    # a candidate passes d̃ ≤ low + e_min + e ≤ low + 2b + 8u·m, m bounding |s̃| there:
    # s̃ ≤ (csq_max - low)/2 (as low ≈ min d̃) and -s̃ ≤ (low + 2b + 8u·m - csq_min)/2
    low_exact = low + b + 4 * u * (csq_max + low.abs())  # covers low's own rounding
    m = torch.maximum((csq_max - low) / 2 + u * (csq_max + low.abs()),
                      (low_exact - csq_min + 2 * b) / (2 - 8 * u)).clamp_(min=0)
    return ((2 * b + 8 * u * m) * 1.01 + 1e-30).nan_to_num_(posinf=math.inf)


def _pair_dots(x: Tensor, codebook: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """``x[rows[i]]·codebook[cols[i]]`` in float32, gathered a few pairs at a time into two
    small reused buffers: about three times faster on CPU than gathering all pairs at once
    (which spills the caches and the allocator's free lists)."""
    chunk = PAIR_CHUNK
    out = x.new_empty(rows.shape[0])
    left, right = x.new_empty(chunk, x.shape[1]), x.new_empty(chunk, x.shape[1])
    for start in range(0, rows.shape[0], chunk):
        stop = min(start + chunk, rows.shape[0])
        n = stop - start
        torch.index_select(x, 0, rows[start:stop], out=left[:n])
        torch.index_select(codebook, 0, cols[start:stop], out=right[:n])
        torch.linalg.vecdot(left[:n], right[:n], out=out[start:stop])
    return out


def nearest_code_bf16(x: Tensor, codebook: Tensor, code_sq: Tensor | None = None) -> Tensor:
    """``(N,)`` int64 index of the nearest code of each row of float32 ``x`` ``(N, D)``: the
    float32 search's answer up to float32 near-ties (see the module docstring).
    ``code_sq``: ``||c||²`` per code if the caller has it."""
    if code_sq is None:
        code_sq = codebook.pow(2).sum(-1)
    x16, c16 = x.bfloat16(), codebook.bfloat16()
    approx = torch.addmm(code_sq.bfloat16(), x16, c16.t(), alpha=-2.0)  # (N, K) d̃ in bf16
    num_codes = codebook.shape[0]
    if num_codes % TILE:
        low = approx.amin(1).float()  # (a bf16 argmin costs more than the whole test below)
        threshold = low + _margin(x, x16, codebook, c16, code_sq, low)
        # compared in float32 (exact for bf16 values): faster than torch's bfloat16 compare
        candidates = approx.float() <= threshold.unsqueeze(1)
        if int(candidates.sum()) > MAX_CANDIDATES_PER_ROW * x.shape[0]:  # a loose bound
            return _float32_search(x, codebook)
        rows, cols = candidates.nonzero(as_tuple=True)  # row-major
    else:
        found = _tile_candidates(approx, x, x16, codebook, c16, code_sq)
        if found is None:
            return _float32_search(x, codebook)
        rows, cols = found
    out = torch.full((x.shape[0],), num_codes, dtype=torch.long)
    out.scatter_reduce_(0, rows, cols, "amin")  # the answer of the rows with one candidate
    # a row without candidates holds NaN (its distances compare false): give it an index in
    # range, as the float32 search does, so that the caller's finiteness check reports it
    out.clamp_(max=num_codes - 1)
    several = torch.bincount(rows, minlength=x.shape[0])[rows] > 1
    if not bool(several.any()):
        return out
    rows, cols = rows[several], cols[several]
    exact = code_sq[cols] - 2 * _pair_dots(x, codebook, rows, cols)
    best = torch.full((x.shape[0],), math.inf).scatter_reduce_(0, rows, exact, "amin")
    # the first code at the row's float32 minimum, as argmin picks among ties
    winner = torch.where(exact == best[rows], cols, num_codes)
    return out.index_fill_(0, rows, num_codes).scatter_reduce_(0, rows, winner, "amin")


def _tile_candidates(approx: Tensor, x: Tensor, x16: Tensor, codebook: Tensor, c16: Tensor,
                     code_sq: Tensor) -> tuple[Tensor, Tensor] | None:
    """The candidates ``(rows, cols)`` (row-major) of ``approx`` ``(N, K)``, ``K`` a multiple
    of ``TILE``, or None when there are more than ``MAX_CANDIDATES_PER_ROW`` per row.

    The same set as comparing every entry with the row's threshold, found from the minimum of
    each tile of ``TILE`` codes: only the tiles whose minimum passes (one or two per row,
    typically) are compared entry by entry. Three passes over the ``(N, K)`` block (a compare,
    a count and ``nonzero``, 1.4 ms per million entries here) become one ``amin``.
    """
    num_rows, num_codes = approx.shape
    per_row = num_codes // TILE
    tile_min = approx.view(num_rows, per_row, TILE).amin(-1).float()  # (N, K / TILE)
    low = tile_min.amin(1)
    threshold = low + _margin(x, x16, codebook, c16, code_sq, low)
    hot_rows, hot_tiles = (tile_min <= threshold.unsqueeze(1)).nonzero(as_tuple=True)
    if hot_rows.shape[0] > MAX_CANDIDATES_PER_ROW * num_rows:  # each holds a candidate
        return None
    tiles = approx.view(-1, TILE).index_select(0, hot_rows * per_row + hot_tiles)  # (H, TILE)
    passed = tiles.float() <= threshold.index_select(0, hot_rows).unsqueeze(1)
    which, within = passed.nonzero(as_tuple=True)
    if which.shape[0] > MAX_CANDIDATES_PER_ROW * num_rows:
        return None
    return hot_rows.index_select(0, which), hot_tiles.index_select(0, which) * TILE + within


def _float32_search(x: Tensor, codebook: Tensor) -> Tensor:
    """The float32 search, through oneDNN where that applies."""
    if _f32_routed(x, codebook):
        return nearest_code_f32(x, codebook)
    return nearest_code(x, codebook)


def nearest_code_f32(x: Tensor, codebook: Tensor, *,
                     max_block_bytes: int = DEFAULT_BLOCK_BYTES,
                     code_sq: Tensor | None = None) -> Tensor:
    """The float32 search of :func:`vqvae.quantizers.search.nearest_code` (``||c||² - 2 x·c``
    by row blocks, then the first minimum), its products through
    :func:`.onednn_linear.linear`: the same distances up to the last bits, at 2.2x MKL's speed
    on the AMD EPYC (about even held to AVX2)."""
    if code_sq is None:
        code_sq = codebook.pow(2).sum(-1)
    weight = codebook * -2.0  # exact: a power of two, so x·(-2c) = -2(x·c) bit for bit
    num_codes = codebook.shape[0]
    blockwise = num_codes % ARGMIN_BLOCK == 0 and num_codes >= 2 * ARGMIN_BLOCK
    row_argmin = blockwise_argmin if blockwise else (lambda d: d.argmin(dim=-1))
    step = max(1, max_block_bytes // (4 * num_codes))
    if step >= x.shape[0]:
        return row_argmin(linear(x, weight, code_sq))
    return torch.cat([row_argmin(linear(x[start:start + step], weight, code_sq))
                      for start in range(0, x.shape[0], step)])


def _f32_routed(x: Tensor, codebook: Tensor) -> bool:
    """The float32 search goes through oneDNN: float32 CPU vectors too long for the C
    kernel, and a product big enough (:func:`.onednn_linear.routed`)."""
    # tracing first: a traced size is symbolic, and comparing it would guard on it
    return (not tracing() and x.ndim == 2 and x.shape[1] >= MIN_DIM and x.shape[0] > 0
            and routed(x, codebook))


def nearest(x: Tensor, codebook: Tensor, *, max_block_bytes: int = DEFAULT_BLOCK_BYTES,
            code_sq: Tensor | None = None) -> Tensor:
    """:func:`vqvae.quantizers.search.nearest_code` with the same answer, through the two-stage
    search where it applies (:func:`usable`, and the search backend left at ``"auto"``), by row
    blocks whose bfloat16 distances stay under ``max_block_bytes``; elsewhere on CPU, the
    float32 search with oneDNN's products (:func:`nearest_code_f32`) where it applies."""
    auto = search_defaults()["backend"] == "auto" and not torch.is_autocast_enabled("cpu")
    if not (usable(x, codebook) and auto):
        if auto and _f32_routed(x, codebook):
            return nearest_code_f32(x, codebook, max_block_bytes=max_block_bytes,
                                    code_sq=code_sq)
        return nearest_code(x, codebook, max_block_bytes=max_block_bytes)
    if code_sq is None:
        code_sq = codebook.pow(2).sum(-1)
    step = max(1, max_block_bytes // (3 * codebook.shape[0]))  # bf16 distances + bool mask
    if step >= x.shape[0]:
        return nearest_code_bf16(x, codebook, code_sq)
    return torch.cat([nearest_code_bf16(x[start:start + step], codebook, code_sq)
                      for start in range(0, x.shape[0], step)])
