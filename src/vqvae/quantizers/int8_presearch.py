"""Nearest-code search on CPU by an int8 pre-search and an exact float32 re-check.

torch's ``_int_mm`` (int8 x int8 -> int32) runs about twice as fast as the float32 matmul on
CPUs without bfloat16 dot products (AVX2: 4.9 ms against 10.6 ms for a (1024, 512) x
(512, 1024) product, one thread of the AMD EPYC held to AVX2), where the bfloat16 pre-search of
:mod:`.bf16_presearch` cannot run, and with AVX-512 VNNI it beats the bfloat16 product too.
Each row of ``x`` is rounded to int8 with its own scale, the codebook with one scale
(``x ≈ x̃ = s·q``, ``|q| ≤ 127``, ``s`` the largest magnitude over 127; see :data:`LEVELS` for
the narrower ranges of CPUs without VNNI); the integer products are exact, so the approximate
distance ``d̃ = ||c||² - 2 sx·sc·(qx·qc)`` errs only by the rounding of the vectors, whose
residuals are measured::

    |x·c - x̃·c̃| ≤ ||x - x̃||·||c|| + ||x̃||·||c - c̃|| =: a   (with the largest ||c||, ||c - c̃||)

plus the float32 rounding of forming ``d̃`` and of ``||c||²``, all bounded per row (``_slack``).

The bound is several times looser than the bfloat16 one (int8 keeps 8 bits of the row's largest
entry, bfloat16 8 bits of each entry), so the candidate test is anchored on an exact distance
rather than on the approximate minimum: the code ``j`` at the row's smallest ``d̃`` is evaluated
in float32 (``f_j``), and a code can only be nearest, or the float32 search's answer, if
``d̃ ≤ f_j + e + 3ρ`` (``e`` the error of ``d̃``, ``ρ`` that of a float32 distance): a window
of one error bound instead of the two that ``d̃ ≤ min d̃ + 2e`` needs: 3.8 candidates per row
instead of 12.5 for 1024 Gaussian codes of 512 dimensions (5.1 held to AVX2, whose codebook
range is narrower). The candidates are then re-checked in float32 (:func:`.presearch.resolve`);
blocks with too many candidates, or with non-finite values, are searched in float32 instead.

With the C kernels (:mod:`.cpu_kernel`) the rounding and the whole second stage run there,
their rows split over torch's threads where the kernels are built with OpenMP
(:func:`.cpu_kernel.parallel`): the anchor, candidates and re-check in two passes over each row
of the integer products (:func:`.cpu_kernel.int8_recheck`), where the tensor form above takes
some thirty operations over the block (held to AVX2, one thread, 1024 rows against 1024 codes
of 512 dimensions: 9.1 ms for the whole search before, 6.9 after, of which the product is 4.9).

Where it is used is decided by :func:`.bf16_presearch.presearch_kind`: wherever :func:`usable`
says so unless ``VQVAE_CPU_PRESEARCH`` asks otherwise.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from . import cpu_kernel
from .presearch import (
    MAX_CANDIDATES_PER_ROW,
    candidates,
    first_minimum,
    float32_search,
    pair_dots,
    plain_usable,
    resolve,
)
from .search import DEFAULT_BLOCK_BYTES

U = 2.0 ** -24  # float32 unit roundoff
# int8 entries stay in [-127, 127] (never -128), so that every int32 sum stays exact
QMAX = 127
# below this many multiply-adds (N·K·D) the float32 search is as fast: its fixed costs (two
# quantisations, the anchor, the candidate test) outweigh half a matmul. Measured on the AMD
# EPYC, AVX-512 and AVX2: at 2²⁸ (1024 x 256 x 1024) int8 took 0.8-0.9 of the float32 time,
# at 2²⁷ 1.1-1.4 of it
MIN_PRODUCTS = 1 << 28
# codes per tile of the candidate test (.presearch.candidates): with some 4 to 8 candidates a
# row, tiles of 32 gather half the entries that tiles of 64 do (8.4 against 8.8 ms for 1024
# rows against 1024 codes of 512 dimensions held to AVX2; 16 is slower again)
TILE = 32
# smallest row peak quantised as such (127 / 2⁻¹²⁰ is still a finite float32)
PEAK_FLOOR = 2.0 ** -120
# _int_mm multiplies int32 sums of 127² per dimension: room for this many dimensions
MAX_DIM = (2**31 - 1) // QMAX**2
# the ranges tried for (x, codebook, codebook pairs), widest first. Without VNNI, x86 int8
# products go through vpmaddubsw, which adds the two u8 x s8 products of adjacent entries
# (2i, 2i + 1) in saturating int16, x shifted by 128: held to AVX2, _int_mm with both sides at
# ±127 errs by up to 10⁵. 255·(|c₂ᵢ| + |c₂ᵢ₊₁|) fits when each such pair of codebook entries
# sums to at most 128 in magnitude ("pairs", for even D); the codebook is then scaled by its
# largest pair rather than its largest entry, some 20% coarser for Gaussian codes where ±64
# would be twice as coarse
LEVELS = ((QMAX, QMAX, False), (QMAX, QMAX, True), (QMAX, 64, False), (64, 64, False))
PAIR_SUM = QMAX + 1


def _codebook_patterns(qc: int, pairs: bool, g: torch.Generator) -> list[Tensor]:
    """Codebook rows of 256 entries at the edge of what ``(qc, pairs)`` allows, and at random."""
    if not pairs:
        edges = [[qc, qc], [qc, -qc]]
        random = torch.randint(-qc, qc + 1, (64, 256), generator=g, dtype=torch.int8)
    else:
        edges = [[qc, PAIR_SUM - qc], [PAIR_SUM - qc, qc], [64, 64], [qc, 1, 1, qc], [0, qc]]
        first = torch.randint(-qc, qc + 1, (64, 128), generator=g)
        room = PAIR_SUM - first.abs()
        second = (torch.rand(64, 128, generator=g) * (2 * room + 1)).floor() - room
        random = torch.stack([first, second.long().clamp(-qc, qc)], -1).reshape(64, 256)
        random = random.to(torch.int8)
    rows = [torch.tensor(edge * (256 // len(edge)), dtype=torch.int8).expand(16, 256)
            for edge in edges]
    return [random] + [sign * row for row in rows for sign in (1, -1)]


def _exact_at(qx: int, qc: int, pairs: bool) -> bool:
    """Whether ``torch._int_mm`` gives exact sums for x entries up to ``qx`` and codebook
    entries up to ``qc`` (and pairs as :data:`LEVELS` says): at random, and at the extremes of
    each sign (where a saturating sum would show)."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.randint(-qx, qx + 1, (64, 256), generator=g, dtype=torch.int8)]
    xs += [torch.full((16, 256), sign * qx, dtype=torch.int8) for sign in (1, -1)]
    return all(torch.equal(torch._int_mm(a, b.t()), (a.long() @ b.long().t()).int())
               for a in xs for b in _codebook_patterns(qc, pairs, g))


