"""FSQ: finite scalar quantization (Mentzer et al. 2023), a drop-in for the library's ``FSQ``.

Each of the ``len(levels)`` latent channels is squashed into a bounded range and rounded to one of
``levels[i]`` evenly spaced values; the code of a vector is the tuple of its rounded channels,
and its index is that tuple read as a mixed-radix number (the first channel varies fastest).
No codebook is learnt, so there is no loss and no state that a call can change.

The constructor and call are those of ``vector_quantize_pytorch.FSQ`` (1.32): ``out, indices =
fsq(z)``. Where we differ on purpose:

- ``indices`` are ``int64`` (the library: ``int32``, which overflows for level products past
  2**31) and are computed in integer arithmetic from the rounded levels; the library sums
  ``code * basis`` in float32, exact only up to 2**24 codes. ``implicit_codebook`` is built on
  demand rather than stored, so large level products do not fill memory at construction.
- The quantization math runs in float32 for float16/bfloat16 inputs and in float64 for float64
  inputs, whatever autocast is active and even with ``force_quantization_f32=False`` (where
  the library also ends up in float32, by promotion against its float32 constants); the
  output is cast back to the input's dtype before ``project_out``.
- ``noise_dropout`` (with ``preserve_symmetry``) replaces rounding, for the chosen entries, by
  uniform noise one quantization bin wide around the bounded value (half the step ``2/(L-1)``
  either side), so the noise scale follows the levels. The library adds ``U(-0.5, 0.5)`` to the
  already rounded value whatever the levels: several bins when ``L`` is large.
- Non-finite input raises :class:`QuantizerInputError`; wrong shapes raise it too, naming the
  expected layout.
- Under autocast the projections run in float32 with the rest of the call (the library's run in
  the autocast dtype); the output has the autocast dtype, as the library's.

One option of ours: ``inward_clamp=True`` bounds with the clamp of ``bound_hard_clamp`` but
keeps its gradient outside [-1, 1] wherever that gradient points back into the range
(:func:`clamp_gradient`). With tanh the straight-through gradient fades towards the outer levels;
with torch's clamp an entry pushed past the range gets no gradient again and its channel can die
(the course MLP collapsed to 5 codes in one of three seeds); an identity gradient lets entries
run away outwards. The inward rule has full gradient over the range, pulls saturated entries
back and never pushes them further out. The forward is the clamp bound's, bit for bit.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from . import fsq_cpu
from .checks import all_finite
from .narrow_linear import narrow_outer, narrow_routed
from .onednn_linear import linear
from .tracing import spread_nonfinite, tracing
from .vector_quantize import QuantizerInputError

_HALF_DTYPES = (torch.float16, torch.bfloat16)
#: The projected call gathers each row's output from the projections of every code when there
#: are at least this many rows per code (projecting the codes costs about as much as gathering
#: a quarter of their count in rows).
TABLE_ROWS_PER_CODE = 4


class FSQOutput(NamedTuple):
    quantized: Tensor  # the input's shape: the codes, through project_out
    indices: Tensor | None  # int64, (b, n) or (b, n, c), or (b, *spatial[, c]) for feature maps


def check_finite(x: Tensor) -> None:
    """Raise :class:`QuantizerInputError` if ``x`` holds NaN or Inf (the caller checks cheaply
    first; this builds the message)."""
    bad = ~torch.isfinite(x)
    raise QuantizerInputError(
        f"input has {int(bad.sum())} non-finite value(s) (NaN or Inf) out of {x.numel()}; "
        "finite scalar quantization needs finite values. Check the encoder output.")


def check_tensor(z: object, dim: int, channel_axis: int) -> None:
    if not isinstance(z, Tensor):
        raise QuantizerInputError(f"expected a torch.Tensor, got a {type(z).__name__}")
    if not z.dtype.is_floating_point:
        raise QuantizerInputError(
            f"expected a floating-point tensor (float16/bfloat16/float32/float64), got {z.dtype}")
    if z.ndim < 2 or z.shape[channel_axis] != dim:
        layout = "(b, dim, ...) channel first" if channel_axis == 1 else "(..., dim) channels last"
        raise QuantizerInputError(
            f"expected dimension of {dim} on axis {channel_axis} ({layout}), "
            f"got shape {tuple(z.shape)}")


def clamp_gradient(grad: Tensor, u: Tensor, mode: bool | str) -> Tensor:
    """The gradient through ``clamp(u, -1, 1)``: kept inside the range; outside it, dropped
    (``mode`` True, torch's clamp) or, with ``mode == "inward"``, kept where it has the sign of
    ``u``, so that a descent step moves ``u`` back towards the range and never further out.
    Multiplies ``grad`` in place."""
    inside = u.abs() <= 1.0
    if mode == INWARD:
        inside = inside | (u * grad > 0)
    return grad.mul_(inside)  # the callers' own buffer


#: ``hard_clamp`` value of the bound functions for ``FSQ(inward_clamp=True)``
INWARD = "inward"


class _BoundAndRound(torch.autograd.Function):
    """Squash, round and rescale in one autograd node (straight-through estimator).

    Forward, per channel with ``t = act(z + shift)`` (act = tanh, or a clamp to [-1, 1]):
        level  = round(t * half_l - offset) + half_width    (standard FSQ, integer 0..L-1)
        level  = floor((t + 1) * (L - 1) / 2 + 0.5)         (symmetric FSQ)
        code   = (level - half_width) / half_width  or  level * 2 / (L - 1) - 1
    Backward: rounding is the identity, so d code / dz = slope * act'(z + shift), with
    slope = half_l / half_width (standard) or 1 (symmetric); for the clamp see
    :func:`clamp_gradient` (``hard_clamp`` True or INWARD).
    """

    @staticmethod
    def forward(ctx, z, shift, scale, bias, centre, step, slope, symmetric, hard_clamp):
        u = z + shift
        t = u.clamp(-1.0, 1.0) if hard_clamp else torch.tanh(u)
        if symmetric:  # the library's order of operations, so that ties fall alike
            level = torch.floor((t + 1.0) * scale + 0.5)
        else:
            level = torch.round(torch.addcmul(bias, t, scale)) + centre
        code = level * step - 1.0 if symmetric else (level - centre) / centre
        ctx.hard_clamp = hard_clamp
        ctx.save_for_backward(u if hard_clamp else t, slope)
        ctx.mark_non_differentiable(level)
        return code, level

    @staticmethod
    def backward(ctx, grad_code, _grad_level):
        saved, slope = ctx.saved_tensors
        if ctx.hard_clamp:
            grad = clamp_gradient(grad_code * slope, saved, ctx.hard_clamp)
        else:
            grad = grad_code * ((1.0 - saved * saved) * slope)
        return grad, None, None, None, None, None, None, None, None


class _ProjectedFSQ(torch.autograd.Function):
    """project_in -> bound and round -> project_out as one autograd node.

    Why: at (8, 1024, 256) against 4 channels the call is memory traffic over the (N, dim)
    tensors, and Linear's backward is slow on these narrow shapes: it reads the output gradient
    three times (two matmuls and the bias sum) and forms the weight gradient in the slow
    operand order. Here the weight and bias gradients of project_out come from one matmul
    against [codes, 1], in the fast order. ``table`` (every code and the index basis, given
    when there are at least TABLE_ROWS_PER_CODE rows per code): project_out is applied to the
    codes once and the output rows gathered by index, one write of the (N, dim) output; the
    indices come back as the third output and the levels (second) are left empty, the other
    way round without a table.
    """

    @staticmethod
    def forward(ctx, x, w_in, b_in, w_out, b_out, shift, scale, bias, centre, step, slope,
                symmetric, hard_clamp, table):
        h = x @ w_in.t() if b_in is None else torch.addmm(b_in, x, w_in.t())
        if tracing():  # no host check in a graph: Inf becomes NaN instead of a valid code
            h = spread_nonfinite(h)
        elif not all_finite(h):  # tanh would map Inf to a valid code
            check_finite(x)
        u = h.add_(shift)  # h is this call's own buffer
        t = u.clamp(-1.0, 1.0) if hard_clamp else torch.tanh(u)
        # with a table, the codes go into the first columns of an (N, codebook_dim + 1)
        # buffer whose last column is 1: the backward's product for project_out's weight and
        # bias reads it whole (without, project_out takes the codes contiguous, as Linear does)
        n, width = t.shape
        ones_column = b_out is not None and table is not None
        code_ext = t.new_empty(n, width + 1) if ones_column else None
        code = code_ext[:, :width] if ones_column else None
        if symmetric:  # the library's order of operations, so that ties fall alike
            level = torch.floor((t + 1.0) * scale + 0.5)
            code = torch.sub(level * step, 1.0, out=code)
        else:
            # round(.) is an integer, so (round(.) + centre - centre) / centre is exactly
            # round(.) / centre: the library's value without forming and undoing the level
            level = torch.round(torch.addcmul(bias, t, scale))
            code = torch.div(level, centre, out=code)
        if ones_column:
            code_ext[:, width].fill_(1.0)
        if table is None:
            if not symmetric:
                level = level.add_(centre)
            out = code @ w_out.t() if b_out is None else torch.addmm(b_out, code, w_out.t())
            index = level.new_empty(0, dtype=torch.long)
        else:
            # few codes, many rows: project each code once and gather the rows, one write
            # of the (N, dim) output instead of addmm's three passes (bias copy, read, write)
            every_code, basis, first = table
            # level . basis, exact: every partial sum an integer < 2**24; ``first`` is the
            # index of the lowest standard level (centre . basis), 0 for symmetric FSQ
            index = torch.addmv(first, level, basis).long()
            rows = every_code @ w_out.t() if b_out is None else torch.addmm(
                b_out, every_code, w_out.t())
            out = rows.index_select(0, index)
            level = level.new_empty(0)  # the caller reads the indices
        ctx.hard_clamp = hard_clamp
        ctx.has_bias = (b_in is not None, b_out is not None)
        ctx.ones_column = ones_column
        ctx.save_for_backward(x, w_in, w_out, code_ext if ones_column else code,
                              u if hard_clamp else t, slope)
        ctx.mark_non_differentiable(level, index)
        return out, level, index

    @staticmethod
    def backward(ctx, grad_out, _grad_level, _grad_index):
        x, w_in, w_out, code, saved, slope = ctx.saved_tensors
        # one contiguous copy (a loss like out.sum() hands back an expanded gradient) instead
        # of one per matmul; that copy is ours, and later takes the input gradient
        given = grad_out
        grad_out = grad_out.contiguous()
        spare = grad_out if grad_out is not given and grad_out.shape == x.shape else None
        in_bias, out_bias = ctx.has_bias
        # (codebook_dim [+ 1], N) @ (N, dim): the narrow operand transposed. The same product
        # as grad_out.t() @ code (what Linear's backward computes), which BLAS runs ~30x
        # slower here with N = 8192 and 4 columns. A column of ones gives the bias gradient in
        # the same product (the forward's code buffer carries it when there is a table)
        if out_bias:
            if not ctx.ones_column:
                code = torch.cat([code, torch.ones_like(code[:, :1])], 1)
            both = narrow_outer(code, grad_out)
            grad_w_out, grad_b_out = both[:-1].t(), both[-1]
        else:
            grad_w_out, grad_b_out = narrow_outer(code, grad_out).t(), None
        # w_out is (dim, codebook_dim) row-major; BLAS wants it as the transpose of a row-major
        # (codebook_dim, dim) here (4x faster at N = 8192, dim = 256). The bound's slope is
        # folded into that small matrix, so the (N, codebook_dim) side takes one product
        grad_h = grad_out @ (w_out * slope).t().contiguous().t()  # (N, codebook_dim)
        if ctx.hard_clamp:
            grad_h = clamp_gradient(grad_h, saved, ctx.hard_clamp)
        else:  # tanh' = 1 - t^2
            grad_h = grad_h.addcmul_(grad_h, saved * saved, value=-1.0)
        if spare is None and narrow_routed(grad_h, w_in.t()):  # 0.26 ms against 0.83 (hot)
            grad_x = linear(grad_h, w_in.t())
        else:  # into the gradient's copy: no new (N, dim) buffer
            grad_x = torch.mm(grad_h, w_in, out=spare) if spare is not None else grad_h @ w_in
        grad_w_in = narrow_outer(grad_h, x)
        grad_b_in = grad_h.sum(0) if in_bias else None
        return (grad_x, grad_w_in, grad_b_in, grad_w_out, grad_b_out,
                None, None, None, None, None, None, None, None, None)


class FSQ(nn.Module):
    """Finite scalar quantizer; see the module docstring for the contract and differences."""

    def __init__(
        self,
        levels: list[int] | tuple[int, ...],
        dim: int | None = None,
        num_codebooks: int = 1,
        keep_num_codebooks_dim: bool | None = None,
        scale: float | None = None,
        allowed_dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64),
        channel_first: bool = False,
        projection_has_bias: bool = True,
        return_indices: bool = True,
        force_quantization_f32: bool = True,
        preserve_symmetry: bool = False,
        noise_dropout: float = 0.0,
        bound_hard_clamp: bool = False,
        orthogonal_rotation: bool = False,
        inward_clamp: bool = False,
    ):
        super().__init__()
        levels = [int(level) for level in levels]
        if not levels or any(level < 2 for level in levels):
            raise ValueError(f"levels must be a non-empty list of integers >= 2, got {levels}")
        if any(level == 2 for level in levels) and not preserve_symmetry:
            raise ValueError("levels of 2 need preserve_symmetry=True (standard FSQ's even-level "
                             "offset leaves a 2-level channel on {-1, 0}); or use levels > 2")
        if not 0.0 <= noise_dropout <= 1.0:
            raise ValueError(f"noise_dropout must lie in [0, 1], got {noise_dropout}")
        if noise_dropout > 0 and not preserve_symmetry:
            raise ValueError("noise_dropout needs preserve_symmetry=True")
        if num_codebooks < 1:
            raise ValueError(f"num_codebooks must be >= 1, got {num_codebooks}")
        if not isinstance(inward_clamp, bool):
            raise ValueError(f"inward_clamp must be True or False, got {inward_clamp!r}")
        if keep_num_codebooks_dim is None:
            keep_num_codebooks_dim = num_codebooks > 1
        if num_codebooks > 1 and not keep_num_codebooks_dim:
            raise ValueError("num_codebooks > 1 needs keep_num_codebooks_dim=True")

        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.int32), persistent=False)
        basis = [math.prod(levels[:i]) for i in range(len(levels))]
        self.register_buffer("_basis", torch.tensor(basis, dtype=torch.int64), persistent=False)

        self.scale = scale  # accepted for the library's signature; FSQ itself does not use it
        self.preserve_symmetry = preserve_symmetry
        self.noise_dropout = noise_dropout
        self.codebook_dim = len(levels)
        self.num_codebooks = num_codebooks
        self.effective_codebook_dim = self.codebook_dim * num_codebooks
        self.keep_num_codebooks_dim = keep_num_codebooks_dim
        self.dim = dim if dim is not None else self.effective_codebook_dim
        self.channel_first = channel_first
        self.has_projections = self.dim != self.effective_codebook_dim
        if self.has_projections:
            self.project_in = nn.Linear(self.dim, self.effective_codebook_dim,
                                        bias=projection_has_bias)
            self.project_out = nn.Linear(self.effective_codebook_dim, self.dim,
                                         bias=projection_has_bias)
        else:
            self.project_in = nn.Identity()
            self.project_out = nn.Identity()
        self.return_indices = return_indices
        self.codebook_size = math.prod(levels)
        self.allowed_dtypes = allowed_dtypes
        self.force_quantization_f32 = force_quantization_f32
        # inward_clamp (ours): the clamp bound, with the gradient of clamp_gradient's INWARD
        self.inward_clamp = bool(inward_clamp)
        self.bound_hard_clamp = bool(bound_hard_clamp) or self.inward_clamp
        self._clamp = INWARD if self.inward_clamp else self.bound_hard_clamp
        self.orthogonal_rotation = orthogonal_rotation
        self._register_constants(levels)
        if orthogonal_rotation:
            rotation = torch.empty(self.codebook_dim, self.codebook_dim)
            nn.init.orthogonal_(rotation)
            self.register_buffer("orthogonal_rot", rotation)

    @property
    def implicit_codebook(self) -> Tensor:
        """(codebook_size, codebook_dim) every code, in index order. Built on demand (the
        library keeps it as a buffer, which for large level products fills memory)."""
        return self._indices_to_codes(torch.arange(self.codebook_size,
                                                   device=self._levels.device)).float()

    def _register_constants(self, levels: list[int]) -> None:
        """Per-channel constants of the bound, in float64 (cast per call to the math dtype)."""
        eps = 1e-3
        lv = torch.tensor(levels, dtype=torch.float64)
        if self.preserve_symmetry:
            shift = torch.zeros_like(lv)
            scale = (lv - 1) / 2
            bias = (lv - 1) / 2 + 0.5
            centre = torch.zeros_like(lv)
            step = 2.0 / (lv - 1)
            slope = torch.ones_like(lv)
        else:
            half_l = (lv - 1) * (1 + eps) / 2
            offset = (lv % 2 == 0).double() * 0.5
            ratio = offset / half_l
            # even levels: shift so that z = 0 lands on code 0 after the half-level offset
            shift = ratio if self.bound_hard_clamp else torch.atanh(ratio)
            scale = half_l
            bias = -offset
            centre = torch.div(lv, 2, rounding_mode="floor")
            step = 1.0 / centre
            slope = half_l / centre
        for name, value in dict(shift=shift, scale=scale, bias=bias, centre=centre, step=step,
                                slope=slope).items():
            self.register_buffer(f"_bound_{name}", value, persistent=False)
        self._cache: dict = {}

    def _constants(self, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, ...]:
        key = (dtype, device)
        hit = self._cache.get(key)
        if hit is None or hit[0].device != device:
            hit = tuple(getattr(self, f"_bound_{n}").to(device=device, dtype=dtype)
                        for n in ("shift", "scale", "bias", "centre", "step", "slope"))
            self._cache = {key: hit}
        return hit

    def _apply(self, fn, recurse=True):
        self._cache = {}
        return super()._apply(fn, recurse)

    # ------------------------------------------------------------------ the library's helpers

    def bound(self, z: Tensor, eps: float = 1e-3, hard_clamp: bool = False) -> Tensor:
        """Standard FSQ bound and round, as the library's ``bound``: codes in [-1, 1]."""
        levels = self._levels.to(z.dtype)
        half_l = (levels - 1) * (1 + eps) / 2
        offset = (self._levels % 2 == 0).to(z.dtype) * 0.5
        shift = offset / half_l if hard_clamp else torch.atanh(offset / half_l)
        bounded = (z + shift).clamp(-1, 1) if hard_clamp else torch.tanh(z + shift)
        bounded = bounded * half_l - offset
        rounded = bounded + (bounded.round() - bounded).detach()
        return rounded / torch.div(self._levels, 2, rounding_mode="floor")

    def symmetry_preserving_bound(self, z: Tensor, hard_clamp: bool = False) -> Tensor:
        levels_minus_1 = (self._levels - 1).to(z.dtype)
        t = z.clamp(-1, 1) if hard_clamp else torch.tanh(z)
        bracket = levels_minus_1 * (t + 1) / 2 + 0.5
        bracket = bracket + (bracket.floor() - bracket).detach()
        return 2.0 / levels_minus_1 * bracket - 1.0

    def quantize(self, z: Tensor) -> Tensor:
        """Bound and round ``z`` (..., codebook_dim) to codes in [-1, 1], same shape."""
        return self._bound_and_round(z)[0]

    def _bound_and_round(self, z: Tensor) -> tuple[Tensor, Tensor]:
        constants = self._constants(z.dtype, z.device)
        return _BoundAndRound.apply(z, *constants, self.preserve_symmetry, self._clamp)

    def maybe_apply_noise(self, codes: Tensor, bounded: Tensor | None = None) -> Tensor:
        """In training with ``noise_dropout``: for each entry with that probability, the
        bounded value plus uniform noise of half a step either side, clamped to [-1, 1]."""
        if not self.training or self.noise_dropout == 0.0:
            return codes
        if bounded is None:
            bounded = codes
        step = self._constants(codes.dtype, codes.device)[4]
        noisy = bounded + (torch.rand_like(bounded) - 0.5) * step
        chosen = torch.rand_like(bounded) < self.noise_dropout
        return torch.where(chosen, noisy.clamp(-1.0, 1.0), codes)

    def _scale_and_shift(self, zhat_normalized: Tensor) -> Tensor:
        if self.preserve_symmetry:
            return (zhat_normalized + 1.0) / (2.0 / (self._levels - 1))
        half_width = self._levels // 2
        return zhat_normalized * half_width + half_width

    def _scale_and_shift_inverse(self, zhat: Tensor) -> Tensor:
        if self.preserve_symmetry:
            return zhat * (2.0 / (self._levels - 1)) - 1.0
        half_width = self._levels // 2
        return (zhat - half_width) / half_width

    def indices_to_level_indices(self, indices: Tensor) -> Tensor:
        """(...,) code indices -> (..., codebook_dim) level of each channel, 0..L-1."""
        indices = indices.long().unsqueeze(-1)
        return torch.div(indices, self._basis, rounding_mode="floor") % self._levels

    def _indices_to_codes(self, indices: Tensor) -> Tensor:
        return self._scale_and_shift_inverse(self.indices_to_level_indices(indices))

    def codes_to_indices(self, zhat: Tensor) -> Tensor:
        """(..., codebook_dim) codes in [-1, 1] -> (...,) int64 indices."""
        if zhat.shape[-1] != self.codebook_dim:
            raise QuantizerInputError(
                f"expected codes of shape (..., {self.codebook_dim}), got {tuple(zhat.shape)}")
        levels = self._scale_and_shift(zhat.double()).round().long()
        return (levels * self._basis).sum(-1)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """Indices as returned by ``forward`` -> the output ``forward`` gave for them."""
        if indices.dtype.is_floating_point or indices.dtype == torch.bool:
            raise QuantizerInputError(f"expected integer indices, got {indices.dtype}")
        is_img_or_video = indices.ndim >= 3 + int(self.keep_num_codebooks_dim)
        dtype = self._param_dtype(torch.float32)
        table = None
        if not torch.is_autocast_enabled(indices.device.type):
            table = self._table_for(indices.numel(), dtype, indices.device)
        if table is not None:
            # as the forward computed these rows: the same products, so the same bits
            pout = self.project_out
            rows = (table[0] @ pout.weight.t() if pout.bias is None
                    else torch.addmm(pout.bias, table[0], pout.weight.t()))
            # out-of-range indices wrap around, as the digit arithmetic below makes them
            flat = torch.remainder(indices.reshape(-1).long(), self.codebook_size)
            shape = indices.shape[:-1] if self.keep_num_codebooks_dim else indices.shape
            codes = rows.index_select(0, flat).view(*shape, self.dim)
        else:
            codes = self._indices_to_codes(indices).float()
            if self.orthogonal_rotation:
                codes = codes @ self.orthogonal_rot.t()
            if self.keep_num_codebooks_dim:
                codes = codes.flatten(-2)
            codes = self.project_out(codes.to(dtype))
        if is_img_or_video or self.channel_first:
            codes = codes.movedim(-1, 1)
        return codes

    def _param_dtype(self, default: torch.dtype) -> torch.dtype:
        if self.has_projections:
            return self.project_out.weight.dtype
        return default

    # ------------------------------------------------------------------ forward

    def forward(self, z: Tensor) -> FSQOutput:
        """``z``: (b, n, dim), or (b, dim, *spatial) for image/video feature maps (4+ dims)
        or when ``channel_first``. Returns ``(out, indices)`` in the same layout."""
        channel_first = self.channel_first or (isinstance(z, Tensor) and z.ndim >= 4)
        check_tensor(z, self.dim, 1 if channel_first else -1)
        if channel_first:
            spatial = z.shape[2:]
            z = z.flatten(2).transpose(1, 2)  # (b, n, dim)

        fused = self._fused_call(z)
        if fused is not None:
            return self._output(*fused, spatial if channel_first else None)

        h = self.project_in(z)
        # a non-finite input entry makes every projected entry it feeds non-finite, so the
        # small projected tensor is the cheap place to look
        if tracing():  # see .tracing: no host check inside a graph
            h = spread_nonfinite(h)
        elif not all_finite(h):
            check_finite(z)
        orig_dtype = h.dtype
        math_dtype = orig_dtype
        if orig_dtype not in self.allowed_dtypes and (
                self.force_quantization_f32 or orig_dtype in _HALF_DTYPES):
            # half precision would misplace the rounding thresholds
            math_dtype = torch.float32
        h = h.to(math_dtype)
        h = h.unflatten(-1, (self.num_codebooks, self.codebook_dim))  # (b, n, c, d)
        if self.orthogonal_rotation:
            h = h @ self.orthogonal_rot.to(math_dtype)

        with torch.autocast(h.device.type, enabled=False):
            codes, level = self._bound_and_round(h)
            indices = None
            if self.return_indices:
                indices = (level.long() * self._basis).sum(-1)  # (b, n, c), exact
            if self.noise_dropout > 0.0 and self.training:
                codes = self.maybe_apply_noise(codes, self._bounded(h))
            if self.orthogonal_rotation:
                codes = codes @ self.orthogonal_rot.to(math_dtype).t()
        codes = codes.flatten(-2).to(orig_dtype)
        out = self.project_out(codes)
        return self._output(out, indices, spatial if channel_first else None)

    def _output(self, out: Tensor, indices: Tensor | None,
                spatial: torch.Size | None) -> FSQOutput:
        """The call's ``(b, n, dim)`` output and ``(b, n, c)`` indices in the input's layout:
        back to ``(b, dim, *spatial)`` for a channel-first input, the codebook axis dropped
        unless kept."""
        if spatial is not None:
            out = out.transpose(1, 2).unflatten(2, spatial)
            if indices is not None:
                indices = indices.unflatten(1, spatial)
        if indices is not None and not self.keep_num_codebooks_dim:
            indices = indices.squeeze(-1)
        return FSQOutput(out, indices)

    def _fused_call(self, z: Tensor) -> tuple[Tensor, Tensor | None] | None:
        """The common case (projections, float32/float64, no rotation or noise) in one autograd
        node; None when the general path is needed.

        Under autocast, with float32 weights and a float32 or autocast-dtype input, the whole
        call (projections too) runs in float32 and the output is cast to the autocast dtype,
        the dtype the general path's ``project_out`` gives there. The projections are narrow
        (``dim`` to ``len(levels)``): at the course MLP's 2048 x 16 rows the bfloat16 products
        cost more than the float32 ones (dtype casts and small-matmul overhead), and float32
        is the more accurate."""
        device_type = z.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            if not (self.has_projections and z.dtype in (torch.float32, dtype)
                    and self.project_in.weight.dtype == torch.float32):
                return None
            with torch.autocast(device_type, enabled=False):
                fused = self._fused_call(z.float())
            if fused is None:
                return None
            return fused[0].to(dtype), fused[1]
        if not (self.has_projections and z.dtype in self.allowed_dtypes
                and not self.orthogonal_rotation
                and not (self.noise_dropout > 0.0 and self.training)
                and z.dtype == self.project_in.weight.dtype):
            return None
        flat = z.reshape(-1, self.dim)
        pin, pout = self.project_in, self.project_out
        constants = self._constants(z.dtype, z.device)
        repeat = self.num_codebooks
        if repeat > 1:
            constants = tuple(c.repeat(repeat) for c in constants)
        table = self._table_for(flat.shape[0], z.dtype, z.device)
        if fsq_cpu.usable(flat, pin, pout, self.num_codebooks):
            found = fsq_cpu.projected_call(flat, pin, pout, constants, self._levels, self._basis,
                                           self.preserve_symmetry, self._clamp, table)
            if found is not None:
                out, index = found
                indices = index.view(*z.shape[:-1], 1) if self.return_indices else None
                return out.view(*z.shape[:-1], self.dim), indices
        out, level, index = _ProjectedFSQ.apply(flat, pin.weight, pin.bias, pout.weight,
                                                pout.bias, *constants, self.preserve_symmetry,
                                                self._clamp, table)
        indices = None
        if self.return_indices:
            if table is not None:
                indices = index.view(*z.shape[:-1], 1)
            else:
                level = level.view(*z.shape[:-1], self.num_codebooks, self.codebook_dim)
                if self.codebook_size <= 2 ** 24 and level.dtype == torch.float32:
                    # one matvec, exact: every partial sum is an integer below 2**24
                    indices = (level @ self._basis.to(level.dtype)).long()
                else:
                    indices = (level.long() * self._basis).sum(-1)
        return out.view(*z.shape[:-1], self.dim), indices

    def _table_for(self, rows: int, dtype: torch.dtype, device: torch.device
                   ) -> tuple[Tensor, Tensor, Tensor] | None:
        """The code table (see ``_code_table``) when a call on ``rows`` rows projects the codes
        once and gathers (``_ProjectedFSQ``), else None. Not while tracing: a NaN there (see
        .tracing) must reach the output, not an index."""
        # tracing first: a traced row count is symbolic, and comparing it would guard on it
        if (not tracing() and self.num_codebooks == 1 and self.has_projections
                and not self.orthogonal_rotation and dtype in (torch.float32, torch.float64)
                and self.codebook_size <= 2 ** 24
                and self.codebook_size * TABLE_ROWS_PER_CODE <= rows):
            return self._code_table(dtype, device)
        return None

    def _code_table(self, dtype: torch.dtype, device: torch.device
                    ) -> tuple[Tensor, Tensor, Tensor]:
        """(codebook_size, codebook_dim) every code in index order, as the forward computes
        codes from levels, the index basis, and the index of the lowest standard level (0-d),
        all in ``dtype`` (cached, like the bound's constants: none depends on anything a call
        or an optimiser changes)."""
        key = ("table", dtype, device)
        hit = self._cache.get(key)
        if hit is None:
            shift, scale, bias, centre, step, slope = self._constants(dtype, device)
            level = self.indices_to_level_indices(
                torch.arange(self.codebook_size, device=device)).to(dtype)
            code = level * step - 1.0 if self.preserve_symmetry else (level - centre) / centre
            basis = self._basis.to(dtype)
            first = (torch.zeros_like(basis) if self.preserve_symmetry else centre) @ basis
            hit = self._cache[key] = (code, basis, first)
        return hit

    def _bounded(self, h: Tensor) -> Tensor:
        """The continuous bounded value in code units (symmetric FSQ), differentiable."""
        t = h.clamp(-1.0, 1.0) if self.bound_hard_clamp else torch.tanh(h)
        return t

    def extra_repr(self) -> str:
        return (f"levels={self._levels.tolist()}, dim={self.dim}, "
                f"num_codebooks={self.num_codebooks}, codebook_size={self.codebook_size}")
