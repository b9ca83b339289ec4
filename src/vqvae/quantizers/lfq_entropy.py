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


def _halves_matrix(k: int, device, dtype) -> Tensor:
    """(k, 2^k1 + 2^k2) block-diagonal bit matrix: the high k1 = k // 2 bits' settings in the
    first 2^k1 columns, the low k2 bits' in the rest."""
    k1 = k // 2
    out = torch.zeros(k, 2**k1 + 2 ** (k - k1), device=device, dtype=dtype)
    out[:k1, : 2**k1] = bit_matrix(k1, device, dtype)
    out[k1:, 2**k1 :] = bit_matrix(k - k1, device, dtype)
    return out


def mean_distribution(logits: Tensor) -> Tensor:
    """(C, 2^k) mean over samples of each codebook's code distribution, from (C, N, k) logits.

    For each half of the bits, log P(setting) = sum_d log sigmoid(-l_d) + sum_d b_d l_d (as
    log sigmoid(l) - log sigmoid(-l) = l): one matmul and one exp give both halves.
    """
    k = logits.shape[-1]
    k1 = k // 2
    neg = F.logsigmoid(-logits)  # (C, N, k)
    base = torch.stack([neg[..., :k1].sum(-1), neg[..., k1:].sum(-1)], -1)  # (C, N, 2)
    widths = torch.tensor([2**k1, 2 ** (k - k1)], device=logits.device)
    base = base.repeat_interleave(widths, dim=-1, output_size=2**k1 + 2 ** (k - k1))
    probs = torch.exp(torch.baddbmm(base, logits, _halves_matrix(k, logits.device, logits.dtype)
                                    .expand(logits.shape[0], -1, -1)))
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
