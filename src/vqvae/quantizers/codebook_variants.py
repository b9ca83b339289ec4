"""Codebooks whose codes are computed from the stored ones: an affine map fitted to the batch
statistics (:class:`AffineCodebook`) and a learned map (:class:`BridgedCodebook`).

Both are :class:`~vqvae.quantizers.codebook.Codebook` subclasses that override
:meth:`~vqvae.quantizers.codebook.Codebook.vectors` (what search and lookup see); the EMA still
runs on the stored codes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .codebook import Codebook, CodeStatistics
from .tracing import tracing

#: Floor of the variances before their square root (the reference library's value).
MIN_VARIANCE = 1e-5


class AffineCodebook(Codebook):
    """Codes shifted and scaled so that their per-dimension mean and variance follow the
    inputs': ``vectors() = (E - μ_E) · σ_x / σ_E + μ_x`` (Huh et al., 2023, "Straightening out
    the straight-through estimator", affine reparameterisation).

    ``μ_E, σ²_E`` are EMAs (rate ``1 - codebook_decay``) of the codes' statistics, updated in
    training; ``μ_x, σ²_x`` EMAs (rate ``1 - batch_decay``) of the input rows', updated in
    training too (an eval call changes nothing: before any training it maps with the batch's
    own statistics, unstored). The first update of each sets it. The EMA of the codes sees the
    rows mapped back into the codes' frame. Every statistic is a buffer from the start, so a
    trained state dict loads into a fresh module.
    """

    def __init__(self, *args, batch_decay: float = 0.99, codebook_decay: float = 0.9, **kwargs):
        super().__init__(*args, **kwargs)
        self.batch_decay = batch_decay
        self.codebook_decay = codebook_decay
        stat = (self.num_codebooks, 1, self.dim)
        # +inf marks "not set yet" and compares equal to itself (torch.equal), unlike NaN
        self.register_buffer("batch_mean", torch.full(stat, float("inf")))
        self.register_buffer("batch_variance", torch.full(stat, float("inf")))
        self.register_buffer("codebook_mean_needs_init", torch.tensor(True))
        self.register_buffer("codebook_mean", torch.zeros(stat))
        self.register_buffer("codebook_variance_needs_init", torch.tensor(True))
        self.register_buffer("codebook_variance", torch.zeros(stat))
        self._batch_now: tuple[Tensor, Tensor] | None = None

    @staticmethod
    def _mean_var(x: Tensor) -> tuple[Tensor, Tensor]:
        """Per-dimension mean and biased variance of ``(C, N, D)`` rows: ``(C, 1, D)`` each."""
        var, mean = torch.var_mean(x, dim=1, keepdim=True, correction=0)
        return mean, var

    @torch.no_grad()
    def observe(self, rows: Tensor, *, training: bool, ok: Tensor | None = None,
                row_weight: Tensor | None = None) -> None:
        """Take the statistics of this call's ``(C, N, D)`` rows (masked rows removed) and, in
        training, of the codes, into the EMAs. With ``ok`` (0-d bool; a deferred call) every
        choice is a ``torch.where`` and nothing changes unless ``ok`` is true."""
        if row_weight is not None:
            raise ValueError("AffineCodebook.observe takes the kept rows only (no row_weight)")
        mean, var = self._mean_var(rows.float())
        self._batch_now = None
        if not training:
            # before any training the batch's own statistics, stored ones after: chosen on
            # the device (the same values either way)
            unset = ~torch.isfinite(self.batch_mean).all()
            self._batch_now = (torch.where(unset, mean, self.batch_mean),
                               torch.where(unset, var, self.batch_variance))
            return
        if ok is not None:
            self._observe_deferred(mean, var, ok)
            return
        codes = self.embed.detach()
        c_mean, c_var = self._mean_var(codes)
        for name, flag, value in (("codebook_mean", "codebook_mean_needs_init", c_mean),
                                  ("codebook_variance", "codebook_variance_needs_init", c_var)):
            if bool(getattr(self, flag)):
                getattr(self, name).copy_(value)
                getattr(self, flag).fill_(False)
            else:
                getattr(self, name).lerp_(value, 1.0 - self.codebook_decay)
        for name, value in (("batch_mean", mean), ("batch_variance", var)):
            stored = getattr(self, name)
            if bool(torch.isinf(stored).all()):
                stored.copy_(value)
            else:
                stored.lerp_(value, 1.0 - self.batch_decay)

    def _observe_deferred(self, mean: Tensor, var: Tensor, ok: Tensor) -> None:
        c_mean, c_var = self._mean_var(self.embed.detach())
        for name, flag, value in (("codebook_mean", "codebook_mean_needs_init", c_mean),
                                  ("codebook_variance", "codebook_variance_needs_init", c_var)):
            stored, first = getattr(self, name), getattr(self, flag)
            new = torch.where(first, value, stored.lerp(value, 1.0 - self.codebook_decay))
            stored.copy_(torch.where(ok, new, stored))
            first.copy_(first & ~ok)
        for name, value in (("batch_mean", mean), ("batch_variance", var)):
            stored = getattr(self, name)
            new = torch.where(torch.isinf(stored).all(), value,
                              stored.lerp(value, 1.0 - self.batch_decay))
            stored.copy_(torch.where(ok, new, stored))

    def _affine(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(μ_E, σ_E, μ_x, σ_x)``, each ``(C, 1, D)``."""
        if tracing() or self.embed.device.type != "cpu":
            # chosen on the device: the codes' own statistics before any training
            first = self.codebook_mean_needs_init
            own_mean, own_var = self._mean_var(self.embed.detach())
            c_mean = torch.where(first, own_mean, self.codebook_mean)
            c_var = torch.where(first, own_var, self.codebook_variance)
        elif bool(self.codebook_mean_needs_init):  # eval before any training
            c_mean, c_var = self._mean_var(self.embed.detach())
        else:
            c_mean, c_var = self.codebook_mean, self.codebook_variance
        b_mean, b_var = self._batch_now if self._batch_now is not None \
            else (self.batch_mean, self.batch_variance)
        return (c_mean, c_var.clamp(min=MIN_VARIANCE).sqrt(), b_mean,
                b_var.clamp(min=MIN_VARIANCE).sqrt())

    def vectors(self) -> Tensor:
        c_mean, c_std, b_mean, b_std = self._affine()
        return (self.embed - c_mean) * (b_std / c_std) + b_mean

    def statistics(self, x: Tensor, indices: Tensor,
                   weight: Tensor | None = None) -> CodeStatistics:
        """As :meth:`Codebook.statistics`, of the rows mapped back into the codes' frame."""
        c_mean, c_std, b_mean, b_std = self._affine()
        blocks, single = self._blocks(x)
        back = (blocks - b_mean) * (c_std / b_std) + c_mean
        return super().statistics(back[0] if single else back, indices, weight)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A state dict saved before any training call (or by the reference library, which
        # registers them at the first call) has no batch statistics: they stay unset.
        for name in ("batch_mean", "batch_variance"):
            state_dict.setdefault(prefix + name, getattr(self, name).clone())
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class BridgedCodebook(Codebook):
    """Codes passed through a learned module before use: ``vectors() = bridge(E)`` (the
    reference library's ``vq_bridge``). The stored codes are learnable, the bridge's
    parameters are trained with them."""

    def __init__(self, *args, bridge: nn.Module, **kwargs):
        super().__init__(*args, **kwargs)
        self.vq_bridge = bridge

    def vectors(self) -> Tensor:
        return self.vq_bridge(self.embed)
