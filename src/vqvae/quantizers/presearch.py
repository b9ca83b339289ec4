"""The machinery the two-stage CPU searches share: candidates from approximate distances, their
exact float32 re-check, and the float32 search they fall back to.

A pre-search (:mod:`.bf16_presearch`, :mod:`.int8_presearch`) forms approximate distances
``d̃ = ||c||² - 2 x·c`` for every row and code in low precision, and a threshold per row above
which no code can be the nearest in exact arithmetic (nor the float32 search's answer). The
functions here turn that into indices:

- :func:`candidates`: the ``(row, code)`` pairs whose ``d̃`` passes the row's threshold, found
  tile by tile (:data:`TILE` codes, or another width) without comparing the whole ``(N, K)``
  block entry by entry, or None when there are too many to re-check;
- :func:`resolve`: the answer of rows with one candidate, and the first code at the float32
  minimum, as ``argmin`` picks among ties, for the others;
- :func:`float32_search`: the float32 search, through oneDNN where that applies.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from .onednn_linear import linear, routed
from .search import ARGMIN_BLOCK, DEFAULT_BLOCK_BYTES, blockwise_argmin, nearest_code
from .tracing import tracing

# below this many distances the float32 search is as fast as the two-stage one
MIN_WORK = 1 << 18
# up to the C kernel's widest vectors the float32 search is cheap and the pre-search's error
# bound loose (a trained SimVQ codebook of 16-d codes: 135 ms through the two stages, 0.8 ms in
# float32)
MIN_DIM = 33
# more candidates than this per row on average: the re-check would cost more than the float32
# search, so the rows of that block are searched in float32 instead
MAX_CANDIDATES_PER_ROW = 8
# codes per tile of the candidate test (candidates): the tile minima are one SIMD-friendly
# amin, and a row's candidates fall in one or two tiles
TILE = 64

#: ``threshold_of(approx, tile_min)``: the ``(N,)`` float32 threshold of each row, given the
#: approximate distances ``(N, K)`` and, when ``K`` is a multiple of the tile (:data:`TILE`
#: unless the caller says), the float32 minimum of each tile ``(N, K / tile)`` (else None)
Threshold = Callable[[Tensor, "Tensor | None"], Tensor]


def pair_dots(x: Tensor, codebook: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """``x[rows[i]]·codebook[cols[i]]`` in float32, ``rows`` sorted and ``cols`` increasing
    within a row (as ``nonzero`` lists them): torch's sampled matrix product, which reads the
    vectors in place. Gathering the pairs into buffers and taking their dot products cost six
    times as much (3900 pairs of 512-d vectors: 0.96 ms against 0.16 ms), nearly all of it
    copying."""
    starts = torch.zeros(x.shape[0] + 1, dtype=torch.long)
    torch.cumsum(torch.bincount(rows, minlength=x.shape[0]), 0, out=starts[1:])
    with warnings.catch_warnings():  # (torch says once that its CSR support is in beta)
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(starts, cols, x.new_zeros(cols.shape[0]),
                                          size=(x.shape[0], codebook.shape[0]),
                                          check_invariants=False)
        return torch.sparse.sampled_addmm(pattern, x, codebook.t()).values()


def candidates(approx: Tensor, threshold_of: Threshold, per_row: int = MAX_CANDIDATES_PER_ROW,
               tile: int = TILE) -> tuple[Tensor, Tensor] | None:
    """The pairs ``(rows, cols)`` (row-major) with ``approx[row, col] <= threshold[row]``, or
    None when there are more than ``per_row`` per row on average.

    When ``K`` is a multiple of ``tile`` they are found from the minimum of each tile of
    ``tile`` codes: only the tiles whose minimum passes (one or two per row, typically) are
    compared entry by entry. Three passes over the ``(N, K)`` block (a compare, a count and
    ``nonzero``, 1.4 ms per million entries here) become one ``amin``. The comparisons run in
    float32 (exact for bfloat16 values, and faster than torch's bfloat16 compare).
    """
    num_rows, num_codes = approx.shape
    limit = per_row * num_rows
    if num_codes % tile:
        threshold = threshold_of(approx, None)
        passed = approx.float() <= threshold.unsqueeze(1)
        if int(passed.sum()) > limit:
            return None
        rows, cols = passed.nonzero(as_tuple=True)
        return rows, cols
    tiles_per_row = num_codes // tile
    tile_min = approx.view(num_rows, tiles_per_row, tile).amin(-1).float()  # (N, K / tile)
    threshold = threshold_of(approx, tile_min)
    hot_rows, hot_tiles = (tile_min <= threshold.unsqueeze(1)).nonzero(as_tuple=True)
    if hot_rows.shape[0] > limit:  # each holds a candidate
        return None
    tiles = approx.view(-1, tile).index_select(0, hot_rows * tiles_per_row + hot_tiles)
    passed = tiles.float() <= threshold.index_select(0, hot_rows).unsqueeze(1)
    which, within = passed.nonzero(as_tuple=True)
    if which.shape[0] > limit:
        return None
    return hot_rows.index_select(0, which), hot_tiles.index_select(0, which) * tile + within


def first_minimum(approx: Tensor, tile_min: Tensor | None) -> Tensor:
    """``(N,)`` int64: ``approx.argmin(1)``, from the tile minima when there are some (the
    first minimum, as :func:`.search.blockwise_argmin` finds it)."""
    if tile_min is None:
        return approx.argmin(1)
    num_rows, per_row = tile_min.shape
    tile = approx.shape[1] // per_row
    best_tile = tile_min.argmin(1)
    rows = torch.arange(0, num_rows * per_row, per_row).add_(best_tile)
    within = approx.view(-1, tile).index_select(0, rows).argmin(1)
    return within.add_(best_tile, alpha=tile)


def resolve(x: Tensor, codebook: Tensor, code_sq: Tensor, rows: Tensor,
            cols: Tensor) -> Tensor:
    """``(N,)`` int64: for each row of ``x``, the candidate (``cols`` of its entries of
    ``rows``, row-major) at the smallest float32 ``||c||² - 2 x·c``, the first such code among
    ties (as ``argmin`` picks); a row with one candidate gets it without a re-check."""
    num_codes = codebook.shape[0]
    out = torch.full((x.shape[0],), num_codes, dtype=torch.long)
    out.scatter_reduce_(0, rows, cols, "amin")  # the answer of the rows with one candidate
    # a row without candidates holds NaN (its distances compare false): give it an index in
    # range, as the float32 search does, so that the caller's finiteness check reports it
    out.clamp_(max=num_codes - 1)
    several = torch.bincount(rows, minlength=x.shape[0])[rows] > 1
    if not bool(several.any()):
        return out
    rows, cols = rows[several], cols[several]
    exact = code_sq[cols] - 2 * pair_dots(x, codebook, rows, cols)
    best = torch.full((x.shape[0],), math.inf).scatter_reduce_(0, rows, exact, "amin")
    # the first code at the row's float32 minimum, as argmin picks among ties
    winner = torch.where(exact == best[rows], cols, num_codes)
    return out.index_fill_(0, rows, num_codes).scatter_reduce_(0, rows, winner, "amin")


def float32_search(x: Tensor, codebook: Tensor) -> Tensor:
    """The float32 search, through oneDNN where that applies."""
    if f32_routed(x, codebook):
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


def f32_routed(x: Tensor, codebook: Tensor) -> bool:
    """The float32 search goes through oneDNN: float32 CPU vectors too long for the C
    kernel, and a product big enough (:func:`.onednn_linear.routed`)."""
    # tracing first: a traced size is symbolic, and comparing it would guard on it
    return (not tracing() and x.ndim == 2 and x.shape[1] >= MIN_DIM and x.shape[0] > 0
            and routed(x, codebook))


def plain_usable(x: Tensor, codebook: Tensor) -> bool:
    """What every two-stage search needs: float32 CPU inputs, a search big enough to pay, vectors
    longer than the C kernel's, and no ``torch.compile``/``torch.export`` tracing (the candidate
    lists have data-dependent sizes, which one graph cannot hold)."""
    return (x.device.type == "cpu" and codebook.device.type == "cpu" and not tracing()
            and x.dtype == torch.float32 and codebook.dtype == torch.float32
            and x.ndim == 2 and x.shape[0] * codebook.shape[0] >= MIN_WORK
            and x.shape[1] >= MIN_DIM)
