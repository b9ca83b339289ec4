"""The differentiable part of quantization: output, loss, and the gradients they pass back.

Given encoder vectors ``x`` and their codes ``q``, :func:`quantize` returns ``q`` (exactly: so
``quantized`` equals ``decode(indices)`` bit for bit) and the loss

    loss = commitment_weight · mse(x, sg(q)) + codebook_weight · mse(sg(x), q)

The commitment term trains the encoder (moves ``x`` toward its code), the codebook term trains
the codes (moves ``q`` toward ``x``). Both have the value ``mse(x, q)``, so it is computed once
from one ``x - q``, which the backward pass reuses.

The gradient of the output reaches ``x`` through one of two estimators:

- straight-through (van den Oord et al., 2017), the seed's ``(q - x).detach() + x``: the
  gradient passes to ``x`` unchanged;
- rotation trick (Fifty et al., 2024, arXiv 2410.06424, §4.2): the output is treated as
  ``λ R x`` with ``R`` the rotation taking ``x̂`` to ``q̂`` and ``λ = ||q|| / ||x||`` held
  constant, so ``x`` receives ``λ Rᵀ g``, which tells the encoder where ``x`` sits in its cell.

The output passes no gradient to ``q``: codes learn only from the codebook term (or from the EMA).
One autograd function instead of the textbook expressions: ``x + (q - x).detach()`` rounds (its
value differs from ``q`` in the last bits), and the fused form saves passes over the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class _Quantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, q: Tensor, commitment_weight: float, codebook_weight: float,
                rotation: bool):
        diff = x - q  # (N, D)
        flat = diff.reshape(-1)
        mse = torch.dot(flat, flat) / flat.numel()  # one pass, no temporary
        ctx.weights = (commitment_weight, codebook_weight)
        ctx.rotation = rotation
        saved = [diff]
        if rotation:
            eps = torch.finfo(x.dtype).eps
            x_norm = x.norm(dim=-1, keepdim=True).clamp(min=eps)  # (N, 1)
            q_norm = q.norm(dim=-1, keepdim=True).clamp(min=eps)
            u, v = x / x_norm, q / q_norm  # x̂, q̂
            # R = I - 2 r rᵀ + 2 v uᵀ maps u to v; if u = -v, r = 0 and R = I - 2 u uᵀ reflects
            r = F.normalize(u + v, dim=-1, eps=eps)
            saved += [u, v, r, q_norm / x_norm]
        ctx.save_for_backward(*saved)
        # q is returned as is (no copy): its gradient is defined by backward() below
        return q, (commitment_weight + codebook_weight) * mse

    @staticmethod
    def backward(ctx, grad_out: Tensor, grad_loss: Tensor):
        diff, *rotation = ctx.saved_tensors
        commitment_weight, codebook_weight = ctx.weights
        scale = 2.0 / diff.numel() * grad_loss
        if ctx.rotation:
            u, v, r, ratio = rotation
            # λ Rᵀ g = λ (g - 2 r (r·g) + 2 u (v·g))
            r_dot = (r * grad_out).sum(-1, keepdim=True)
            v_dot = (v * grad_out).sum(-1, keepdim=True)
            grad_out = ratio * (grad_out - 2 * r * r_dot + 2 * u * v_dot)
        grad_x = grad_q = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.addcmul(grad_out, diff, commitment_weight * scale)
        if ctx.needs_input_grad[1]:
            grad_q = diff * (-codebook_weight * scale)
        return grad_x, grad_q, None, None, None


def quantize(x: Tensor, q: Tensor, *, commitment_weight: float = 1.0,
             codebook_weight: float = 0.0, rotation: bool = False) -> tuple[Tensor, Tensor]:
    """``(output, loss)`` for encoder vectors ``x`` and their code vectors ``q``, both ``(N, D)``.

    ``output`` equals ``q``; its gradient reaches ``x`` by straight-through (or the rotation
    trick). ``loss`` is the weighted commitment + codebook loss, a scalar.
    """
    return _Quantize.apply(x, q, float(commitment_weight), float(codebook_weight), rotation)
