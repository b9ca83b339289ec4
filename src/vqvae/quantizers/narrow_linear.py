"""A linear layer's function with a backward that suits narrow projections.

The FSQ family projects wide features (dim 256) to a handful of channels (4) and back. For
these shapes ``nn.Linear``'s backward forms its products in operand orders that CPU BLAS runs
several times slower than the equivalent transposed product: ``g.t() @ x`` with ``g`` wide and
``x`` narrow (the weight gradient of the widening projection), and ``g @ W`` with ``W`` a
row-major (wide, narrow) weight (the input gradient through it). ``narrow_linear`` computes
the same values with the fast orders.

:func:`narrow_outer` forms the weight gradients ``a.T @ b`` (a narrow, b wide, many rows): CPU
BLAS runs that product on one thread whatever the thread count, so it is split by rows into
one batched product per thread.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .onednn_linear import linear, routed
from .tracing import tracing

#: Fewer rows than this: ``a.T @ b`` on one thread, the split costs more than it saves.
SPLIT_ROWS = 2048


@functools.cache
def _avx512() -> bool:
    return torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX512_BF16", "AMX")


def narrow_routed(x: Tensor, weight: Tensor) -> bool:
    """Whether a product with a narrow side takes oneDNN (:func:`.onednn_linear.routed`): only
    where torch runs AVX-512 code. Held to AVX2 (``ATEN_CPU_CAPABILITY=avx2
    ONEDNN_MAX_CPU_ISA=AVX2``) oneDNN took 1.2 ms for the (8192, 4) x (8192, 256) weight
    gradient inside an FSQ call, MKL less: the FSQ call ran 5-15% faster without it."""
    return not tracing() and _avx512() and routed(x, weight)  # (no cached call in a graph)


def narrow_outer(a: Tensor, b: Tensor) -> Tensor:
    """``a.T @ b`` for ``a`` (N, p) and ``b`` (N, q), both row-major: a weight gradient.

    Through oneDNN where :func:`.onednn_linear.linear` takes that route (float32 CPU tensors,
    big enough): inside an FSQ call at (8192, 4 or 5) x (8192, 256), one thread, 0.47 ms
    against MKL's 0.63, and oneDNN spreads it over the threads itself. Otherwise, with several
    CPU threads the N rows are cut into one contiguous slab per thread and the slabs' products
    run as one ``bmm`` (which torch spreads over the threads), then summed: at (8192, 4) x
    (8192, 256) on two threads, half the time of the single ``mm``, which runs on one. The rows
    left over by the cut are added by one ``addmm_``.
    """
    if narrow_routed(a.t(), b.t()):
        return linear(a.t(), b.t())
    n = a.shape[0]
    threads = 1 if tracing() or a.device.type != "cpu" else torch.get_num_threads()
    if threads < 2 or n < SPLIT_ROWS or not (a.is_contiguous() and b.is_contiguous()):
        return a.t() @ b
    rows = n // threads
    cut = rows * threads
    slabs = torch.bmm(a[:cut].view(threads, rows, -1).transpose(1, 2),
                      b[:cut].view(threads, rows, -1))
    total = slabs.sum(0)
    if cut < n:
        total.addmm_(a[cut:].t(), b[cut:])
    return total


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
        want_b = ctx.has_bias and ctx.needs_input_grad[2]
        if ctx.needs_input_grad[1] and out_features > in_features:
            # the narrow operand goes first, transposed; with a bias, a column of ones on it
            # gives the bias gradient from the same pass over the wide gradient
            if want_b:
                both = narrow_outer(torch.cat([x, torch.ones_like(x[:, :1])], 1), grad)
                grad_w, grad_b = both[:-1].t(), both[-1]
            else:
                grad_w = narrow_outer(x, grad).t()
        elif ctx.needs_input_grad[1]:
            grad_w = narrow_outer(grad, x)
        if want_b and grad_b is None:
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

