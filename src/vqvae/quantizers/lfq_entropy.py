"""The entropy terms of lookup-free quantisation, without forming the N x 2^k distribution.

LFQ (Yu et al. 2023, MAGVIT-v2) scores code ``c`` in {-a, +a}^k for an input ``x`` by
``q(c | x) = softmax_c(-T ||x - c||^2)``. Since ``||c||^2`` is the same for every code, the
exponent is ``2T x.c + const`` = ``sum_d 2T a x_d b_d`` with bits ``b_d`` in {-1, +1}, so the
distribution is a product of independent Bernoullis, one per bit, with logit
``l_d = 4 T a x_d`` (the exponent's change when bit ``d`` flips). Hence:

* the per-sample entropy is exactly ``sum_d H_b(sigmoid(l_d))``, O(N k) work;
* the batch (codebook) entropy ``H(mean_i q(. | x_i))`` does not factorise, but splitting the
  bits into a high half (k1 bits) and a low half (k2 bits) makes the averaged distribution a
  matrix product: ``mean_i q_i(hi, lo) = mean_i P_hi[i, hi] P_lo[i, lo]`` = ``P_hi^T P_lo / N``,
  a (2^k1, N) @ (N, 2^k2) matmul. Memory is N (2^k1 + 2^k2) + 2^k instead of N 2^k.

Code ``j`` has its bits most significant first (bit 0 is the top bit), as in the library, so
``j = j_hi * 2^k2 + j_lo`` and the (2^k1, 2^k2) matrix flattens row-major into code order.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

# log of the smallest normal float32: entries of the mean distribution below it contribute
# under 1e-36 to the entropy; clamping there keeps the gradient -(log p + 1) finite where
# float32 underflows to 0 (its true contribution, p log p, tends to 0).
_TINY = torch.finfo(torch.float32).tiny


def bit_matrix(bits: int, device: torch.device | None = None,
               dtype: torch.dtype = torch.float32) -> Tensor:
    """(bits, 2^bits) matrix: column ``j`` holds the bits of ``j``, most significant
    first, as 0/1."""
    codes = torch.arange(2**bits, device=device)
    weights = 2 ** torch.arange(bits - 1, -1, -1, device=device)
    return ((codes[None, :] & weights[:, None]) != 0).to(dtype)


def per_sample_entropy(logits: Tensor) -> Tensor:
    """Exact entropy (nats) of each sample's code distribution: the sum over the last axis
    (bits) of the binary entropies of ``sigmoid(logits)``.

    With a = |l| (the entropy is even in l): H = sigmoid(-a) a - log sigmoid(a). Both terms
    are small and positive for large a, so there is no cancellation and no log of an
    underflowed probability; finite with a finite gradient for any finite logit.
    """
    a = logits.abs()
    return (torch.sigmoid(-a) * a - F.logsigmoid(a)).sum(-1)


@functools.lru_cache(maxsize=32)
def _halves_matrix(k: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(2k, 2^k1 + 2^k2) matrix M such that [log sigmoid(-l), log sigmoid(l)] @ M = log P of
    every setting of the high k1 = k // 2 bits (first 2^k1 columns) and of the low k2 bits (the
    rest).

    Top block: the bits each setting leaves clear (each adds log sigmoid(-l_d)); bottom block:
    the bits it sets (each adds log sigmoid(l_d)). Every term is <= 0, so nothing cancels: the
    equivalent [log sigmoid(-l), l] form subtracts terms of the logits' size, and with large
    logits (an encoder whose outputs grow) the rounding left a positive log P whose exp
    overflowed. Cached: it is rebuilt only for a new (k, device, dtype).
    """
    k1, k2 = k // 2, k - k // 2
    out = torch.zeros(2 * k, 2**k1 + 2**k2, device=device, dtype=dtype)
    out[:k1, : 2**k1] = 1 - bit_matrix(k1, device, dtype)
    out[k1:k, 2**k1 :] = 1 - bit_matrix(k2, device, dtype)
    out[k : k + k1, : 2**k1] = bit_matrix(k1, device, dtype)
    out[k + k1 :, 2**k1 :] = bit_matrix(k2, device, dtype)
    return out


def mean_distribution(logits: Tensor) -> Tensor:
    """(C, 2^k) mean over samples of each codebook's code distribution, from (C, N, k) logits.

    One matmul and one exp give the probabilities of both halves' settings (_halves_matrix).
    """
    k = logits.shape[-1]
    k1 = k // 2
    features = torch.cat([F.logsigmoid(-logits), F.logsigmoid(logits)], -1)  # (C, N, 2k)
    probs = torch.exp(features @ _halves_matrix(k, logits.device, logits.dtype))
    hi, lo = probs[..., : 2**k1], probs[..., 2**k1 :]  # (C, N, 2^k1), (C, N, 2^k2)
    avg = hi.transpose(-1, -2) @ lo / logits.shape[-2]  # (C, 2^k1, 2^k2)
    return avg.flatten(-2)


def entropy(prob: Tensor) -> Tensor:
    """Entropy (nats) over the last axis; zero-probability entries contribute zero."""
    return -(prob * prob.clamp_min(_TINY).log()).sum(-1)


def batch_entropy(logits: Tensor, reduce_mean=None) -> Tensor:
    """(C,) entropy of each codebook's mean code distribution over the N samples of (C, N, k)
    logits. ``reduce_mean`` (optional) maps the (C, 2^k) mean distribution to its mean over
    processes before the entropy is taken."""
    avg = mean_distribution(logits)
    if reduce_mean is not None:
        avg = reduce_mean(avg)
    return entropy(avg)
