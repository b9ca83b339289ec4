"""Residual vector quantization, built by composing :class:`VectorQuantize` layers.

- :class:`ResidualVQ` (SoundStream, Zeghidour et al., 2021, arXiv 2107.03312, Algorithm 1):
  ``num_quantizers`` layers in sequence, each quantizing what the previous ones left,
  ``r_1 = x``, ``q_l = Q_l(r_l)``, ``r_{l+1} = r_l - q_l``; the output is ``Σ_l q_l``.
- RQ-VAE (Lee et al., 2022, arXiv 2203.01941) is a :class:`ResidualVQ` with
  ``shared_codebook=True`` (every depth uses one codebook) and ``stochastic_sample_codes=True``.
- :class:`GroupedResidualVQ` (HiFi-Codec, Yang et al., 2023, arXiv 2305.02765): the feature axis
  is split into ``groups`` and each group has its own :class:`ResidualVQ`.

Both are drop-ins for vector_quantize_pytorch's classes of the same names (keyword arguments,
forward arguments, return values, state_dict keys of the residual level). Code layouts::

    ResidualVQ          x (..., dim) -> indices (..., num_quantizers),  losses (num_quantizers,)
    GroupedResidualVQ   x (..., dim) -> indices (groups, ..., num_quantizers),
                                        losses (groups, num_quantizers)

``indices[..., l]`` is the code of depth ``l`` (0 = coarsest). ``-1`` marks a depth that a
training call skipped (quantize dropout) or a masked position.

Both compile whole (``torch.compile(..., fullgraph=True)``) and never read a value back in
deferred calls (see :mod:`.guard`): the non-finite check, k-means, restarts and quantize dropout
(a mask over every depth, :meth:`ResidualVQ.dropout_mask`) are decided on the device. A ``mask``
and teacher forcing (``indices=``) are eager only; docs/compile.md has the details.
"""

from __future__ import annotations

import random
from math import ceil
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import distributed, guard
from .beam_search import beam_search
from .checks import (
    QuantizerInputError,
    check_finite,
    check_input,
    describe,
    require,
    too_large_to_square,
)
from .codebook import CodeStatistics
from .estimators import quantize, quantize_residual
from .implicit_codebook import CodeMLP, ConditionedCodes
from .tracing import tracing
from .vector_quantize import VectorQuantize, VQOutput, unusable_rows_as_nan

DROPPED = -1  # the index of a depth a training call did not use, or of a masked position

#: Layer options the residual stack applies itself through the Codebook API (search, lookup,
#: statistics, update) and the estimators. With any other layer option (orthogonal or
#: diversity losses, affine codebooks, ...) each depth calls its layer's forward instead.
CODEBOOK_PATH_OPTIONS = frozenset({
    "decay", "eps", "commitment_weight", "codebook_weight", "kmeans_init", "kmeans_iters",
    "sync_kmeans", "threshold_ema_dead_code", "dead_code_warmup_steps", "rotation_trick",
    "stochastic_sample_codes", "sample_codebook_temp", "sync_codebook", "max_search_bytes",
    "use_cosine_sim", "ema_update", "learnable_codebook", "route_gradients_to_input",
    "codebook_init",
})
#: The layers' defaults of this residual quantizer (straight-through, N(0, 1) codes), where
#: VectorQuantize's own follow the reference library.
LAYER_DEFAULTS = {"rotation_trick": False, "codebook_init": "normal"}


class ResidualOutput(NamedTuple):
    """``return_all_codes=True``: the three usual values and every depth's code vectors."""

    quantized: Tensor
    indices: Tensor
    loss: Tensor  # (num_quantizers,)
    all_codes: Tensor  # (num_quantizers, ..., codebook_dim)


class _DepthLosses(torch.autograd.Function):
    """``w_l · ||r_{l+1}||² / n`` per depth, with ``r_{l+1} = r_l − q_l`` (codes held
    constant) and ``d r_l / d x = a_l · I``: the gradient to ``x`` is
    ``Σ_l g_l · 2 w_l a_l / n · r_{l+1}``, from residuals the search computed anyway."""

    @staticmethod
    def forward(ctx, x: Tensor, weights: Tensor, factors: Tensor, *residuals: Tensor):
        ctx.save_for_backward(weights * factors, *residuals)
        ctx.numel = x.numel()
        sq = torch.stack([torch.dot(r.reshape(-1), r.reshape(-1)) for r in residuals])
        return sq * weights / x.numel()

    @staticmethod
    def backward(ctx, grad: Tensor):
        weights, *residuals = ctx.saved_tensors
        # the scales stay on the device (0-d tensors): no read-back in backward
        scale = grad * weights * (2.0 / ctx.numel)  # (L,)
        grad_x = residuals[0] * scale[0]
        for depth in range(1, len(residuals)):
            grad_x = grad_x.addcmul_(residuals[depth], scale[depth])
        return (grad_x, None, None, *([None] * len(residuals)))


class _ScaledStraightThrough(torch.autograd.Function):
    """``q`` as is, passing ``scale · g`` to ``x``: the sum of ``L`` straight-through layer
    outputs whose inputs have ``d r_l / d x = a_l · I`` (``scale = Σ_l a_l``)."""

    @staticmethod
    def forward(ctx, x: Tensor, q: Tensor, scale: float | Tensor):
        ctx.scale = scale  # a 0-d tensor when quantize dropout is decided on the device
        return q

    @staticmethod
    def backward(ctx, grad: Tensor):
        if isinstance(ctx.scale, Tensor):
            return grad * ctx.scale, None, None
        return grad * ctx.scale if ctx.scale != 1.0 else grad, None, None


