"""ResidualFSQ and GroupedResidualFSQ: drop-ins for the library's classes of the same names.

A stack of symmetric FSQ layers (``preserve_symmetry=True``), layer ``q`` quantizing the residual
left by the layers before it at scale ``levels ** -q``; the output is the sum of the scaled codes.
The grouped form splits the feature dimension into groups, one residual stack each.

Call as in ``vector_quantize_pytorch`` 1.32: ``quantized, indices = rfsq(x)`` (plus ``all_codes``
with ``return_all_codes=True``), ``rfsq.get_output_from_indices(indices)``.

Why it is fast: the residual passes see only detached residuals, so d output / d x is the sum of
the layers' local bound derivatives; the whole stack is one autograd node whose backward is one
elementwise product, instead of a graph of ~10 nodes per layer.

Where we differ on purpose:
- Quantize dropout works for any input rank (the library builds its null indices from
  ``x.shape[:2]`` and fails on ``(b, h, w, d)`` channels-last input).
- Indices are ``int64``; 16-bit inputs are quantized in float32 and the output cast back.
- Non-finite input raises :class:`QuantizerInputError`.
"""

from __future__ import annotations

import random
from math import ceil

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .fsq import FSQ, all_finite, check_finite, check_tensor
from .grouped import GroupedStacks
from .narrow_linear import narrow_linear
from .tracing import spread_nonfinite, tracing
from .vector_quantize import QuantizerInputError

