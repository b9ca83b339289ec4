"""Residual vector quantization, built by composing :class:`VectorQuantize` layers.

- :class:`ResidualVQ` (SoundStream, Zeghidour et al., 2021, arXiv 2107.03312, Algorithm 1):
  ``num_quantizers`` layers in sequence, each quantizing what the previous ones left,
  ``r_1 = x``, ``q_l = Q_l(r_l)``, ``r_{l+1} = r_l - q_l``; the output is ``Σ_l q_l``.
- RQ-VAE (Lee et al., 2022, arXiv 2203.01941) is a :class:`ResidualVQ` with
  ``shared_codebook=True`` (every depth uses one codebook) and ``stochastic_sample_codes=True``
  (in training, codes are sampled from ``softmax(-distance / sample_codebook_temp)``).
- :class:`GroupedResidualVQ` (HiFi-Codec, Yang et al., 2023, arXiv 2305.02765): the feature axis
  is split into ``groups`` and each group has its own :class:`ResidualVQ`.

Code layouts (last axes of ``indices``)::

    ResidualVQ          x (..., dim) -> indices (..., num_quantizers)
    GroupedResidualVQ   x (..., dim) -> indices (..., groups, num_quantizers)

``indices[..., l]`` is the code of depth ``l`` (0 = coarsest). ``-1`` marks a depth that a
training call skipped (quantize dropout); it never appears in eval mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import distributed
from .checks import QuantizerInputError, check_finite, check_input, describe, require
from .codebook import CodeStatistics
from .estimators import quantize_residual
from .vector_quantize import VectorQuantize, VQOutput

#: Options of :class:`VectorQuantize` that a residual quantizer passes to its layers.
LAYER_OPTIONS = frozenset({
    "decay", "eps", "commitment_weight", "codebook_weight", "kmeans_init", "kmeans_iters",
    "threshold_ema_dead_code", "dead_code_warmup_steps", "rotation_trick",
    "stochastic_sample_codes",
    "sample_codebook_temp", "sync_codebook", "max_search_bytes", "codebook_init",
})
#: The layers' defaults of this residual quantizer (straight-through, N(0, 1) codes), where
#: VectorQuantize's own follow the reference library.
LAYER_DEFAULTS = {"rotation_trick": False, "codebook_init": "normal"}

DROPPED = -1  # the index of a depth a training call did not use (quantize dropout)


class ResidualVQ(nn.Module):
    """Residual vector quantizer: ``num_quantizers`` :class:`VectorQuantize` layers in sequence.

    Tensor contract: ``x`` is ``(..., dim)``, channels last. The result is a :class:`VQOutput`
    ``(quantized, indices, loss)``: ``quantized`` has ``x``'s shape and dtype and is the sum of
    the layers' codes; ``indices`` is int64 of shape ``(..., num_quantizers)``; ``loss`` is a
    float32 scalar, the **mean** over the layers used of each layer's loss (as ``VectorQuantize``
    defines it, on the residual that layer quantized).

    Why the mean: the loss, and the pull of the commitment term on the encoder, then keep the
    scale of one ``VectorQuantize`` whatever the depth, so a ``commitment_weight`` tuned for one
    layer carries over, and under quantize dropout the loss does not jump with the number of
    layers a step used. (Summed, the terms multiply the commitment with depth, and it slows the
    autoencoder: on the course's MLP VQ-VAE after one epoch, test MSE 0.044 with 4 summed
    layers, 0.036 with 4 averaged ones, 0.033 with no quantizer.) RQ-VAE's sum over depths is
    the mean with ``commitment_weight · num_quantizers``.

    Gradients: ``quantized`` passes its gradient to ``x`` once, straight through from ``x`` to the
    whole sum (or by the rotation trick from ``x`` to the sum, with ``rotation_trick=True``), as
    if one quantizer had produced it. The commitment term of layer ``l`` moves ``x`` toward
    ``q_1 + … + q_l`` (the earlier codes are held constant in ``r_l``).

    Args:
        dim: size of the last axis of the input.
        codebook_size: codes per codebook.
        num_quantizers: layers (depths). Each has its own codebook unless ``shared_codebook``.
        shared_codebook: one codebook for every depth (RQ-VAE). It is one tensor, held by one
            :class:`VectorQuantize` (its :class:`~vqvae.quantizers.codebook.Codebook`); with an
            EMA codebook the statistics of all depths are added
            up and the codebook is updated once per training call, after every depth has
            searched it. k-means initialisation (if enabled) runs on the first depth's input, the
            only vectors there are before any code exists; dead codes are restarted from the
            residuals of all depths.
        quantize_dropout: in training, use only the first ``n`` layers, ``n`` drawn uniformly from
            ``[quantize_dropout_min_layers, num_quantizers]`` once per call (per batch, as the
            library does; SoundStream draws per example), so that the first layers alone learn to
            decode well. Skipped depths get index ``-1``. Eval always uses every layer.
        quantize_dropout_min_layers: the fewest layers a training call uses (>= 1).
        codebook_dim: quantize in a space of this size: ``Linear(dim, codebook_dim)`` before the
            first layer, ``Linear(codebook_dim, dim)`` after the sum. Default: ``dim``.
        **layer_options: options of every layer's :class:`VectorQuantize` (see
            :data:`LAYER_OPTIONS`): ``decay``, ``commitment_weight``, ``kmeans_init``,
            ``threshold_ema_dead_code``, ``stochastic_sample_codes``, ``sample_codebook_temp``, …
            k-means initialisation runs per layer on the residuals that layer sees.

    Stochastic sampling (``stochastic_sample_codes=True``): in training, each depth samples its
    code from ``softmax(-d / sample_codebook_temp)`` with ``d`` the Euclidean distance (as
    ``torch.cdist``, not squared) between its residual and each code; this is the library's
    choice (RQ-VAE's paper writes the squared distance, which changes what a temperature means).
    ``sample_codebook_temp=0`` is the nearest code. Eval always takes the nearest code.

    Cosine-similarity search is refused: it discards the norm that the next depth must quantize.

    State lives in the layers' buffers (and ``nn.Parameter`` for a learnable codebook); eval
    calls leave it bit-identical. A batch with NaN or Inf raises :class:`QuantizerInputError`
    before any codebook changes.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        num_quantizers: int,
        *,
        shared_codebook: bool = False,
        quantize_dropout: bool = False,
        quantize_dropout_min_layers: int = 1,
        codebook_dim: int | None = None,
        **layer_options,
    ):
        super().__init__()
        require(isinstance(dim, int) and dim >= 1, f"dim must be a positive int, got {dim!r}")
        require(isinstance(num_quantizers, int) and num_quantizers >= 1,
                 f"num_quantizers must be a positive int, got {num_quantizers!r}")
        require(isinstance(quantize_dropout_min_layers, int)
                 and 1 <= quantize_dropout_min_layers <= num_quantizers,
                 f"quantize_dropout_min_layers must be an int in [1, num_quantizers="
                 f"{num_quantizers}], got {quantize_dropout_min_layers!r}")
        require(codebook_dim is None or (isinstance(codebook_dim, int) and codebook_dim >= 1),
                 f"codebook_dim must be None or a positive int, got {codebook_dim!r}")
        require(not layer_options.get("use_cosine_sim", False),
                 "use_cosine_sim is not supported by residual quantizers: each depth would "
                 "quantize the direction of its residual and lose the norm the next depth needs")
        layer_options.pop("use_cosine_sim", None)
        unknown = sorted(set(layer_options) - LAYER_OPTIONS)
        require(not unknown, f"unknown option(s) {unknown}; a residual quantizer takes "
                              f"shared_codebook, quantize_dropout, quantize_dropout_min_layers, "
                              f"codebook_dim and the layer options {sorted(LAYER_OPTIONS)}")

        self.dim = dim
        self.codebook_size = codebook_size
        self.num_quantizers = num_quantizers
        self.codebook_dim = codebook_dim or dim
        self.shared_codebook = shared_codebook
        self.quantize_dropout = quantize_dropout
        self.quantize_dropout_min_layers = quantize_dropout_min_layers

        has_projection = self.codebook_dim != dim
        self.project_in = nn.Linear(dim, self.codebook_dim) if has_projection else nn.Identity()
        self.project_out = nn.Linear(self.codebook_dim, dim) if has_projection else nn.Identity()
        # A shared codebook is one layer used at every depth: one tensor, one set of EMA buffers
        count = 1 if shared_codebook else num_quantizers
        self.layers = nn.ModuleList(
            VectorQuantize(self.codebook_dim, codebook_size, **{**LAYER_DEFAULTS,
                                                                **layer_options})
            for _ in range(count))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, codebook_size={self.codebook_size}, "
                f"num_quantizers={self.num_quantizers}, shared_codebook={self.shared_codebook}, "
                f"quantize_dropout={self.quantize_dropout}")

    def layer_at(self, depth: int) -> VectorQuantize:
        """The :class:`VectorQuantize` that quantizes depth ``depth`` (0-based)."""
        if not 0 <= depth < self.num_quantizers:
            raise IndexError(f"depth must be in [0, {self.num_quantizers}), got {depth}")
        return self.layers[0 if self.shared_codebook else depth]

    @property
    def codebooks(self) -> tuple[Tensor, ...]:
        """The codebook of each depth, ``num_quantizers`` tensors of ``(codebook_size,
        codebook_dim)``; with ``shared_codebook`` they are all the same tensor."""
        return tuple(self.layer_at(depth).codebook for depth in range(self.num_quantizers))

    # ------------------------------------------------------------------ forward

    def forward(self, x: Tensor) -> VQOutput:
        return self.quantize(x, self.active_layers())

    def active_layers(self) -> int:
        """How many layers this call uses: all of them, or a random number under dropout."""
        if not (self.training and self.quantize_dropout):
            return self.num_quantizers
        # torch's generator, so a run's checkpointed RNG state covers it
        active = torch.randint(self.quantize_dropout_min_layers, self.num_quantizers + 1, (1,))
        first = self.layers[0]
        if distributed.should_sync(first.sync_codebook):
            # every process must run the same layers: their EMA updates all-reduce
            active = distributed.broadcast(active.to(first.codebook.device), src=0)
        return int(active)

    def quantize(self, x: Tensor, active: int) -> VQOutput:
        """:meth:`forward` with the first ``active`` layers (``1 <= active <= num_quantizers``)
        instead of a number drawn by :meth:`active_layers`."""
        check_input(x, self.dim)
        if not (isinstance(active, int) and 1 <= active <= self.num_quantizers):
            raise ValueError(f"active must be an int in [1, num_quantizers="
                             f"{self.num_quantizers}], got {active!r}")
        shape = x.shape
        flat = x.reshape(-1, self.dim)  # (N, dim)
        if flat.shape[0] == 0:
            empty = torch.empty((*shape[:-1], self.num_quantizers), dtype=torch.long,
                                device=x.device)
            return VQOutput(x.clone(), empty, x.sum().float() * 0.0)

        h = self.project_in(flat)  # (N, codebook_dim)
        first = self.layers[0]
        h = first.book.prepare(h)  # float32 from half precision (cosine search is refused)
        training = self.training
        grad_to_input = torch.is_grad_enabled() and h.requires_grad
        commitment_grad = grad_to_input and first.commitment_weight > 0
        learnable = not first.is_ema
        # Residuals are kept only where something needs them after the loop
        keep_inputs = learnable or (self.shared_codebook and training
                                    and first.threshold_ema_dead_code > 0)

        codes: list[Tensor] = []  # (N,) per depth
        inputs: list[Tensor] = []  # (N, codebook_dim) residual each depth quantized
        shared_stats: CodeStatistics | None = None  # summed over all depths
        with torch.no_grad():
            residual = h.detach()
            q_sum = residual_sum = sq_sum = None
            for depth in range(active):
                layer = self.layer_at(depth)
                book = layer.book
                if training and book.kmeans_pending:
                    book.initialize(residual)
                index = book.search(residual, temperature=layer.search_temperature)  # (N,)
                q = book.lookup(index).to(residual.dtype)
                next_residual = residual - q
                flat_next = next_residual.reshape(-1)
                sq = torch.dot(flat_next, flat_next)  # ||r_{l+1}||², the layer's loss · numel
                if depth == 0 and not bool(torch.isfinite(sq)):
                    check_finite(h)  # raises before any codebook update
                if training:
                    stats = book.statistics(residual, index) if book.is_ema else None
                    if not self.shared_codebook:
                        book.update(stats, residual)
                    elif stats is not None:
                        shared_stats = stats if shared_stats is None else shared_stats.add_(stats)
                codes.append(index)
                if keep_inputs:
                    inputs.append(residual)
                # Σ q_l in depth order: decode() adds in the same order, so the bits agree
                q_sum = q if q_sum is None else q_sum.add_(q)
                sq_sum = sq if sq_sum is None else sq_sum + sq
                if commitment_grad:
                    residual_sum = next_residual if residual_sum is None \
                        else residual_sum + next_residual
                residual = next_residual

            if training and self.shared_codebook:
                # one update of the one codebook, from the statistics of every depth
                first.book.update(shared_stats, lambda: torch.cat(inputs))

        weight = first.commitment_weight / active  # the mean over the layers used
        if grad_to_input:
            out, loss = quantize_residual(h, q_sum, residual_sum, sq_sum,
                                          commitment_weight=weight,
                                          rotation=first.rotation_trick)
        else:
            out, loss = q_sum, sq_sum * (weight / h.numel())
        if learnable and first.codebook_weight > 0:
            loss = loss + first.codebook_weight / active * self._codebook_term(codes, inputs,
                                                                               sq_sum)

        if isinstance(self.project_out, nn.Linear):
            out = self.project_out(out.to(self.project_out.weight.dtype))
        quantized = out.reshape(shape).to(x.dtype)
        indices = torch.stack(codes, dim=-1)  # (N, active)
        if active < self.num_quantizers:
            padded = indices.new_full((indices.shape[0], self.num_quantizers), DROPPED)
            padded[:, :active] = indices
            indices = padded
        return VQOutput(quantized, indices.reshape(*shape[:-1], self.num_quantizers),
                        loss.float())

    def _codebook_term(self, codes: list[Tensor], inputs: list[Tensor], sq_sum: Tensor) -> Tensor:
        """``Σ_l mse(sg(r_l), q_l)``: moves each learnable code toward the residuals it got."""
        if not (torch.is_grad_enabled() and self.layers[0].codebook.requires_grad):
            return sq_sum / inputs[0].numel()  # the same value, without building a graph
        terms = [F.mse_loss(self.layer_at(depth).book.lookup(index), residual, reduction="sum")
                 for depth, (index, residual) in enumerate(zip(codes, inputs, strict=True))]
        return torch.stack(terms).sum() / inputs[0].numel()

    # ------------------------------------------------------------------ from indices

    def decode(self, indices: Tensor) -> Tensor:
        """``(..., L)`` codes, ``1 <= L <= num_quantizers``, to ``(..., dim)`` vectors.

        The sum of the first ``L`` layers' codes (``-1`` entries add nothing), projected back
        when ``codebook_dim`` is set. With all layers it equals ``quantized`` of an eval-mode
        call that produced ``indices``, bit for bit; fewer layers give a coarser reconstruction.
        """
        total = None
        for code in self._layer_code_list(indices):
            total = code if total is None else total.add_(code)
        return self.project_out(total)

    # Name used by vector_quantize_pytorch.
    get_output_from_indices = decode

    def layer_codes(self, indices: Tensor) -> Tensor:
        """Each layer's code vector: ``(..., L)`` codes to ``(..., L, codebook_dim)``, in the
        space the layers quantize (before ``project_out``). Dropped depths (``-1``) are zeros."""
        return torch.stack(self._layer_code_list(indices), dim=-2)

    def partial_reconstructions(self, indices: Tensor) -> Tensor:
        """Reconstructions from the first ``1, 2, …, L`` layers: ``(..., L)`` codes to
        ``(..., L, dim)``. Entry ``l`` is ``decode(indices[..., :l + 1])``, so the last one is the
        full ``quantized`` in eval mode."""
        partial, total = [], None
        for code in self._layer_code_list(indices):
            total = code if total is None else total + code
            partial.append(self.project_out(total))
        return torch.stack(partial, dim=-2)

    def _layer_code_list(self, indices: Tensor) -> list[Tensor]:
        _check_indices(indices, self.codebook_size, "(..., num_quantizers)")
        depth_count = indices.shape[-1]
        if not 1 <= depth_count <= self.num_quantizers:
            raise QuantizerInputError(
                f"indices must have 1 to num_quantizers={self.num_quantizers} codes on their last "
                f"axis, got shape {tuple(indices.shape)}")
        indices = indices.long()
        dropped = bool((indices < 0).any()) if indices.numel() else False
        codes = []
        for depth in range(depth_count):
            index = indices[..., depth]
            book = self.layer_at(depth).book
            if dropped:
                code = book.lookup(index.clamp(min=0))
                codes.append(code.masked_fill((index < 0).unsqueeze(-1), 0.0))
            else:
                codes.append(book.lookup(index))
        return codes