class ResidualVQ(nn.Module):
    """Residual vector quantizer: ``num_quantizers`` :class:`VectorQuantize` layers in sequence.

    A drop-in for ``vector_quantize_pytorch.ResidualVQ`` (1.32): ``quantized, indices, losses =
    rvq(x)`` with ``x`` ``(..., dim)`` (or ``(B, dim, H, W)`` with ``accept_image_fmap``),
    ``indices`` int64 ``(..., num_quantizers)`` and ``losses`` float32 ``(num_quantizers,)``,
    each depth's loss as its layer defines it on the residual it quantized (zero in eval, and
    for depths quantize dropout skipped).

    Args (keyword; ``dim, codebook_size, num_quantizers`` may also be positional):
        codebook_size: codes per layer, or a tuple of one size per depth.
        num_quantizers: depths (may be left out with a tuple ``codebook_size``).
        codebook_dim: quantize in a space of this size (``project_in`` / ``project_out``).
        shared_codebook: every depth uses layer 0's codebook; each depth takes one EMA step of
            the statistics, the codes are recomputed once after the last depth.
        quantize_dropout: in training, depths after ``last`` are skipped, ``last =
            random.Random(seed).randrange(quantize_dropout_cutoff_index, num_quantizers)``
            (rounded up to ``quantize_dropout_multiple_of`` depths); ``seed`` is the forward's
            ``rand_quantize_dropout_fixed_seed`` or drawn from torch's generator (so a run's
            checkpointed RNG state covers it). ``quantize_dropout_min_layers=n`` is the cutoff
            ``n − 1``.
        beam_size, eval_beam_size, beam_score_quantizer_weights: beam search over the depths
            (:mod:`.beam_search`); ``eval_beam_size`` (default ``beam_size``) applies in eval. A
            beam above a codebook's size extends each path by all its codes.
        quant_grad_frac: ``r_{l+1} = r_l − (f·q̃_l + (1−f)·sg(q̃_l))`` with ``q̃_l`` layer ``l``'s
            output: the fraction of the gradient a residual passes through the previous codes.
        return_zeros_for_masked_padding: masked positions of ``quantized`` are 0 (else ``x``).
        accept_image_fmap: input ``(B, dim, H, W)``, indices ``(B, H, W, num_quantizers)``.
        heads: must be 1 (as in the library).
        diveq, implicit_neural_codebook, mlp_kwargs: accepted; they need layer options
            (a learnable codebook without EMA) that the layers are given as keywords.
        straight_through_sum: pass the output's gradient to ``x`` once, as if one quantizer had
            produced ``Σ q_l`` (and each depth's commitment term to ``x`` through its
            residual), instead of once per depth as the library does (``L`` times for
            straight-through). Not a library option; the models use it.
        **layer_options: every other keyword goes to each layer's :class:`VectorQuantize`.

    Forward keywords: ``mask`` ``(B, N)`` bool, ``indices`` (teacher forcing: returns
    ``(quantized, Σ_l cross-entropy)``, each layer scoring the residual the given codes left),
    ``return_all_codes``, ``sample_codebook_temp``, ``freeze_codebook``, ``beam_size``,
    ``rand_quantize_dropout_fixed_seed``.

    Eval calls leave every buffer bit-identical. A batch with NaN or Inf raises
    :class:`QuantizerInputError` before any codebook changes (in deferred and compiled calls it
    changes nothing, comes out NaN, and :func:`vqvae.raise_deferred` reports it).
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int | tuple[int, ...] | None = None,
        num_quantizers: int | None = None,
        *,
        codebook_dim: int | None = None,
        shared_codebook: bool = False,
        diveq: bool = False,
        heads: int = 1,
        quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0,
        quantize_dropout_multiple_of: int = 1,
        quantize_dropout_min_layers: int | None = None,
        accept_image_fmap: bool = False,
        implicit_neural_codebook: bool = False,
        mlp_kwargs: dict | None = None,
        beam_size: int | None = None,
        eval_beam_size: int | None = None,
        beam_score_quantizer_weights: list[float] | None = None,
        quant_grad_frac: float = 0.0,
        return_zeros_for_masked_padding: bool = True,
        straight_through_sum: bool = False,
        **layer_options,
    ):
        super().__init__()
        require(isinstance(dim, int) and dim >= 1, f"dim must be a positive int, got {dim!r}")
        require(heads == 1, f"residual quantizers take heads=1 only, got heads={heads!r}")
        if isinstance(codebook_size, (tuple, list)):
            sizes = tuple(codebook_size)
            if num_quantizers is None:
                num_quantizers = len(sizes)
            require(len(sizes) == num_quantizers,
                    f"codebook_size has {len(sizes)} sizes for num_quantizers={num_quantizers}")
        else:
            require(isinstance(num_quantizers, int),
                    f"num_quantizers must be a positive int (or codebook_size a tuple of one "
                    f"size per depth), got {num_quantizers!r}")
            sizes = (codebook_size,) * num_quantizers
        require(isinstance(num_quantizers, int) and num_quantizers >= 1,
                f"num_quantizers must be a positive int, got {num_quantizers!r}")
        require(all(isinstance(k, int) and k >= 1 for k in sizes),
                f"codebook_size must be positive ints, got {codebook_size!r}")
        require(not shared_codebook or len(set(sizes)) == 1,
                "shared_codebook needs one codebook_size for every depth")
        if quantize_dropout_min_layers is not None:
            require(isinstance(quantize_dropout_min_layers, int)
                    and 1 <= quantize_dropout_min_layers <= num_quantizers,
                    f"quantize_dropout_min_layers must be an int in [1, num_quantizers="
                    f"{num_quantizers}], got {quantize_dropout_min_layers!r}")
            quantize_dropout_cutoff_index = quantize_dropout_min_layers - 1
        require(isinstance(quantize_dropout_cutoff_index, int)
                and 0 <= quantize_dropout_cutoff_index < num_quantizers,
                f"quantize_dropout_cutoff_index must be an int in [0, num_quantizers="
                f"{num_quantizers}), got {quantize_dropout_cutoff_index!r}")
        require(isinstance(quantize_dropout_multiple_of, int) and quantize_dropout_multiple_of >= 1,
                f"quantize_dropout_multiple_of must be a positive int, got "
                f"{quantize_dropout_multiple_of!r}")
        require(codebook_dim is None or (isinstance(codebook_dim, int) and codebook_dim >= 1),
                f"codebook_dim must be None or a positive int, got {codebook_dim!r}")
        require(eval_beam_size is None or beam_size is not None,
                "eval_beam_size needs beam_size (the beam of training calls)")
        for name, beam in (("beam_size", beam_size), ("eval_beam_size", eval_beam_size)):
            require(beam is None or (isinstance(beam, int) and beam >= 1),
                    f"{name} must be None or a positive int, got {beam!r}")
        weights = beam_score_quantizer_weights
        if weights is None:
            weights = [1.0] * num_quantizers
        require(len(weights) == num_quantizers,
                f"beam_score_quantizer_weights needs {num_quantizers} weights, got {len(weights)}")
        require(0.0 <= quant_grad_frac <= 1.0 or quant_grad_frac < 0,
                f"quant_grad_frac must be <= 1, got {quant_grad_frac!r}")
        require(not (implicit_neural_codebook and (beam_size or 1) > 1),
                "beam search over implicit neural codebooks is not supported")
        if diveq or implicit_neural_codebook:
            # a learnable codebook trained by the output's gradient (diveq) or through the MLPs
            layer_options.update(ema_update=False, learnable_codebook=True)
        if diveq:
            layer_options.update(route_gradients_to_input=False, commitment_weight=0.0)
            quant_grad_frac = 1.0

        self.dim = dim
        self.codebook_sizes = sizes
        self.codebook_size = sizes[0]
        self.num_quantizers = num_quantizers
        self.codebook_dim = codebook_dim or dim
        self.shared_codebook = shared_codebook
        self.diveq = diveq
        self.quantize_dropout = quantize_dropout and num_quantizers > 1
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        self.quantize_dropout_multiple_of = quantize_dropout_multiple_of
        self.accept_image_fmap = accept_image_fmap
        self.beam_size = beam_size
        self.eval_beam_size = eval_beam_size if eval_beam_size is not None else beam_size
        self.beam_score_quantizer_weights = [float(w) for w in weights]
        self.quant_grad_frac = float(quant_grad_frac)
        self.return_zeros_for_masked_padding = return_zeros_for_masked_padding
        self.straight_through_sum = straight_through_sum
        self.implicit_neural_codebook = implicit_neural_codebook
        # whether each depth runs its layer's forward (see CODEBOOK_PATH_OPTIONS)
        self.layer_forward = bool(set(layer_options) - CODEBOOK_PATH_OPTIONS)
        require(not (self.layer_forward and (shared_codebook or implicit_neural_codebook or diveq
                                             or (beam_size or 1) > 1)),
                f"layer options {sorted(set(layer_options) - CODEBOOK_PATH_OPTIONS)} are "
                f"not supported with shared_codebook, implicit_neural_codebook, diveq or beam "
                f"search")

        has_projection = self.codebook_dim != dim
        self.project_in = nn.Linear(dim, self.codebook_dim) if has_projection else nn.Identity()
        self.project_out = nn.Linear(self.codebook_dim, dim) if has_projection else nn.Identity()
        self.layers = nn.ModuleList(
            VectorQuantize(self.codebook_dim, size, **{**LAYER_DEFAULTS, **layer_options})
            for size in sizes)
        guard.register_counter(self)
        if shared_codebook:
            # one Codebook module held by every layer: one tensor, one set of EMA buffers
            for layer in self.layers[1:]:
                layer._codebook = self.layers[0].book
            self.register_load_state_dict_pre_hook(_fill_shared_layers)
        if implicit_neural_codebook:
            cosine = bool(layer_options.get("use_cosine_sim", False))
            self.mlps = nn.ModuleList(
                CodeMLP(self.codebook_dim, l2norm_output=cosine, **(mlp_kwargs or {}))
                for _ in range(num_quantizers - 1))

    def codes_at(self, depth: int, condition: Tensor | None):
        """What depth ``depth`` searches and looks codes up in: its layer's Codebook, or with
        an implicit neural codebook the codes its MLP makes for ``condition`` (the sum of the
        earlier depths' codes, ``(N, codebook_dim)``)."""
        book = self.layers[depth].book
        if not self.implicit_neural_codebook or depth == 0:
            return book
        return ConditionedCodes(self.mlps[depth - 1], book.vectors()[0], condition)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, codebook_size={self.codebook_sizes}, "
                f"num_quantizers={self.num_quantizers}, shared_codebook={self.shared_codebook}, "
                f"quantize_dropout={self.quantize_dropout}")

    def layer_at(self, depth: int) -> VectorQuantize:
        """The :class:`VectorQuantize` that quantizes depth ``depth`` (0-based)."""
        if not 0 <= depth < self.num_quantizers:
            raise IndexError(f"depth must be in [0, {self.num_quantizers}), got {depth}")
        return self.layers[depth]

    @property
    def codebooks(self) -> Tensor | tuple[Tensor, ...]:
        """``(num_quantizers, K, codebook_dim)``; a tuple of ``(K_l, codebook_dim)`` when the
        depths have different sizes."""
        books = tuple(layer.codebook for layer in self.layers)
        return torch.stack(books) if len(set(self.codebook_sizes)) == 1 else books

    # ------------------------------------------------------------------ forward

    def forward(self, x: Tensor, mask: Tensor | None = None, indices: Tensor | None = None,
                return_all_codes: bool = False, sample_codebook_temp: float | None = None,
                freeze_codebook: bool = False, beam_size: int | None = None,
                rand_quantize_dropout_fixed_seed: int | None = None):
        if self.accept_image_fmap:
            if not isinstance(x, Tensor) or x.ndim != 4:
                raise QuantizerInputError(f"accept_image_fmap: x must be (B, dim, H, W), got "
                                          f"{describe(x)}")
            x = x.movedim(1, -1)
        if indices is not None:
            if tracing():
                raise QuantizerInputError(
                    "teacher forcing (indices=...) cannot be compiled or exported: the indices' "
                    "range is checked on the host; call eagerly")
            out = self.cross_entropy(x, indices, mask=mask)
            quantized = out[0].movedim(-1, 1) if self.accept_image_fmap else out[0]
            return quantized, out[1]
        return self._forward(x, mask=mask, return_all_codes=return_all_codes,
                             sample_codebook_temp=sample_codebook_temp,
                             freeze_codebook=freeze_codebook, beam_size=beam_size,
                             seed=rand_quantize_dropout_fixed_seed)

    def _forward(self, x: Tensor, *, mask, return_all_codes, sample_codebook_temp,
                 freeze_codebook, beam_size, seed, ok: Tensor | None = None):
        """:meth:`forward` once ``x`` is channels last (and without teacher forcing); ``ok``
        is a verdict on the whole input already taken (by :class:`GroupedResidualVQ`)."""
        active, depth_mask = self.num_quantizers, None
        if self.training and self.quantize_dropout:
            if guard.deferred(x) and (seed is None or isinstance(seed, Tensor)):
                # decided on the device: every depth runs, the dropped ones are masked out
                depth_mask = self.dropout_mask(seed, device=x.device)
            else:
                active = self.dropout_layers(int(seed) if isinstance(seed, Tensor) else seed)
        result = self.quantize(x, active, mask=mask, sample_codebook_temp=sample_codebook_temp,
                               freeze_codebook=freeze_codebook, beam_size=beam_size,
                               return_all_codes=return_all_codes, depth_mask=depth_mask, ok=ok)
        if self.accept_image_fmap:
            result = result._replace(quantized=result.quantized.movedim(-1, 1))
        return result

    def dropout_seed(self) -> int:
        """A seed for quantize dropout, from torch's generator (the same on every process)."""
        return int(self._dropout_seed_tensor())

    def _dropout_seed_tensor(self, device: torch.device | None = None) -> Tensor:
        seed = torch.randint(0, 10_000, (), device=device)
        first = self.layers[0]
        if distributed.should_sync(first.sync_codebook):
            seed = distributed.broadcast(seed.to(first.codebook.device), src=0)
        return seed

    def dropout_mask(self, seed: Tensor | None = None, *,
                     device: torch.device | None = None) -> Tensor:
        """Which depths a training call with quantize dropout keeps, decided on the device:
        ``(num_quantizers,)`` bool, true for depths ``0..last`` with ``last = cutoff + seed mod
        (num_quantizers − cutoff)`` rounded up to ``quantize_dropout_multiple_of`` depths.
        ``seed``: a 0-d integer tensor (default: drawn from torch's generator). What deferred
        and compiled calls use instead of :meth:`dropout_layers`, which reads its draw back."""
        if seed is None:
            seed = self._dropout_seed_tensor(device)
        cutoff = self.quantize_dropout_cutoff_index
        last = cutoff + seed.to(torch.long) % (self.num_quantizers - cutoff)
        multiple = self.quantize_dropout_multiple_of
        if multiple != 1:
            last = (last + multiple) // multiple * multiple - 1
        depths = torch.arange(self.num_quantizers, device=seed.device)
        return depths <= last

    def dropout_layers(self, seed: int | None = None) -> int:
        """How many depths a training call with quantize dropout uses."""
        seed = self.dropout_seed() if seed is None else seed
        last = random.Random(seed).randrange(self.quantize_dropout_cutoff_index,
                                             self.num_quantizers)
        multiple = self.quantize_dropout_multiple_of
        if multiple != 1:
            last = ceil((last + 1) / multiple) * multiple - 1
        return min(last + 1, self.num_quantizers)

    def active_layers(self) -> int:
        """How many layers a training call uses: all, or fewer under quantize dropout."""
        if self.training and self.quantize_dropout:
            return self.dropout_layers()
        return self.num_quantizers

    def _beam(self, beam_size: int | None) -> int:
        if beam_size is None:
            beam_size = self.beam_size if self.training else self.eval_beam_size
        return 1 if beam_size is None else int(beam_size)

    def quantize(self, x: Tensor, active: int, *, mask: Tensor | None = None,
                 sample_codebook_temp: float | None = None, freeze_codebook: bool = False,
                 beam_size: int | None = None, return_all_codes: bool = False,
                 depth_mask: Tensor | None = None, ok: Tensor | None = None):
        """:meth:`forward` (channels last, no teacher forcing) with the first ``active``
        depths instead of a number drawn by quantize dropout, or, with ``depth_mask``
        (``(num_quantizers,)`` bool on the device, see :meth:`dropout_mask`), with every depth
        computed and those it marks false dropped (index -1, no output, no loss, no update).
        ``ok``: a verdict (0-d bool) on the input taken by the caller (see :mod:`.guard`)."""
        check_input(x, self.dim)
        if mask is not None and tracing():
            raise QuantizerInputError(
                "a mask is not supported in compiled or exported ResidualVQ calls (the kept "
                "rows are selected by value); call eagerly, or pass every row")
        if not (isinstance(active, int) and 1 <= active <= self.num_quantizers):
            raise ValueError(f"active must be an int in [1, num_quantizers="
                             f"{self.num_quantizers}], got {active!r}")
        shape, depths = x.shape, self.num_quantizers
        flat = x.reshape(-1, self.dim)  # (M, dim)
        keep = None
        if mask is not None:
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool \
                    or tuple(mask.shape) != tuple(shape[:-1]):
                raise QuantizerInputError(f"mask must be a bool tensor of shape "
                                          f"{tuple(shape[:-1])}, got {describe(mask)}")
            keep = mask.reshape(-1)
            flat = flat[keep]
        rows = self.project_in(flat)  # (N, codebook_dim)
        rows = rows.float() if rows.dtype in (torch.float16, torch.bfloat16) else rows

        out, codes, losses, all_codes = self._quantize_rows(
            rows, active, sample_codebook_temp=sample_codebook_temp,
            freeze_codebook=freeze_codebook, beam_size=self._beam(beam_size),
            want_codes=return_all_codes, depth_mask=depth_mask, ok=ok)
        if depth_mask is not None:
            codes = codes.masked_fill(~depth_mask, DROPPED)

        if isinstance(self.project_out, nn.Linear):
            out = self.project_out(out.to(self.project_out.weight.dtype))
        out = out.to(x.dtype)
        index = codes.new_full((codes.shape[0], depths), DROPPED)  # (N, L)
        index[:, :active] = codes
        if len(losses) < depths:
            losses = torch.cat([losses, losses.new_zeros(depths - len(losses))])
        if keep is not None:
            base = torch.zeros_like(x) if self.return_zeros_for_masked_padding else x.detach()
            full = base.reshape(-1, self.dim).clone()
            full = full.index_put((keep,), out)
            out = full
            full_index = index.new_full((keep.shape[0], depths), DROPPED)
            full_index[keep] = index
            index = full_index
        quantized = out.reshape(shape)
        indices = index.reshape(*shape[:-1], depths)
        if not return_all_codes:
            return VQOutput(quantized, indices, losses)
        return ResidualOutput(quantized, indices, losses, self.get_codes_from_indices(indices))

    def _temperature(self, layer: VectorQuantize, override: float | None) -> float | None:
        if self.training and layer.stochastic_sample_codes:
            return layer.sample_codebook_temp if override is None else override
        return None

    def _quantize_rows(self, h: Tensor, active: int, *, sample_codebook_temp, freeze_codebook,
                       beam_size, want_codes, depth_mask=None, ok=None):
        """``(out (N, d), codes (N, active), losses (active,), None)`` for rows ``h``."""
        training = self.training
        layers = list(self.layers[:active])
        if h.shape[0] == 0:
            empty = torch.empty(0, active, dtype=torch.long, device=h.device)
            return h.clone(), empty, h.new_zeros(active, dtype=torch.float32), None
        if self.layer_forward and beam_size <= 1:
            return self._forward_layers(h, layers, sample_codebook_temp, freeze_codebook,
                                        depth_mask)
        update = training and not freeze_codebook
        if ok is None and guard.deferred(h):
            ok = guard.usable(h)
        if ok is not None and training:
            guard.record(self, ok)
        residuals: list[Tensor] = []  # r_l, what depth l quantized (no gradient)
        qs: list[Tensor] = []  # the code vectors each depth chose
        codes: list[Tensor] = []
        sq: list[Tensor] = []  # ||s_l - q_l||² with s_l the search input of depth l
        afters: list[Tensor] = []  # r_l - q_l, what depth l leaves
        beam_terms = None
        with torch.no_grad():
            residual = h.detach()
            condition = None  # Σ of the codes so far (implicit neural codebooks)
            if beam_size > 1:
                if ok is None:
                    check_finite(residual)
                if training and any(layer.book.kmeans_pending for layer in layers):
                    # k-means of each depth on the residuals the greedy search leaves it
                    left = residual
                    for layer in layers:
                        book = layer.book
                        if book.kmeans_pending:
                            book.initialize(book.prepare(left), ok)
                        left = left - book.lookup(book.search(book.prepare(left))).to(left.dtype)
                chosen, beam_terms = beam_search(
                    residual, [layer.book for layer in layers], beam_size=beam_size,
                    weights=self.beam_score_quantizer_weights[:active],
                    scales=[layer.commitment_weight for layer in layers])
                chosen = chosen.unbind(-1)
            for depth, layer in enumerate(layers):
                book = layer.book
                search_in = book.prepare(residual)
                if beam_terms is None:
                    if training and book.kmeans_pending:
                        # (a dropped depth too, in a deferred call: its residual is there)
                        book.initialize(search_in, ok)
                    codes_here = self.codes_at(depth, condition)
                    index = codes_here.search(search_in,
                                              temperature=self._temperature(
                                                  layer, sample_codebook_temp))
                    q = codes_here.lookup(index).to(residual.dtype)
                else:
                    index = chosen[depth]
                    q = book.lookup(index).to(residual.dtype)
                if self.implicit_neural_codebook:
                    condition = q if condition is None else condition + q
                next_residual = residual - q
                # the search input's error: the next residual itself unless it was normalised
                diff = (next_residual if search_in is residual else search_in - q).reshape(-1)
                sq.append(torch.dot(diff, diff))
                if depth == 0 and ok is None and not bool(torch.isfinite(sq[0])):
                    check_finite(h)  # raises before any codebook update
                    raise too_large_to_square(h)
                residuals.append(search_in)
                afters.append(next_residual)
                qs.append(q)
                codes.append(index)
                residual = next_residual
            if update:
                self._update(layers, residuals, codes, ok, depth_mask)

        out, losses = self._differentiable(h, layers, residuals, afters, qs, codes, sq,
                                           eval_losses=beam_terms is not None,
                                           depth_mask=depth_mask)
        if ok is not None:
            # a deferred call cannot raise: rows of non-finite (or too large) input come out
            # NaN instead of as valid-looking codes
            out = out + unusable_rows_as_nan(h)
        return out, torch.stack(codes, dim=-1), losses, None

    def _forward_layers(self, h, layers, sample_codebook_temp, freeze_codebook,
                        depth_mask=None):
        """Each depth through its layer's forward (the layer owns its losses and updates):
        ``r_{l+1} = r_l − frac(q̃_l)``, the output ``Σ_l q̃_l``."""
        if depth_mask is not None:
            raise QuantizerInputError(
                "quantize dropout decided on the device (deferred or compiled calls) needs the "
                "codebook path of the residual stack; the layer options "
                "that make each depth call its layer's forward do not allow it. Pass "
                "rand_quantize_dropout_fixed_seed (an int), or use immediate checks eagerly")
        call = {}
        if sample_codebook_temp is not None:
            call["sample_codebook_temp"] = sample_codebook_temp
        if freeze_codebook:
            call["freeze_codebook"] = True
        residual, out, codes, losses = h, None, [], []
        frac = self.quant_grad_frac
        for depth, layer in enumerate(layers):
            q, index, loss = layer(residual, **call)[:3]
            codes.append(index)
            losses.append(loss.reshape(()) if self.training else loss.new_zeros(()))
            out = q if out is None else out + q
            if depth + 1 < len(layers):
                residual = residual - (q.detach() if frac <= 0
                                       else frac * q + (1 - frac) * q.detach())
        return out, torch.stack(codes, dim=-1), torch.stack(losses).float(), None

    def _update(self, layers, residuals, codes, ok=None, depth_mask=None) -> None:
        if ok is not None:
            self._update_deferred(layers, residuals, codes, ok, depth_mask)
            return
        if not self.shared_codebook:
            for layer, rows, index in zip(layers, residuals, codes, strict=True):
                book = layer.book
                book.update(book.statistics(rows, index) if book.is_ema else None, rows)
            return
        book = layers[0].book
        if not book.is_ema:
            book.update(None, lambda: torch.cat(residuals))
            return
        # One EMA step per depth of the statistics (cs <- d·cs + (1-d)·n_l, in depth order)
        # equals one step of decay d^L with the depths' statistics weighted
        # (1-d)·d^(L-1-l) / (1-d^L); the codes are then recomputed once.
        decay, count = book.decay, len(layers)
        total = 1.0 - decay ** count
        statistics = None
        for depth, (rows, index) in enumerate(zip(residuals, codes, strict=True)):
            weight = (1.0 - decay) * decay ** (count - 1 - depth) / total
            stats = book.statistics(rows, index)
            stats = CodeStatistics(stats.counts * weight, stats.sums * weight)
            statistics = stats if statistics is None else statistics.add_(stats)
        book.decay = decay ** count
        try:
            book.update(statistics, lambda: torch.cat(residuals))
        finally:
            book.decay = decay

    def _update_deferred(self, layers, residuals, codes, ok: Tensor,
                         depth_mask: Tensor | None) -> None:
        """:meth:`_update` decided on the device: depth ``l`` changes only where ``ok`` and
        ``depth_mask[l]`` are true."""
        keeps = [ok if depth_mask is None else ok & depth_mask[depth]
                 for depth in range(len(layers))]
        if not self.shared_codebook:
            for layer, rows, index, keep in zip(layers, residuals, codes, keeps, strict=True):
                book = layer.book
                book.update(book.statistics(rows, index) if book.is_ema else None, rows,
                            ok=keep)
            return
        book = layers[0].book
        rows = torch.cat(residuals)
        if depth_mask is not None:
            # the dropped depths' residuals are no candidates for a restart
            row_weight = depth_mask.repeat_interleave(residuals[0].shape[0]).to(rows.dtype)
        else:
            row_weight = None
        if not book.is_ema:
            book.update(None, rows, ok=ok, row_weight=row_weight)
            return
        # As in _update: one EMA step of decay d^A (A depths kept) with the depths' statistics
        # weighted (1-d)·d^(A-1-l) / (1-d^A); here A may be a tensor, so the step's rate
        # 1 - d^A is given as the factor (1 - d^A) / (1 - d) of the codebook's own rate 1 - d.
        decay, count = book.decay, len(layers)
        kept = count if depth_mask is None else depth_mask.sum()
        total = 1.0 - decay ** kept if decay < 1.0 else None
        statistics = None
        for depth, (rows_l, index) in enumerate(zip(residuals, codes, strict=True)):
            stats = book.statistics(rows_l, index)
            if total is None:  # decay 1: the statistics are frozen whatever they are
                weight = 0.0
            else:
                weight = (1.0 - decay) * decay ** (kept - 1 - depth) / total
                if depth_mask is not None:
                    weight = weight * depth_mask[depth]
            stats = CodeStatistics(stats.counts * weight, stats.sums * weight)
            statistics = stats if statistics is None else statistics.add_(stats)
        factor = 0.0 if total is None else total / (1.0 - decay)
        book.update(statistics, rows, factor, ok=ok, row_weight=row_weight)

    def _differentiable(self, h, layers, residuals, afters, qs, codes, sq, *, eval_losses,
                        depth_mask=None):
        """The output and per-depth losses, with their gradients; ``depth_mask`` zeroes the
        dropped depths' outputs and losses (and so their gradients)."""
        if depth_mask is None:
            return self._differentiable_inner(h, layers, residuals, afters, qs, codes, sq,
                                              eval_losses=eval_losses, keep=None)
        keep = depth_mask.to(h.dtype)
        out, losses = self._differentiable_inner(h, layers, residuals, afters, qs, codes, sq,
                                                 eval_losses=eval_losses, keep=keep)
        return out, losses * keep

    def _differentiable_inner(self, h, layers, residuals, afters, qs, codes, sq, *,
                              eval_losses, keep):
        # keep: (L,) 1 for the depths kept, 0 for those quantize dropout removed, or None
        training = self.training
        with_loss = training or eval_losses
        numel = h.numel()
        learnable = [not layer.book.is_ema for layer in layers]
        needs_graph = torch.is_grad_enabled() and (h.requires_grad or any(learnable))
        weights = [(layer.commitment_weight + (layer.codebook_weight if learn else 0.0))
                   if with_loss else 0.0 for layer, learn in zip(layers, learnable, strict=True)]
        if keep is not None:
            # masked out of the sums (the codes stay as found, so every graph stays finite)
            kept_qs = [q * keep[depth] for depth, q in enumerate(qs)]
        else:
            kept_qs = qs
        if not needs_graph:
            out = kept_qs[0].clone()
            for q in kept_qs[1:]:
                out.add_(q)
            losses = torch.stack(sq) * torch.tensor(weights, device=h.device) / numel
            return out, losses.float()
        cosine = any(layer.book.use_cosine_sim for layer in layers)
        plain = not (self.diveq or self.implicit_neural_codebook or cosine)
        rotation = any(layer.rotation_trick for layer in layers)
        if plain and (self.straight_through_sum or not (rotation or any(learnable))):
            # Straight-through layers, or the whole sum passed once: the output and the
            # commitment terms have closed-form gradients; no per-depth graph is built
            frac = self.quant_grad_frac
            factors = [1.0 if frac <= 0 or self.straight_through_sum else (1.0 - frac) ** depth
                       for depth in range(len(layers))]
            q_sum = kept_qs[0].clone()
            for q in kept_qs[1:]:
                q_sum.add_(q)
            if self.straight_through_sum and rotation:
                out, _ = quantize_residual(h, q_sum, None, q_sum.new_zeros(()),
                                           commitment_weight=0.0,
                                           rotation=layers[0].rotation_trick)
            else:
                scale = 1.0 if self.straight_through_sum else sum(factors)
                if keep is not None and not self.straight_through_sum:
                    scale = (keep * torch.tensor(factors, dtype=h.dtype,
                                                 device=h.device)).sum()
                out = _ScaledStraightThrough.apply(h, q_sum, scale)
            commitment = torch.tensor([layer.commitment_weight if with_loss else 0.0
                                       for layer in layers], device=h.device, dtype=h.dtype)
            losses = _DepthLosses.apply(h, commitment, torch.tensor(factors, dtype=h.dtype,
                                                                    device=h.device), *afters)
            if any(learnable) and with_loss:
                # each learnable code moves toward the residuals it got: cbw · mse(sg(r_l), q_l)
                losses = losses + torch.stack([
                    layer.codebook_weight * F.mse_loss(layer.book.lookup(index).to(h.dtype), r)
                    if learn else h.new_zeros(())
                    for layer, learn, index, r in zip(layers, learnable, codes, residuals,
                                                      strict=True)])
            return out, losses.float()
        residual, out, losses = h, None, []
        frac = self.quant_grad_frac
        for depth, layer in enumerate(layers):
            book = layer.book
            search_in = book.prepare(residual)
            q = self.codes_at(depth, out).lookup(codes[depth]).to(h.dtype) if learnable[depth] \
                else qs[depth]
            if self.diveq:
                out_l, loss_l = q, q.new_zeros(())
            else:
                out_l, loss_l = quantize(
                    search_in, q, rotation=layer.rotation_trick,
                    commitment_weight=layer.commitment_weight if with_loss else 0.0,
                    codebook_weight=layer.codebook_weight if learnable[depth] and with_loss
                    else 0.0)
            losses.append(loss_l)
            if keep is not None:
                out_l = out_l * keep[depth]
            out = out_l if out is None else out + out_l
            if depth + 1 < len(layers):
                step = out_l.detach() if frac <= 0 else frac * out_l + (1 - frac) * out_l.detach()
                residual = residual - step
        if self.diveq:
            out = _directional_reparam(h, out)
        return out, torch.stack(losses).float()

    # ------------------------------------------------------------------ teacher forcing

    def cross_entropy(self, x: Tensor, indices, *, mask: Tensor | None = None):
        """``(quantized, Σ_l CE_l)`` for given codes ``(..., L)`` (or a list of ``(...)``): layer
        ``l`` scores the residual the given codes of the layers before it left, with logits
        ``−||r_l − c||`` (Euclidean distance; cosine similarity with ``use_cosine_sim``)."""
        check_input(x, self.dim)
        if isinstance(indices, (list, tuple)):
            indices = torch.stack(list(indices), dim=-1)
        _check_indices(indices, self.codebook_sizes, "(..., num_quantizers)")
        if tuple(indices.shape[:-1]) != tuple(x.shape[:-1]):
            raise QuantizerInputError(f"indices must have shape {tuple(x.shape[:-1])} + (L,), "
                                      f"got {tuple(indices.shape)}")
        if bool((indices < 0).any()):
            raise QuantizerInputError("indices hold -1 (a dropped depth): teacher forcing "
                                      "needs the codes of every depth")
        residual = self.project_in(x.reshape(-1, self.dim))
        target = indices.reshape(-1, indices.shape[-1]).long()
        if mask is not None:
            target = target.masked_fill(~mask.reshape(-1, 1), -100)
        total, ce = None, residual.new_zeros(())
        for depth in range(indices.shape[-1]):
            book = self.layers[depth].book
            codes_here = self.codes_at(depth, total)
            codes = codes_here.codes if isinstance(codes_here, ConditionedCodes) \
                else book.vectors()[0]  # (N, K, d) per row, or (K, d)
            if book.use_cosine_sim:
                logits = (book.prepare(residual).unsqueeze(-2) * codes).sum(-1)
            elif codes.ndim == 3:
                logits = -(residual.unsqueeze(1) - codes).norm(dim=-1)
            else:
                logits = -torch.cdist(residual, codes)
            ce = ce + F.cross_entropy(logits, target[:, depth], ignore_index=-100)
            code = codes_here.lookup(target[:, depth].clamp(min=0))
            residual = residual - code
            total = code if total is None else total + code
        quantized = self.project_out(total).reshape(x.shape)
        return quantized, ce

    # ------------------------------------------------------------------ from indices

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """``(..., L')`` codes (``L' ≤ num_quantizers``; ``-1`` and missing depths give zero
        vectors) to ``(num_quantizers, ..., codebook_dim)``, before ``project_out``."""
        codes = self._layer_code_list(indices)
        zeros = torch.zeros_like(codes[0])
        codes += [zeros] * (self.num_quantizers - len(codes))
        return torch.stack(codes)

    def decode(self, indices: Tensor) -> Tensor:
        """``(..., L')`` codes, ``1 <= L' <= num_quantizers``, to ``(..., dim)`` vectors: the
        sum of the depths' codes (``-1`` adds nothing), projected back. With every depth it
        equals ``quantized`` of an eval call that produced ``indices``, bit for bit."""
        total = None
        for code in self._layer_code_list(indices):
            total = code if total is None else total.add_(code)
        out = self.project_out(total)
        return out.movedim(-1, 1) if self.accept_image_fmap else out

    get_output_from_indices = decode

    def layer_codes(self, indices: Tensor) -> Tensor:
        """Each depth's code vector: ``(..., L)`` codes to ``(..., L, codebook_dim)``."""
        return torch.stack(self._layer_code_list(indices), dim=-2)

    def partial_reconstructions(self, indices: Tensor) -> Tensor:
        """Reconstructions from the first ``1, 2, …, L`` depths: ``(..., L)`` codes to
        ``(..., L, dim)``."""
        partial, total = [], None
        for code in self._layer_code_list(indices):
            total = code if total is None else total + code
            partial.append(self.project_out(total))
        return torch.stack(partial, dim=-2)

    def _layer_code_list(self, indices: Tensor) -> list[Tensor]:
        _check_indices(indices, self.codebook_sizes, "(..., num_quantizers)")
        depth_count = indices.shape[-1]
        if not 1 <= depth_count <= self.num_quantizers:
            raise QuantizerInputError(
                f"indices must have 1 to num_quantizers={self.num_quantizers} codes on their last "
                f"axis, got shape {tuple(indices.shape)}")
        indices = indices.long()
        dropped = bool((indices < 0).any()) if indices.numel() else False
        codes, total = [], None
        for depth in range(depth_count):
            index = indices[..., depth]
            book = self.layers[depth].book
            if self.implicit_neural_codebook and depth > 0:
                flat = self.codes_at(depth, total.reshape(-1, total.shape[-1])).lookup(
                    index.reshape(-1).clamp(min=0))
                code = flat.reshape(*index.shape, -1)
            else:
                code = book.lookup(index.clamp(min=0) if dropped else index)
            if dropped:
                code = code.masked_fill((index < 0).unsqueeze(-1), 0.0)
            codes.append(code)
            if self.implicit_neural_codebook:
                total = code if total is None else total + code
        return codes


