"""FSQ's projected call on CPU past ``project_in``, in C.

The projected FSQ call in tensor operations (:class:`.fsq._ProjectedFSQ`) is some twenty
operations on narrow ``(N, c)`` blocks, with their Python calls, and several passes over the
``(N, dim)`` ones. Here ``project_in``, the bound's tanh and the projection of the code table
stay torch operations, and the rest is one pass over the rows each way on the calling thread
(:func:`.cpu_kernel.fsq_forward`, :func:`.cpu_kernel.fsq_backward`): the same
codes, indices and output, bit for bit (the forward's arithmetic is the tensor form's, without
fused multiply-adds; tanh is torch's, whose last bits a C ``tanhf`` would not reproduce), and
the same gradients up to float32 rounding.

At the course MLP's call (2048 rows of 16 features, 3 channels, 512 codes, the inward
clamp) a training call took 344 µs the tensor way and 251 µs here (the library's: 429 µs),
one thread.

It takes float32 CPU calls with a code table (few codes, many rows), both projections with
their biases, and no tracing, where the call is small (:func:`usable`); everything else goes
the tensor way.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import cpu_kernel

#: widest features taken: at 128 the two ways tie on one thread, at 256 the tensor form's
#: products win on two (3.3-3.6 against 2.5-2.7 ms for 8192 rows)
MAX_DIM = 64
#: with several torch threads, the largest ``rows · dim`` taken: the tensor form's parallel
#: operations win above it (two threads, 16 features: 0.33 against 0.34-0.44 ms at 4096
#: rows, 0.49-0.59 against 0.47-0.49 at 8192, 0.78 against 0.64 at 16384)
MAX_PARALLEL_WORK = 1 << 16


class _FSQGrad(torch.autograd.Function):
    """The gradients of the call whose forward :func:`projected_call` ran: ``out`` comes in
    computed, and leaves as the node's output."""

    @staticmethod
    def forward(ctx, out, x, w_in, b_in, w_out, b_out, saved, code, slope, bound):
        ctx.save_for_backward(x, w_in, w_out, saved, code, slope)
        ctx.bound = bound
        ctx.has_bias = (b_in is not None, b_out is not None)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, w_in, w_out, saved, code, slope = ctx.saved_tensors
        # (contiguous: the gradient of a sum arrives as one expanded value)
        grads = cpu_kernel.fsq_backward(grad.contiguous().float(), x, saved, code, w_in, w_out,
                                        slope, ctx.bound, *ctx.has_bias)
        return (None, *grads, None, None, None, None)


def usable(x: Tensor, project_in, project_out, table) -> bool:
    """Whether :func:`projected_call` takes this call (see the module docstring)."""
    weights = (project_in.weight, project_out.weight, project_in.bias, project_out.bias)
    return (table is not None and x.dtype == torch.float32 and x.device.type == "cpu"
            and all(w is not None and w.dtype == torch.float32 and w.device.type == "cpu"
                    for w in weights)
            and project_in.weight.shape[0] <= cpu_kernel.FSQ_MAX_CHANNELS
            and x.ndim == 2 and x.shape[1] <= MAX_DIM
            and (torch.get_num_threads() == 1 or x.numel() <= MAX_PARALLEL_WORK)
            and cpu_kernel.supports_rows(x))


def projected_call(x: Tensor, project_in, project_out, constants: tuple[Tensor, ...],
                   levels: Tensor, basis: Tensor, symmetric: bool, clamp: bool | str,
                   table: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor] | None:
    """``(out (N, dim), index (N,))`` of the projected call on ``x`` ``(N, dim)``, or None when
    ``project_in`` gave a value that is not finite (the tensor form then runs the call and
    reports it). ``constants``: :meth:`.fsq.FSQ._constants`; ``clamp``: False (tanh), True
    (torch's clamp) or ``"inward"``."""
    shift, scale, bias, centre, step, slope = constants
    w_in, b_in = project_in.weight, project_in.bias
    w_out, b_out = project_out.weight, project_out.bias
    with torch.no_grad():
        u = torch.addmm(b_in, x, w_in.t()).add_(shift)  # as the tensor form computes it
        bounded = None if clamp else torch.tanh(u)
        rows = torch.addmm(b_out, table[0], w_out.t())  # project_out of every code
    found = cpu_kernel.fsq_forward(u, bounded, (scale, bias, centre, step), levels, basis,
                                   symmetric, rows)
    if found is None:
        return None
    out, index, code = found
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, w_in, b_in, w_out, b_out)):
        bound = (cpu_kernel.FSQ_TANH if not clamp else
                 cpu_kernel.FSQ_INWARD if clamp == "inward" else cpu_kernel.FSQ_CLAMP)
        out = _FSQGrad.apply(out, x, w_in, b_in, w_out, b_out, u if clamp else bounded, code,
                             slope, bound)
    return out, index