class GroupedResidualVQ(nn.Module):
    """A :class:`ResidualVQ` per group of features (HiFi-Codec's group-residual VQ).

    ``x`` ``(..., dim)`` is split along its last axis into ``groups`` equal parts,
    ``x[..., g·dim/groups : (g+1)·dim/groups]`` goes to ``rvqs[g]``, and the outputs are
    concatenated in the same order. Returns :class:`VQOutput` ``(quantized, indices, loss)``:
    ``indices`` is int64 ``(..., groups, num_quantizers)`` (``indices[..., g, l]`` = group ``g``,
    depth ``l``); ``loss`` is the **mean** over groups of each group's loss (itself a mean over
    depths): the mean over all codebooks, and the loss a :class:`ResidualVQ` over the whole
    ``dim`` would report for the same residuals, whatever the number of groups.

    Under quantize dropout every group uses the same number of layers in a call. Other options
    are those of :class:`ResidualVQ` and apply to every group.
    """

    def __init__(self, dim: int, codebook_size: int, num_quantizers: int, *, groups: int,
                 **residual_options):
        super().__init__()
        require(isinstance(groups, int) and groups >= 1,
                 f"groups must be a positive int, got {groups!r}")
        require(isinstance(dim, int) and dim >= 1 and dim % groups == 0,
                 f"dim={dim!r} must be a positive multiple of groups={groups}")
        self.dim = dim
        self.groups = groups
        self.group_dim = dim // groups
        self.codebook_size = codebook_size
        self.num_quantizers = num_quantizers
        self.rvqs = nn.ModuleList(
            ResidualVQ(self.group_dim, codebook_size, num_quantizers, **residual_options)
            for _ in range(groups))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, groups={self.groups}"

    def forward(self, x: Tensor) -> VQOutput:
        check_input(x, self.dim)
        if self.training and self.groups > 1 and x.numel() and not bool(torch.isfinite(x).all()):
            # checked here, not per group: an earlier group would already have updated
            check_finite(x)
        active = self.rvqs[0].active_layers()
        outs = [rvq.quantize(part, active)
                for rvq, part in zip(self.rvqs, x.split(self.group_dim, dim=-1), strict=True)]
        quantized = torch.cat([out.quantized for out in outs], dim=-1)
        indices = torch.stack([out.indices for out in outs], dim=-2)  # (..., G, L)
        loss = torch.stack([out.loss for out in outs]).mean()
        return VQOutput(quantized, indices, loss)

    def decode(self, indices: Tensor) -> Tensor:
        """``(..., groups, L)`` codes to ``(..., dim)``; see :meth:`ResidualVQ.decode`."""
        return torch.cat([rvq.decode(part) for rvq, part in self._split(indices)], dim=-1)

    get_output_from_indices = decode

    def layer_codes(self, indices: Tensor) -> Tensor:
        """``(..., groups, L)`` codes to ``(..., groups, L, dim / groups)``."""
        return torch.stack([rvq.layer_codes(part) for rvq, part in self._split(indices)], dim=-3)

    def partial_reconstructions(self, indices: Tensor) -> Tensor:
        """``(..., groups, L)`` codes to ``(..., L, dim)``: the first ``1, …, L`` layers of
        every group."""
        return torch.cat([rvq.partial_reconstructions(part)
                          for rvq, part in self._split(indices)], dim=-1)

    def _split(self, indices: Tensor):
        _check_indices(indices, self.codebook_size, "(..., groups, num_quantizers)")
        if indices.ndim < 2 or indices.shape[-2] != self.groups:
            raise QuantizerInputError(
                f"indices must have shape (..., groups={self.groups}, num_quantizers), got "
                f"{tuple(indices.shape)}")
        return zip(self.rvqs, indices.unbind(dim=-2), strict=True)


def _check_indices(indices: object, codebook_size: int, layout: str) -> None:
    if not isinstance(indices, Tensor) or indices.dtype.is_floating_point \
            or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise QuantizerInputError(
            f"indices must be an integer tensor of shape {layout}, got {describe(indices)}")
    if indices.ndim < 1:
        raise QuantizerInputError(f"indices must have shape {layout}, got a 0-d tensor")
    if indices.numel() and (int(indices.min()) < DROPPED
                            or int(indices.max()) >= codebook_size):
        raise QuantizerInputError(
            f"indices must lie in [0, {codebook_size}) (or be {DROPPED} for a dropped depth), "
            f"got values in [{int(indices.min())}, {int(indices.max())}]")
