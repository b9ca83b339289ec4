"""FSQ's projected call on CPU past ``project_in``, in C.

The projected FSQ call in tensor operations (:class:`.fsq._ProjectedFSQ`) is some twenty
operations on narrow ``(N, c)`` blocks, with their Python calls, and several passes over the
``(N, dim)`` ones: the gradient read twice for two narrow products and summed for the bias,
the input gradient written, the input read again for its weight gradient. Here
``project_in``, the bound's tanh and the projection of the code table stay torch operations,
and the rest is one pass over the rows each way (:func:`.cpu_kernel.fsq_forward`,
:func:`.cpu_kernel.fsq_backward`), split over torch's threads where the kernels are built
with OpenMP (:func:`.cpu_kernel.parallel`): the same codes and indices, with a code table the
same output bit for bit (the forward's arithmetic is the tensor form's, without fused
multiply-adds; tanh is torch's, whose last bits a C ``tanhf`` would not reproduce), without
one the codes projected as the tensor form projects them, and the same gradients up to
float32 rounding. The
gradient of ``out.sum()`` (one value broadcast to every row) is read where it is, not copied.

Measured (2-core AMD EPYC, this machine's noisy memory; ours and the library taking turns, a
training call, medians): at the course MLP's call (2048 rows of 16 features, 3 channels, 512
codes, the inward clamp) 251 µs against the tensor form's 344 and the library's 429, one
thread; at (8, 1024, 256) and levels [8, 5, 5, 5] 4.0 ms against 4.9 and 8.5 (two threads 2.5
against 3.2 and 5.5); at (4, 1024, 512) and 64000 codes (no table) 3.5 against 6.4 and 8.6.

It takes float32 CPU calls with one codebook, both projections with their biases, and no
tracing (:func:`usable`); everything else goes the tensor way.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import cpu_kernel

#: with several torch threads and kernels built without OpenMP (one thread each), the largest
#: ``rows · dim`` taken: the tensor form's parallel operations win above it (two threads, 16
#: features: 0.33 against 0.34-0.44 ms at 4096 rows, 0.49-0.59 against 0.47-0.49 at 8192, 0.78
#: against 0.64 at 16384)
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
        grad, copied = rows_of(grad.float())
        grads = cpu_kernel.fsq_backward(grad, x, saved, code, w_in, w_out, slope, ctx.bound,
                                        *ctx.has_bias, in_place=copied)
        return (None, *grads, None, None, None, None)


def rows_of(grad: Tensor) -> tuple[Tensor, bool]:
    """``grad`` ``(N, dim)`` as :func:`.cpu_kernel.fsq_backward` takes it, and whether that is
    a copy (ours, then: it can take the input gradient in place). One row broadcast to all
    (the gradient of ``out.sum()`` or ``out.mean()`` arrives as one value, strides (0, 0)) is
    passed as that row, not copied ``N`` times: 8 MB written and read again at (8192, 256)."""
    if grad.stride(-1) == 1 and grad.stride(0) in (0, grad.shape[1]):
        return grad, False
    if grad.stride(0) == 0:
        return grad[:1].contiguous().expand(grad.shape), False
    return grad.contiguous(), True


def usable(x: Tensor, project_in, project_out, num_codebooks: int) -> bool:
    """Whether :func:`projected_call` takes this call (see the module docstring)."""
    weights = (project_in.weight, project_out.weight, project_in.bias, project_out.bias)
    # supports_rows first: it is false while tracing, where get_num_threads would break the
    # graph (a traced call takes the tensor form)
    return (cpu_kernel.supports_rows(x) and num_codebooks == 1
            and all(w is not None and w.dtype == torch.float32 and w.device.type == "cpu"
                    for w in weights)
            and project_in.weight.shape[0] <= cpu_kernel.FSQ_MAX_CHANNELS
            and (torch.get_num_threads() == 1 or x.numel() <= MAX_PARALLEL_WORK
                 or cpu_kernel.parallel()))


def projected_call(x: Tensor, project_in, project_out, constants: tuple[Tensor, ...],
                   levels: Tensor, basis: Tensor, symmetric: bool, clamp: bool | str,
                   table: tuple[Tensor, Tensor, Tensor] | None
                   ) -> tuple[Tensor, Tensor] | None:
    """``(out (N, dim), index (N,))`` of the projected call on ``x`` ``(N, dim)``, or None when
    ``project_in`` gave a value that is not finite (the tensor form then runs the call and
    reports it). ``constants``: :meth:`.fsq.FSQ._constants`; ``clamp``: False (tanh), True
    (torch's clamp) or ``"inward"``; ``table``: :meth:`.fsq.FSQ._table_for` (None: each row's
    code is projected on its own)."""
    shift, scale, bias, centre, step, slope = constants
    w_in, b_in = project_in.weight, project_in.bias
    w_out, b_out = project_out.weight, project_out.bias
    with torch.no_grad():
        u = torch.addmm(b_in, x, w_in.t()).add_(shift)  # as the tensor form computes it
        bounded = None if clamp else torch.tanh(u)
        # project_out of every code, gathered by index; or of each row's code, as decoding
        # the indices computes it (the same bits)
        rows = torch.addmm(b_out, table[0], w_out.t()) if table is not None else None
        found = cpu_kernel.fsq_forward(u, bounded, (scale, bias, centre, step), levels, basis,
                                       symmetric, rows)
        if found is None:
            return None
        out, index, code = found
        if out is None:
            out = torch.addmm(b_out, code, w_out.t())
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, w_in, b_in, w_out, b_out)):
        bound = (cpu_kernel.FSQ_TANH if not clamp else
                 cpu_kernel.FSQ_INWARD if clamp == "inward" else cpu_kernel.FSQ_CLAMP)
        out = _FSQGrad.apply(out, x, w_in, b_in, w_out, b_out, u if clamp else bounded, code,
                             slope, bound)
    return out, index