def _directional_reparam(x: Tensor, q: Tensor, variance: float = 5e-3) -> Tensor:
    """DiVeQ: ``x + sg(unit(q − x + √s·ε)) · ||q − x||``: the value is (nearly) ``q``; ``x`` and
    the codes get the gradient along the error's direction."""
    error = q - x
    noised = F.normalize((error + variance ** 0.5 * torch.randn_like(error)).detach(), dim=-1)
    return x + noised * error.norm(dim=-1, keepdim=True)


def _fill_shared_layers(module: ResidualVQ, state: dict, prefix: str, *args) -> None:
    """Older checkpoints of a shared codebook hold only ``layers.0``: every layer aliases it."""
    first = f"{prefix}layers.0."
    for key in [k for k in state if k.startswith(first)]:
        for depth in range(1, module.num_quantizers):
            state.setdefault(f"{prefix}layers.{depth}.{key[len(first):]}", state[key])


class GroupedResidualVQ(nn.Module):
    """A :class:`ResidualVQ` per group of features (HiFi-Codec's group-residual VQ).

    A drop-in for ``vector_quantize_pytorch.GroupedResidualVQ``: ``x`` ``(..., dim)`` is split
    along its last axis (axis 1 with ``accept_image_fmap``) into ``groups`` equal parts, part
    ``g`` goes to ``rvqs[g]``. Returns ``(quantized, indices (groups, ..., L), losses (groups,
    L))`` (and with ``return_all_codes`` a tuple of each group's ``(L, ..., dim / groups)``).
    Under quantize dropout every group skips the same depths in a call.
    """

    def __init__(self, dim: int, codebook_size=None, num_quantizers: int | None = None, *,
                 groups: int = 1, accept_image_fmap: bool = False, **residual_options):
        super().__init__()
        require(isinstance(groups, int) and groups >= 1,
                f"groups must be a positive int, got {groups!r}")
        require(isinstance(dim, int) and dim >= 1 and dim % groups == 0,
                f"dim={dim!r} must be a positive multiple of groups={groups}")
        self.dim = dim
        self.groups = groups
        self.group_dim = dim // groups
        self.accept_image_fmap = accept_image_fmap
        self.rvqs = nn.ModuleList(
            ResidualVQ(self.group_dim, codebook_size, num_quantizers,
                       accept_image_fmap=accept_image_fmap, **residual_options)
            for _ in range(groups))
        self.codebook_size = self.rvqs[0].codebook_size
        self.num_quantizers = self.rvqs[0].num_quantizers

    def extra_repr(self) -> str:
        return f"dim={self.dim}, groups={self.groups}"

    @property
    def codebooks(self) -> Tensor:
        """``(groups, num_quantizers, K, dim / groups)``."""
        return torch.stack([rvq.codebooks for rvq in self.rvqs])

    def forward(self, x: Tensor, indices=None, return_all_codes: bool = False,
                sample_codebook_temp: float | None = None, freeze_codebook: bool = False,
                mask: Tensor | None = None):
        axis = 1 if self.accept_image_fmap else -1
        if not self.accept_image_fmap:
            check_input(x, self.dim)
        elif not isinstance(x, Tensor) or x.ndim != 4 or x.shape[axis] != self.dim:
            raise QuantizerInputError(f"x must have {self.dim} features on axis {axis}, got "
                                      f"{describe(x)}")
        parts = x.split(self.group_dim, dim=axis)
        if indices is not None:
            outs = [rvq(part, indices=index, mask=mask)
                    for rvq, part, index in zip(self.rvqs, parts, indices, strict=True)]
            return torch.cat([o[0] for o in outs], dim=axis), sum(o[1] for o in outs)
        deferred = guard.deferred(x)
        ok = None
        if deferred and self.training:
            ok = guard.usable(x)  # one verdict for every group: all update, or none
        elif self.training and self.groups > 1 and x.numel() \
                and not bool(torch.isfinite(x).all()):
            check_finite(x)  # checked here: an earlier group would already have updated
        seed = None
        if self.training and self.rvqs[0].quantize_dropout:
            # one draw for every group; kept on the device in a deferred call
            seed = self.rvqs[0]._dropout_seed_tensor(x.device) if deferred \
                else self.rvqs[0].dropout_seed()
        outs = [rvq._forward(part.movedim(1, -1) if self.accept_image_fmap else part,
                             mask=mask, return_all_codes=return_all_codes,
                             sample_codebook_temp=sample_codebook_temp,
                             freeze_codebook=freeze_codebook, beam_size=None, seed=seed, ok=ok)
                for rvq, part in zip(self.rvqs, parts, strict=True)]
        quantized = torch.cat([o[0] for o in outs], dim=axis)
        result = (quantized, torch.stack([o[1] for o in outs]), torch.stack([o[2] for o in outs]))
        if return_all_codes:
            return (*result, tuple(o[3] for o in outs))
        return VQOutput(*result)

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """``(groups, ..., L)`` codes to ``(groups, L, ..., dim / groups)``."""
        return torch.stack([rvq.get_codes_from_indices(part) for rvq, part in
                            self._split(indices)])

    def decode(self, indices: Tensor) -> Tensor:
        """``(groups, ..., L)`` codes to ``(..., dim)``; see :meth:`ResidualVQ.decode`."""
        axis = 1 if self.accept_image_fmap else -1
        return torch.cat([rvq.decode(part) for rvq, part in self._split(indices)], dim=axis)

    get_output_from_indices = decode

    def layer_codes(self, indices: Tensor) -> Tensor:
        """``(groups, ..., L)`` codes to ``(groups, ..., L, dim / groups)``."""
        return torch.stack([rvq.layer_codes(part) for rvq, part in self._split(indices)])

    def partial_reconstructions(self, indices: Tensor) -> Tensor:
        """``(groups, ..., L)`` codes to ``(..., L, dim)``: the first ``1, …, L`` depths of
        every group."""
        return torch.cat([rvq.partial_reconstructions(part)
                          for rvq, part in self._split(indices)], dim=-1)

    def _split(self, indices: Tensor):
        if isinstance(indices, Tensor) and indices.ndim >= 2 and indices.shape[0] == self.groups:
            return zip(self.rvqs, indices.unbind(dim=0), strict=True)
        raise QuantizerInputError(
            f"indices must have shape (groups={self.groups}, ..., num_quantizers), got "
            f"{describe(indices)}")


def _check_indices(indices: object, codebook_sizes: tuple[int, ...], layout: str) -> None:
    if not isinstance(indices, Tensor) or indices.dtype.is_floating_point \
            or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise QuantizerInputError(
            f"indices must be an integer tensor of shape {layout}, got {describe(indices)}")
    if indices.ndim < 1:
        raise QuantizerInputError(f"indices must have shape {layout}, got a 0-d tensor")
    if not indices.numel():
        return
    for depth in range(min(indices.shape[-1], len(codebook_sizes))):
        column = indices[..., depth]
        low, high = int(column.min()), int(column.max())
        if low < DROPPED or high >= codebook_sizes[depth]:
            raise QuantizerInputError(
                f"indices of depth {depth} must lie in [0, {codebook_sizes[depth]}) (or be "
                f"{DROPPED} for a dropped depth), got values in [{low}, {high}]")
