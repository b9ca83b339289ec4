"""VectorQuantize: replace each vector by its nearest codebook entry.

The layer of the VQ-VAE (van den Oord et al., 2017), a drop-in for
``vector_quantize_pytorch.VectorQuantize`` (1.32): the same constructor arguments (in the same
positional order), forward arguments, return values, defaults and state-dict layout::

    vq = VectorQuantize(dim=256, codebook_size=512, decay=0.8, commitment_weight=1.0)
    quantized, indices, loss = vq(x)  # x: (B, N, 256)

The layer is a composition: the layout of the input (:func:`_to_tokens`), the projections,
the split into heads, a :class:`~vqvae.quantizers.codebook.Codebook` (or one of its variants
in :mod:`.codebook_variants`) that searches and updates the codes, an output estimator from
:mod:`.estimators` chosen once in ``__init__``, and the loss terms of :mod:`.vq_losses`.

Non-finite input is checked as :mod:`.guard` says: raised from ``forward`` (immediate), or, in
deferred calls (every ``torch.compile`` / ``torch.export`` trace, eager calls off the CPU by
default), decided on the device: no update happens, the call is counted in ``nonfinite_calls``
for :func:`.guard.raise_deferred`, and the rows of such input come out NaN. So
``torch.compile(vq, fullgraph=True)`` captures a whole training call. Every option compiles
except ``in_place_codebook_optimizer``, ``accum_ema_update=True``,
``orthogonal_reg_active_codes_only`` and ``affine_param`` with a mask, which raise
:class:`QuantizerInputError` saying so; ``decode`` and ``update_ema_indices`` read values back
and are for eager use (docs/compile.md lists what is guaranteed where).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import estimators, guard
from .checks import (
    QuantizerInputError,
    check_finite,
    check_input,
    check_not_meta,
    check_optional_probability,
    check_positive_int,
    describe,
    require,
    too_large_to_square,
)
from .codebook import Codebook
from .codebook_variants import AffineCodebook, BridgedCodebook
from .search import DEFAULT_BLOCK_BYTES
from .tracing import tracing
from .vq_losses import (
    code_logits,
    cross_entropy_to_codes,
    diversity_loss,
    orthogonal_loss,
    select_codes,
)

__all__ = ["LossBreakdown", "QuantizerInputError", "VQOutput", "VectorQuantize", "check_input"]

#: Keys of the earlier layout, saved directly under the layer's prefix; moved under
#: ``_codebook.`` when loading, where the codebook converts them.
LEGACY_STATE = ("codebook", "cluster_size", "initialized", "steps")


def check_rows_usable(rows: Tensor) -> None:
    """Raise :class:`QuantizerInputError` unless every value of ``rows`` is finite and small
    enough that squared distances stay finite (in float32, |x| below about 1e19): a batch of
    1e30s would otherwise give infinite distances and move a code to 1e29. One dot product over
    the batch, read once, decides; the slow check only names the fault."""
    flat = rows.detach().reshape(-1)
    if flat.numel() == 0 or math.isfinite(float(torch.dot(flat, flat))):
        return
    check_finite(rows)
    raise too_large_to_square(rows)


def unusable_rows_as_nan(rows: Tensor) -> Tensor:
    """``(..., 1)``: 0 for each row of ``rows`` ``(..., D)`` whose squared norm is finite, NaN
    for the others (NaN, Inf, or too large to square). Added to a deferred call's output, which
    cannot raise: such rows come out NaN, not as valid-looking codes. A ``where``, not
    ``x * 0``: compilers may fold a product with zero to zero, Inf or not."""
    sq = rows.detach().pow(2).sum(-1, keepdim=True)
    return torch.where(torch.isfinite(sq), torch.zeros_like(sq), torch.full_like(sq, math.nan))


class VQOutput(NamedTuple):
    quantized: Tensor  # x.shape, the code vectors (gradient reaches x by the estimator)
    indices: Tensor  # x.shape[:-1] (channels last), int64 code indices
    loss: Tensor  # scalar: weighted commitment (+ auxiliary) loss; 0 in eval


class VQOutputWithBreakdown(NamedTuple):
    quantized: Tensor
    indices: Tensor
    loss: Tensor
    breakdown: LossBreakdown


class LossBreakdown(NamedTuple):
    """The unweighted loss terms of one call (0-d tensors, zero when a term is off)."""

    commitment: Tensor
    codebook_diversity: Tensor
    orthogonal_reg: Tensor
    inplace_optimize: Tensor


class _BookSetting:
    """A setting of the layer's :class:`Codebook`, read and written under the layer's name."""

    def __init__(self, name: str):
        self.name = name

    def __get__(self, layer, owner=None):
        return self if layer is None else getattr(layer._codebook, self.name)

    def __set__(self, layer, value) -> None:
        setattr(layer._codebook, self.name, value)


class _Tokens(NamedTuple):
    """The input as ``(B, N, dim)`` tokens, and how to give results its layout back."""

    x: Tensor  # (B, N, dim)
    layout: str  # "tokens", "one" (B, dim), "vector" (dim,), "channel_first", "fmap", "flat"
    shape: tuple[int, ...]  # the input's shape


class VectorQuantize(nn.Module):
    """Nearest-neighbour vector quantizer with an EMA or learnable codebook.

    Arguments and defaults are those of ``vector_quantize_pytorch.VectorQuantize`` 1.32 (see
    its README); each is implemented here by the piece named:

    - layout: ``channel_last``, ``accept_image_fmap``, ``accept_3d_fmap`` (input ``(B, N,
      dim)``, ``(B, dim, N)``, ``(B, C, H, W)``, ``(B, C, D, H, W)``; ``(B, dim)`` is one token
      per row; other channels-last shapes ``(..., dim)`` are accepted too);
    - projections ``dim -> codebook_dim · heads`` when they differ
      (``layernorm_after_project_in``), ``heads`` with ``separate_codebook_per_head``;
    - the codebook (:class:`Codebook`; ``affine_param`` -> :class:`AffineCodebook`,
      ``vq_bridge`` -> :class:`BridgedCodebook`): ``decay``, ``eps``, ``kmeans_init``,
      ``kmeans_iters``, ``use_cosine_sim``, ``threshold_ema_dead_code``, ``ema_update``,
      ``manual_ema_update``, ``learnable_codebook``, ``sync_codebook``, ``sync_kmeans``;
    - code choice: nearest, or sampled (``stochastic_sample_codes``, ``sample_codebook_temp``),
      or the Gumbel straight-through relaxation (``straight_through``);
    - output estimator (:mod:`.estimators`): ``rotation_trick`` (default for ``dim > 1``),
      ``directional_reparam`` (DiVeQ), straight-through, or none
      (``route_gradients_to_input=False``); then ``sync_update_v``;
    - losses (:mod:`.vq_losses`), in training only: ``commitment_weight`` (mse, or
      ``commitment_use_cross_entropy_loss``), ``orthogonal_reg_*``, ``codebook_diversity_*``;
    - ``in_place_codebook_optimizer``: one optimiser step of the codes per training call.

    Where this layer deliberately differs from the library (each covered by a test):
    an eval call never changes any state (no k-means, no affine statistics), non-finite input
    raises :class:`QuantizerInputError` before any change (or, in deferred and compiled calls,
    changes nothing and is reported by :func:`vqvae.raise_deferred`), the masked commitment loss
    compares with the projected (and normalised) rows, ``sync_update_v`` follows vqtorch's
    eq. 21 (the codes get ``ν`` times the gradient), the affine statistics are buffers from the
    start (a trained state dict loads into a fresh layer), and shared-head indices decode to
    ``(..., heads · codebook_dim)``.

    Options of this project, keyword-only:
        decay: ``None`` is a learnable codebook without EMA (``learnable_codebook=True,
            ema_update=False``).
        codebook_weight: with a learnable codebook, weight of the term that moves the codes
            toward the inputs; ``None`` (default) uses ``commitment_weight`` (the library's one
            ``w · mse(x, q)`` term with gradient to both).
        codebook_init: ``"kaiming_uniform"`` (default, the library's) or ``"normal"`` (N(0, 1)).
        dead_code_warmup_steps: training calls before the first dead-code restart.
        max_search_bytes: memory bound of one block of the distance matrix.

    Returns ``(quantized, indices, loss)`` (a :class:`VQOutput`), plus a
    :class:`LossBreakdown` with ``return_loss_breakdown=True``.
    """

    _codebook: Codebook

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        codebook_dim: int | None = None,
        heads: int = 1,
        separate_codebook_per_head: bool = False,
        decay: float | None = 0.8,
        eps: float = 1e-5,
        freeze_codebook: bool = False,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        sync_kmeans: bool = True,
        use_cosine_sim: bool = False,
        layernorm_after_project_in: bool = False,
        threshold_ema_dead_code: float = 0,
        channel_last: bool = True,
        accept_image_fmap: bool = False,
        accept_3d_fmap: bool = False,
        commitment_weight: float = 1.0,
        commitment_use_cross_entropy_loss: bool = False,
        orthogonal_reg_weight: float = 0.0,
        orthogonal_reg_active_codes_only: bool = False,
        orthogonal_reg_max_codes: int | None = None,
        codebook_diversity_loss_weight: float = 0.0,
        codebook_diversity_temperature: float = 100.0,
        stochastic_sample_codes: bool = False,
        sample_codebook_temp: float = 1.0,
        straight_through: bool = False,
        rotation_trick: bool | None = None,
        directional_reparam: bool = False,
        directional_reparam_variance: float = 5e-3,
        sync_codebook: bool | None = None,
        sync_affine_param: bool = False,
        ema_update: bool | None = None,
        vq_bridge: nn.Module | None = None,
        manual_ema_update: bool = False,
        learnable_codebook: bool | None = None,
        in_place_codebook_optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        manual_in_place_optimizer_update: bool = False,
        affine_param: bool = False,
        affine_param_batch_decay: float = 0.99,
        affine_param_codebook_decay: float = 0.9,
        sync_update_v: float = 0.0,
        return_zeros_for_masked_padding: bool = True,
        route_gradients_to_input: bool = True,
        *,
        codebook_weight: float | None = None,
        codebook_init: str = "kaiming_uniform",
        dead_code_warmup_steps: int = 0,
        max_search_bytes: int = DEFAULT_BLOCK_BYTES,
    ):
        super().__init__()
        check_not_meta("VectorQuantize")
        check_positive_int("dim", dim)
        check_positive_int("codebook_size", codebook_size)
        # decay 1 freezes the EMA statistics (the codes stay where they were written)
        check_optional_probability("decay", decay, include_one=True)
        require(codebook_dim is None or (isinstance(codebook_dim, int) and codebook_dim >= 1),
                f"codebook_dim must be None or a positive int, got {codebook_dim!r}")
        require(isinstance(heads, int) and heads >= 1, f"heads must be a positive int, got "
                f"{heads!r}")
        require(commitment_weight >= 0 and (codebook_weight is None or codebook_weight >= 0),
                "commitment_weight and codebook_weight must be >= 0")
        require(sample_codebook_temp >= 0,
                f"sample_codebook_temp must be >= 0, got {sample_codebook_temp!r}")
        if decay is None:  # this project's shorthand for a learnable codebook
            learnable_codebook = True if learnable_codebook is None else learnable_codebook
            ema_update = False if ema_update is None else ema_update
        if ema_update is None:
            ema_update = not directional_reparam and vq_bridge is None
        if learnable_codebook is None:
            learnable_codebook = directional_reparam or vq_bridge is not None
        if rotation_trick is None:
            rotation_trick = not directional_reparam and dim > 1
        require(not (use_cosine_sim and learnable_codebook),
                "use_cosine_sim cannot be combined with a learnable codebook")
        require(sum(map(bool, (straight_through, rotation_trick, directional_reparam))) <= 1,
                "choose at most one of straight_through, rotation_trick and directional_reparam "
                "(rotation_trick is on by default: pass rotation_trick=False)")
        require(not (directional_reparam and threshold_ema_dead_code == 0),
                "directional_reparam needs threshold_ema_dead_code > 0 (dead codes of a "
                "learnable codebook are only revived by replacement)")
        require(not (straight_through and learnable_codebook),
                "straight_through (Gumbel softmax) cannot be combined with a learnable codebook")
        require(not (ema_update and learnable_codebook),
                "a learnable codebook cannot also be updated by EMA: pass ema_update=False")
        require(vq_bridge is None or (learnable_codebook and not ema_update),
                "vq_bridge needs a learnable codebook without EMA")
        require(0.0 <= sync_update_v <= 1.0,
                f"sync_update_v must be in [0, 1], got {sync_update_v!r}")
        require(sync_update_v == 0 or learnable_codebook,
                "sync_update_v > 0 needs a learnable codebook (it sends the codes a gradient)")
        require(not (affine_param and use_cosine_sim),
                "affine_param works with the Euclidean codebook only, not use_cosine_sim")
        require(not (accept_image_fmap and accept_3d_fmap),
                "accept_image_fmap and accept_3d_fmap are exclusive")

        self.dim = dim
        self.codebook_size = codebook_size
        self.heads = heads
        self.separate_codebook_per_head = separate_codebook_per_head
        self.codebook_dim = codebook_dim or dim
        self.freeze_codebook = freeze_codebook
        self.channel_last = channel_last
        self.accept_image_fmap = accept_image_fmap
        self.accept_3d_fmap = accept_3d_fmap
        self.commitment_weight = commitment_weight
        # None: the library's single term (its weight is commitment_weight); the attribute
        # holds the weight the codes' side of the loss gets either way
        self._two_term_loss = codebook_weight is not None
        self.codebook_weight = commitment_weight if codebook_weight is None else codebook_weight
        self.commitment_use_cross_entropy_loss = commitment_use_cross_entropy_loss
        self.has_commitment_loss = commitment_weight > 0 and not directional_reparam
        self.orthogonal_reg_weight = orthogonal_reg_weight
        self.orthogonal_reg_active_codes_only = orthogonal_reg_active_codes_only
        self.orthogonal_reg_max_codes = orthogonal_reg_max_codes
        self.codebook_diversity_loss_weight = codebook_diversity_loss_weight
        self.codebook_diversity_temperature = codebook_diversity_temperature
        self.stochastic_sample_codes = stochastic_sample_codes
        self.sample_codebook_temp = sample_codebook_temp
        self.straight_through = straight_through
        self.rotation_trick = bool(rotation_trick)
        self.directional_reparam = directional_reparam
        self.directional_reparam_variance = directional_reparam_variance
        self.learnable_codebook = bool(learnable_codebook)
        self.sync_update_v = sync_update_v
        self.return_zeros_for_masked_padding = return_zeros_for_masked_padding
        self.route_gradients_to_input = route_gradients_to_input
        self.manual_in_place_optimizer_update = manual_in_place_optimizer_update
        # Single process: sync_kmeans / sync_affine_param have nothing to synchronise; with
        # several, the codebook's own sync setting covers k-means and the statistics.
        self.sync_kmeans = sync_kmeans
        self.sync_affine_param = sync_affine_param
        self._estimator = self._choose_estimator()
        self._fused_estimator = self._estimator in (estimators.straight_through,
                                                    estimators.rotation_trick)

        inner = self.codebook_dim * heads
        self.has_projection = inner != dim
        if self.has_projection:
            project_in = nn.Linear(dim, inner)
            if layernorm_after_project_in:
                project_in = nn.Sequential(project_in, nn.LayerNorm(inner))
            project_out = nn.Linear(inner, dim)
        else:
            project_in, project_out = nn.Identity(), nn.Identity()
        # The codes are drawn after the projections' weights, as they always were: a seeded
        # run starts from the same values.
        options: dict[str, Any] = dict(
            num_codebooks=heads if separate_codebook_per_head else 1, decay=decay, eps=eps,
            # a Parameter also for the orthogonal loss to reach (still updated by the EMA)
            learnable=learnable_codebook or orthogonal_reg_weight > 0, ema_update=ema_update,
            manual_ema_update=manual_ema_update, use_cosine_sim=use_cosine_sim,
            kmeans_init=kmeans_init, kmeans_iters=kmeans_iters, init=codebook_init,
            threshold_ema_dead_code=threshold_ema_dead_code,
            dead_code_warmup_steps=dead_code_warmup_steps, sync=sync_codebook,
            max_search_bytes=max_search_bytes)
        if affine_param:
            book: Codebook = AffineCodebook(
                codebook_size, self.codebook_dim, batch_decay=affine_param_batch_decay,
                codebook_decay=affine_param_codebook_decay, **options)
        elif vq_bridge is not None:
            book = BridgedCodebook(codebook_size, self.codebook_dim, bridge=vq_bridge,
                                   **options)
        else:
            book = Codebook(codebook_size, self.codebook_dim, **options)
        self.project_in, self.project_out = project_in, project_out
        self._codebook = book
        self.in_place_codebook_optimizer = in_place_codebook_optimizer(book.parameters()) \
            if in_place_codebook_optimizer is not None else None
        self.register_load_state_dict_pre_hook(_nest_legacy_state)
        guard.register_counter(self)

    def _choose_estimator(self) -> Callable[[Tensor, Tensor], Tensor]:
        if not self.route_gradients_to_input:
            return estimators.no_gradient_to_input
        if self.rotation_trick:
            return estimators.rotation_trick
        if self.directional_reparam:
            variance = self.directional_reparam_variance
            return lambda x, q: estimators.directional_reparam(x, q, variance)
        return estimators.straight_through

    # ------------------------------------------------------------------ the codebook

    @property
    def book(self) -> Codebook:
        """The layer's :class:`Codebook` (also ``_codebook``, the library's name)."""
        return self._codebook

    @property
    def codebook(self) -> Tensor:
        """The codes: ``(K, codebook_dim)``, or ``(heads, K, codebook_dim)`` for separate
        per-head codebooks."""
        return self._codebook.codebook

    @codebook.setter
    def codebook(self, codes: Tensor) -> None:
        # the EMA sums follow, so that the written codes survive the next EMA update
        self._codebook.set_codes(codes)

    @property
    def cluster_size(self) -> Tensor:
        """EMA cluster sizes: ``(K,)``, or ``(heads, K)`` for separate per-head codebooks."""
        size = self._codebook.cluster_size
        return size[0] if size.shape[0] == 1 else size

    @property
    def initialized(self) -> Tensor:
        return self._codebook.initted

    @property
    def steps(self) -> Tensor:
        return self._codebook.steps

    @property
    def is_ema(self) -> bool:
        return self._codebook.is_ema

    @property
    def ema_update(self) -> bool:
        return self._codebook.ema_update

    decay = _BookSetting("decay")
    eps = _BookSetting("eps")
    kmeans_init = _BookSetting("kmeans_init")
    kmeans_iters = _BookSetting("kmeans_iters")
    threshold_ema_dead_code = _BookSetting("threshold_ema_dead_code")
    dead_code_warmup_steps = _BookSetting("dead_code_warmup_steps")
    use_cosine_sim = _BookSetting("use_cosine_sim")
    sync_codebook = _BookSetting("sync")
    max_search_bytes = _BookSetting("max_search_bytes")
    manual_ema_update = _BookSetting("manual_ema_update")

    def extra_repr(self) -> str:
        return f"dim={self.dim}, codebook_size={self.codebook_size}, " \
               f"codebook_dim={self.codebook_dim}, heads={self.heads}"

    @property
    def search_temperature(self) -> float | None:
        """The temperature :meth:`Codebook.search` samples with in this mode: None (nearest
        code) in eval or without stochastic sampling."""
        if self.training and self.stochastic_sample_codes and self.sample_codebook_temp > 0:
            return self.sample_codebook_temp
        return None

    def update_in_place_optimizer(self) -> None:
        """Step the in-place codebook optimiser on the gradients its loss left, and clear
        them (called by each training call unless ``manual_in_place_optimizer_update``)."""
        if self.in_place_codebook_optimizer is None:
            return
        self.in_place_codebook_optimizer.step()
        self.in_place_codebook_optimizer.zero_grad()

    # ------------------------------------------------------------------ layout

    def _to_tokens(self, x: Tensor) -> _Tokens:
        shape = tuple(x.shape)
        if self.accept_image_fmap or self.accept_3d_fmap:
            spatial = 2 if self.accept_image_fmap else 3
            if x.ndim != 2 + spatial or x.shape[1] != self.dim:
                raise QuantizerInputError(
                    f"expected a feature map (B, {self.dim}, "
                    f"{'H, W' if spatial == 2 else 'D, H, W'}), got shape {shape}")
            return _Tokens(x.flatten(2).transpose(1, 2), "fmap", shape)
        if x.ndim == 2:  # one token per batch row, whatever channel_last says
            check_input(x, self.dim)
            return _Tokens(x.unsqueeze(1), "one", shape)
        if not self.channel_last:
            if x.ndim != 3 or x.shape[1] != self.dim:
                raise QuantizerInputError(
                    f"expected (B, {self.dim}, N) with channel_last=False, got shape {shape}")
            return _Tokens(x.transpose(1, 2), "channel_first", shape)
        check_input(x, self.dim)
        if x.ndim == 3:
            return _Tokens(x, "tokens", shape)
        if x.ndim == 1:
            return _Tokens(x.reshape(1, 1, -1), "vector", shape)
        return _Tokens(x.reshape(-1, shape[-2], shape[-1]), "flat", shape)

    def _from_tokens(self, out: Tensor, tokens: _Tokens) -> Tensor:
        """``(B, N, dim)`` output in the input's layout."""
        if tokens.layout == "fmap":
            b, c, *spatial = tokens.shape
            return out.transpose(1, 2).reshape(b, c, *spatial)
        if tokens.layout == "channel_first":
            return out.transpose(1, 2)
        return out.reshape(tokens.shape)

    def _index_shape(self, tokens: _Tokens) -> tuple[int, ...]:
        """Shape of the indices (without the heads / top-k axis)."""
        if tokens.layout == "fmap":
            return (tokens.shape[0], *tokens.shape[2:])
        if tokens.layout == "channel_first":
            return (tokens.shape[0], tokens.shape[2])
        return tokens.shape[:-1]

    def _split_heads(self, h: Tensor) -> Tensor:
        """``(B, N, heads · d)`` -> rows ``(C, M, d)``: one block per separate codebook, or all
        heads' slices as rows of one shared codebook (token-major)."""
        d = self.codebook_dim
        rows = h.reshape(-1, self.heads, d)  # (B·N, heads, d)
        if self.heads > 1 and self.separate_codebook_per_head:
            return rows.transpose(0, 1)  # (heads, B·N, d)
        return rows.reshape(1, -1, d)  # (1, B·N·heads, d)

    def _merge_heads(self, rows: Tensor, b: int, n: int) -> Tensor:
        """The inverse of :meth:`_split_heads`: rows ``(C, M, ...)`` -> ``(B, N, heads·...)``
        (indices: ``(B, N, heads)``, or ``(B, N)`` for one head)."""
        if self.heads > 1 and self.separate_codebook_per_head:
            rows = rows.transpose(0, 1)  # (B·N, heads, ...)
        tail = rows.shape[2:]
        if self.heads == 1:
            return rows.reshape(b, n, *tail)
        merged = rows.reshape(b, n, self.heads, *tail)
        return merged.flatten(2, 3) if tail else merged

    def _row_mask(self, mask: Tensor | None) -> Tensor | None:
        """Token mask ``(B, N)`` -> row mask ``(M,)`` in the order of :meth:`_split_heads`."""
        if mask is None:
            return None
        flat = mask.reshape(-1)
        if self.heads > 1 and not self.separate_codebook_per_head:
            flat = flat.repeat_interleave(self.heads)
        return flat

    def _check_mask(self, mask: Tensor | None, lens: Tensor | None, tokens: _Tokens
                    ) -> Tensor | None:
        if mask is not None and lens is not None:
            raise QuantizerInputError("pass mask or lens, not both")
        if lens is None and mask is None:
            return None
        if tokens.layout in ("fmap", "one", "vector", "flat"):
            raise QuantizerInputError(
                "mask / lens need (B, N, dim) or (B, dim, N) input, not a feature map or one "
                f"token per row; got shape {tokens.shape}")
        b, n = tokens.x.shape[:2]
        if lens is not None:
            mask = torch.arange(n, device=lens.device)[None] < lens.reshape(-1, 1)
        if mask.shape != (b, n):
            raise QuantizerInputError(f"mask must be (B, N) = {(b, n)}, got {describe(mask)}")
        return mask.to(device=tokens.x.device, dtype=torch.bool)

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        x: Tensor,
        indices: Tensor | None = None,
        mask: Tensor | None = None,
        lens: Tensor | None = None,
        topk: int | None = None,
        sample_codebook_temp: float | None = None,
        freeze_codebook: bool | None = None,
        return_loss_breakdown: bool = False,
        codebook_transform_fn: Callable[[Tensor], Tensor] | None = None,
        ema_update_weight: Tensor | Callable[[Tensor, Tensor], Tensor] | None = None,
        accum_ema_update: bool = False,
        ema_update: bool | None = None,
    ):
        if not isinstance(x, Tensor) or not x.dtype.is_floating_point:
            raise QuantizerInputError(
                f"expected a floating-point torch.Tensor, got {describe(x)}")
        tokens = self._to_tokens(x)
        mask = self._check_mask(mask, lens, tokens)
        b, n = tokens.x.shape[:2]
        if b * n == 0:
            empty = torch.empty(self._index_shape(tokens) + ((self.heads,) if self.heads > 1
                                                              else ()),
                                dtype=torch.long, device=x.device)
            return VQOutput(x.clone(), empty, x.sum().float() * 0.0)
        freeze = self.freeze_codebook if freeze_codebook is None else freeze_codebook
        temperature = self.sample_codebook_temp if sample_codebook_temp is None \
            else sample_codebook_temp
        if topk is not None:
            return self._forward_topk(tokens, mask, int(topk))

        book = self._codebook
        h = self.project_in(tokens.x)  # (B, N, heads · d)
        all_rows = book.prepare(self._split_heads(h))  # (C, M, d)
        # NaN/Inf propagate into the sum of squares, and so do values too large to square
        # (their distances would overflow): one reduction guards every update below, read
        # back here (immediate) or kept on the device as ``ok`` (deferred, see guard.py)
        ok = None
        if guard.deferred(all_rows):
            ok = guard.usable(all_rows)
            if self.training:
                guard.record(self, ok)
            self._check_deferrable(mask is not None)
        else:
            check_rows_usable(all_rows)
        row_mask = self._row_mask(mask)  # (M,) or None
        padding = None  # deferred calls with a mask: (C, M) weights, 0 for the padding rows
        if row_mask is not None and ok is not None:
            # Fixed shapes: every row is searched, the padding weighs 0 in the statistics
            # and the losses, and its results are replaced at the end.
            padding = row_mask.to(all_rows.dtype).expand(all_rows.shape[:2])
            row_mask = None
        elif row_mask is not None:
            # A mask drops the padding rows here: search, statistics and losses see only the
            # kept rows (so the common path below serves masked calls too), and the results
            # are put back in place at the end.
            row_mask = row_mask.nonzero().squeeze(1)  # (M',) positions of the kept rows
        rows = all_rows if row_mask is None else all_rows.index_select(1, row_mask)  # (C, M', d)
        kept = rows.detach()
        if self.training and book.kmeans_pending:
            book.initialize(kept, ok, padding)
        if isinstance(book, AffineCodebook):
            book.observe(kept, training=self.training, ok=ok, row_weight=padding)

        training = self.training
        codes = book.vectors()  # (C, K, d)
        if not self.learnable_codebook:
            codes = codes.detach()
        stochastic = training and self.stochastic_sample_codes and temperature > 0
        gumbel = training and self.straight_through and temperature > 0
        needs_logits = indices is not None or codebook_transform_fn is not None or gumbel \
            or (stochastic and book.use_cosine_sim) or (training and (
                self.codebook_diversity_loss_weight > 0
                or (self.has_commitment_loss and self.commitment_use_cross_entropy_loss)))
        logits = None
        if codebook_transform_fn is not None:
            idx, q, logits = self._search_transformed(rows, codes, codebook_transform_fn, b, n)
        elif needs_logits:
            logits = code_logits(rows, codes, use_cosine_sim=book.use_cosine_sim)
            sampling = logits.detach()
            if stochastic:
                sampling = sampling / temperature + _gumbel_noise(sampling)
            idx = sampling.argmax(-1)  # (C, M)
            if gumbel:
                soft = (logits / temperature).softmax(-1)
                hard = F.one_hot(idx, self.codebook_size).to(soft.dtype)
                q = (hard + soft - soft.detach()) @ codes.detach()
            else:
                q = book.lookup(idx, codes)
        else:
            idx = book.search(rows.detach(), temperature=temperature if stochastic else None,
                              codes=codes)
            q = book.lookup(idx, codes)
        q = q.to(rows.dtype)

        zero = rows.new_zeros(())
        inplace_loss = zero
        if training and not freeze and self.in_place_codebook_optimizer is not None:
            inplace_loss, idx, q = self._in_place_step(rows, q, idx, ok)
        elif training and not freeze:
            self._update_codebook(kept, idx, None, kept, ema_update_weight, accum_ema_update,
                                  ema_update, ok=ok, padding=padding)
        if padding is not None:
            pad = padding == 0  # (C, M)
            idx = idx.masked_fill(pad, -1)  # ignored by the cross-entropy terms, -1 outside
        if ok is not None:
            # a deferred call cannot raise: the rows of non-finite (or too large) input come
            # out NaN instead of as valid-looking codes
            q = q + unusable_rows_as_nan(rows)

        if indices is not None:
            target = self._rows_of_indices(indices, b, n)
            if row_mask is not None:
                target = target.index_select(1, row_mask)
            if padding is not None:
                target = target.masked_fill(padding == 0, -1)
            out_rows = _expand(self._estimate(rows, q, training), row_mask, all_rows.shape[1])
            if padding is not None:
                out_rows = out_rows.masked_fill(pad[..., None], 0.0)
            out = self._finish(out_rows, tokens, h, mask)
            return out, cross_entropy_to_codes(logits, target)

        commitment = diversity = orthogonal = zero
        loss = zero
        out_rows = None
        if training and self.has_commitment_loss:
            if self._fused_estimator and not self.sync_update_v and padding is None \
                    and not self.commitment_use_cross_entropy_loss \
                    and not (self.learnable_codebook and not freeze):
                # the common case in one autograd function: output (exactly q) and the
                # weighted mse from one pass
                out_rows, loss = estimators.quantize(
                    rows, q.detach(), commitment_weight=self.commitment_weight,
                    rotation=self.rotation_trick)
                commitment = loss.detach() / self.commitment_weight
            else:
                commitment = self._commitment(rows, q, idx, logits, freeze, padding)
                loss = loss + commitment * self.commitment_weight
        if training:
            if self.codebook_diversity_loss_weight > 0:
                # one distribution per sequence position, padding included (the library's)
                full = logits if row_mask is None else code_logits(
                    all_rows, codes, use_cosine_sim=book.use_cosine_sim)
                diversity = diversity_loss(self._positions(full, b, n),
                                           self.codebook_diversity_temperature)
                loss = loss + diversity * self.codebook_diversity_loss_weight
            if self.orthogonal_reg_weight > 0:
                orthogonal = self._orthogonal(idx)
                loss = loss + orthogonal * self.orthogonal_reg_weight

        if out_rows is None:
            out_rows = self._estimate(rows, q, training)
        if padding is not None:
            out_rows = out_rows.masked_fill(pad[..., None], 0.0)
        quantized = self._finish(_expand(out_rows, row_mask, all_rows.shape[1]), tokens, h, mask)
        idx_out = self._merge_heads(_expand(idx, row_mask, all_rows.shape[1], -1), b, n)
        idx_out = idx_out.reshape(self._index_shape(tokens) + idx_out.shape[2:])
        loss = loss.float()
        if return_loss_breakdown:
            return VQOutputWithBreakdown(quantized, idx_out, loss, LossBreakdown(
                commitment.detach().float() if not training else commitment, diversity,
                orthogonal, inplace_loss))
        return VQOutput(quantized, idx_out, loss)

    # ------------------------------------------------------------------ forward's parts

    def _estimate(self, rows: Tensor, q: Tensor, training: bool) -> Tensor:
        """The output rows: ``q`` with the gradient rule of the chosen estimator."""
        out = self._estimator(rows, q) if rows.requires_grad or q.requires_grad else q.detach()
        if self.sync_update_v > 0 and training:
            out = estimators.sync_update(out, q, self.sync_update_v)
        return out

    def _finish(self, out_rows: Tensor, tokens: _Tokens, h: Tensor, mask: Tensor | None
                ) -> Tensor:
        b, n = tokens.x.shape[:2]
        out = self._merge_heads(out_rows, b, n).to(h.dtype)  # (B, N, heads · d)
        out = self.project_out(out)
        # masked rows come as zeros; they stay so unless a projection (its bias) moved them
        if mask is not None and (self.has_projection
                                 or not self.return_zeros_for_masked_padding):
            fill = torch.zeros_like(out) if self.return_zeros_for_masked_padding else tokens.x
            out = torch.where(mask[..., None], out, fill)
        return self._from_tokens(out, tokens).to(tokens.x.dtype)

    def _commitment(self, rows: Tensor, q: Tensor, idx: Tensor, logits: Tensor | None,
                    freeze: bool, padding: Tensor | None = None) -> Tensor:
        if self.commitment_use_cross_entropy_loss:
            return cross_entropy_to_codes(logits, idx)  # padding has index -1: ignored

        def mse(a: Tensor, b: Tensor) -> Tensor:
            if padding is None:
                return F.mse_loss(a, b)
            # the mean over the kept rows, as the row-dropping path computes it
            sq = (a - b).pow(2).sum(-1) * padding
            return sq.sum() / (padding.sum() * a.shape[-1]).clamp(min=1)

        learn_codes = self.learnable_codebook and not freeze
        if learn_codes and self._two_term_loss:
            # this project's two-term form: each side with its own weight
            commit = mse(rows, q.detach())
            codebook = mse(rows.detach(), q)
            ratio = self.codebook_weight / self.commitment_weight
            return commit + ratio * codebook
        return mse(rows, q if learn_codes else q.detach())

    def _positions(self, logits: Tensor, b: int, n: int) -> Tensor:
        """Logits ``(C, M, K)`` as ``(..., N, K)``: the diversity term averages over all but
        the sequence position."""
        k = logits.shape[-1]
        if self.heads > 1 and not self.separate_codebook_per_head:
            return logits.reshape(b, n, self.heads, k).transpose(1, 2)
        return logits.reshape(logits.shape[0], b, n, k)

    def _orthogonal(self, idx: Tensor) -> Tensor:
        if self.orthogonal_reg_active_codes_only and self.heads > 1 \
                and self.separate_codebook_per_head:
            raise QuantizerInputError("orthogonal_reg_active_codes_only does not support "
                                      "separate per-head codebooks")
        used = idx if self.orthogonal_reg_active_codes_only else None
        codes = select_codes(self._codebook.embed, used=used,
                             max_codes=self.orthogonal_reg_max_codes)
        return orthogonal_loss(codes)

    def _update_codebook(self, rows: Tensor, idx: Tensor, row_mask: Tensor | None,
                         kept: Tensor, weight, accumulate: bool, ema_update: bool | None, *,
                         ok: Tensor | None = None, padding: Tensor | None = None) -> None:
        """The codebook's training update; ``ok`` (0-d bool) makes it a deferred one, and
        ``padding`` ``(C, M)`` then weighs the rows (0: padding)."""
        book = self._codebook
        ema = book.ema_update if ema_update is None else ema_update
        if not (ema or book.threshold_ema_dead_code > 0):
            if ok is None:
                book.steps += 1
            else:
                book.steps.add_(ok.to(book.steps.dtype))
            return
        row_weight = padding
        if row_mask is not None:
            row_weight = row_mask.to(rows.dtype).expand(idx.shape)
        stats = book.statistics(rows, idx, row_weight)
        if accumulate:
            book.accumulate(stats, ok)
            return
        if ok is None:
            book.update(stats, kept, weight, ema_update=ema)
        else:
            book.update(stats, kept, weight, ema_update=ema, ok=ok, row_weight=row_weight)

    def _check_deferrable(self, masked: bool) -> None:
        """Refuse, in a deferred call, the options that need a value on the host."""
        if self.in_place_codebook_optimizer is not None and tracing():
            raise QuantizerInputError(
                "in_place_codebook_optimizer cannot be compiled or exported: it runs an "
                "optimiser step (backward, then step) inside forward; call the layer eagerly")
        if self.orthogonal_reg_active_codes_only and self.training \
                and self.orthogonal_reg_weight > 0:
            raise QuantizerInputError(
                "orthogonal_reg_active_codes_only picks a number of codes known only from the "
                "batch's values, which a compiled graph or a call that must not read back "
                "cannot do; use orthogonal_reg_max_codes, or vqvae.set_input_checks("
                "'immediate') and call eagerly")
        if masked and isinstance(self._codebook, AffineCodebook):
            raise QuantizerInputError(
                "a mask with affine_param is not supported in deferred or compiled calls; use "
                "vqvae.set_input_checks('immediate') and call eagerly")

    def _in_place_step(self, rows: Tensor, q: Tensor, idx: Tensor, ok: Tensor | None = None):
        """One optimiser step of the codes toward the rows they quantize, then the search
        again with the new codes. (Eager only; a deferred call reads its verdict back here:
        an optimiser step cannot be made conditional on the device.)"""
        book = self._codebook
        if ok is not None and not bool(ok):
            raise QuantizerInputError(
                "non-finite input (NaN or Inf, or values too large to square) reached the "
                "in-place codebook optimiser; the codebook was not updated")
        loss = F.mse_loss(q, rows.detach())
        loss.backward()
        if not self.manual_in_place_optimizer_update:
            self.update_in_place_optimizer()
        codes = book.vectors()
        idx = book.search(rows.detach(), codes=codes)
        return loss.detach(), idx, book.lookup(idx, codes).to(rows.dtype)

    def _search_transformed(self, rows: Tensor, codes: Tensor, transform, b: int, n: int):
        """Per-token codebooks ``transform(codes)`` ``(C, B, N, K, d)``: the nearest of each
        token's own codes."""
        per_token = transform(codes).reshape(codes.shape[0], b * n, -1, codes.shape[-1])
        if self._codebook.use_cosine_sim:
            per_token = F.normalize(per_token, dim=-1)
            logits = (rows[:, :, None] * per_token).sum(-1)
        else:
            logits = -(rows[:, :, None] - per_token).pow(2).sum(-1).clamp(min=1e-8).sqrt()
        idx = logits.detach().argmax(-1)  # (C, M)
        q = per_token.gather(2, idx[..., None, None].expand(-1, -1, 1, per_token.shape[-1]))
        return idx, q.squeeze(2), logits

    def _rows_of_indices(self, indices: Tensor, b: int, n: int) -> Tensor:
        """Given code indices ``(B, N[, heads])`` in the row order of :meth:`_split_heads`."""
        indices = indices.reshape(b, n, self.heads) if self.heads > 1 else \
            indices.reshape(b, n)
        if self.heads > 1 and self.separate_codebook_per_head:
            return indices.reshape(b * n, self.heads).transpose(0, 1)
        return indices.reshape(1, -1)

    def _forward_topk(self, tokens: _Tokens, mask: Tensor | None, k: int):
        """The ``k`` nearest codes of each token, nearest first: indices ``(..., k)``, their
        codes ``(..., k, dim)`` and each candidate's commitment loss ``(..., k)``; no update."""
        if self.heads != 1 or k <= 0:
            raise QuantizerInputError("topk needs heads == 1 and topk > 0")
        if self.training and (self.commitment_use_cross_entropy_loss
                              or self.in_place_codebook_optimizer is not None):
            raise QuantizerInputError("topk in training does not work with the cross-entropy "
                                      "commitment loss or the in-place optimiser")
        k = min(k, self.codebook_size)
        book = self._codebook
        b, n = tokens.x.shape[:2]
        h = self.project_in(tokens.x)
        rows = book.prepare(self._split_heads(h))  # (1, M, d)
        if not guard.deferred(rows):
            check_rows_usable(rows)  # (no state changes here: a deferred call gives NaN)
        codes = book.vectors()
        logits = code_logits(rows.detach(), codes.detach(), use_cosine_sim=book.use_cosine_sim)
        idx = logits.topk(k, dim=-1).indices  # (1, M, k)
        q = book.lookup(idx, codes).to(rows.dtype)  # (1, M, k, d)
        if guard.deferred(rows):
            q = q + unusable_rows_as_nan(rows)[..., None, :]
        per_candidate = (q.detach() - rows[:, :, None]).pow(2).mean(-1)  # (1, M, k)
        loss = per_candidate * self.commitment_weight if self.has_commitment_loss \
            or self.training else per_candidate
        if self.training and not self.has_commitment_loss:
            loss = torch.zeros_like(per_candidate)
        quantized = self.project_out(q.reshape(b, n, k, -1).to(h.dtype))
        idx = idx.reshape(b, n, k)
        loss = loss.reshape(b, n, k)
        if mask is not None:
            loss = loss.masked_fill(~mask[..., None], 0.0)
            idx = idx.masked_fill(~mask[..., None], -1)
            quantized = quantized.masked_fill(~mask[..., None, None], 0.0)
        if tokens.layout in ("fmap", "one", "vector", "flat"):
            shape = self._index_shape(tokens) + (k,)
            idx, loss = idx.reshape(shape), loss.reshape(shape)
            quantized = quantized.reshape(shape + (self.dim,))
        return VQOutput(quantized, idx, loss.float())

    # ------------------------------------------------------------------ from indices

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """Codes (in the codebook space, before ``project_out``) of ``indices`` ``(...)`` or
        ``(..., heads)``: ``(..., codebook_dim · heads)``; ``-1`` gives zeros."""
        if not isinstance(indices, Tensor) or indices.dtype.is_floating_point \
                or indices.dtype.is_complex or indices.dtype == torch.bool:
            raise QuantizerInputError(
                f"indices must be an integer tensor, got {describe(indices)}")
        indices = indices.long()
        valid = indices >= 0
        safe = indices.clamp(min=0)
        codes = self._codebook.vectors()
        if not self.learnable_codebook:
            codes = codes.detach()
        if self.heads > 1:
            lead = safe.shape[:-1]
            flat = safe.reshape(-1, self.heads)  # (T, heads)
            if self.separate_codebook_per_head:
                got = self._codebook.lookup(flat.transpose(0, 1), codes).transpose(0, 1)
            else:
                got = self._codebook.lookup(flat, codes)  # (T, heads, d)
            got = got * valid.reshape(-1, self.heads, 1)
            return got.reshape(*lead, self.heads * self.codebook_dim)
        return self._codebook.lookup(safe, codes) * valid[..., None]

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """What a forward call returns as ``quantized`` for these ``indices`` (``project_out``
        applied; feature maps channel-first)."""
        out = self.project_out(self.get_codes_from_indices(indices))
        if self.accept_image_fmap or self.accept_3d_fmap:
            out = out.movedim(-1, 1)
        return out

    def decode(self, indices: Tensor) -> Tensor:
        """Code vectors for ``indices`` (any shape; ``(..., heads)`` with heads), channels
        last: ``(..., dim)``. Equal to ``quantized`` of an eval-mode call that produced
        ``indices``. Indices outside ``[0, codebook_size)`` raise."""
        if not isinstance(indices, Tensor) or indices.dtype.is_floating_point \
                or indices.dtype.is_complex or indices.dtype == torch.bool:
            raise QuantizerInputError(
                f"indices must be an integer tensor, got {describe(indices)}")
        if indices.numel() and (int(indices.min()) < 0
                                or int(indices.max()) >= self.codebook_size):
            raise QuantizerInputError(
                f"indices must lie in [0, {self.codebook_size}), got values in "
                f"[{int(indices.min())}, {int(indices.max())}]")
        return self.project_out(self.get_codes_from_indices(indices))

    @torch.no_grad()
    def update_ema_indices(self, x: Tensor, indices: Tensor, mask: Tensor | None = None,
                           ema_update_weight=None, accum_ema_update: bool = False,
                           ema_update: bool | None = None) -> None:
        """The training update (EMA step, dead-code restarts) with the given ``indices``
        instead of the searched ones; ``x`` and ``indices`` in forward's layouts."""
        tokens = self._to_tokens(x)
        mask = self._check_mask(mask, None, tokens)
        b, n = tokens.x.shape[:2]
        rows = self._codebook.prepare(self._split_heads(self.project_in(tokens.x)))
        check_finite(rows)
        idx = self._rows_of_indices(indices.long(), b, n)
        row_mask = self._row_mask(mask)
        if row_mask is not None:
            row_mask = row_mask & (idx >= 0).all(0)
        elif bool((idx < 0).any()):
            row_mask = (idx >= 0).all(0)
        idx = idx.clamp(min=0)
        kept = rows if row_mask is None else rows[:, row_mask]
        self._update_codebook(rows, idx, row_mask, kept, ema_update_weight, accum_ema_update,
                              ema_update)

    update_indices = update_ema_indices


def _expand(kept: Tensor, positions: Tensor | None, num_rows: int, fill: float = 0) -> Tensor:
    """Values ``(C, M', ...)`` of the kept rows back at their ``positions`` among all
    ``num_rows`` rows (``fill`` elsewhere); differentiable."""
    if positions is None:
        return kept
    full = kept.new_full((kept.shape[0], num_rows, *kept.shape[2:]), fill)
    return full.index_copy(1, positions, kept)


def _gumbel_noise(t: Tensor) -> Tensor:
    uniform = torch.rand_like(t).clamp_(min=torch.finfo(t.dtype).tiny)
    return -(-uniform.log()).log()


def _nest_legacy_state(module: VectorQuantize, state: dict, prefix: str, *args) -> None:
    """Earlier checkpoints kept the codebook's tensors directly under the layer's prefix (or
    under ``book.``): move them under ``_codebook.``, where the codebook converts them."""
    for old in (prefix, f"{prefix}book."):
        if old + "codebook" not in state:
            continue
        for name in LEGACY_STATE:
            if old + name in state:
                state[f"{prefix}_codebook.{name}"] = state.pop(old + name)
