"""Codebook usage from indices: perplexity and the number of codes used.

Perplexity is ``exp(entropy)`` of the empirical code distribution: 1 when every vector takes
the same code, ``codebook_size`` when all codes are used equally often.

Several codebooks (the depths of a residual quantizer, the groups × depths of a grouped one):
usage is computed per codebook and then averaged, so perplexity and used codes stay on the scale
of one codebook (at most ``codebook_size``) whatever the number of codebooks. A shared codebook
(RQ-VAE) is counted per depth the same way: how much of the codebook each depth uses.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor


class CodebookUsage(NamedTuple):
    perplexity: float
    used_codes: int | float  # a mean (float) over several codebooks


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


def code_counts_per_codebook(indices: Tensor, codebook_size: int, codebook_dims: int = 0, *,
                             check: bool = True) -> Tensor:
    """``(C, codebook_size)`` int64 histograms, one per codebook.

    The last ``codebook_dims`` axes of ``indices`` say which codebook a code belongs to (for
    ``(B, positions, groups, depths)`` codes, ``codebook_dims=2`` and ``C = groups · depths``);
    ``codebook_dims=0`` is one codebook, ``C = 1``. Negative entries (``-1``: a depth that
    quantize dropout skipped) are not counted. ``check=False`` skips the range check, which reads
    the indices on the host (the training loop counts codes straight from the quantizer).
    """
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise TypeError(f"indices must be an integer tensor, got {indices.dtype}")
    codebooks = math.prod(indices.shape[indices.ndim - codebook_dims:]) if codebook_dims else 1
    flat = indices.reshape(-1, codebooks).long()  # (N, C)
    if check and flat.numel() and (int(flat.min()) < -1 or int(flat.max()) >= codebook_size):
        raise ValueError(
            f"indices must lie in [0, {codebook_size}) (or be -1 for a skipped depth), got "
            f"values in [{int(flat.min())}, {int(flat.max())}]")
    bins = codebooks * codebook_size
    offsets = torch.arange(codebooks, device=flat.device) * codebook_size  # (C,)
    # skipped (-1) codes go to one extra bin, dropped below: no boolean indexing, no host sync
    binned = torch.where(flat < 0, bins, flat + offsets)
    return torch.bincount(binned.reshape(-1), minlength=bins + 1)[:bins].view(
        codebooks, codebook_size)


def usage_from_counts(counts: Tensor) -> CodebookUsage:
    """Perplexity and used codes of a histogram of code counts: ``(K,)`` for one codebook, or
    ``(C, K)`` for ``C`` codebooks, whose usages are averaged (codebooks that received no code
    are left out)."""
    if counts.ndim == 2:
        usages = [usage_from_counts(row) for row in counts if row.sum() > 0]
        if len(counts) == 1 or not usages:
            return usages[0] if usages else CodebookUsage(perplexity=0.0, used_codes=0)
        return CodebookUsage(perplexity=sum(u.perplexity for u in usages) / len(usages),
                             used_codes=sum(u.used_codes for u in usages) / len(usages))
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
