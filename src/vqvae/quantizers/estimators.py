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

:func:`quantize_residual` is the same for a residual stack (``residual.py``): one output for the
sum of the layers' codes, and the layers' commitment terms from running sums, so backward
needs no per-layer tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _rotation(x: Tensor, q: Tensor) -> list[Tensor]:
    """``[u, v, r, λ]`` of the rotation trick: ``λ R`` with ``R = I - 2 r rᵀ + 2 v uᵀ`` maps
    ``x`` to ``q`` (``u = x̂``, ``v = q̂``, ``λ = ||q|| / ||x||``)."""
    eps = torch.finfo(x.dtype).eps
    x_norm = x.norm(dim=-1, keepdim=True).clamp(min=eps)  # (N, 1)
    q_norm = q.norm(dim=-1, keepdim=True).clamp(min=eps)
    u, v = x / x_norm, q / q_norm  # x̂, q̂
    # R maps u to v; if u = -v, r = 0 and R = I - 2 u uᵀ reflects
    r = F.normalize(u + v, dim=-1, eps=eps)
    return [u, v, r, q_norm / x_norm]


def _rotate_back(grad: Tensor, u: Tensor, v: Tensor, r: Tensor, ratio: Tensor) -> Tensor:
    """``λ Rᵀ g = λ (g - 2 r (r·g) + 2 u (v·g))``: the gradient the rotation trick gives ``x``."""
    r_dot = (r * grad).sum(-1, keepdim=True)
    v_dot = (v * grad).sum(-1, keepdim=True)
    return ratio * (grad - 2 * r * r_dot + 2 * u * v_dot)


class _Quantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, q: Tensor, commitment_weight: float, codebook_weight: float,
                rotation: bool):
        diff = x - q  # (N, D)
        flat = diff.reshape(-1)
        ctx.weights = (commitment_weight, codebook_weight)
        ctx.rotation = rotation
        saved = [diff]
        if rotation:
            saved += _rotation(x, q)
        ctx.save_for_backward(*saved)
        # the weighted mse: one pass (dot), no temporary
        loss = torch.dot(flat, flat).mul_((commitment_weight + codebook_weight) / flat.numel())
        # q is returned as is (no copy): its gradient is defined by backward() below
        return q, loss

    @staticmethod
    def backward(ctx, grad_out: Tensor, grad_loss: Tensor):
        diff, *rotation = ctx.saved_tensors
        commitment_weight, codebook_weight = ctx.weights
        if ctx.rotation:
            grad_out = _rotate_back(grad_out, *rotation)
        grad_x = grad_q = None
        if ctx.needs_input_grad[0]:
            # d/dx of commitment_weight · mean((x - q)²) = 2 · commitment_weight / n · (x - q)
            grad_x = torch.addcmul(grad_out, diff, grad_loss * (2.0 * commitment_weight
                                                                / diff.numel()))
        if ctx.needs_input_grad[1]:
            grad_q = diff * (grad_loss * (-2.0 * codebook_weight / diff.numel()))
        return grad_x, grad_q, None, None, None


def quantize(x: Tensor, q: Tensor, *, commitment_weight: float = 1.0,
             codebook_weight: float = 0.0, rotation: bool = False) -> tuple[Tensor, Tensor]:
    """``(output, loss)`` for encoder vectors ``x`` and their code vectors ``q``, both ``(N, D)``.

    ``output`` equals ``q``; its gradient reaches ``x`` by straight-through (or the rotation
    trick). ``loss`` is the weighted commitment + codebook loss, a scalar.
    """
    return _Quantize.apply(x, q, float(commitment_weight), float(codebook_weight), rotation)


class _QuantizeResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, q_sum: Tensor, residual_sum: Tensor | None, sq_sum: Tensor,
                commitment_weight: float, rotation: bool):
        ctx.scale = 2.0 * commitment_weight / x.numel()
        ctx.rotation = rotation
        saved = [residual_sum if residual_sum is not None else x.new_zeros(())]
        if rotation:
            saved += _rotation(x, q_sum)
        ctx.save_for_backward(*saved)
        return q_sum, sq_sum * (commitment_weight / x.numel())

    @staticmethod
    def backward(ctx, grad_out: Tensor, grad_loss: Tensor):
        residual_sum, *rotation = ctx.saved_tensors
        if ctx.rotation:
            grad_out = _rotate_back(grad_out, *rotation)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out if residual_sum.ndim == 0 else \
                torch.addcmul(grad_out, residual_sum, ctx.scale * grad_loss)
        return grad_x, None, None, None, None, None


