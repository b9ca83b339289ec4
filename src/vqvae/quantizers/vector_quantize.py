"""VectorQuantize: replace each vector by its nearest codebook entry.

The layer of the VQ-VAE (van den Oord et al., 2017), usable as a drop-in for
``vector_quantize_pytorch.VectorQuantize`` in the common case::

    vq = VectorQuantize(dim=256, codebook_size=512, decay=0.8, commitment_weight=1.0)
    quantized, indices, loss = vq(x)  # x: (..., 256)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .checks import (
    QuantizerInputError,
    check_finite,
    check_input,
    check_not_meta,
    check_optional_probability,
    check_positive_int,
    describe,
    require,
)
from .codebook import Codebook
from .estimators import quantize
from .search import DEFAULT_BLOCK_BYTES

__all__ = ["QuantizerInputError", "VQOutput", "VectorQuantize", "check_input"]

#: Buffers (and the learnable parameter) of the codebook, saved under the layer's own prefix as
#: they were before the codebook became a module of its own, so that checkpoints keep loading.
CODEBOOK_STATE = ("codebook", "cluster_size", "initialized", "steps")


class VQOutput(NamedTuple):
    quantized: Tensor  # x.shape, the code vectors (gradient reaches x by the estimator)
    indices: Tensor  # x.shape[:-1], int64 code indices
    loss: Tensor  # scalar: weighted commitment (+ codebook) loss


class _BookSetting:
    """A setting of the layer's :class:`Codebook`, read and written under the layer's name."""

    def __init__(self, name: str):
        self.name = name

    def __get__(self, layer, owner=None):
        return self if layer is None else getattr(layer.book, self.name)

    def __set__(self, layer, value) -> None:
        setattr(layer.book, self.name, value)


class VectorQuantize(nn.Module):
    """Nearest-neighbour vector quantizer with an EMA or learnable codebook.

    Tensor contract: ``x`` is ``(..., dim)``, channels last, any floating dtype. The result is a
    :class:`VQOutput` ``(quantized, indices, loss)``: ``quantized`` has ``x``'s shape and dtype,
    ``indices`` is int64 of shape ``x.shape[:-1]``, ``loss`` a float32 scalar.

    Args:
        dim: size of the last axis of the input.
        codebook_size: number of codes K.

    Codebook and its update:
        codebook_dim: quantize in a lower-dimensional space: ``Linear(dim, codebook_dim)`` before
            the search, ``Linear(codebook_dim, dim)`` after. Default: ``dim``, no projection.
        decay: a float in [0, 1) keeps the codebook as an exponential moving average of the
            vectors assigned to each code (cluster sizes and sums, Laplace-smoothed with ``eps``),
            updated in ``train()`` mode only; the codebook then gets no gradient and
            ``loss = commitment_weight · mse(x, sg(q))``. ``None`` makes the codebook an
            ``nn.Parameter`` trained by the optimiser, with
            ``loss = codebook_weight · mse(sg(x), q) + commitment_weight · mse(x, sg(q))``.
        eps: Laplace smoothing of the EMA cluster sizes.
        commitment_weight: weight of the term that moves encoder outputs toward their codes.
        codebook_weight: weight of the term that moves codes toward encoder outputs
            (learnable codebook only).

    Initialisation and code restarts:
        kmeans_init: on the first training batch, set the codebook to the k-means centroids of
            that batch (``kmeans_iters`` steps). Otherwise codes start as N(0, 1) samples.
        threshold_ema_dead_code: codes whose EMA cluster size falls below this value are moved
            onto random vectors of the current batch (EMA codebook only). 0 disables restarts.
        dead_code_warmup_steps: training calls before the first restart. Early in training the
            vectors of different positions of an untrained encoder sit in separate small
            clusters; codes restarted onto them end up serving one position each, which wastes
            the codebook. Waiting until the encoder's outputs have spread out keeps codes shared.

    Search and gradient:
        use_cosine_sim: L2-normalise vectors and codes; the nearest code is then the one of
            largest cosine similarity, and ``quantized`` holds unit vectors.
        rotation_trick: pass the gradient to ``x`` by the rotation trick (Fifty et al., 2024)
            instead of the straight-through estimator.
        stochastic_sample_codes: in training, sample each code from
            ``softmax(-distance / sample_codebook_temp)`` (Euclidean distance) instead of taking
            the nearest one; eval always takes the nearest.
        sync_codebook: all-reduce codebook statistics across processes; ``None`` does so when
            ``torch.distributed`` is initialised with more than one process.
        max_search_bytes: memory bound of one block of the distance matrix.

    The codes and their state (EMA cluster sizes, whether k-means ran, the step count) are a
    :class:`~vqvae.quantizers.codebook.Codebook`, ``self.book``; ``codebook``, ``cluster_size``,
    ``initialized`` and ``steps`` read its tensors, and ``state_dict`` keeps them under those
    names. Calls in ``eval()`` mode never change them.

    Non-finite input: a batch containing NaN or Inf raises :class:`QuantizerInputError` before
    anything is updated, so such a batch never reaches the codebook.
    """

    book: Codebook

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        *,
        codebook_dim: int | None = None,
        decay: float | None = 0.8,
        eps: float = 1e-5,
        commitment_weight: float = 1.0,
        codebook_weight: float = 1.0,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        threshold_ema_dead_code: float = 0.0,
        dead_code_warmup_steps: int = 0,
        use_cosine_sim: bool = False,
        rotation_trick: bool = False,
        stochastic_sample_codes: bool = False,
        sample_codebook_temp: float = 1.0,
        sync_codebook: bool | None = None,
        max_search_bytes: int = DEFAULT_BLOCK_BYTES,
    ):
        super().__init__()
        check_not_meta("VectorQuantize")
        check_positive_int("dim", dim)
        check_positive_int("codebook_size", codebook_size)
        check_optional_probability("decay", decay)
        require(codebook_dim is None or (isinstance(codebook_dim, int) and codebook_dim >= 1),
                f"codebook_dim must be None or a positive int, got {codebook_dim!r}")
        require(commitment_weight >= 0 and codebook_weight >= 0,
                "commitment_weight and codebook_weight must be >= 0")
        require(sample_codebook_temp >= 0,
                f"sample_codebook_temp must be >= 0, got {sample_codebook_temp!r}")

        self.dim = dim
        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim or dim
        self.commitment_weight = commitment_weight
        self.codebook_weight = codebook_weight
        self.rotation_trick = rotation_trick
        self.stochastic_sample_codes = stochastic_sample_codes
        self.sample_codebook_temp = sample_codebook_temp

        self.has_projection = self.codebook_dim != dim
        project_in = nn.Linear(dim, self.codebook_dim) if self.has_projection else nn.Identity()
        project_out = nn.Linear(self.codebook_dim, dim) if self.has_projection \
            else nn.Identity()
        # The codes are drawn after the projections' weights and the codebook is registered
        # before them, as they always were: a seeded run starts from the same values, and
        # parameters() keeps its order, which optimizer checkpoints rely on.
        self.book = Codebook(
            codebook_size, self.codebook_dim, decay=decay, eps=eps,
            use_cosine_sim=use_cosine_sim, kmeans_init=kmeans_init, kmeans_iters=kmeans_iters,
            threshold_ema_dead_code=threshold_ema_dead_code,
            dead_code_warmup_steps=dead_code_warmup_steps, sync=sync_codebook,
            max_search_bytes=max_search_bytes)
        self.project_in, self.project_out = project_in, project_out
        self.register_state_dict_post_hook(_flatten_codebook_state)
        self.register_load_state_dict_pre_hook(_nest_codebook_state)

    # The codebook's settings and tensors, under the names this layer always had
    @property
    def codebook(self) -> Tensor:
        return self.book.codebook

    @property
    def cluster_size(self) -> Tensor:
        return self.book.cluster_size

    @property
    def initialized(self) -> Tensor:
        return self.book.initialized

    @property
    def steps(self) -> Tensor:
        return self.book.steps

    @property
    def is_ema(self) -> bool:
        return self.book.is_ema

    decay = _BookSetting("decay")
    eps = _BookSetting("eps")
    kmeans_init = _BookSetting("kmeans_init")
    kmeans_iters = _BookSetting("kmeans_iters")
    threshold_ema_dead_code = _BookSetting("threshold_ema_dead_code")
    dead_code_warmup_steps = _BookSetting("dead_code_warmup_steps")
    use_cosine_sim = _BookSetting("use_cosine_sim")
    sync_codebook = _BookSetting("sync")
    max_search_bytes = _BookSetting("max_search_bytes")

    def extra_repr(self) -> str:
        update = f"decay={self.decay}" if self.is_ema else "learnable"
        return f"dim={self.dim}, codebook_size={self.codebook_size}, " \
               f"codebook_dim={self.codebook_dim}, {update}"

    @property
    def search_temperature(self) -> float | None:
        """The temperature :meth:`Codebook.search` samples with in this mode: None (nearest
        code) in eval or without stochastic sampling."""
        if self.training and self.stochastic_sample_codes:
            return self.sample_codebook_temp
        return None

    # ------------------------------------------------------------------ forward

    def forward(self, x: Tensor) -> VQOutput:
        check_input(x, self.dim)
        shape = x.shape
        flat = x.reshape(-1, self.dim)  # (N, dim)
        if flat.shape[0] == 0:
            empty = torch.empty(shape[:-1], dtype=torch.long, device=x.device)
            return VQOutput(x.clone(), empty, x.sum().float() * 0.0)

        book = self.book
        h = self.project_in(flat) if self.has_projection else flat  # (N, codebook_dim)
        h = book.prepare(h)
        if self.training and book.kmeans_pending:
            book.initialize(h.detach())

        indices = book.search(h.detach(), temperature=self.search_temperature)  # (N,)
        q = book.lookup(indices).to(h.dtype)  # (N, codebook_dim)
        out, loss = quantize(
            h, q, commitment_weight=self.commitment_weight, rotation=self.rotation_trick,
            codebook_weight=0.0 if book.is_ema else self.codebook_weight)
        # Any NaN/Inf in h makes the loss non-finite: one scalar check guards the updates below
        if not math.isfinite(loss.item()):
            check_finite(h)

        if self.training:
            statistics = book.statistics(h.detach(), indices) if book.is_ema else None
            book.update(statistics, h.detach())

        if self.has_projection:
            out = self.project_out(out.to(self.project_out.weight.dtype))
        quantized = out.reshape(shape).to(x.dtype)
        return VQOutput(quantized, indices.reshape(shape[:-1]), loss.float())

    def decode(self, indices: Tensor) -> Tensor:
        """Code vectors for ``indices`` (any shape): ``(*indices.shape, dim)``.

        Equal to ``quantized`` of an eval-mode call that produced ``indices``.
        """
        if not isinstance(indices, Tensor) or indices.dtype.is_floating_point \
                or indices.dtype.is_complex or indices.dtype == torch.bool:
            raise QuantizerInputError(
                f"indices must be an integer tensor, got {describe(indices)}")
        if indices.numel() and (int(indices.min()) < 0
                                or int(indices.max()) >= self.codebook_size):
            raise QuantizerInputError(
                f"indices must lie in [0, {self.codebook_size}), got values in "
                f"[{int(indices.min())}, {int(indices.max())}]")
        return self.project_out(self.book.lookup(indices.long()))

    # Name used by vector_quantize_pytorch.
    get_output_from_indices = decode


def _flatten_codebook_state(module: VectorQuantize, state: dict, prefix: str,
                            local_metadata: dict) -> None:
    """``book.codebook`` -> ``codebook`` (and the other buffers): the checkpoint layout, keys
    in the order they always had (codebook state first, then the projections)."""
    # This layer's keys are the last ones written so far: move the codebook's ahead of the rest
    later = [key for key in state if key.startswith(prefix)
             and not key.startswith(f"{prefix}book.")]
    for name in CODEBOOK_STATE:
        nested = f"{prefix}book.{name}"
        if nested in state:
            state[prefix + name] = state.pop(nested)
    for key in later:
        state.move_to_end(key)
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        metadata.pop(f"{prefix}book", None)


def _nest_codebook_state(module: VectorQuantize, state: dict, prefix: str, *args) -> None:
    """The inverse of :func:`_flatten_codebook_state`, before loading."""
    for name in CODEBOOK_STATE:
        if prefix + name in state:
            state[f"{prefix}book.{name}"] = state.pop(prefix + name)
