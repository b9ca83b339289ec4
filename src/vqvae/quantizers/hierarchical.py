"""Hierarchical (multi-scale residual) VQ over feature maps, a drop-in for
``vector_quantize_pytorch.HierarchicalVQ``.

What it computes (the library's definition, as in VAR's multi-scale quantizer, Tian et al.,
2024, arXiv 2404.02905): with levels ``l = 0..L-1`` of non-decreasing spatial shapes ``s_l``,

    r_0 = x
    for each level l:
        z_l   = avgpool(r_l, s_l)                 # adaptive average pooling to s_l
        q_l   = VQ_l(z_l)                         # nearest code per position (EMA codebook)
        u_l   = φ_l(interpolate(q_l, full shape)) # (bi/tri)linear, then a residual conv
        r_l+1 = r_l - u_l
    reconstruction = Σ_l u_l,  loss = mean_l loss_l

``φ(u) = u + ratio · (conv(u) - u)`` (a 3-wide convolution; identity when ``quant_resi`` is 0),
one shared or ``share_quant_resi`` of them spread over the levels. The gradient passes through
every step (the residuals are not detached; each VQ is straight-through). With a ``mask``, the
pooled positions that cover no valid position are not quantized (index ``-1``, zero vector), the
others average valid positions only, and the reconstruction is zero outside the mask. Nested
dropout (training): with probability ``nested_dropout``, keep only levels ``0..c`` for a random
``c``, both in the reconstruction and in the loss.

Deferred calls (compiled, or on an accelerator; see :mod:`vqvae.quantizers.guard`) read nothing
back: NaN/Inf input is left to the level quantizers' own device-side rule (no codebook changes,
the error at the trainer's read-back) and makes the reconstruction NaN where the input was; the
nested-dropout cutoff is drawn on the device and applied as a mask over the levels (the cutoff
returned with ``return_cutoff`` is then a 0-d tensor, ``-1`` for none). A ``mask`` selects a
data-dependent number of positions, which only an eager call can do (on an accelerator it
waits for that number).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from . import guard
from .checks import all_finite
from .simvq import check_finite
from .tracing import tracing
from .vector_quantize import QuantizerInputError, VectorQuantize

DROPPED = -1  # index of a pooled position that covers no valid input position


def to_level_shape(scale: int | Sequence[int], spatial_dims: int) -> tuple[int, ...]:
    if isinstance(scale, int):
        return (scale,) * spatial_dims
    shape = tuple(int(s) for s in scale)
    if len(shape) != spatial_dims:
        raise ValueError(f"scale {scale!r} must have {spatial_dims} entries")
    return shape


def _sync_seed(device: torch.device) -> int:
    seed = torch.randint(0, 10_000, (), device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(seed)
    return int(seed.item())


def _sync_uniform(device: torch.device) -> Tensor:
    """A 0-d float64 draw in [0, 1) on ``device``, equal on all processes (no read back)."""
    draw = torch.rand((), device=device, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(draw)
        draw = draw - draw.floor()  # the sum of uniforms, wrapped: still uniform
    return draw


class _Phi(nn.Module):
    """``u + ratio · (conv(u) - u)``: the residual convolution after upsampling."""

    def __init__(self, dim: int, spatial_dims: int, resi_ratio: float):
        super().__init__()
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[spatial_dims - 1]
        self.conv = conv(dim, dim, 3, padding=1)
        self.resi_ratio = float(abs(resi_ratio))

    def forward(self, u: Tensor) -> Tensor:
        if self.resi_ratio <= 1e-8:
            return u
        return u.lerp(self.conv(u), self.resi_ratio)


class HierarchicalVQ(nn.Module):
    """Multi-scale residual VQ of ``(B, C, *spatial)`` maps (``(B, *spatial, C)`` with
    ``channel_first=False``); 1, 2 or 3 spatial axes (``accept_image_fmap`` /
    ``accept_3d_fmap``). Returns ``(reconstruction, indices, loss)`` (and the nested-dropout
    cutoff with ``return_cutoff=True``): ``reconstruction`` has ``x``'s shape, ``indices`` a tuple
    of int64 ``(B, *s_l)`` per level, ``loss`` a scalar.

    Each level quantizes with this project's :class:`VectorQuantize` (EMA codebook,
    ``decay``, k-means init, dead-code restarts), shared across levels or one per level.
    Arguments are the library's.

    Differences from the library, on purpose:

    - in eval mode ``loss`` is the commitment loss of the call (the library returns 0);
    - NaN/Inf input raises :class:`QuantizerInputError` before any codebook changes;
    - all positions of a level masked out (an all-false mask row) give zero vectors and index
      ``-1`` for that level; the library's coarsest level instead takes the masked mean of zero
      positions.
    """

    def __init__(
        self,
        *,
        dim: int,
        codebook_size: int | tuple[int, ...],
        scales: Sequence[int | Sequence[int]],
        shared_codebook: bool = True,
        channel_first: bool = True,
        sync_codebook: bool | None = None,
        decay: float = 0.99,
        commitment_weight: float = 1.0,
        rotation_trick: bool = False,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        threshold_ema_dead_code: float = 2,
        stochastic_sample_codes: bool = False,
        sample_codebook_temp: float = 0.1,
        orthogonal_reg_weight: float = 0.0,
        orthogonal_reg_max_codes: int | None = 128,
        orthogonal_reg_active_codes_only: bool = False,
        quant_resi: float = 0.5,
        share_quant_resi: int = 1,
        nested_dropout: float = 0.0,
        nested_dropout_min_levels: int = 1,
        accept_image_fmap: bool = False,
        accept_3d_fmap: bool = False,
    ):
        super().__init__()
        if accept_image_fmap and accept_3d_fmap:
            raise ValueError("choose at most one of accept_image_fmap / accept_3d_fmap")
        if not 0.0 <= nested_dropout <= 1.0:
            raise ValueError(f"nested_dropout must lie in [0, 1], got {nested_dropout!r}")
        if nested_dropout_min_levels < 1:
            raise ValueError("nested_dropout_min_levels must be >= 1")
        spatial_dims = 2 if accept_image_fmap else 3 if accept_3d_fmap else 1
        level_shapes = tuple(to_level_shape(scale, spatial_dims) for scale in scales)
        if not level_shapes or any(s <= 0 for shape in level_shapes for s in shape):
            raise ValueError(f"scales must be a non-empty list of positive sizes, got {scales!r}")
        for coarse, fine in zip(level_shapes, level_shapes[1:], strict=False):
            if any(a > b for a, b in zip(coarse, fine, strict=True)):
                raise ValueError(f"scales must be non-decreasing, got {scales!r}")
        sizes = (codebook_size,) * len(level_shapes) if isinstance(codebook_size, int) \
            else tuple(codebook_size)
        if len(sizes) != len(level_shapes):
            raise ValueError(f"codebook_size has {len(sizes)} entries for "
                             f"{len(level_shapes)} scales")
        if shared_codebook and len(set(sizes)) != 1:
            raise ValueError("shared_codebook=True needs one codebook size for all levels")

        self.dim = dim
        self.spatial_dims = spatial_dims
        self.channel_first = channel_first
        self.scales = tuple(scales)
        self.level_shapes = level_shapes
        self.num_levels = len(level_shapes)
        self.codebook_sizes = sizes
        self.nested_dropout = nested_dropout
        self.nested_dropout_min_levels = nested_dropout_min_levels
        self.orthogonal_reg_weight = orthogonal_reg_weight
        self.orthogonal_reg_max_codes = orthogonal_reg_max_codes
        self.orthogonal_reg_active_codes_only = orthogonal_reg_active_codes_only

        options = dict(decay=decay, commitment_weight=commitment_weight,
                       rotation_trick=rotation_trick, kmeans_init=kmeans_init,
                       kmeans_iters=kmeans_iters, threshold_ema_dead_code=threshold_ema_dead_code,
                       stochastic_sample_codes=stochastic_sample_codes,
                       sample_codebook_temp=sample_codebook_temp, sync_codebook=sync_codebook)
        self.vq = self.vqs = None
        if shared_codebook:
            self.vq = VectorQuantize(dim, sizes[0], **options)
        else:
            self.vqs = nn.ModuleList([VectorQuantize(dim, size, **options) for size in sizes])

        self.phi_shared = self.phi_levels = None
        if share_quant_resi == 1:
            self.phi_shared = _Phi(dim, spatial_dims, quant_resi)
        else:
            count = self.num_levels if share_quant_resi <= 0 \
                else min(self.num_levels, int(share_quant_resi))
            self.phi_levels = nn.ModuleList([_Phi(dim, spatial_dims, quant_resi)
                                             for _ in range(count)])

    # ------------------------------------------------------------------ pieces

    def get_vq(self, level: int) -> VectorQuantize:
        return self.vq if self.vq is not None else self.vqs[level]

    def choose_phi(self, level: int) -> _Phi:
        if self.phi_shared is not None:
            return self.phi_shared
        count = len(self.phi_levels)
        if count == 1:
            return self.phi_levels[0]
        position = level / max(self.num_levels - 1, 1)
        return self.phi_levels[round(position * (count - 1))]  # Python rounding, as the library

    def upsample_to_full(self, q: Tensor, full_shape: tuple[int, ...], level: int) -> Tensor:
        if tuple(q.shape[2:]) != tuple(full_shape):
            mode = ("linear", "bilinear", "trilinear")[self.spatial_dims - 1]
            q = F.interpolate(q, size=full_shape, mode=mode, align_corners=False)
        return self.choose_phi(level)(q)

    def _pool(self, t: Tensor, shape: tuple[int, ...], mask: Tensor | None):
        """``(pooled (B, C, *shape), valid (B, *shape) or None)``."""
        pool = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
                F.adaptive_avg_pool3d)[self.spatial_dims - 1]
        if mask is None:
            return pool(t, shape), None
        weight = mask.unsqueeze(1).to(t.dtype)  # (B, 1, *spatial)
        covered = pool(weight, shape)  # fraction of valid positions under each pooled cell
        # mean over the valid positions only: pool(t · m) / pool(m)
        return pool(t * weight, shape) / covered.clamp(min=1e-6), covered.squeeze(1) > 0

    def _quantize_level(self, level: int, z: Tensor, valid: Tensor | None):
        """VQ of the pooled map ``z`` ``(B, C, *s)``: ``(q (B, C, *s), indices (B, *s), loss)``."""
        vq = self.get_vq(level)
        rows = z.movedim(1, -1)  # (B, *s, C)
        if valid is None:
            q, indices, loss = vq(rows)
        else:
            chosen, chosen_indices, loss = vq(rows[valid])  # only positions with valid input
            q = rows.new_zeros(rows.shape).index_put((valid,), chosen)
            indices = torch.full(valid.shape, DROPPED, dtype=torch.long, device=z.device)
            indices[valid] = chosen_indices
        if self.training and self.orthogonal_reg_weight > 0:
            loss = loss + self.orthogonal_reg_weight * self._orthogonal_loss(vq, indices)
        # NCHW-contiguous: a channels-last view would send the convolutions down a slower path
        return q.movedim(-1, 1).contiguous(), indices, loss

    def _orthogonal_loss(self, vq: VectorQuantize, indices: Tensor) -> Tensor:
        """Mean squared cosine similarity between codes less ``1/n`` (Shin et al., 2021,
        arXiv 2112.00384, eq. 2); the codes of this batch only with
        ``orthogonal_reg_active_codes_only``, at most ``orthogonal_reg_max_codes`` random ones."""
        codes = vq.codebook
        if self.orthogonal_reg_active_codes_only:
            used = indices[indices != DROPPED].unique()
            codes = codes[used]
        limit = self.orthogonal_reg_max_codes
        if limit is not None and codes.shape[0] > limit:
            codes = codes[torch.randperm(codes.shape[0], device=codes.device)[:limit]]
        n = codes.shape[0]
        unit = F.normalize(codes, dim=-1, eps=1e-6)
        return (unit @ unit.t()).pow(2).sum() / n**2 - 1.0 / n

    def sample_nested_cutoff(self, device: torch.device) -> int | None:
        if not self.training or self.nested_dropout <= 0 or self.num_levels <= 1:
            return None
        if self.nested_dropout_min_levels >= self.num_levels:
            return None
        rand = random.Random(_sync_seed(device))
        if rand.random() >= self.nested_dropout:
            return None
        return rand.randrange(self.nested_dropout_min_levels - 1, self.num_levels - 1)

    def sample_nested_cutoff_on_device(self, device: torch.device) -> Tensor | None:
        """:meth:`sample_nested_cutoff` without a read back: a 0-d int64 tensor, ``-1`` for no
        cutoff (all levels kept); ``None`` where no call can drop levels."""
        if not self.training or self.nested_dropout <= 0 or self.num_levels <= 1:
            return None
        if self.nested_dropout_min_levels >= self.num_levels:
            return None
        low, high = self.nested_dropout_min_levels - 1, self.num_levels - 1
        applies, pick = _sync_uniform(device), _sync_uniform(device)
        cutoff = low + (pick * (high - low)).long().clamp_(max=high - low - 1)
        return torch.where(applies < self.nested_dropout, cutoff, -1)

    # ------------------------------------------------------------------ forward

    def _check(self, x: object, mask: Tensor | None, lens: Tensor | None):
        if not isinstance(x, Tensor) or not x.dtype.is_floating_point:
            raise QuantizerInputError(f"expected a floating-point tensor, got {x!r:.80}")
        layout = "(B, C, *spatial)" if self.channel_first else "(B, *spatial, C)"
        channels = x.shape[1] if self.channel_first and x.ndim > 1 else x.shape[-1]
        if x.ndim != self.spatial_dims + 2 or channels != self.dim:
            raise QuantizerInputError(
                f"expected {layout} with C={self.dim} and {self.spatial_dims} spatial axes, "
                f"got shape {tuple(x.shape)}")
        if mask is not None and lens is not None:
            raise QuantizerInputError("pass either mask or lens, not both")
        full_shape = tuple(x.shape[2:]) if self.channel_first else tuple(x.shape[1:-1])
        if lens is not None:
            if self.spatial_dims != 1:
                raise QuantizerInputError("lens is only supported for 1d sequences")
            mask = torch.arange(full_shape[0], device=x.device) < lens.to(x.device)[:, None]
        if mask is not None:
            if tuple(mask.shape) != (x.shape[0], *full_shape):
                raise QuantizerInputError(
                    f"mask must have shape {(x.shape[0], *full_shape)}, got {tuple(mask.shape)}")
            mask = mask.to(device=x.device, dtype=torch.bool)
        if mask is not None and tracing():
            raise QuantizerInputError(
                "a mask (or lens) selects a data-dependent number of positions, which one "
                "compiled graph cannot hold: call HierarchicalVQ eagerly with a mask")
        # one sum; the exact test only when it is not finite
        if not guard.deferred(x) and not all_finite(x):
            check_finite(x)
        return full_shape, mask

    def forward(self, x: Tensor, indices: Tensor | None = None, mask: Tensor | None = None,
                lens: Tensor | None = None, sample_codebook_temp: float | None = None,
                return_cutoff: bool = False):
        if indices is not None:
            raise QuantizerInputError("forward does not reconstruct from indices; "
                                      "use get_output_from_indices")
        full_shape, mask = self._check(x, mask, lens)
        h = x if self.channel_first else x.movedim(-1, 1)  # (B, C, *spatial)
        saved_temps = self._set_temperature(sample_codebook_temp)
        try:
            residual = h
            reconstruction = torch.zeros_like(h)
            cumulative, all_indices, losses = [], [], []
            for level, shape in enumerate(self.level_shapes):
                z, valid = self._pool(residual, shape, mask)
                q, level_indices, loss = self._quantize_level(level, z, valid)
                u = self.upsample_to_full(q, full_shape, level)
                reconstruction = reconstruction + u
                residual = residual - u
                cumulative.append(reconstruction)
                all_indices.append(level_indices)
                losses.append(loss)
        finally:
            self._restore_temperature(saved_temps)

        if guard.deferred(x):
            cutoff = self.sample_nested_cutoff_on_device(x.device)
            if cutoff is not None:  # levels past the cutoff masked out
                kept_levels = cutoff.where(cutoff >= 0, self.num_levels - 1)
                reconstruction = torch.stack(cumulative).index_select(
                    0, kept_levels.reshape(1)).squeeze(0)
                kept = torch.arange(self.num_levels, device=x.device) <= kept_levels
                loss = (torch.stack(losses) * kept).sum() / (kept_levels + 1)
            else:
                loss = torch.stack(losses).mean()
            # the codes look valid whatever the input was: NaN where the input was not
            reconstruction = reconstruction + (h.detach() - h.detach())
        else:
            cutoff = self.sample_nested_cutoff(x.device)
            if cutoff is not None:
                reconstruction = cumulative[cutoff]
                losses = losses[:cutoff + 1]
            loss = torch.stack(losses).mean()
        if mask is not None:
            reconstruction = reconstruction * mask.unsqueeze(1).to(reconstruction.dtype)
        if not self.channel_first:
            reconstruction = reconstruction.movedim(1, -1)
        if return_cutoff:
            return reconstruction, tuple(all_indices), loss, cutoff
        return reconstruction, tuple(all_indices), loss

    def _set_temperature(self, temperature: float | None) -> list[float] | None:
        if temperature is None:
            return None
        vqs = [self.vq] if self.vq is not None else list(self.vqs)
        saved = [vq.sample_codebook_temp for vq in vqs]
        for vq in vqs:
            vq.sample_codebook_temp = float(temperature)
        return saved

    def _restore_temperature(self, saved: list[float] | None) -> None:
        if saved is None:
            return
        vqs = [self.vq] if self.vq is not None else list(self.vqs)
        for vq, temperature in zip(vqs, saved, strict=True):
            vq.sample_codebook_temp = temperature

    # ------------------------------------------------------------------ decode

    def get_output_from_indices(self, indices: Sequence[Tensor],
                                full_shape: int | Sequence[int] | None = None) -> Tensor:
        """The reconstruction from per-level indices (``-1`` gives zero vectors); equal to the
        eval-mode forward's without a mask. ``full_shape`` defaults to the finest scale."""
        if not isinstance(indices, (tuple, list)) or len(indices) != self.num_levels:
            raise QuantizerInputError(
                f"indices must be a tuple of {self.num_levels} tensors, one per level")
        full = self.level_shapes[-1] if full_shape is None \
            else to_level_shape(full_shape, self.spatial_dims)
        out = None
        for level, level_indices in enumerate(indices):
            if level_indices.ndim != self.spatial_dims + 1:
                raise QuantizerInputError(
                    f"level {level} indices must be (B, {self.spatial_dims} spatial axes), got "
                    f"shape {tuple(level_indices.shape)}")
            kept = level_indices != DROPPED
            codes = self.get_vq(level).decode(level_indices.clamp(min=0))  # (B, *s, C)
            codes = codes * kept.unsqueeze(-1).to(codes.dtype)
            # contiguous as in forward: a channels-last view takes other conv and interpolation
            # kernels, whose bits differ (held to AVX2, they did)
            u = self.upsample_to_full(codes.movedim(-1, 1).contiguous(), full, level)
            out = u if out is None else out + u
        return out if self.channel_first else out.movedim(1, -1)
