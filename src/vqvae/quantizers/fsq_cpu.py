"""FSQ's projected call with a clamp bound on CPU, past ``project_in``, in C.

At the course MLP's call (2048 rows of 16 features, 3 channels, 512 codes) the work of the
projected FSQ call is a few thousand multiply-adds; the tensor form
(:class:`.fsq._ProjectedFSQ`) spends its time on some twenty tensor operations and their
Python calls, forward and backward. Here ``project_in`` and the projection of the code table
stay matrix products, and the rest is one pass over the rows each way
(:func:`.cpu_kernel.fsq_clamp_forward`, :func:`.cpu_kernel.fsq_clamp_backward`): the same
codes, indices and output, bit for bit (the forward's arithmetic is the tensor form's, without
fused multiply-adds), and the same gradients up to float32 rounding.

It takes float32 CPU calls with a code table (few codes, many rows), the clamp bounds
(``bound_hard_clamp`` or ``inward_clamp``; tanh is left to torch's vectorised tanh, whose
last bits a C ``tanhf`` would not reproduce), both projections, and no tracing; everything
else goes the tensor way.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import cpu_kernel


class _ClampFSQ(torch.autograd.Function):
    """The gradients of the call whose forward :func:`projected_call` ran: ``out`` comes in
    computed, and leaves as the node's output."""

    @staticmethod
    def forward(ctx, out, x, w_in, b_in, w_out, b_out, u, code, slope, inward):
        ctx.save_for_backward(x, w_in, w_out, u, code, slope)
        ctx.inward = inward
        ctx.has_bias = (b_in is not None, b_out is not None)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, w_in, w_out, u, code, slope = ctx.saved_tensors
        # (contiguous: the gradient of a sum arrives as one expanded value)
        grads = cpu_kernel.fsq_clamp_backward(grad.contiguous().float(), x, u, code, w_in, w_out,
                                              slope, ctx.inward, *ctx.has_bias)
        return (None, *grads, None, None, None, None)


def usable(x: Tensor, project_in, project_out, table, clamp) -> bool:
    """Whether :func:`projected_call` takes this call (see the module docstring)."""
    weights = (project_in.weight, project_out.weight, project_in.bias, project_out.bias)
    return (bool(clamp) and table is not None and x.dtype == torch.float32
            and x.device.type == "cpu"
            and all(w is not None and w.dtype == torch.float32 and w.device.type == "cpu"
                    for w in weights)
            and project_in.weight.shape[0] <= cpu_kernel.FSQ_MAX_CHANNELS
            and cpu_kernel.supports_rows(x))


def projected_call(x: Tensor, project_in, project_out, constants: tuple[Tensor, ...],
                   levels: Tensor, basis: Tensor, symmetric: bool, inward: bool,
                   table: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor] | None:
    """``(out (N, dim), index (N,))`` of the projected call on ``x`` ``(N, dim)``, or None when
    ``project_in`` gave a NaN (the tensor form then runs the call and reports it).
    ``constants``: :meth:`.fsq.FSQ._constants`; ``inward``: the inward clamp's gradient (else
    torch's clamp's)."""
    shift, scale, bias, centre, step, slope = constants
    w_in, b_in = project_in.weight, project_in.bias
    w_out, b_out = project_out.weight, project_out.bias
    with torch.no_grad():
        h = torch.addmm(b_in, x, w_in.t())
        rows = torch.addmm(b_out, table[0], w_out.t())  # project_out of every code
    found = cpu_kernel.fsq_clamp_forward(h, (shift, scale, bias, centre, step),
                                         levels.long(), basis, symmetric, rows)
    if found is None:
        return None
    out, index, u, code = found
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, w_in, b_in, w_out, b_out)):
        out = _ClampFSQ.apply(out, x, w_in, b_in, w_out, b_out, u, code, slope, inward)
    return out, index
