"""LFQ: lookup-free quantisation, each feature quantised to the sign of itself.

Yu et al. 2023 (MAGVIT-v2): a vector of ``k = log2(codebook_size)`` features is quantised to
``codebook_scale * sign(x)``; its index is the bits ``x_d > 0``, most significant first. An
entropy penalty ``E[H(q(z))] - gamma H(E[q(z)])`` keeps each choice confident and all codes in
use. A drop-in for ``vector_quantize_pytorch.LFQ`` (same arguments, returns, index order and
state-dict keys)::

    quantizer = LFQ(codebook_size=65536, dim=16, entropy_loss_weight=0.1)
    quantized, indices, aux_loss = quantizer(image_feats)  # (B, 16, H, W) -> (B, H, W)

Differences from the library, each on purpose and tested:

* the entropies are computed exactly without the N x 2^k distribution (see lfq_entropy):
  fast at 2^16 codes and memory bounded at 2^18; the library clamps probabilities at 1e-5
  inside the log, which underestimates both entropies when codes are many (at 2^16 codes,
  inv_temperature 10: per-sample 7.318 against the exact 7.364 nats);
* with ``mask`` the batch entropy is the entropy of the mean over the kept tokens; the
  library's mean then runs over no axis, so its "batch entropy" is the per-sample one and
  the diversity term cancels;
* the quantisation and entropies run in float32 under CPU autocast too (the library turns
  off CUDA autocast only, so under CPU autocast its entropies come out rounded to bfloat16);
* EvoLFQ (evo_lfq.py) reports the gene that earned the best fitness, not a row of the next
  generation.
* non-finite input, a wrong feature size or out-of-range indices raise QuantizerInputError.

One option of ours: ``centre_init=True`` sets ``project_in``'s bias on the first training call
so that every projected feature has mean zero over that batch (over all processes when
training is distributed): each bit starts split about evenly between its two values, where a
random projection of the encoder's first outputs leaves some bits nearly constant for the
entropy penalty to undo. Scale-free, so it suits spherical LFQ, whose codes ignore the size of
the features. A persistent ``initted`` buffer (registered only with the option) keeps a
resumed run from centring again; a non-finite first batch changes nothing.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import distributed, lfq_entropy
from .tracing import InitFlag, tracing
from .vector_quantize import QuantizerInputError


class Return(NamedTuple):
    quantized: Tensor  # input shape
    indices: Tensor  # input shape without the feature axis (+ codebook axis if kept), int64
    entropy_aux_loss: Tensor  # scalar: weighted entropy penalty + commitment loss


class LossBreakdown(NamedTuple):
    per_sample_entropy: Tensor
    batch_entropy: Tensor
    commitment: Tensor


class CosineSimLinear(nn.Module):
    """Linear map by cosine similarity: unit-norm inputs times unit-norm weight columns."""

    def __init__(self, dim_in: int, dim_out: int, scale: float = 1.0):
        super().__init__()
        self.scale = scale
        self.weight = nn.Parameter(torch.randn(dim_in, dim_out))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=-1) @ F.normalize(self.weight, dim=0) * self.scale


def _mean_over_processes(t: Tensor) -> Tensor:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return t
    world = torch.distributed.get_world_size()
    if world == 1:
        return t
    from torch.distributed.nn import all_reduce  # differentiable: gradients reach every rank

    return all_reduce(t) / world


def check_finite(x: Tensor, name: str = "input") -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise QuantizerInputError(f"{name} must be a floating-point tensor, got "
                                  f"{getattr(x, 'dtype', type(x).__name__)}")
    if tracing():  # see .tracing: no host check inside a graph
        return
    # one reduction decides the common case: a sum is finite only if every term is; a
    # non-finite sum (a NaN/inf, or finite values overflowing) gets the exact elementwise test
    if torch.isfinite(x.sum(dtype=torch.float32)):
        return
    if not torch.isfinite(x).all():
        raise QuantizerInputError(f"{name} contains NaN or infinite values; "
                                  "expected finite features")


class LFQ(InitFlag, nn.Module):
    """Lookup-free quantiser. Input (B, N, dim) channels-last, or channel-first feature maps
    (B, dim, ...) when ``channel_first`` (default: for 4-D and larger input)."""

    def __init__(
        self,
        *,
        dim: int | None = None,
        codebook_size: int | None = None,
        entropy_loss_weight: float = 0.1,
        commitment_loss_weight: float = 0.0,
        diversity_gamma: float = 1.0,
        straight_through_activation: nn.Module | None = None,
        num_codebooks: int = 1,
        keep_num_codebooks_dim: bool | None = None,
        codebook_scale: float = 1.0,
        frac_per_sample_entropy: float = 1.0,
        has_projections: bool | None = None,
        projection_has_bias: bool = True,
        soft_clamp_input_value: float | None = None,
        cosine_sim_project_in: bool = False,
        cosine_sim_project_in_scale: float | None = None,
        channel_first: bool | None = None,
        experimental_softplus_entropy_loss: bool = False,
        entropy_loss_offset: float = 5.0,
        spherical: bool = False,
        force_quantization_f32: bool = True,
        orthogonal_rotation: bool = False,
        centre_init: bool = False,
    ):
        super().__init__()
        if not isinstance(centre_init, bool):
            raise ValueError(f"centre_init must be True or False, got {centre_init!r}")
        if dim is None and codebook_size is None:
            raise ValueError("LFQ needs dim or codebook_size")
        if codebook_size is None:
            codebook_size = 2**dim
        if codebook_size < 2 or codebook_size & (codebook_size - 1):
            suggest = 2 ** math.ceil(math.log2(max(codebook_size, 2)))
            raise ValueError(f"codebook_size must be a power of 2 for lookup-free quantisation, "
                             f"got {codebook_size} (suggested {suggest})")
        if not 0 < frac_per_sample_entropy <= 1:
            raise ValueError(f"frac_per_sample_entropy must be in (0, 1], "
                             f"got {frac_per_sample_entropy}")
        if soft_clamp_input_value is not None and soft_clamp_input_value < codebook_scale:
            raise ValueError("soft_clamp_input_value must be at least codebook_scale")

        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim = codebook_size.bit_length() - 1
        self.num_codebooks = num_codebooks
        codebook_dims = codebook_dim * num_codebooks
        self.dim = dim = codebook_dims if dim is None else dim
        if keep_num_codebooks_dim is None:
            keep_num_codebooks_dim = num_codebooks > 1
        if num_codebooks > 1 and not keep_num_codebooks_dim:
            raise ValueError("keep_num_codebooks_dim must be true with several codebooks")
        self.keep_num_codebooks_dim = keep_num_codebooks_dim

        if has_projections is None:
            has_projections = dim != codebook_dims
        self.has_projections = has_projections
        if not has_projections:
            self.project_in, self.project_out = nn.Identity(), nn.Identity()
        else:
            if cosine_sim_project_in:
                scale = codebook_scale if cosine_sim_project_in_scale is None \
                    else cosine_sim_project_in_scale
                self.project_in = CosineSimLinear(dim, codebook_dims, scale=scale)
            else:
                self.project_in = nn.Linear(dim, codebook_dims, bias=projection_has_bias)
            self.project_out = nn.Linear(codebook_dims, dim, bias=projection_has_bias)

        self.channel_first = channel_first
        self.activation = straight_through_activation or nn.Identity()
        self.spherical = spherical
        self.orthogonal_rotation = orthogonal_rotation
        if orthogonal_rotation:
            self.register_buffer("orthogonal_rot",
                                 nn.init.orthogonal_(torch.empty(codebook_dim, codebook_dim)))
        self.frac_per_sample_entropy = frac_per_sample_entropy
        self.diversity_gamma = diversity_gamma
        self.entropy_loss_weight = entropy_loss_weight
        self.codebook_scale = codebook_scale
        self.commitment_loss_weight = commitment_loss_weight
        self.soft_clamp_input_value = soft_clamp_input_value
        self.entropy_loss_offset = entropy_loss_offset
        self.experimental_softplus_entropy_loss = experimental_softplus_entropy_loss
        self.force_quantization_f32 = force_quantization_f32
        self.centre_init = centre_init
        if centre_init:
            if getattr(self.project_in, "bias", None) is None:
                raise ValueError(
                    "centre_init sets project_in's bias: it needs a projection with a bias "
                    f"(dim={dim} differs from num_codebooks * log2(codebook_size) = "
                    f"{codebook_dims}, projection_has_bias=True, cosine_sim_project_in=False)")
        self._register_init_flag(centre_init)

        # bit weights, most significant first; persistent under the library's name so that
        # its state dicts load unchanged
        self.register_buffer("mask", 2 ** torch.arange(codebook_dim - 1, -1, -1))
        self.register_buffer("zero", torch.tensor(0.0), persistent=False)

    # codes

    @property
    def dtype(self) -> torch.dtype:
        return self.zero.dtype

    @property
    def code_magnitude(self) -> float:
        """|value| of each feature of a code: the scale, over sqrt(k) when spherical."""
        s = self.codebook_scale
        return s / math.sqrt(self.codebook_dim) if self.spherical else s

    def bits_to_codes(self, bits: Tensor) -> Tensor:
        return bits * (2 * self.codebook_scale) - self.codebook_scale

    @property
    def codebook(self) -> Tensor:
        """(codebook_size, k) every code, unscaled by ``spherical`` (as the library's buffer);
        built on demand rather than held, since it is 2^k x k."""
        bits = lfq_entropy.bit_matrix(self.codebook_dim, self.mask.device, self.dtype).T
        return self.bits_to_codes(bits)

    def _check_indices(self, indices: Tensor) -> None:
        if not isinstance(indices, Tensor) or indices.is_floating_point() or indices.is_complex():
            raise QuantizerInputError("indices must be an integer tensor")
        if tracing():  # a range check reads values back to the host (see .tracing)
            return
        if indices.numel() and (indices.min() < 0 or indices.max() >= self.codebook_size):
            raise QuantizerInputError(f"indices must lie in [0, {self.codebook_size}), got "
                                      f"[{int(indices.min())}, {int(indices.max())}]")

    def indices_to_codes(self, indices: Tensor, project_out: bool = True) -> Tensor:
        """Codes (after ``project_out``) for ``indices``; channel-first for 2-D+ index maps, as
        the forward returns them."""
        self._check_indices(indices)
        is_img_or_video = indices.ndim >= 3 + int(self.keep_num_codebooks_dim)
        transpose = is_img_or_video if self.channel_first is None else self.channel_first
        if not self.keep_num_codebooks_dim:
            indices = indices[..., None]
        bits = ((indices[..., None] & self.mask) != 0).to(self.dtype)  # (..., c, k)
        # the forward's formula exactly, so decoded codes equal the quantized output bit for bit
        codes = bits * (2 * self.code_magnitude) - self.code_magnitude
        if self.orthogonal_rotation:
            codes = codes @ self.orthogonal_rot.t()
        codes = codes.flatten(-2)
        if project_out:
            codes = self.project_out(codes)
        if transpose:
            codes = codes.movedim(-1, 1)
        return codes

    # forward

    # a residual stack checks its input once and turns its layers' own check off
    check_input = True

    def forward(self, x: Tensor, inv_temperature: float = 100.0,
                return_loss_breakdown: bool = False, mask: Tensor | None = None):
        if self.check_input:
            check_finite(x)
        if x.ndim < 3:
            raise QuantizerInputError(f"LFQ expects (batch, seq, dim) or channel-first maps, "
                                      f"got shape {tuple(x.shape)}")
        transpose = x.ndim >= 4 if self.channel_first is None else self.channel_first
        if transpose:
            x = x.movedim(1, -1)
        lead = x.shape[:-1]  # (B, ...) before flattening to (B, N)
        if x.shape[-1] != self.dim:
            raise QuantizerInputError(f"expected features of size {self.dim}, got "
                                      f"{x.shape[-1]} (shape {tuple(x.shape)})")
        x = x.reshape(lead[0], -1, self.dim)
        b, n = x.shape[:2]
        if mask is not None:
            if mask.dtype != torch.bool or mask.shape != (b, n):
                raise QuantizerInputError(f"mask must be a bool tensor of shape {(b, n)}, got "
                                          f"{mask.dtype} {tuple(mask.shape)}")

        x = self.project_in(x)
        if self.training and self.init_pending:
            x = x - self._centre(x, mask)
        if self.soft_clamp_input_value is not None:
            c = self.soft_clamp_input_value
            x = (x / c).tanh() * c
        x = x.unflatten(-1, (self.num_codebooks, self.codebook_dim))  # (B, N, C, k)
        if self.orthogonal_rotation:
            x = x @ self.orthogonal_rot
        if self.spherical:
            x = F.normalize(x, dim=-1) * self.codebook_scale

        force_f32 = self.force_quantization_f32
        orig_dtype = x.dtype
        context = torch.autocast(x.device.type, enabled=False) if force_f32 else nullcontext()
        with context:
            if force_f32:
                x = x.float()
            positive = x > 0
            quantized = positive.to(x.dtype) * (2 * self.code_magnitude) - self.code_magnitude
            if tracing() and self.check_input:
                # no host check in a graph (see .tracing): a NaN/Inf entry, which the sign
                # would turn into a valid code, makes its code NaN instead
                quantized = quantized + (x - x)
            indices = (positive.long() * self.mask).sum(-1)  # (B, N, C)

            if self.training:
                act = self.activation(x)
                out = act + (quantized - act).detach()
                per_sample, batch, aux = self._entropy_loss(x, inv_temperature, mask)
                if self.commitment_loss_weight > 0:
                    err = (x - quantized).square()
                    commit = (err[mask] if mask is not None else err).mean()
                else:
                    commit = self.zero
            else:
                out = quantized
                per_sample = batch = aux = commit = self.zero
            out = out.to(orig_dtype)

        if self.orthogonal_rotation:
            out = out @ self.orthogonal_rot.t()
        out = self.project_out(out.flatten(-2))
        out = out.reshape(*lead, out.shape[-1])
        indices = indices.reshape(*lead, self.num_codebooks)
        if transpose:
            out = out.movedim(-1, 1)
        if not self.keep_num_codebooks_dim:
            indices = indices.squeeze(-1)

        loss = aux * self.entropy_loss_weight + commit * self.commitment_loss_weight
        ret = Return(out, indices, loss)
        if not return_loss_breakdown:
            return ret
        return ret, LossBreakdown(per_sample, batch, commit)

    @torch.no_grad()
    def _centre(self, h: Tensor, mask: Tensor | None) -> Tensor:
        """Subtract the mean of the projected features ``h`` (B, N, C*k) over the batch (the
        kept tokens with ``mask``) from project_in's bias and mark it done; returns that mean,
        for this call's own features. A non-finite mean changes nothing (and is returned as
        zeros): in a traced call by ``torch.where``, with no read-back."""
        rows = h[mask] if mask is not None else h.reshape(-1, h.shape[-1])
        total = rows.float().sum(0)
        count = total.new_tensor(float(rows.shape[0]))
        if distributed.should_sync(None):
            if tracing():
                raise QuantizerInputError(
                    "centre_init synchronised across processes runs eagerly: use immediate "
                    "input checks (vqvae.set_input_checks('immediate')) and call eagerly")
            distributed.all_reduce(total)
            distributed.all_reduce(count)
        mean = total / count.clamp_min(1.0)
        bias = self.project_in.bias
        if tracing():
            ok = torch.isfinite(mean).all() & ~self.initted
            mean = torch.where(ok, mean, torch.zeros_like(mean))
            self.initted.copy_(self.initted | ok)
        elif not bool(torch.isfinite(mean).all()):
            return torch.zeros_like(mean).to(h.dtype)
        else:
            self.initted.fill_(True)
        bias.sub_(mean.to(bias.dtype))
        self._initted_known = True
        return mean.to(h.dtype)

    def _entropy_loss(self, x: Tensor, inv_temperature: float, mask: Tensor | None):
        """(per-sample entropy, batch entropy, penalty) of the (B, N, C, k) pre-sign inputs."""
        tokens = x[mask] if mask is not None else x.flatten(0, 1)  # (M, C, k)
        if self.frac_per_sample_entropy < 1:
            count = tokens.shape[0]
            keep = int(count * self.frac_per_sample_entropy)
            tokens = tokens[torch.randperm(count, device=tokens.device)[:keep]]
        if tokens.shape[0] == 0:  # every token masked out: nothing to regularise
            return self.zero, self.zero, self.zero
        logits = tokens.float() * (4 * inv_temperature * self.code_magnitude)
        per_sample = lfq_entropy.per_sample_entropy(logits).mean()
        batch = lfq_entropy.batch_entropy(logits.transpose(0, 1), _mean_over_processes).mean()
        aux = per_sample - self.diversity_gamma * batch
        if self.experimental_softplus_entropy_loss:
            aux = F.softplus(aux + self.entropy_loss_offset)
        return per_sample, batch, aux
