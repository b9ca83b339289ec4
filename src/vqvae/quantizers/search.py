"""Nearest-code search: for each vector, the index of the closest codebook row.

The squared Euclidean distance is ``||x||² - 2 x·c + ||c||²``. ``||x||²`` is the same for every
code of a row, so the argmin only needs ``||c||² - 2 x·c``: one ``addmm`` per block of rows.
Rows are processed in blocks so that the ``(rows, codebook_size)`` distance block never holds
more than ``max_block_bytes``; a (65536, 256) batch against 8192 codes would otherwise need a
2 GiB distance matrix.

Distances are computed in float32 (float64 inputs stay float64), also for bf16/fp16 inputs and
under autocast: low-precision distances pick a different code for a few percent of vectors.
"""

from __future__ import annotations

import torch
from torch import Tensor

DEFAULT_BLOCK_BYTES = 64 * 2**20


def distance_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype distances are computed in: float64 stays, everything else becomes float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_blocks(num_rows: int, codebook_size: int, itemsize: int, max_block_bytes: int):
    rows = max(1, max_block_bytes // max(1, codebook_size * itemsize))
    for start in range(0, num_rows, rows):
        yield start, min(num_rows, start + rows)


def _float_inputs(x: Tensor, codebook: Tensor) -> tuple[Tensor, Tensor]:
    dtype = distance_dtype(torch.promote_types(x.dtype, codebook.dtype))
    return x.to(dtype), codebook.to(dtype)


@torch.no_grad()
def nearest_code(
    x: Tensor, codebook: Tensor, *, max_block_bytes: int = DEFAULT_BLOCK_BYTES
) -> Tensor:
    """Index of the nearest codebook row for each row of ``x``.

    Args:
        x: ``(N, D)`` vectors.
        codebook: ``(K, D)`` codes.
        max_block_bytes: upper bound on the memory of one block of distances.

    Returns:
        ``(N,)`` int64 indices, equal to ``torch.cdist(x, codebook).argmin(-1)`` up to ties.
    """
    if torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return nearest_code(x, codebook, max_block_bytes=max_block_bytes)
    x, codebook = _float_inputs(x, codebook)
    code_sq = codebook.pow(2).sum(-1)  # (K,)
    blocks = list(_row_blocks(x.shape[0], codebook.shape[0], x.dtype.itemsize, max_block_bytes))
    if len(blocks) == 1:
        # (N, K) = ||c||² - 2 x·cᵀ, the squared distance less the row constant ||x||²
        return torch.addmm(code_sq, x, codebook.t(), alpha=-2.0).min(dim=-1).indices
    out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    values = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    for start, stop in blocks:
        partial = torch.addmm(code_sq, x[start:stop], codebook.t(), alpha=-2.0)
        torch.min(partial, dim=-1, out=(values[start:stop], out[start:stop]))
    return out


@torch.no_grad()
def sample_code(
    x: Tensor,
    codebook: Tensor,
    temperature: float,
    *,
    generator: torch.Generator | None = None,
    max_block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> Tensor:
    """Sample a code per row from ``softmax(-distance / temperature)``.

    ``distance`` is the Euclidean distance (as ``torch.cdist``, not squared), the same choice as
    ``vector_quantize_pytorch``. Sampling uses the Gumbel-max trick block by block, so memory stays
    bounded like :func:`nearest_code`. ``temperature == 0`` is the nearest code.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return nearest_code(x, codebook, max_block_bytes=max_block_bytes)
    if torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return sample_code(x, codebook, temperature, generator=generator,
                               max_block_bytes=max_block_bytes)
    x, codebook = _float_inputs(x, codebook)
    code_sq = codebook.pow(2).sum(-1)  # (K,)
    x_sq = x.pow(2).sum(-1, keepdim=True)  # (N, 1)
    out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    tiny = torch.finfo(x.dtype).tiny
    for start, stop in _row_blocks(x.shape[0], codebook.shape[0], x.dtype.itemsize,
                                   max_block_bytes):
        sq = torch.addmm(code_sq, x[start:stop], codebook.t(), alpha=-2.0)
        distance = sq.add_(x_sq[start:stop]).clamp_(min=0).sqrt_()  # (rows, K)
        uniform = torch.rand(distance.shape, generator=generator, dtype=x.dtype,
                             device=x.device)
        gumbel = uniform.clamp_(min=tiny).log_().neg_().log_().neg_()
        # argmax(-d/T + g) samples from softmax(-d/T)
        out[start:stop] = gumbel.add_(distance, alpha=-1.0 / temperature).argmax(dim=-1)
    return out