def quantize_residual(x: Tensor, q_sum: Tensor, residual_sum: Tensor | None, sq_sum: Tensor, *,
                      commitment_weight: float = 1.0,
                      rotation: bool = False) -> tuple[Tensor, Tensor]:
    """``(output, commitment loss)`` of a residual quantizer, from what its layers computed.

    With ``r_1 = x`` and ``r_{l+1} = r_l - q_l`` (the ``q_l`` held constant), the layers give
    ``q_sum = Σ_l q_l``, ``residual_sum = Σ_l r_{l+1}`` and ``sq_sum = Σ_l ||r_{l+1}||²``. Then

        loss = commitment_weight · Σ_l mse(r_l, sg(q_l)) = commitment_weight · sq_sum / x.numel()

    whose gradient is ``2 · commitment_weight / x.numel() · residual_sum``: each layer's term moves
    ``x`` toward what that layer chose, and no layer's residual needs to be kept for backward.
    ``output`` equals ``q_sum``; its gradient reaches ``x`` once, by straight-through (or the
    rotation trick) from ``x`` to the whole sum, as if one quantizer had produced ``q_sum``.
    ``residual_sum`` may be ``None`` when ``x`` needs no gradient from the loss.
    """
    return _QuantizeResidual.apply(x, q_sum, residual_sum, sq_sum, float(commitment_weight),
                                   rotation)


# ---------------------------------------------------------------------------------------------
# Output estimators of VectorQuantize, one function each, chosen once when the layer is built:
# ``estimator(x, q) -> output`` with the value of ``q`` (up to rounding) and the gradient rule
# of its name. ``x`` and ``q`` are (..., D).


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, q: Tensor):
        return q.detach().clone()

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        return grad_out, None


def straight_through(x: Tensor, q: Tensor) -> Tensor:
    """``x + sg(q - x)``: the gradient passes to ``x`` unchanged, none to ``q``. The value is
    ``q`` exactly (the textbook expression rounds)."""
    return _StraightThrough.apply(x, q)


class _Rotate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, q: Tensor):
        ctx.save_for_backward(*_rotation(x, q))
        return q.detach().clone()

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        return _rotate_back(grad_out, *ctx.saved_tensors), None


def rotation_trick(x: Tensor, q: Tensor) -> Tensor:
    """Rotation trick (Fifty et al., 2024): value ``q``, ``x`` receives ``λ Rᵀ g``."""
    return _Rotate.apply(x, q)


def directional_reparam(x: Tensor, q: Tensor, variance: float) -> Tensor:
    """DiVeQ (Vali et al., 2025): ``x + sg(d̃) · ||q - x||`` with ``d̃`` the unit vector of
    ``q - x + sqrt(variance) · N(0, I)``. The value is ``q`` moved along a noisy direction at the
    exact distance; ``x`` gets ``(I - d̃ eᵀ) g`` and ``q`` gets ``d̃ eᵀ g`` (``e`` the unit
    error)."""
    error = q - x
    noisy = error.detach()
    if variance > 0:
        noisy = noisy + variance ** 0.5 * torch.randn_like(noisy)
    direction = F.normalize(noisy, dim=-1)
    return x + direction * error.norm(dim=-1, keepdim=True)


def no_gradient_to_input(x: Tensor, q: Tensor) -> Tensor:
    """``q`` itself: only the codes (a learnable codebook) receive the gradient."""
    return q


def sync_update(output: Tensor, q: Tensor, nu: float) -> Tensor:
    """Synchronised update (Huh et al., 2023, vqtorch eq. 21): ``output + ν q - sg(ν q)``: the
    value is unchanged, the codes additionally receive ``ν`` times the output's gradient."""
    return output + nu * q - (nu * q).detach()
