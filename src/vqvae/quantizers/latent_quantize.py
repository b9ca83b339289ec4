"""LatentQuantize (Hsu et al. 2023, latent quantization): a drop-in for the library's class.

Each latent channel ``i`` has its own small learnable scalar codebook ``values_per_latent[i]``
(``levels[i]`` values, initialised evenly in [-0.5, 0.5] with 0 among them); a channel is
replaced by its nearest value, with straight-through gradients to the input. The index of a
vector is its tuple of per-channel value indices read as a mixed-radix number.

Call as in ``vector_quantize_pytorch`` 1.32: ``quantized, indices, loss = lq(x)`` with ``x``
channel first, ``(b, dim, ...)``. Where the library is wrong we differ, on purpose:

- The scalar codebooks learn. The library's output is ``z + (q - z).detach()``, so no gradient
  ever reaches ``values_per_latent`` (``optimize_values=True`` does nothing). Here the loss is
  the paper's: ``commitment_loss_weight * ||z - sg(q)||^2`` (moves the encoder output) plus
  ``quantization_loss_weight * ||sg(z) - q||^2`` (moves the values), on the latent ``z`` after
  ``project_in``; without projections this equals the library's value.
- Indices come from the nearest-value search, and ``indices_to_codes`` reads the current
  values. The library reads indices back from the straight-through output (an ulp off the
  value) and truncates with ``.to(int32)``, so some come out one low even on the initial grid,
  and it decodes from the initial grid, wrong once the values move. Indices are ``int64``.
- Sequences ``(b, n, dim)`` channels last, as the library's README shows, are accepted when
  ``x.shape[1] != dim`` (the library rejects them); the output keeps the input's layout.
- ``in_place_codebook_optimizer`` works (the library reads a missing ``self.optimize_values``).
- Non-finite input raises :class:`QuantizerInputError`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer

from .fsq import all_finite, check_finite
from .tracing import tracing
from .vector_quantize import QuantizerInputError


def _nearest_channel_major(h: Tensor, table: Tensor) -> tuple[Tensor, Tensor]:
    """``nearest_value`` for ``h`` laid out (codebook_dim, M): the indices and the values
    themselves, both (codebook_dim, M)."""
    ordered, order = table.sort(-1)
    midpoints = (ordered[:, 1:] + ordered[:, :-1]) * 0.5  # +inf past each channel's values
    rank = torch.searchsorted(midpoints, h)
    return order.gather(1, rank), ordered.gather(1, rank)


def nearest_value(h: Tensor, table: Tensor) -> Tensor:
    """Index of the nearest entry of ``table[i]`` (padded with +inf) for each ``h[:, i]``.

    Sorting each channel's few values and bisecting at the midpoints costs a fraction of the
    (M, codebook_dim, widest) distance tensor an argmin would need. Ties at a midpoint go to
    the smaller value.
    """
    ordered, order = table.sort(-1)
    midpoints = (ordered[:, 1:] + ordered[:, :-1]) * 0.5  # +inf past each channel's values
    rank = torch.searchsorted(midpoints, h.t().contiguous())  # (codebook_dim, M)
    return order.gather(1, rank).t().contiguous()


class _LatentQuantizeCall(torch.autograd.Function):
    """project_in, nearest value per channel, straight-through output, both losses and
    project_out in one node (one node instead of ~15 small ones: the call is overhead-bound).

    Forward on x (N, dim): h = project_in(x) viewed (M, codebook_dim), q = nearest value,
    loss = (cw + qw) * mean((h - q)^2), out = project_out(q). Backward: d q / d h = identity
    (straight-through); the loss sends cw * 2 (h - q) / n to h (commitment) and
    qw * 2 (q - h) / n to the chosen values (quantization), as the paper's two stop-gradient
    terms do.
    """

    @staticmethod
    def forward(ctx, z, channel_first, w_in, b_in, w_out, b_out, table_index, padding, offsets,
                codebook_dim, cw, qw, with_loss, *values):
        # the layout change happens here, not as autograd views around the node; a
        # channel-first input is copied to rows (addmm is 3x slower on the transposed view)
        dim = z.shape[1] if channel_first else z.shape[-1]
        x = (z.flatten(2).transpose(1, 2) if channel_first else z).reshape(-1, dim).contiguous()
        flat = torch.cat(values).to(x.dtype)
        h = x if w_in is None else torch.addmm(b_in, x, w_in.t()) if b_in is not None \
            else x @ w_in.t()
        hq = h.reshape(-1, codebook_dim)
        level = nearest_value(hq, flat[table_index].masked_fill_(padding, math.inf))
        position = level + offsets
        q = flat[position]
        diff = None
        if with_loss:
            diff = hq - q
            flat_diff = diff.view(-1)
            loss = torch.dot(flat_diff, flat_diff) * ((cw + qw) / flat_diff.numel())
        else:
            loss = x.new_zeros(())
        codes = q.view(h.shape)
        if w_out is None:
            out = codes
        else:
            out = torch.addmm(b_out, codes, w_out.t()) if b_out is not None else codes @ w_out.t()
        ctx.save_for_backward(x, w_in, w_out, codes, diff, position)
        ctx.info = (cw, qw, b_in is not None, b_out is not None, [v.shape[0] for v in values])
        ctx.layout = (z.shape, channel_first)
        ctx.mark_non_differentiable(level)
        if channel_first:
            out = out.view(z.shape[0], -1, dim).transpose(1, 2).reshape(z.shape)
        else:
            out = out.view(z.shape)
        return out, level, loss

    @staticmethod
    def backward(ctx, grad_out, _grad_level, grad_loss):
        x, w_in, w_out, codes, diff, position = ctx.saved_tensors
        cw, qw, in_bias, out_bias, sizes = ctx.info
        shape, channel_first = ctx.layout
        dim = x.shape[1]
        if channel_first:
            grad_out = grad_out.flatten(2).transpose(1, 2)
        grad_out = grad_out.reshape(-1, dim)
        grad_w_out = grad_b_out = grad_w_in = grad_b_in = None
        if w_out is not None:
            grad_out = grad_out.contiguous()  # out.sum() hands back an expanded gradient
            # operand orders CPU BLAS runs fast for these narrow shapes (see narrow_linear)
            grad_codes = grad_out @ w_out.t().contiguous().t()
            grad_w_out = (codes.t() @ grad_out).t()
            grad_b_out = grad_out.sum(0) if out_bias else None
        else:
            grad_codes = grad_out
        grad_h = grad_codes
        grad_values = [None] * len(sizes)
        if diff is not None:
            scale = grad_loss * (2.0 / diff.numel())
            if isinstance(cw, Tensor) or cw:  # a tensor weight (traced call) always adds
                grad_h = torch.addcmul(grad_codes, diff.view(codes.shape), scale * cw)
            if any(ctx.needs_input_grad[12:]):
                grad_flat = diff.new_zeros(sum(sizes)).index_add_(
                    0, position.reshape(-1), (diff * (scale * -qw)).reshape(-1))
                grad_values = list(grad_flat.split(sizes))
        if w_in is not None:
            grad_x = grad_h @ w_in
            grad_w_in = grad_h.t() @ x
            grad_b_in = grad_h.sum(0) if in_bias else None
        else:
            grad_x = grad_h
        if channel_first:
            grad_x = grad_x.view(shape[0], -1, dim).transpose(1, 2).reshape(shape)
        else:
            grad_x = grad_x.view(shape)
        return (grad_x, None, grad_w_in, grad_b_in, grad_w_out, grad_b_out, None, None, None,
                None, None, None, None, *grad_values)


def _apply_left(weight: Tensor, x3: Tensor, bias: Tensor | None = None) -> Tensor:
    """``bias[:, None] + weight @ x3[b]`` for each b of x3 (b, in, n): (b, out, n). One
    image is a plain mm (``torch.matmul`` folds the batch with copies, and bmm costs more)."""
    if x3.shape[0] == 1:
        if bias is None:
            return (weight @ x3[0]).unsqueeze(0)
        return torch.addmm(bias[:, None], weight, x3[0]).unsqueeze(0)
    weight = weight.expand(x3.shape[0], -1, -1)
    if bias is None:
        return torch.bmm(weight, x3)
    return torch.baddbmm(bias[:, None], weight, x3)


def _outer_sum(a3: Tensor, b3: Tensor) -> Tensor:
    """``sum_b a3[b] @ b3[b].T`` (a weight gradient) for a3 (b, p, n), b3 (b, q, n)."""
    if a3.shape[0] == 1:
        return torch.mm(a3[0], b3[0].t())
    return torch.bmm(a3, b3.transpose(1, 2)).sum(0)


class _LatentQuantizeChannelFirst(torch.autograd.Function):
    """``_LatentQuantizeCall`` for channel-first input (b, dim, ...), computed in that layout:
    the projections are (b)mm's of the weights with (dim, positions) slices, which CPU BLAS
    runs faster than the row form and which need no transposed copies of the input, the
    output or their gradients. The nearest-value search runs channel-major, (codebook_dim, m).
    Returns the output, the int64 indices (b, ..., num_codebooks) and the loss; the gradients
    are those of ``_LatentQuantizeCall``."""

    @staticmethod
    def forward(ctx, z, w_in, b_in, w_out, b_out, pads, widest, offsets, basis,
                codebook_dim, cw, qw, with_loss, *values):
        batch, dim = z.shape[0], z.shape[1]
        z3 = z.reshape(batch, dim, -1)
        # each channel's values then +inf up to the widest: (codebook_dim, widest), one cat
        table = torch.cat([part for pair in zip(values, pads, strict=True) for part in pair])
        table = table.view(codebook_dim, widest).to(z.dtype)
        h3 = z3 if w_in is None else _apply_left(w_in, z3, b_in)
        width, spots = h3.shape[1], h3.shape[2]
        simple = batch == 1 and width == codebook_dim
        books = width // codebook_dim
        # (codebook_dim, m) with m ordered (b, book, position)
        h_cm = h3.view(codebook_dim, spots) if simple else h3.view(
            batch, books, codebook_dim, spots).permute(2, 0, 1, 3).reshape(codebook_dim, -1)
        h_cm = h_cm.contiguous()  # searchsorted copies a strided input anyway
        level, q_cm = _nearest_channel_major(h_cm, table)
        q3 = q_cm.view(1, codebook_dim, spots) if simple else q_cm.view(
            codebook_dim, batch, books, spots).permute(1, 2, 0, 3).reshape(batch, width, spots)
        diff = None
        if with_loss:
            diff = h3 - q3
            flat_diff = diff.view(-1)
            loss = torch.dot(flat_diff, flat_diff) * ((cw + qw) / flat_diff.numel())
            # a NaN/Inf in z reaches the loss; the exact test runs only then (a finite input
            # whose loss overflows passes it)
            if not tracing() and not math.isfinite(float(loss)) \
                    and not bool(torch.isfinite(z).all()):
                check_finite(z)
        else:
            loss = z.new_zeros(())
        out = q3 if w_out is None else _apply_left(w_out, q3, b_out)
        indices = (level * basis[:, None]).sum(0).view(batch, books, spots).transpose(1, 2)
        indices = indices.reshape(batch, *z.shape[2:], books)
        ctx.save_for_backward(z3, w_in, w_out, q3, diff, level, offsets)
        ctx.info = (cw, qw, b_in is not None, b_out is not None, [v.shape[0] for v in values],
                    z.shape, simple)
        ctx.mark_non_differentiable(indices)
        return out.view(batch, -1, *z.shape[2:]), indices, loss

    @staticmethod
    def backward(ctx, grad_out, _grad_indices, grad_loss):
        z3, w_in, w_out, q3, diff, level, offsets = ctx.saved_tensors
        cw, qw, in_bias, out_bias, sizes, shape, simple = ctx.info
        batch = z3.shape[0]
        grad_w_out = grad_b_out = grad_w_in = grad_b_in = None
        if w_out is not None:
            g3 = grad_out.reshape(batch, w_out.shape[0], -1).contiguous()
            grad_h = _apply_left(w_out.t(), g3)
            # the narrow operand first: q[b] @ g[b].T is several times faster on CPU than
            # g[b] @ q[b].T (2.5x at (8, 64, 32, 32))
            grad_w_out = _outer_sum(q3, g3).t()
            grad_b_out = g3.sum((0, 2)) if out_bias else None
        else:
            grad_h = grad_out.reshape(q3.shape)
        grad_values = [None] * len(sizes)
        if diff is not None:
            traced = isinstance(cw, Tensor)  # weights are tensors in a traced call
            if traced:  # no host read in a graph: the scales stay tensors
                scale = grad_loss * (2.0 / diff.numel())
                grad_h = torch.addcmul(grad_h, diff, scale * cw)
            else:
                # one read of the loss gradient lets the scales ride along as alpha arguments
                scale = float(grad_loss) * 2.0 / diff.numel()
                if cw:
                    grad_h = torch.add(grad_h, diff, alpha=scale * cw)
            if any(ctx.needs_input_grad[13:]):
                position = level + offsets[:, None]
                codebook_dim = position.shape[0]
                batch, width, spots = diff.shape
                diff_cm = diff.view(codebook_dim, spots) if simple else diff.view(
                    batch, width // codebook_dim, codebook_dim, spots).permute(2, 0, 1, 3)
                if traced:
                    grad_flat = diff.new_zeros(sum(sizes)).index_add_(
                        0, position.reshape(-1), diff_cm.reshape(-1) * (scale * -qw))
                else:
                    grad_flat = diff.new_zeros(sum(sizes)).index_add_(
                        0, position.reshape(-1), diff_cm.reshape(-1), alpha=scale * -qw)
                grad_values = list(grad_flat.split(sizes))
        if w_in is not None:
            grad_x = _apply_left(w_in.t(), grad_h)
            grad_w_in = _outer_sum(grad_h, z3)
            grad_b_in = grad_h.sum((0, 2)) if in_bias else None
        else:
            grad_x = grad_h
        return (grad_x.reshape(shape), grad_w_in, grad_b_in, grad_w_out, grad_b_out, None, None,
                None, None, None, None, None, None, *grad_values)


class LatentQuantizeOutput(NamedTuple):
    quantized: Tensor  # the input's shape
    indices: Tensor  # int64, (b, ...) or (b, ..., num_codebooks)
    loss: Tensor  # scalar; 0 outside training


class LatentQuantize(nn.Module):
    """Per-channel learnable scalar codebooks (see the module docstring)."""

    def __init__(
        self,
        levels: list[int] | int,
        dim: int,
        commitment_loss_weight: float | None = 0.1,
        quantization_loss_weight: float | None = 0.1,
        num_codebooks: int = 1,
        codebook_dim: int = -1,
        keep_num_codebooks_dim: bool | None = None,
        optimize_values: bool | None = True,
        in_place_codebook_optimizer: Callable[..., Optimizer] | None = None,
    ):
        super().__init__()
        if isinstance(levels, int):
            if codebook_dim < 1:
                raise ValueError("an int `levels` needs codebook_dim >= 1 (how many channels)")
            levels = [levels] * codebook_dim
        levels = [int(level) for level in levels]
        if not levels or any(level < 2 for level in levels):
            raise ValueError(f"levels must be integers >= 2, got {levels}")
        if codebook_dim > 0 and codebook_dim != len(levels):
            raise ValueError(f"codebook_dim={codebook_dim} disagrees with {len(levels)} levels")
        if num_codebooks < 1:
            raise ValueError(f"num_codebooks must be >= 1, got {num_codebooks}")
        keep_num_codebooks_dim = bool(keep_num_codebooks_dim) or num_codebooks > 1
        self.dim = dim
        self.codebook_dim = len(levels)
        self.num_codebooks = num_codebooks
        self.effective_codebook_dim = self.codebook_dim * num_codebooks
        self.keep_num_codebooks_dim = keep_num_codebooks_dim
        self.optimize_values = bool(optimize_values)
        self.register_buffer("commitment_loss_weight",
                             torch.tensor(commitment_loss_weight or 0.0), persistent=False)
        self.register_buffer("quantization_loss_weight",
                             torch.tensor(quantization_loss_weight or 0.0), persistent=False)
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.int32),
                             persistent=False)
        basis = [math.prod(levels[:i]) for i in range(len(levels))]
        self.register_buffer("_basis", torch.tensor(basis, dtype=torch.int64), persistent=False)
        self.has_projections = dim != self.effective_codebook_dim
        self.project_in = (nn.Linear(dim, self.effective_codebook_dim) if self.has_projections
                           else nn.Identity())
        self.project_out = (nn.Linear(self.effective_codebook_dim, dim) if self.has_projections
                            else nn.Identity())
        self.codebook_size = math.prod(levels)

        # zero is one of the values, the first is -0.5
        initial = [torch.linspace(-0.5, 0.5, level) if level % 2 else
                   torch.arange(level) / level - 0.5 for level in levels]
        if self.optimize_values:
            self.values_per_latent = nn.ParameterList(nn.Parameter(v) for v in initial)
        else:
            self.values_per_latent = initial
        self.in_place_codebook_optimizer = None
        if in_place_codebook_optimizer is not None:
            if not self.optimize_values:
                raise ValueError("in_place_codebook_optimizer needs optimize_values=True")
            self.in_place_codebook_optimizer = in_place_codebook_optimizer(
                self.values_per_latent)

        # lookup tables: value k of channel i sits at offsets[i] + k of the concatenated values
        widest = max(levels)
        offsets = torch.tensor([0, *itertools.accumulate(levels[:-1])], dtype=torch.int64)
        self.register_buffer("_offsets", offsets, persistent=False)
        slot = torch.arange(widest)
        self.register_buffer("_padding", slot >= torch.tensor(levels)[:, None], persistent=False)
        self.register_buffer("_table_index",
                             (offsets[:, None] + slot).clamp_max(sum(levels) - 1),
                             persistent=False)
        grid = self._level_indices(torch.arange(self.codebook_size))
        self.register_buffer("implicit_codebook",
                             (grid - self._levels // 2) / (self._levels // 2) / 2,
                             persistent=False)

    def _loss_weights(self) -> tuple[float, float]:
        """The two loss weights as floats, read from their buffers only when a buffer was
        replaced or written to (each read is a device sync and a dispatch per call)."""
        cw, qw = self.commitment_loss_weight, self.quantization_loss_weight
        key = self.__dict__.get("_weights_key")
        if (key is None or key[0] is not cw or key[1] != cw._version or key[2] is not qw
                or key[3] != qw._version):
            self.__dict__["_weights_key"] = (cw, cw._version, qw, qw._version)
            self.__dict__["_weights"] = (float(cw), float(qw))
        return self.__dict__["_weights"]

    def _table_pads(self, like: Tensor) -> tuple[Tensor, ...]:
        """Per channel, the +inf entries that pad its values to the widest channel, in
        ``like``'s dtype and device (made once)."""
        cache = self.__dict__.setdefault("_pads", {})
        key = (like.dtype, like.device)
        if key not in cache:
            widest = self._padding.shape[1]
            cache[key] = tuple(torch.full((widest - int(level),), math.inf, dtype=like.dtype,
                                          device=like.device) for level in self._levels)
        return cache[key]

    # ------------------------------------------------------------------ lookups

    def _flat_values(self) -> Tensor:
        # fixed values (optimize_values=False) are a plain list, as in the library: follow the
        # module's device here
        return torch.cat(list(self.values_per_latent)).to(self._levels.device)

    def _level_indices(self, indices: Tensor) -> Tensor:
        indices = indices.long().unsqueeze(-1)
        return torch.div(indices, self._basis, rounding_mode="floor") % self._levels

    def quantize_with_indices(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """(..., codebook_dim) -> nearest values (differentiable w.r.t. the values, not z)
        and their per-channel indices (..., codebook_dim)."""
        flat = self._flat_values().to(z.dtype)
        table = flat[self._table_index]  # (codebook_dim, widest)
        with torch.no_grad():
            table_inf = table.detach().masked_fill(self._padding, math.inf)
            level = nearest_value(z.detach().reshape(-1, self.codebook_dim), table_inf)
            level = level.view(z.shape)
        return flat[level + self._offsets], level

    def quantize(self, z: Tensor) -> Tensor:
        """The library's ``quantize``: nearest values, straight-through to ``z``."""
        q, _ = self.quantize_with_indices(z)
        return z + (q - z).detach()

    def codes_to_indices(self, zhat: Tensor) -> Tensor:
        """Codes made of the current values -> int64 indices (nearest value per channel)."""
        if zhat.shape[-1] != self.codebook_dim:
            raise QuantizerInputError(
                f"expected codes of shape (..., {self.codebook_dim}), got {tuple(zhat.shape)}")
        _, level = self.quantize_with_indices(zhat)
        return (level * self._basis).sum(-1)

    def indices_to_codes(self, indices: Tensor, project_out: bool = True,
                         channel_first: bool = True) -> Tensor:
        """Indices as ``forward`` returned them -> the output it gave (channel first, as the
        library; ``channel_first=False`` for a channels-last sequence)."""
        if indices.dtype.is_floating_point or indices.dtype == torch.bool:
            raise QuantizerInputError(f"expected integer indices, got {indices.dtype}")
        level = self._level_indices(indices)
        codes = self._flat_values()[level + self._offsets]
        if self.keep_num_codebooks_dim:
            codes = codes.flatten(-2)
        if project_out:
            codes = self.project_out(codes)
        return codes.movedim(-1, 1) if channel_first else codes

    # ------------------------------------------------------------------ losses and forward

    def quantization_loss(self, z: Tensor, zhat: Tensor, reduce: str = "mean") -> Tensor:
        """Moves the values toward the (fixed) latents."""
        return F.mse_loss(zhat, z.detach(), reduction=reduce)

    def commitment_loss(self, z: Tensor, zhat: Tensor, reduce: str = "mean") -> Tensor:
        """Moves the latents toward the (fixed) values."""
        return F.mse_loss(z, zhat.detach(), reduction=reduce)

    def forward(self, z: Tensor) -> LatentQuantizeOutput:
        """``z``: (b, dim, ...) channel first, or (b, n, dim) channels last. Returns quantized
        (same layout), indices (b, ...[, num_codebooks]) and the loss."""
        if not isinstance(z, Tensor) or not z.dtype.is_floating_point or z.ndim < 2:
            raise QuantizerInputError(
                f"expected a floating tensor (b, {self.dim}, ...), got "
                f"{tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__}")
        channel_first = z.shape[1] == self.dim
        if not channel_first and not (z.ndim == 3 and z.shape[-1] == self.dim):
            raise QuantizerInputError(
                f"expected dimension of {self.dim} on axis 1 (b, dim, ...) or a sequence "
                f"(b, n, {self.dim}), got shape {tuple(z.shape)}")
        # training on channel-first input checks inside the fused call, off the loss
        if (not (channel_first and self.training) or self.in_place_codebook_optimizer
                is not None) and not tracing() and not all_finite(z):
            check_finite(z)

        if self.in_place_codebook_optimizer is not None and self.training:
            rows = z.flatten(2).transpose(1, 2) if channel_first else z  # (b, n, dim)
            h = self.project_in(rows).unflatten(-1, (self.num_codebooks, self.codebook_dim))
            values, _ = self.quantize_with_indices(h)
            step_loss = self.quantization_loss(h, values)
            grads = torch.autograd.grad(step_loss, list(self.values_per_latent))
            for value, grad in zip(self.values_per_latent, grads, strict=True):
                value.grad = grad
            self.in_place_codebook_optimizer.step()
            self.in_place_codebook_optimizer.zero_grad()

        pin, pout = self.project_in, self.project_out
        projected = self.has_projections
        values = (list(self.values_per_latent) if self.optimize_values else
                  [v.to(self._levels.device) for v in self.values_per_latent])
        if tracing():  # the weights as 0-d tensors: float(buffer) cannot be read inside a graph
            cw, qw = self.commitment_loss_weight, self.quantization_loss_weight
        else:
            cw, qw = self._loss_weights()
        if channel_first:
            out, indices, loss = _LatentQuantizeChannelFirst.apply(
                z, pin.weight if projected else None, pin.bias if projected else None,
                pout.weight if projected else None, pout.bias if projected else None,
                self._table_pads(values[0]), self._padding.shape[1], self._offsets,
                self._basis,
                self.codebook_dim, cw, qw, self.training, *values)
            if not self.keep_num_codebooks_dim:
                indices = indices.squeeze(-1)
            return LatentQuantizeOutput(out, indices, loss)
        out, level, loss = _LatentQuantizeCall.apply(
            z, channel_first, pin.weight if projected else None,
            pin.bias if projected else None, pout.weight if projected else None,
            pout.bias if projected else None, self._table_index, self._padding, self._offsets,
            self.codebook_dim, cw, qw, self.training, *values)
        positions = (z.shape[0], *z.shape[2:]) if channel_first else z.shape[:-1]
        indices = (level * self._basis).sum(-1).view(*positions, self.num_codebooks)
        if not self.keep_num_codebooks_dim:
            indices = indices.squeeze(-1)
        return LatentQuantizeOutput(out, indices, loss)

