"""BinaryMapper: logits of independent bits to a sampled one-hot code over 2^bits codes.

From Fleuret 2025 (arXiv 2510.17558), a stable alternative to a VAE bottleneck: ``bits``
logits give independent Bernoullis; a sample of them is a code index (bit ``d`` worth 2^d,
least significant first, as in the library), returned one-hot with a straight-through
gradient from the exact code probabilities ``prod_d p_d^{b_d} (1 - p_d)^{1 - b_d}``. The
auxiliary loss ``relu(bits ln 2 - H - threshold)`` (the KL to the uniform code distribution
beyond a free budget) keeps the bits from collapsing. A drop-in for
``vector_quantize_pytorch.BinaryMapper``::

    mapper = BinaryMapper(bits=8)
    one_hot, indices, aux_loss = mapper(logits, return_indices=True)  # (..., 8) -> (..., 256)

NaN/Inf logits raise :class:`QuantizerInputError` in an immediate call. A deferred call
(compiled, or on an accelerator; see :mod:`vqvae.quantizers.guard`) cannot raise: the one-hot
rows of such logits come out NaN (their index is a code drawn at probability 1/2 per bit, not a
meaningful one). The mapper has no state for a bad batch to corrupt.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import guard
from .lfq_entropy import per_sample_entropy
from .vector_quantize import QuantizerInputError

NAT = math.log(2)  # one bit, in nats


def binary_entropy(logits: Tensor) -> Tensor:
    """Entropy (nats) of the joint of independent bits: summed over the last axis."""
    return per_sample_entropy(logits)


class BinaryMapper(nn.Module):
    def __init__(self, bits: int = 1, kl_loss_threshold: float = NAT,
                 deterministic_on_eval: bool = False):
        super().__init__()
        if bits < 1:
            raise ValueError(f"bits must be >= 1, got {bits}")
        self.bits = bits
        self.num_codes = 2**bits
        power_two = 2 ** torch.arange(bits)
        codes = (torch.arange(self.num_codes)[:, None] & power_two) != 0  # (2^bits, bits)
        self.register_buffer("power_two", power_two, persistent=False)
        self.register_buffer("codes", codes, persistent=False)
        self.kl_loss_threshold = kl_loss_threshold
        self.register_buffer("zero", torch.tensor(0.0), persistent=False)
        self.deterministic_on_eval = deterministic_on_eval

    def binary_entropy(self, logits: Tensor) -> Tensor:
        return binary_entropy(logits)

    def _check(self, logits: Tensor) -> None:
        if not isinstance(logits, Tensor) or not logits.is_floating_point():
            raise QuantizerInputError("logits must be a floating-point tensor")
        if logits.ndim < 1 or logits.shape[-1] != self.bits:
            raise QuantizerInputError(f"logits must have a last dimension of {self.bits}, "
                                      f"got shape {tuple(logits.shape)}")
        if guard.deferred(logits):
            return  # see the module docstring
        if not torch.isfinite(logits).all():
            raise QuantizerInputError("logits contain NaN or infinite values")

    def calc_aux_loss(self, logits: Tensor, reduce_aux_kl_loss: bool = True) -> Tensor:
        kl = self.bits * NAT - self.binary_entropy(logits)  # KL(q || uniform over codes)
        loss = F.relu(kl - self.kl_loss_threshold)
        return loss.mean() if reduce_aux_kl_loss else loss

    def log_prob(self, logits: Tensor, *, indices: Tensor | None = None,
                 one_hot: Tensor | None = None, sum_bits: bool = True) -> Tensor:
        """log q(code) of the given codes (indices, or one-hot over the last axis)."""
        if (indices is None) == (one_hot is None):
            raise ValueError("give exactly one of indices or one_hot")
        if one_hot is not None:
            indices = one_hot.argmax(-1)
        bits = self.codes[indices]  # (..., bits)
        log_probs = torch.where(bits, F.logsigmoid(logits), F.logsigmoid(-logits))
        return log_probs.sum(-1) if sum_bits else log_probs

    def forward(self, logits: Tensor, temperature: float = 1.0,
                straight_through: bool | None = None, calc_aux_loss: bool | None = None,
                deterministic: bool | None = None, return_indices: bool = False,
                reduce_aux_kl_loss: bool = True):
        self._check(logits)
        if deterministic is None:
            deterministic = self.deterministic_on_eval and not self.training
        if straight_through is None:
            straight_through = self.training
        if calc_aux_loss is None:
            calc_aux_loss = self.training

        prob = torch.sigmoid(logits / temperature)
        nonfinite = None
        if guard.deferred(logits):
            # 0 per row, NaN for a row holding a NaN or ±Inf; such a row is drawn at 1/2 per
            # bit (bernoulli refuses a NaN probability) and its one-hot made NaN below
            nonfinite = (logits.detach() - logits.detach()).sum(-1, keepdim=True)
            prob = torch.where(torch.isnan(nonfinite), 0.5, prob)
        sampled = (prob > 0.5) if deterministic else torch.bernoulli(prob).bool()
        indices = (sampled.long() * self.power_two).sum(-1)
        one_hot = F.one_hot(indices, self.num_codes).float()
        if nonfinite is not None:
            one_hot = one_hot + nonfinite.float()

        aux = self.calc_aux_loss(logits, reduce_aux_kl_loss) if calc_aux_loss else self.zero

        if straight_through:
            # exact code probabilities, computed in float32 whatever the logits' dtype
            lg = logits.float()
            soft = torch.exp(F.logsigmoid(-lg).sum(-1, keepdim=True)
                             + lg @ self.codes.T.float())  # log p(b) = sum logsig(-l) + b.l
            one_hot = one_hot + soft - soft.detach()

        if not return_indices:
            return one_hot, aux
        return one_hot, indices, aux
