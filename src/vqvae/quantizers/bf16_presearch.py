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

Only used where :func:`usable` says so and the int8 pre-search (:mod:`.int8_presearch`) does
not apply or is turned off (:func:`presearch_kind`, which :func:`nearest`, the entry point of
both, follows); elsewhere (small searches, GPUs, other dtypes) callers use the float32 search:
on CPU, for vectors longer than the C kernel's and big enough products, with the distance
products through oneDNN (:func:`nearest_code_f32`). The candidate test and the re-check are
shared with the int8 pre-search (:mod:`.presearch`).
"""

from __future__ import annotations

import functools
import math
import os

import torch
from torch import Tensor

from . import int8_presearch
from .presearch import (
    MAX_CANDIDATES_PER_ROW,  # noqa: F401  (re-exported: the limit the two searches share)
    MIN_DIM,  # noqa: F401
    candidates,
    f32_routed,
    float32_search,
    nearest_code_f32,
    plain_usable,
    resolve,
)
from .search import DEFAULT_BLOCK_BYTES, nearest_code, search_defaults

UNIT = 2.0 ** -8  # bfloat16 unit roundoff (8 significant bits, round to nearest)
#: environment variable choosing the CPU pre-search of :func:`nearest`: ``auto`` (default: the
#: int8 one wherever torch's int8 product runs, with several torch threads only when its second
#: stage runs in C; else the bfloat16 one where the CPU has native bfloat16 dot products),
#: ``bf16``, ``int8`` (each where it can run, else the float32 search), or ``off`` (the float32
#: search). On the AMD EPYC with AVX-512 VNNI the int8 search took 4.4 ms against 4.7 (bf16) and
#: 5.3 (float32) for 1024 rows against 1024 codes of 512 dimensions, 13.4 against 17.9 and 21.0
#: ms for 4096 codes, one thread. Two threads, SimVQ's call at that size with the C second
#: stage: 0.36 of the library's against 0.42 with bf16, and held to AVX2 0.55 against 0.61 in
#: float32. In tensor operations its some 25 parallel regions (the float32 search has four)
#: each waited for a scheduler slice on a loaded machine: 0.57 -> 1.23 of the library's held
#: to AVX2, hence one thread only there
PRESEARCH_ENV = "VQVAE_CPU_PRESEARCH"
PRESEARCH_CHOICES = ("auto", "bf16", "int8", "off")

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
    """The bfloat16 two-stage search applies: :func:`.presearch.plain_usable` (float32 CPU
    inputs, a big enough search, no tracing) and native bf16."""
    return plain_usable(x, codebook) and native_bf16()


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


def nearest_code_bf16(x: Tensor, codebook: Tensor, code_sq: Tensor | None = None) -> Tensor:
    """``(N,)`` int64 index of the nearest code of each row of float32 ``x`` ``(N, D)``: the
    float32 search's answer up to float32 near-ties (see the module docstring).
    ``code_sq``: ``||c||²`` per code if the caller has it."""
    if code_sq is None:
        code_sq = codebook.pow(2).sum(-1)
    x16, c16 = x.bfloat16(), codebook.bfloat16()
    approx = torch.addmm(code_sq.bfloat16(), x16, c16.t(), alpha=-2.0)  # (N, K) d̃ in bf16

    def threshold_of(approx: Tensor, tile_min: Tensor | None) -> Tensor:
        # (a bf16 argmin costs more than the whole test)
        low = (approx if tile_min is None else tile_min).amin(1).float()
        return low + _margin(x, x16, codebook, c16, code_sq, low)

    found = candidates(approx, threshold_of)
    if found is None:
        return float32_search(x, codebook)
    return resolve(x, codebook, code_sq, *found)


def presearch_kind(x: Tensor, codebook: Tensor) -> str | None:
    """``"bf16"``, ``"int8"`` or None (the float32 search): the two-stage search :func:`nearest`
    takes for these inputs, as :data:`PRESEARCH_ENV` asks (``"auto"`` when unset: see
    :data:`PRESEARCH_CHOICES`)."""
    choice = os.environ.get(PRESEARCH_ENV) or "auto"
    if choice not in PRESEARCH_CHOICES:
        raise ValueError(f"{PRESEARCH_ENV} must be one of {PRESEARCH_CHOICES}, got {choice!r}")
    if choice == "off" or not plain_usable(x, codebook):
        return None
    if (choice == "int8" or (choice == "auto" and (torch.get_num_threads() == 1
                                                    or int8_presearch._c_kernels()))) \
            and int8_presearch.usable(x, codebook):
        return "int8"
    if choice in ("auto", "bf16") and native_bf16():
        return "bf16"
    return None


def nearest(x: Tensor, codebook: Tensor, *, max_block_bytes: int = DEFAULT_BLOCK_BYTES,
            code_sq: Tensor | None = None) -> Tensor:
    """:func:`vqvae.quantizers.search.nearest_code` with the same answer, through a two-stage
    search where one applies (:func:`presearch_kind`, and the search backend left at
    ``"auto"``), by row blocks whose approximate distances stay under ``max_block_bytes``;
    elsewhere on CPU, the float32 search with oneDNN's products (:func:`nearest_code_f32`)
    where it applies."""
    auto = search_defaults()["backend"] == "auto" and not torch.is_autocast_enabled("cpu")
    kind = presearch_kind(x, codebook) if auto else None
    if kind is None:
        if auto and f32_routed(x, codebook):
            return nearest_code_f32(x, codebook, max_block_bytes=max_block_bytes,
                                    code_sq=code_sq)
        return nearest_code(x, codebook, max_block_bytes=max_block_bytes)
    if code_sq is None:
        code_sq = codebook.pow(2).sum(-1)
    if kind == "int8":
        return int8_presearch.nearest_code_int8(x, codebook, code_sq,
                                                max_block_bytes=max_block_bytes)
    step = max(1, max_block_bytes // (3 * codebook.shape[0]))  # bf16 distances + bool mask
    if step >= x.shape[0]:
        return nearest_code_bf16(x, codebook, code_sq)
    return torch.cat([nearest_code_bf16(x[start:start + step], codebook, code_sq)
                      for start in range(0, x.shape[0], step)])
