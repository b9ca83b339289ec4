"""Float32 matrix products on CPU through oneDNN instead of torch's default BLAS.

torch runs ``mm``/``addmm`` of float32 CPU tensors through MKL, which on AMD processors keeps to
its AVX2 code even where AVX-512 is there; oneDNN, which torch also ships (its ``mkldnn``
linear kernels), uses the widest instructions the CPU has, up to ``ONEDNN_MAX_CPU_ISA``.
Measured on the project's AMD EPYC, one thread, ``(1024, 512) x (512, 1024)``: 4.5 ms
against MKL's 11.1 ms; held to AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2``) the two are about even;
below about ``2**21`` multiply-adds oneDNN's fixed cost (some 10 µs a call) outweighs it.

:func:`linear` is ``x @ weight.T (+ bias)``: through oneDNN for float32 CPU tensors big enough,
when torch has oneDNN and nothing traces the call (a ``torch.compile``/``torch.export`` graph
gets torch's own ops, which every backend lowers); through ``mm``/``addmm`` otherwise. It has
no autograd formula: callers use it under ``no_grad`` or inside their own backward. The two
routes sum in different orders, so results differ in the last bits: a caller that promises
equal bits between two calls (a forward and a decode) must compute both with :func:`linear`.
"""

from __future__ import annotations

import functools
import platform

import torch
from torch import Tensor

from .tracing import tracing

#: Fewer multiply-adds than this: torch's ``mm``, as fast or faster.
MIN_MACS = 1 << 21


@functools.cache
def available() -> bool:
    """Whether torch was built with oneDNN and has its linear kernel, on an x86 CPU (the only
    kind measured: elsewhere torch's own route stays)."""
    return (platform.machine().lower() in ("x86_64", "amd64")
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def routed(x: Tensor, weight: Tensor) -> bool:
    """Whether :func:`linear` would take the oneDNN route for these operands."""
    # tracing first: a traced size is symbolic, and comparing it would guard on it
    return (not tracing() and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32
            and weight.device.type == "cpu" and x.ndim == 2 and weight.ndim == 2
            and x.shape[0] * x.shape[1] * weight.shape[0] >= MIN_MACS
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and not torch.is_autocast_enabled("cpu") and available())


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight.T + bias`` for ``x`` ``(N, in)``, ``weight`` ``(out, in)``, ``bias``
    ``(out,)`` or None; see the module docstring for the route. No gradient."""
    if routed(x, weight) and (bias is None or (bias.dtype == torch.float32
                                               and not (torch.is_grad_enabled()
                                                        and bias.requires_grad))):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return x @ weight.t() if bias is None else torch.addmm(bias, x, weight.t())


class _Linear(torch.autograd.Function):
    """:func:`linear` with its gradients, each product again through :func:`linear`."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = linear(grad, weight.t())  # (N, out) @ (out, in)
        if ctx.needs_input_grad[1]:
            grad_w = linear(grad.t(), x.t())  # (out, N) @ (N, in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(0)
        return grad_x, grad_w, grad_b


def linear_with_grad(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """:func:`linear` (the same bits) with autograd: the gradients of ``x``, ``weight`` and
    ``bias`` as ``nn.functional.linear`` gives them, up to rounding. While tracing, under
    autocast or off float32 CPU tensors: ``nn.functional.linear`` itself."""
    if tracing() or torch.is_autocast_enabled(x.device.type) or not (
            x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32):
        return torch.nn.functional.linear(x, weight, bias)
    return _Linear.apply(x, weight, bias)
