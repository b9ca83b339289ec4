"""ResidualLFQ and GroupedResidualLFQ: LFQ layers applied to what the previous ones left.

Layer ``i`` quantises the residual with codes of scale ``2^-i``, so each layer halves the
remaining error range (residual quantisation, Zeghidour et al. 2021, with LFQ layers).
Drop-ins for ``vector_quantize_pytorch.ResidualLFQ`` / ``GroupedResidualLFQ``::

    rlfq = ResidualLFQ(dim=256, codebook_size=256, num_quantizers=8)
    quantized, indices, losses = rlfq(x)  # (B, N, 256) -> (B, N, 8) indices, (8,) losses
    rlfq.get_output_from_indices(indices)  # == quantized in eval mode

Indices of -1 mark layers skipped by quantizer dropout; they decode to zero.
"""

from __future__ import annotations

import random

import torch
from torch import Tensor, nn

from .grouped import GroupedStacks
from .lfq import LFQ, check_finite
from .vector_quantize import QuantizerInputError


def _maybe_synced_seed(device: torch.device, max_size: int = 10_000) -> int:
    """A random seed, summed over processes so that every rank drops the same layers."""
    seed = torch.randint(0, max_size, (), device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(seed)
    return int(seed.item())


class ResidualLFQ(nn.Module):
    """Residual stack of ``num_quantizers`` LFQ layers on (B, N, dim) channels-last input."""

    def __init__(self, *, dim: int, num_quantizers: int, codebook_size: int,
                 quantize_dropout: bool = False, quantize_dropout_cutoff_index: int = 0,
                 quantize_dropout_multiple_of: int = 1,
                 soft_clamp_input_value: float | None = None, **kwargs):
        super().__init__()
        if codebook_size < 2 or codebook_size & (codebook_size - 1):
            raise ValueError(f"codebook_size must be a power of 2, got {codebook_size}")
        if quantize_dropout_cutoff_index < 0:
            raise ValueError("quantize_dropout_cutoff_index must be >= 0")
        codebook_dim = codebook_size.bit_length() - 1
        self.has_projections = codebook_dim != dim
        self.project_in = nn.Linear(dim, codebook_dim) if self.has_projections else nn.Identity()
        self.project_out = nn.Linear(codebook_dim, dim) if self.has_projections else nn.Identity()
        self.dim = dim
        self.num_quantizers = num_quantizers
        layers = []
        for i in range(num_quantizers):
            layers.append(LFQ(dim=codebook_dim, codebook_size=codebook_size,
                              codebook_scale=2.0**-i,
                              soft_clamp_input_value=soft_clamp_input_value, **kwargs))
            if soft_clamp_input_value is not None:
                soft_clamp_input_value *= 0.5
        for layer in layers:
            layer.check_input = False  # forward checks x once; residuals of finite x are finite
        if any(layer.has_projections for layer in layers):
            raise ValueError("ResidualLFQ layers must not project (num_codebooks must be 1)")
        self.layers = nn.ModuleList(layers)
        self.quantize_dropout = quantize_dropout and num_quantizers > 1
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        self.quantize_dropout_multiple_of = quantize_dropout_multiple_of

    @property
    def codebooks(self) -> Tensor:
        """(num_quantizers, codebook_size, k) every code of every layer."""
        return torch.stack([layer.codebook for layer in self.layers])

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """(Q, B, ..., k) codes of (B, ..., q) indices, q <= Q; -1 (dropped) gives zeros."""
        if indices.is_floating_point() or indices.ndim < 2:
            raise QuantizerInputError("indices must be an integer tensor (batch, ..., quantizers)")
        q = indices.shape[-1]
        if q > self.num_quantizers:
            raise QuantizerInputError(f"got indices for {q} layers, have {self.num_quantizers}")
        if q < self.num_quantizers:
            if not self.quantize_dropout:
                raise QuantizerInputError("indices for fewer layers need quantize_dropout=True")
            pad = indices.new_full((*indices.shape[:-1], self.num_quantizers - q), -1)
            indices = torch.cat([indices, pad], -1)
        size = self.layers[0].codebook_size
        if indices.numel() and (indices.min() < -1 or indices.max() >= size):
            raise QuantizerInputError(f"indices must lie in [-1, {size})")
        dropped = indices == -1
        bits = (indices.clamp_min(0)[..., None] & self.layers[0].mask) != 0  # (B, ..., Q, k)
        scales = torch.tensor([layer.codebook_scale for layer in self.layers],
                              device=indices.device)[:, None]
        dtype = self.layers[0].dtype
        codes = (bits.to(dtype) * 2 - 1) * scales.to(dtype)
        codes = codes.masked_fill(dropped[..., None], 0.0)
        return codes.movedim(-2, 0)

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        return self.project_out(self.get_codes_from_indices(indices).sum(0))

    check_input = True  # off inside a GroupedResidualLFQ, which checks the whole input once

    def forward(self, x: Tensor, mask: Tensor | None = None, return_all_codes: bool = False,
                rand_quantize_dropout_fixed_seed: int | None = None):
        if self.check_input:
            check_finite(x)
        x = self.project_in(x)
        dropout = self.training and self.quantize_dropout and torch.is_grad_enabled()
        last = self.num_quantizers - 1
        if dropout:
            seed = rand_quantize_dropout_fixed_seed
            if seed is None:
                seed = _maybe_synced_seed(x.device)
            last = random.Random(seed).randrange(self.quantize_dropout_cutoff_index,
                                                 self.num_quantizers)
            m = self.quantize_dropout_multiple_of
            if m != 1:
                last = -(-(last + 1) // m) * m - 1  # round the layer count up to a multiple of m

        quantized_out: Tensor | float = 0.0
        residual = x
        all_indices, all_losses = [], []
        for i, layer in enumerate(self.layers):
            if i > last:
                all_indices.append(torch.full(x.shape[:2], -1, device=x.device,
                                              dtype=torch.long))
                all_losses.append(torch.zeros((), device=x.device, dtype=x.dtype))
                continue
            quantized, indices, loss = layer(residual, mask=mask)
            residual = residual - quantized.detach()
            quantized_out = quantized_out + quantized
            all_indices.append(indices)
            all_losses.append(loss)

        quantized_out = self.project_out(quantized_out)
        all_indices = torch.stack(all_indices, -1)
        all_losses = torch.stack(all_losses, -1)
        if not return_all_codes:
            return quantized_out, all_indices, all_losses
        return quantized_out, all_indices, all_losses, self.get_codes_from_indices(all_indices)


class GroupedResidualLFQ(GroupedStacks):
    """``groups`` ResidualLFQ stacks, each on its slice of the features."""

    def __init__(self, *, dim: int, groups: int = 1, accept_image_fmap: bool = False, **kwargs):
        super().__init__()
        if dim % groups:
            raise ValueError(f"dim {dim} is not divisible by groups {groups}")
        self.dim = dim
        self.groups = groups
        self.accept_image_fmap = accept_image_fmap
        self.rvqs = nn.ModuleList(ResidualLFQ(dim=dim // groups, **kwargs)
                                  for _ in range(groups))
        for rvq in self.rvqs:
            rvq.check_input = False

    def forward(self, x: Tensor, mask: Tensor | None = None, return_all_codes: bool = False):
        check_finite(x)
        if x.shape[self.split_dim] != self.dim:
            raise QuantizerInputError(f"expected {self.dim} features on axis {self.split_dim}, "
                                      f"got shape {tuple(x.shape)}")
        seed = _maybe_synced_seed(x.device) if self.training else None
        outs = [rvq(chunk, mask=mask, return_all_codes=return_all_codes,
                    rand_quantize_dropout_fixed_seed=seed)
                for rvq, chunk in zip(self.rvqs, x.chunk(self.groups, dim=self.split_dim),
                                      strict=True)]
        quantized, indices, losses, *codes = zip(*outs, strict=True)
        return (torch.cat(quantized, dim=self.split_dim), torch.stack(indices),
                torch.stack(losses), *codes)
