"""Codebook usage from indices: perplexity and the number of codes used.

Perplexity is ``exp(entropy)`` of the empirical code distribution: 1 when every vector takes
the same code, ``codebook_size`` when all codes are used equally often.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class CodebookUsage(NamedTuple):
    perplexity: float
    used_codes: int


def code_counts(indices: Tensor, codebook_size: int) -> Tensor:
    """``(codebook_size,)`` int64 histogram of ``indices`` (any shape)."""
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise TypeError(f"indices must be an integer tensor, got {indices.dtype}")
    flat = indices.reshape(-1).long()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= codebook_size):
        raise ValueError(
            f"indices must lie in [0, {codebook_size}), got values in "
            f"[{int(flat.min())}, {int(flat.max())}]"
        )
    return torch.bincount(flat, minlength=codebook_size)


def usage_from_counts(counts: Tensor) -> CodebookUsage:
    """Perplexity and used codes of a histogram of code counts."""
    counts = counts.double()
    total = counts.sum()
    if total == 0:
        return CodebookUsage(perplexity=0.0, used_codes=0)
    p = counts / total
    entropy = -(p * torch.log(p.clamp(min=1e-300))).sum()
    return CodebookUsage(perplexity=float(torch.exp(entropy)), used_codes=int((counts > 0).sum()))


def codebook_usage(indices: Tensor, codebook_size: int) -> CodebookUsage:
    """Perplexity and number of distinct codes in ``indices`` (any shape, values < codebook_size).

    >>> codebook_usage(torch.tensor([0, 1, 2, 3]), 8)
    CodebookUsage(perplexity=4.0, used_codes=4)
    """
    return usage_from_counts(code_counts(indices, codebook_size))
