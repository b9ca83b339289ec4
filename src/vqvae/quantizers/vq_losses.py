"""Auxiliary loss terms of :class:`~vqvae.quantizers.vector_quantize.VectorQuantize`, one
function each: code logits, cross-entropy to codes, orthogonality and diversity of the codebook.

The logits of a row against the codes are the negated Euclidean distances (not squared), or the
dot products of unit vectors under cosine similarity: the reference library's choice, which the
cross-entropy commitment, the cross-entropy to given codes and the diversity term share.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def code_logits(rows: Tensor, codes: Tensor, *, use_cosine_sim: bool = False) -> Tensor:
    """``(C, N, K)`` logits of ``(C, N, D)`` rows against ``(C, K, D)`` codes:
    ``-||x - c||`` (clamped at 1e-8 before the root, so the gradient stays finite), or
    ``x·c`` with cosine similarity."""
    dots = rows @ codes.transpose(-1, -2)
    if use_cosine_sim:
        return dots
    sq = rows.pow(2).sum(-1, keepdim=True) - 2 * dots + codes.pow(2).sum(-1)[:, None, :]
    return -sq.clamp(min=1e-8).sqrt()


def cross_entropy_to_codes(logits: Tensor, target: Tensor) -> Tensor:
    """Mean cross-entropy of ``(..., K)`` logits to the codes ``target`` (``logits.shape[:-1]``);
    ``-1`` entries (masked positions) are ignored."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1).long(),
                           ignore_index=-1)


def orthogonal_loss(codes: Tensor) -> Tensor:
    """Orthogonality of ``(C, n, D)`` codes (Shin et al., 2021, arXiv 2112.00384, eq. 2 as the
    reference library scales it): ``Σ cos(c_i, c_j)² / (C n²) - 1 / n``, 0 when the codes are
    orthogonal."""
    c, n = codes.shape[:2]
    unit = F.normalize(codes, dim=-1)
    cos = unit @ unit.transpose(-1, -2)  # (C, n, n)
    return cos.pow(2).sum() / (c * n * n) - 1.0 / n


def select_codes(codes: Tensor, *, used: Tensor | None = None,
                 max_codes: int | None = None) -> Tensor:
    """The codes ``(C, K, D)`` the orthogonal loss looks at: those in ``used`` (indices of this
    batch) if given, then at most ``max_codes`` of them drawn at random."""
    if used is not None:
        codes = codes[:, torch.unique(used[used >= 0])]
    n = codes.shape[1]
    if max_codes is not None and n > max_codes:
        codes = codes[:, torch.randperm(n, device=codes.device)[:max_codes]]
    return codes


def diversity_loss(logits: Tensor, temperature: float) -> Tensor:
    """Negative entropy of the average code distribution, per sequence position: ``logits``
    are ``(..., N, K)``; ``softmax(temperature · logits)`` is averaged over every axis but the
    last two, and the result is ``mean_n Σ_k p log p`` (log clamped at 1e-5). Minimising it
    spreads the batch over the codebook."""
    prob = (logits * temperature).softmax(-1)
    avg = prob.reshape(-1, *prob.shape[-2:]).mean(0)  # (N, K)
    return (avg * avg.clamp(min=1e-5).log()).sum(-1).mean()