@functools.cache
def levels() -> tuple[int, int, bool] | None:
    """The widest int8 ranges ``(x, codebook, pairs)`` for which ``torch._int_mm`` sums
    exactly on this CPU (see :data:`LEVELS`), or None when it runs nowhere (or errs at every
    range)."""
    try:
        return next((level for level in LEVELS if _exact_at(*level)), None)
    except (AttributeError, TypeError, RuntimeError, NotImplementedError):  # no CPU _int_mm
        return None


def _c_kernels() -> bool:
    """Whether the rounding and the re-check run in C (:mod:`.cpu_kernel`), else in tensor
    operations (no C compiler, ``VQVAE_CPU_KERNEL=0``)."""
    return cpu_kernel.available()


def usable(x: Tensor, codebook: Tensor) -> bool:
    """The int8 two-stage search applies (:func:`.presearch.plain_usable`, a product of at
    least :data:`MIN_PRODUCTS`, and ``_int_mm`` sums exactly here)."""
    return (plain_usable(x, codebook) and x.shape[1] <= MAX_DIM
            and x.shape[0] * codebook.shape[0] * x.shape[1] >= MIN_PRODUCTS
            and levels() is not None)


def quantize_rows(v: Tensor, qmax: int = QMAX, pairs: bool = False, *,
                  per_row: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """``(q, scale, residual_norm)``: int8 ``q`` ``(R, D)`` in ``[-qmax, qmax]`` (with
    ``pairs``, ``D`` even: also ``|q₂ᵢ| + |q₂ᵢ₊₁| ≤ qmax + 1``) and float32 ``scale`` ``(R,)``
    (one value repeated with ``per_row=False``) with ``v ≈ scale·q``, and the float32 norm of
    each row of ``v - scale·q`` as computed (the rounding of that computation is covered by
    :func:`_slack`). A row of zeros gets ``q = 0``; non-finite rows give a non-finite scale."""
    if _c_kernels() and v.dtype == torch.float32 and v.numel() \
            and (not pairs or v.shape[1] % 2 == 0):
        return cpu_kernel.quantize_rows(v, qmax, pairs, per_row, PEAK_FLOOR)
    # any scale is valid (the residual is measured): the row's peak maps to ±qmax, and
    # fl(v·fl(qmax/peak)) ≤ qmax(1 + 2u) rounds to at most qmax; the floor keeps qmax/peak
    # finite, so that a row of zeros gets zeros
    # (abs then amax: torch's vector_norm of order inf is a scalar loop, 20 times slower)
    magnitude = v.abs()
    if pairs:  # |t₂ᵢ| + |t₂ᵢ₊₁| ≤ qmax(1 + 2u) below, so their roundings sum to at most qmax + 1
        # (two strided halves added: torch's sum over a last axis of 2 took 8 times as long,
        # 0.87 against 0.11 ms for a (1024, 512) codebook held to AVX2; a + b either way)
        magnitude = magnitude[:, 0::2] + magnitude[:, 1::2]
    peak = (magnitude.amax(1) if per_row else magnitude.amax().expand(v.shape[0]))
    peak = peak.clamp(min=PEAK_FLOOR)
    q = torch.mul(v, (qmax / peak).unsqueeze(1)).round_()  # integers, float32
    scale = peak / qmax
    # (float32 operands: torch's mixed int8/float32 addcmul is 20 times slower)
    q8 = q.to(torch.int8)
    residual = torch.addcmul(v, q, scale.unsqueeze(1), value=-1.0, out=q)  # (q is spent)
    return q8, scale, torch.linalg.vector_norm(residual, dim=1)


def _slack(dim: int, x_norm: Tensor, dx: Tensor, code_norm: float, dc: float,
           csq: float) -> Tensor:
    """``(N,)``: how far above the float32 distance of any code a code's ``d̃`` can lie and
    still be nearest (or the float32 search's answer): ``e + 3ρ``, see the module docstring.

    ``x_norm``, ``dx``: computed ``||x||`` and ``||x - x̃||`` per row; ``code_norm``, ``dc``,
    ``csq``: the largest computed ``||c||``, ``||c - c̃||`` and float32 ``||c||²`` over the
    codes. Every term is linear in the row's ``||x||`` and ``||x - x̃||``: the bound is
    ``α·||x|| + β·||x - x̃|| + κ``, three operations on ``(N,)`` vectors."""
    gamma = dim * U / (1 - dim * U)  # float32 sums of dim products, in any order
    grow = 1 + 2 * (dim + 4) * U  # a computed norm, up to its own rounding
    # true ||x|| ≤ grow·x_norm =: nx; true ||x - x̃|| ≤ grow·dx + 4u·nx =: dx' (the residual's
    # own rounding: scale·q, then the difference); likewise for the codes
    nc = code_norm * grow
    dcm = dc * grow + 4 * U * nc
    nc_t = nc + dcm  # ||c̃|| bound; ||x̃|| ≤ nx + dx'
    # with ||x̃|| ≤ nx + dx': a = dx'·(nc + dcm) + nx·dcm, |s̃| ≤ (nx + dx')·nc_t, and
    # e = 2a + 8u|s̃| (P·sc, ·sx and the int32 -> float32 cast, doubled) + 1.01u(csq + 2|s̃|)
    # (the sum) + γ·csq (||c||²'s own); 3ρ = 3(2γ·nx·nc + γ·csq + 2u(csq + 2·nx·nc)).
    # e + 3ρ = A·nx + B·dx' + κ:
    k = 10.02 * U * nc_t
    per_nx = 2 * dcm + k + 3 * (2 * gamma + 4 * U) * nc
    per_dx = 2 * (nc + dcm) + k
    const = (1.01 * U + gamma + 3 * (gamma + 2 * U)) * csq
    alpha = grow * (per_nx + 4 * U * per_dx)  # nx = grow·x_norm, dx' = grow·dx + 4u·nx
    beta = grow * per_dx
    tiny = (dim + 16) * 2.0 ** -146  # subnormal products: absolute rounding of each
    return (x_norm * (alpha * 1.01)).add_(dx, alpha=beta * 1.01).add_(const * 1.01 + tiny)


def nearest_code_int8(x: Tensor, codebook: Tensor, code_sq: Tensor | None = None, *,
                      max_block_bytes: int = DEFAULT_BLOCK_BYTES) -> Tensor:
    """``(N,)`` int64 index of the nearest code of each row of float32 ``x`` ``(N, D)``: the
    float32 search's answer up to float32 near-ties (see the module docstring), by row blocks
    whose distances stay under ``max_block_bytes``. ``code_sq``: ``||c||²`` per code if the
    caller has it."""
    if code_sq is None:
        code_sq = codebook.pow(2).sum(-1)
    qmax_x, qmax_c, pairs = levels()
    if pairs and codebook.shape[1] % 2:  # (pairs of at most 128 hold entries of at most 64)
        qmax_c, pairs = PAIR_SUM // 2, False
    # one scale for the whole codebook (the bound takes the largest ||c - c̃|| anyway): the
    # distances then need one pass less over the (N, K) block
    qc, sc, dc = quantize_rows(codebook, qmax_c, pairs, per_row=False)
    sc = float(sc[0])
    if not math.isfinite(sc):
        return float32_search(x, codebook)  # NaN/Inf: the float32 search's index, as ever
    code_norm = math.sqrt(float(code_sq.max()))  # (its rounding: within _slack's allowance)
    dc_max = float(dc.max())
    step = max(1, max_block_bytes // (9 * codebook.shape[0]))  # int32 + float32 + mask
    blocks = [_block(x[start:start + step], qmax_x, codebook, code_sq, qc.t(), sc, dc_max,
                     code_norm)
              for start in range(0, x.shape[0], step)]
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks)


def _block(x: Tensor, qmax: int, codebook: Tensor, code_sq: Tensor, qc_t: Tensor, sc: float,
           dc: float, code_norm: float) -> Tensor:
    """:func:`nearest_code_int8` of one row block (int8 entries up to ``qmax``), the codebook
    already quantised (``qc_t`` ``(D, K)`` int8, ``sc`` its scale, ``dc`` and ``code_norm``
    the largest residual and code norms)."""
    qx, sx, dx = quantize_rows(x, qmax)
    if not bool(torch.isfinite(sx).all()):
        return float32_search(x, codebook)  # NaN/Inf: the float32 search's index, as ever
    # d̃ = ||c||² - 2 sx·sc·(qx·qc), (N, K) float32
    products = torch._int_mm(qx, qc_t)  # (N, K) int32, exact
    # the sampled-product re-check costs about four GEMM products per pair: K / 32 candidates
    # a row still cost an eighth of the float32 search
    limit = max(MAX_CANDIDATES_PER_ROW, codebook.shape[0] // 32) * x.shape[0]
    if _c_kernels():  # the same test and answer, in two passes over each row
        slack = _slack(x.shape[1], torch.linalg.vector_norm(x, dim=1), dx, code_norm, dc,
                       float(code_sq.max()))
        found = cpu_kernel.int8_recheck(products, sx * sc, code_sq, x, codebook, slack, limit)
        return float32_search(x, codebook) if found is None else found
    # converted in place, element i to element i of the same bytes (as fast as one pass, where
    # a new (N, K) buffer costs its page faults: 1.4 ms against 3.1 ms for 4096 codes)
    approx = products.view(torch.float32).copy_(products)
    torch.addcmul(code_sq, approx, (sx * sc).unsqueeze_(1), value=-2.0, out=approx)

    def threshold_of(approx: Tensor, tile_min: Tensor | None) -> Tensor:
        anchor = first_minimum(approx, tile_min)  # (N,) the code at the smallest d̃
        exact = code_sq.index_select(0, anchor) - 2 * pair_dots(
            x, codebook, torch.arange(x.shape[0]), anchor)
        slack = _slack(x.shape[1], torch.linalg.vector_norm(x, dim=1), dx, code_norm, dc,
                       float(code_sq.max()))
        # a NaN (overflowing norms) admits every code of its row: the re-check then decides
        return (exact + slack).nan_to_num_(nan=float("inf"))

    found = candidates(approx, threshold_of, limit // x.shape[0], tile=TILE)
    if found is None:
        return float32_search(x, codebook)
    return resolve(x, codebook, code_sq, *found)
