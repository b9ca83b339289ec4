"""A linear layer's function with a backward that suits narrow projections.

The FSQ family projects wide features (dim 256) to a handful of channels (4) and back. For
these shapes ``nn.Linear``'s backward forms its products in operand orders that CPU BLAS runs
several times slower than the equivalent transposed product: ``g.t() @ x`` with ``g`` wide and
``x`` narrow (the weight gradient of the widening projection), and ``g @ W`` with ``W`` a
row-major (wide, narrow) weight (the input gradient through it). ``narrow_linear`` computes
the same values with the fast orders.
"""

from __future__ import annotations

import torch
from torch import Tensor


class _NarrowLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        if bias is None:
            return x @ weight.t()
        return torch.addmm(bias, x, weight.t())

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        out_features, in_features = weight.shape
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # a row-major (wide, narrow) weight is fast only as the transpose of its transpose
            w = weight.t().contiguous().t() if out_features > in_features else weight
            grad_x = grad @ w
        if ctx.needs_input_grad[1]:
            # the narrow operand goes first, transposed
            grad_w = grad.t() @ x if out_features <= in_features else (x.t() @ grad).t()
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(0)
        return grad_x, grad_w, grad_b


def narrow_linear(x: Tensor, linear: torch.nn.Module) -> Tensor:
    """``linear(x)`` for an ``nn.Linear`` (or ``nn.Identity``), over ``(..., in_features)``."""
    if not isinstance(linear, torch.nn.Linear):
        return linear(x)
    if torch.is_autocast_enabled(x.device.type) or x.dtype != linear.weight.dtype:
        return linear(x)
    flat = x.reshape(-1, x.shape[-1])
    return _NarrowLinear.apply(flat, linear.weight, linear.bias).view(*x.shape[:-1], -1)