_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _sync_seed(device: torch.device) -> int:
    """A random seed, the same on every process when distributed (so all drop the same layers)."""
    seed = torch.randint(0, 10_000, (), device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(seed)
    return int(seed.item())


class _ResidualStack(torch.autograd.Function):
    """All residual layers in one node. Forward per layer q (``u = residual / scale_q``):
    ``t = act(u)``, ``level = floor((t + 1) (L - 1) / 2 + 1/2)``, ``code = level * 2/(L-1) - 1``,
    ``out += code * scale_q``, ``residual -= code * scale_q``. Backward: the straight-through
    derivative of layer q w.r.t. x is act'(u_q) (the 1/scale and scale cancel).

    Returns the output and the (..., active) int64 indices. The arithmetic keeps the library's
    order (so the output has its bits); the work between is done in place, on buffers of this
    call, since each of these small elementwise steps costs about as much in dispatch as in
    arithmetic."""

    @staticmethod
    def forward(ctx, x, scales, half_span, step, basis, active, hard_clamp):
        # scales: a tuple of per-layer (codebook_dim,) tensors; basis: the index basis as a
        # float vector, or as int64 when level . basis might not be exact in x's dtype
        residual = x
        out = local = None
        levels = []
        grad = x.requires_grad
        for q in range(active):
            u = residual / scales[q]
            if hard_clamp:
                t = u.clamp(-1.0, 1.0)
                if grad:  # 1 inside the clamp: exactly where the clamp left u alone
                    inside = t == u
                    local = inside.to(x.dtype) if local is None else local.add_(inside)
            else:
                t = torch.tanh(u)
                if grad:  # the sum of tanh' = 1 - t^2: the sum of t^2 here, subtracted below
                    local = t * t if local is None else local.addcmul_(t, t)
            # the library's order: floor((t + 1) * half_span + 0.5), in t's own buffer
            level = t.add_(1.0).mul_(half_span).add_(0.5).floor_()
            levels.append(level)
            quantized = (level * step).sub_(1.0).mul_(scales[q])
            out = quantized if out is None else out.add_(quantized)
            if q + 1 < active:
                residual = residual - quantized if q == 0 else residual.sub_(quantized)
        if local is not None and not hard_clamp:
            local = torch.rsub(local, float(active))
        ctx.save_for_backward(local)
        if not levels:
            indices = x.new_zeros((*x.shape[:-1], 0), dtype=torch.long)
        elif basis.is_floating_point():  # exact: every partial sum an integer the dtype holds
            indices = (torch.stack(levels, -2) @ basis).long()
        else:
            indices = (torch.stack(levels, -2).long() * basis).sum(-1)
        ctx.mark_non_differentiable(indices)
        return out, indices

    @staticmethod
    def backward(ctx, grad_out, _grad_indices):
        (local,) = ctx.saved_tensors
        return grad_out * local, None, None, None, None, None, None


class ResidualFSQ(nn.Module):
    """Residual finite scalar quantization (see the module docstring)."""

    def __init__(
        self,
        *,
        levels: list[int],
        num_quantizers: int,
        dim: int | None = None,
        is_channel_first: bool = False,
        quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0,
        quantize_dropout_multiple_of: int = 1,
        soft_clamp_input_value: float | list[float] | Tensor | None = None,
        bound_hard_clamp: bool = True,
        **kwargs,
    ):
        super().__init__()
        levels = [int(level) for level in levels]
        if num_quantizers < 1:
            raise ValueError(f"num_quantizers must be >= 1, got {num_quantizers}")
        if any(level < 2 for level in levels):
            raise ValueError(f"every level must be > 1, got {levels}")
        if quantize_dropout_cutoff_index < 0:
            raise ValueError("quantize_dropout_cutoff_index must be >= 0")
        if kwargs.get("inward_clamp"):
            raise ValueError("inward_clamp is an option of FSQ alone; the residual stack "
                             "quantizes with its own clamp (bound_hard_clamp)")
        codebook_dim = len(levels)
        dim = codebook_dim if dim is None else dim
        self.dim = dim
        self.has_projections = dim != codebook_dim
        self.project_in = nn.Linear(dim, codebook_dim) if self.has_projections else nn.Identity()
        self.project_out = nn.Linear(codebook_dim, dim) if self.has_projections else nn.Identity()
        self.is_channel_first = is_channel_first
        self.num_quantizers = num_quantizers
        self.levels = levels
        self.layers = nn.ModuleList(
            FSQ(levels=levels, dim=codebook_dim, preserve_symmetry=True,
                bound_hard_clamp=bound_hard_clamp, **kwargs)
            for _ in range(num_quantizers))
        if any(layer.has_projections for layer in self.layers):
            raise ValueError("the FSQ layers of a residual stack must not project "
                             "(num_codebooks must stay 1)")
        self.codebook_size = self.layers[0].codebook_size
        levels_tensor = torch.tensor(levels, dtype=torch.float32)
        scales = torch.stack([levels_tensor ** -q for q in range(num_quantizers)])
        self.register_buffer("scales", scales, persistent=False)
        self.quantize_dropout = quantize_dropout and num_quantizers > 1
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        self.quantize_dropout_multiple_of = quantize_dropout_multiple_of
        if bound_hard_clamp:
            if soft_clamp_input_value is not None:
                raise ValueError("soft_clamp_input_value is set from the levels when "
                                 "bound_hard_clamp=True; pass one or the other")
            soft_clamp_input_value = 1 + 1 / (levels_tensor - 1)
        if isinstance(soft_clamp_input_value, (list, float, int)):
            soft_clamp_input_value = torch.tensor(soft_clamp_input_value, dtype=torch.float32)
        self.register_buffer("soft_clamp_input_value", soft_clamp_input_value, persistent=False)
        self.bound_hard_clamp = bound_hard_clamp
        lv = levels_tensor.double()
        self.register_buffer("_half_span", (lv - 1) / 2, persistent=False)
        self.register_buffer("_step", 2.0 / (lv - 1), persistent=False)
        self.register_buffer("_basis", self.layers[0]._basis.clone(), persistent=False)
        self._cache: dict = {}
        self._plain_layers = all(layer.noise_dropout == 0.0 and not layer.orthogonal_rotation
                                 and layer.return_indices for layer in self.layers)

    @property
    def codebooks(self) -> Tensor:
        return torch.stack([layer.implicit_codebook for layer in self.layers])

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """(b, ..., q') indices, -1 for dropped layers -> (q, b, ..., codebook_dim) scaled codes."""
        if indices.dtype.is_floating_point or indices.dtype == torch.bool:
            raise QuantizerInputError(f"expected integer indices, got {indices.dtype}")
        given = indices.shape[-1]
        if given > self.num_quantizers:
            raise QuantizerInputError(
                f"expected at most {self.num_quantizers} indices per position (last axis), "
                f"got {given}")
        if given < self.num_quantizers:
            if not self.quantize_dropout:
                raise QuantizerInputError(
                    "indices for fewer layers than num_quantizers need quantize_dropout=True")
            pad = indices.new_full((*indices.shape[:-1], self.num_quantizers - given), -1)
            indices = torch.cat([indices, pad], -1)
        dropped = indices == -1
        codes = self.layers[0]._indices_to_codes(indices.masked_fill(dropped, 0))
        codes = codes.float().masked_fill(dropped.unsqueeze(-1), 0.0)  # (b, ..., q, d)
        codes = codes * self.scales
        return codes.movedim(-2, 0)

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        codes = self.get_codes_from_indices(indices).sum(0)
        if self.has_projections:
            codes = codes.to(self.project_out.weight.dtype)
        return self.project_out(codes)

    def _dropout_index(self, seed: int | None, device: torch.device) -> int:
        if seed is None:
            seed = _sync_seed(device)
        index = random.Random(seed).randrange(self.quantize_dropout_cutoff_index,
                                              self.num_quantizers)
        if self.quantize_dropout_multiple_of != 1:
            multiple = self.quantize_dropout_multiple_of
            index = ceil((index + 1) / multiple) * multiple - 1
        return index

    def forward(self, x: Tensor, return_all_codes: bool = False,
                rand_quantize_dropout_fixed_seed: int | None = None):
        """``x``: (b, n, dim), or (b, dim, ...) when ``is_channel_first``. Returns
        ``(quantized, indices)`` with indices (b, n, num_quantizers) (channel first:
        (b, num_quantizers, ...)), plus all codes (q, b, n, codebook_dim) if asked."""
        check_tensor(x, self.dim, 1 if self.is_channel_first else -1)
        if self.is_channel_first:
            spatial = x.shape[2:]
            x = x.flatten(2).transpose(1, 2)
        h = narrow_linear(x, self.project_in)
        if tracing():  # see .tracing: no host check inside a graph
            h = spread_nonfinite(h)
        elif not all_finite(h):
            check_finite(x)
        if self.soft_clamp_input_value is not None:
            clamp = self.soft_clamp_input_value.to(h.dtype)
            h = (h / clamp).tanh() * clamp

        active = self.num_quantizers
        if self.training and self.quantize_dropout and torch.is_grad_enabled():
            active = min(self._dropout_index(rand_quantize_dropout_fixed_seed, h.device) + 1,
                         self.num_quantizers)

        orig_dtype = h.dtype
        math_dtype = torch.float32 if orig_dtype in _HALF_DTYPES else orig_dtype
        with torch.autocast(h.device.type, enabled=False):
            if self._plain_layers or not self.training:
                quantized, indices = self._stack(h.to(math_dtype), active)  # (..., active)
            else:
                quantized, indices = self._layer_by_layer(h.to(math_dtype), active)
        if active < self.num_quantizers:
            pad = indices.new_full((*indices.shape[:-1], self.num_quantizers - active), -1)
            indices = torch.cat([indices, pad], -1)
        quantized = narrow_linear(quantized.to(orig_dtype), self.project_out)

        if self.is_channel_first:
            quantized = quantized.transpose(1, 2).unflatten(2, spatial)
            indices = indices.transpose(1, 2).unflatten(2, spatial)
        if not return_all_codes:
            return quantized, indices
        return quantized, indices, self.get_codes_from_indices(indices)

    def _stack(self, h: Tensor, active: int) -> tuple[Tensor, Tensor]:
        key = (h.dtype, h.device)
        constants = self._cache.get(key)
        if constants is None:
            # the indices as one product of the levels with the basis where every partial sum
            # is an integer the dtype holds exactly (2**24 in float32), else in int64
            exact = 2 ** 24 if h.dtype == torch.float32 else 2 ** 53
            basis = self._basis.to(h.dtype) if self.codebook_size <= exact else self._basis
            constants = (tuple(self.scales.to(h.dtype).unbind(0)), self._half_span.to(h.dtype),
                         self._step.to(h.dtype), basis)
            self._cache = {key: constants}
        return _ResidualStack.apply(h, *constants, active, self.bound_hard_clamp)

    def _apply(self, fn, recurse=True):
        self._cache = {}
        return super()._apply(fn, recurse)

    def _layer_by_layer(self, h: Tensor, active: int) -> tuple[Tensor, Tensor]:
        """Each FSQ layer's own forward (noise dropout, rotation): the library's loop."""
        out, residual, all_indices = 0.0, h, []
        for layer, scale in zip(self.layers[:active], self.scales[:active], strict=True):
            quantized, indices = layer(residual / scale)
            quantized = quantized * scale
            residual = residual - quantized.detach()
            out = out + quantized
            all_indices.append(indices)
        return out, torch.stack(all_indices, -1)


class GroupedResidualFSQ(GroupedStacks):
    """``groups`` ResidualFSQ stacks side by side over equal slices of the feature dimension.

    Returns ``(quantized, indices)`` with indices stacked on a new first axis:
    (groups, b, n, num_quantizers).
    """

    def __init__(self, *, dim: int, groups: int = 1, accept_image_fmap: bool = False, **kwargs):
        super().__init__()
        if groups < 1 or dim % groups:
            raise ValueError(f"dim={dim} must split into groups={groups} equal parts")
        self.dim = dim
        self.groups = groups
        self.accept_image_fmap = accept_image_fmap
        self.rvqs = nn.ModuleList(ResidualFSQ(dim=dim // groups, **kwargs) for _ in range(groups))
        self.codebook_size = self.rvqs[0].codebook_size

    def forward(self, x: Tensor, return_all_codes: bool = False):
        check_tensor(x, self.dim, self.split_dim)
        seed = _sync_seed(x.device) if self.training else None
        outs = [rvq(chunk, return_all_codes=return_all_codes,
                    rand_quantize_dropout_fixed_seed=seed)
                for rvq, chunk in zip(self.rvqs, x.chunk(self.groups, dim=self.split_dim),
                                      strict=True)]
        quantized = torch.cat([o[0] for o in outs], dim=self.split_dim)
        indices = torch.stack([o[1] for o in outs])
        if not return_all_codes:
            return quantized, indices
        return quantized, indices, torch.stack([o[2] for o in outs])
