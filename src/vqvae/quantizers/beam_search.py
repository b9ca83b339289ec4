"""Beam search over the codebooks of a residual stack: the path of codes with the least
weighted total error, instead of the greedy nearest code at each depth.

A path ``(c_1, …, c_L)`` of one vector ``x`` is scored by

    score = −Σ_l w_l · s_l · mean_d (r_l − E_l[c_l])²,    r_1 = x,  r_{l+1} = r_l − E_l[c_l]

with ``s_l`` the scale of depth ``l`` (its commitment weight, as in vector_quantize_pytorch)
and ``w_l`` the depth's weight in the score. At each depth every kept path is extended by its
``min(beam_size, K_l)`` nearest codes and the ``beam_size`` best paths are kept (only the best
one after the last depth). With ``beam_size ≥ Π_{l<L} K_l`` every path survives and the result
is the exhaustive optimum; ``beam_size = 1`` is the greedy search.

Only the codes are read (``Codebook.vectors()``, one codebook per depth), so any codebook
works, and nothing changes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .codebook import Codebook
from .search import code_distances


@torch.no_grad()
def beam_search(x: Tensor, books: Sequence[Codebook], *, beam_size: int,
                weights: Sequence[float], scales: Sequence[float]) -> tuple[Tensor, Tensor]:
    """Best paths for the rows of ``x`` ``(N, D)``: indices ``(N, L)`` int64 and each depth's
    error term ``s_l · mean_d (r_l − c_l)²`` along the path ``(N, L)``."""
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size!r}")
    count, dim = x.shape
    residual = x.unsqueeze(1)  # (N, P, D), P paths kept per row
    score = x.new_zeros(count, 1)  # (N, P)
    paths = x.new_zeros(count, 1, 0, dtype=torch.long)  # (N, P, l)
    terms = x.new_zeros(count, 1, 0)  # (N, P, l)
    last = len(books) - 1
    for depth, book in enumerate(books):
        codes = book.vectors()[0].detach().to(x.dtype)  # (K, D): one codebook per depth
        kept = residual.shape[1]
        flat = residual.reshape(-1, dim)  # (N·P, D)
        offset = flat.pow(2).sum(-1, keepdim=True) + codes.pow(2).sum(-1)
        error = code_distances(flat, codes, offset).clamp_(min=0)  # (N·P, K) squared distances
        error = error * (scales[depth] / dim)
        width = min(beam_size, codes.shape[0])
        term, choice = error.topk(width, dim=-1, largest=False)  # (N·P, k)
        term, choice = term.view(count, kept, width), choice.view(count, kept, width)
        candidate = (score.unsqueeze(-1) - weights[depth] * term).view(count, kept * width)
        keep = 1 if depth == last else beam_size
        if candidate.shape[1] > keep:
            score, pick = candidate.topk(keep, dim=-1)  # (N, P')
        else:
            score, pick = candidate, torch.arange(candidate.shape[1], device=x.device).expand(
                count, -1)
        parent, child = pick.div(width, rounding_mode="floor"), pick.remainder(width)
        code = choice.gather(1, parent.unsqueeze(-1).expand(-1, -1, width)).gather(
            2, child.unsqueeze(-1)).squeeze(-1)  # (N, P')
        chosen_term = term.gather(1, parent.unsqueeze(-1).expand(-1, -1, width)).gather(
            2, child.unsqueeze(-1))  # (N, P', 1)
        residual = residual.gather(1, parent.unsqueeze(-1).expand(-1, -1, dim)) - codes[code]
        paths = torch.cat([paths.gather(1, parent.unsqueeze(-1).expand(-1, -1, depth)),
                           code.unsqueeze(-1)], dim=-1)
        terms = torch.cat([terms.gather(1, parent.unsqueeze(-1).expand(-1, -1, depth)),
                           chosen_term], dim=-1)
    return paths[:, 0], terms[:, 0]
