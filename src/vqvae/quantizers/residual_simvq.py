"""Residual SimVQ: ``num_quantizers`` :class:`SimVQ` layers, each quantizing what the previous
ones left (SoundStream, Zeghidour et al., 2021, arXiv 2107.03312, Algorithm 1).

``r_1 = x``, ``q_l = SimVQ_l(r_l)``, ``r_{l+1} = r_l - sg(q_l)``; the output is ``Σ_l q_l``, each
``q_l`` carrying its own layer's estimator gradient to ``x``. A drop-in for
``vector_quantize_pytorch.ResidualSimVQ``: ``(quantized, indices (..., q), losses (q,))``.

Quantize dropout draws how many layers a training call runs. An immediate call draws it on the
host and runs only those layers; a deferred call (compiled, or on an accelerator; see
:mod:`vqvae.quantizers.guard`) draws it on the device, runs every layer and masks out the
dropped ones, so the number of layers never has to be read back.
"""

from __future__ import annotations

import random
from math import ceil

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import guard
from .simvq import SimVQ
from .vector_quantize import QuantizerInputError

DROPPED = -1  # index of a layer a training call skipped (quantize dropout)


def _dropout_seed(device: torch.device) -> int:
    """A seed from torch's generator, summed over processes so all of them drop alike."""
    seed = torch.randint(0, 10_000, (), device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(seed)
    return int(seed.item())


def _dropout_last_on_device(device: torch.device, low: int, high: int, multiple: int) -> Tensor:
    """The index of the last layer a call runs, drawn uniformly from ``[low, high)`` and
    rounded up to a multiple, as a 0-d int64 tensor on ``device`` (no read back). Summed over
    processes before it is reduced to the range, so all of them drop alike."""
    seed = torch.randint(0, 2**30, (), device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(seed)
    last = low + seed % (high - low)
    if multiple != 1:  # ceil((last + 1) / multiple) · multiple - 1
        last = (last + multiple) // multiple * multiple - 1
    return last


class ResidualSimVQ(nn.Module):
    """Residual quantizer of :class:`SimVQ` layers, drop-in for the library's ``ResidualSimVQ``.

    Tensor contract: ``x`` is ``(B, ..., dim)`` channels last or ``(B, dim, ...)`` with
    ``channel_first=True``. Returns ``(quantized, indices, losses)`` (and ``all_codes`` with
    ``return_all_codes=True``): ``quantized`` has ``x``'s shape, ``indices`` is int64
    ``(B, ..., num_quantizers)`` (``-1`` for layers skipped by quantize dropout), ``losses`` the
    ``(num_quantizers,)`` per-layer losses (0 for skipped layers), ``all_codes``
    ``(num_quantizers, *quantized.shape)``.

    Args:
        dim, num_quantizers, codebook_size: as the library.
        heads: must be 1 (as the library).
        quantize_dropout: in training, stop after a random layer (at least
            ``quantize_dropout_cutoff_index``; rounded up to ``quantize_dropout_multiple_of``).
        channel_first, rotation_trick: passed to the layers.
        **sim_vq_kwargs: further :class:`SimVQ` arguments.

    Differences from the library, on purpose: ``codebook_dim`` works (the library's raises
    ``AttributeError``); quantize dropout on inputs with several spatial axes, channels last,
    works (the library builds the skipped layers' ``-1`` indices of shape ``x.shape[:2]`` and then
    fails to stack them); the implicit codebooks are computed once per call and reused by
    ``get_codes_from_indices``.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_quantizers: int,
        codebook_size: int,
        heads: int = 1,
        quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0,
        quantize_dropout_multiple_of: int = 1,
        channel_first: bool = False,
        rotation_trick: bool = True,
        **sim_vq_kwargs,
    ):
        super().__init__()
        if heads != 1:
            raise ValueError(f"residual SimVQ takes heads=1 only, got heads={heads!r}")
        if not (isinstance(num_quantizers, int) and num_quantizers >= 1):
            raise ValueError(f"num_quantizers must be a positive int, got {num_quantizers!r}")
        if quantize_dropout_cutoff_index < 0 or quantize_dropout_multiple_of < 1:
            raise ValueError("quantize_dropout_cutoff_index must be >= 0 and "
                             "quantize_dropout_multiple_of >= 1")
        self.dim = dim
        self.channel_first = channel_first
        self.num_quantizers = num_quantizers
        self.layers = nn.ModuleList([
            SimVQ(dim=dim, codebook_size=codebook_size, rotation_trick=rotation_trick,
                  channel_first=channel_first, **sim_vq_kwargs)
            for _ in range(num_quantizers)])
        self.quantize_dropout = bool(quantize_dropout) and num_quantizers > 1
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        self.quantize_dropout_multiple_of = quantize_dropout_multiple_of

    @property
    def codebook_size(self) -> int:
        return self.layers[0].codebook_size

    @property
    def codebook_dim(self) -> int:
        return self.layers[0].codebook_dim

    @property
    def codebooks(self) -> Tensor:
        """The layers' implicit codebooks, ``(num_quantizers, codebook_size, dim)``."""
        return torch.stack([layer.codebook for layer in self.layers])

    # ------------------------------------------------------------------ forward

    def forward(self, x: Tensor, return_all_codes: bool = False,
                rand_quantize_dropout_fixed_seed: int | None = None):
        self.layers[0]._check_input(x)
        h = x.movedim(1, -1) if self.channel_first else x  # (B, ..., dim)
        last = self._last_layer(x.device, rand_quantize_dropout_fixed_seed, guard.deferred(h))

        residual = h
        quantized_out = None
        all_indices, all_losses = [], []
        for index, layer in enumerate(self.layers):
            if isinstance(last, int) and index > last:
                all_indices.append(torch.full(h.shape[:-1], DROPPED, dtype=torch.long,
                                              device=h.device))
                all_losses.append(torch.zeros((), device=h.device))
                continue
            quantized, indices, loss = layer.quantize_last(residual)
            if isinstance(last, Tensor) and index > self.quantize_dropout_cutoff_index:
                kept = last >= index  # 0-d bool: this layer runs in this call
                quantized = torch.where(kept, quantized, 0.0)
                indices = torch.where(kept, indices, DROPPED)
                loss = torch.where(kept, loss, 0.0)
            residual = residual - quantized.detach()
            quantized_out = quantized if quantized_out is None else quantized_out + quantized
            all_indices.append(indices)
            all_losses.append(loss)

        if self.channel_first:
            quantized_out = quantized_out.movedim(-1, 1)
        indices = torch.stack(all_indices, dim=-1)  # (B, ..., q)
        losses = torch.stack(all_losses, dim=-1)  # (q,)
        if not return_all_codes:
            return quantized_out, indices, losses
        return quantized_out, indices, losses, self._codes(indices)

    def _last_layer(self, device: torch.device, seed: int | None,
                    on_device: bool = False) -> int | Tensor:
        """Index of the last layer this call runs (quantize dropout in training); drawn as a
        0-d tensor when ``on_device`` and no ``seed`` is given."""
        if not (self.training and self.quantize_dropout):
            return self.num_quantizers - 1
        if seed is None and on_device:
            return _dropout_last_on_device(device, self.quantize_dropout_cutoff_index,
                                           self.num_quantizers,
                                           self.quantize_dropout_multiple_of)
        seed = _dropout_seed(device) if seed is None else seed
        last = random.Random(seed).randrange(self.quantize_dropout_cutoff_index,
                                             self.num_quantizers)
        multiple = self.quantize_dropout_multiple_of
        if multiple != 1:
            last = ceil((last + 1) / multiple) * multiple - 1
        return last

    # ------------------------------------------------------------------ decode

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """Per-layer codes ``(q, B, ..., dim)`` (channel-first: ``(q, B, dim, ...)``) of
        ``indices`` ``(B, ..., q')``; ``-1`` and missing trailing layers (``q' < q``, allowed
        with quantize dropout) give zero vectors."""
        if not isinstance(indices, Tensor) or indices.dtype.is_floating_point \
                or indices.dtype == torch.bool or indices.ndim < 2:
            raise QuantizerInputError(
                "indices must be an integer tensor (B, ..., num_quantizers), got "
                f"{indices.dtype if isinstance(indices, Tensor) else type(indices).__name__}")
        depth = indices.shape[-1]
        if depth > self.num_quantizers:
            raise QuantizerInputError(
                f"indices has {depth} layers on its last axis, expected at most "
                f"{self.num_quantizers}")
        if depth < self.num_quantizers and not self.quantize_dropout:
            raise QuantizerInputError(
                f"indices has {depth} of {self.num_quantizers} layers; fewer layers need "
                "quantize_dropout=True")
        indices = indices.long()
        if indices.numel() and (int(indices.min()) < DROPPED
                                or int(indices.max()) >= self.codebook_size):
            raise QuantizerInputError(
                f"indices must lie in [0, {self.codebook_size}) or be -1, got values in "
                f"[{int(indices.min())}, {int(indices.max())}]")
        return self._codes(indices)

    def _codes(self, indices: Tensor) -> Tensor:
        """:meth:`get_codes_from_indices` of int64 ``indices`` already checked (forward's own,
        whose check would read them back)."""
        depth = indices.shape[-1]
        codes = []
        for index, layer in enumerate(self.layers):
            if index >= depth:
                codes.append(torch.zeros(*indices.shape[:-1], self.dim,
                                         device=indices.device,
                                         dtype=layer.frozen_codebook.dtype))
                continue
            chosen = indices[..., index]
            kept = chosen != DROPPED
            layer_codes = layer.codebook[chosen.clamp(min=0)]  # (B, ..., dim)
            codes.append(layer_codes * kept.unsqueeze(-1).to(layer_codes.dtype))
        all_codes = torch.stack(codes)  # (q, B, ..., dim)
        if self.channel_first:
            all_codes = all_codes.movedim(-1, 2)
        return all_codes

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """Sum of the layers' codes: ``quantized`` of the call that produced ``indices``."""
        return self.get_codes_from_indices(indices).sum(0)

    decode = get_output_from_indices

