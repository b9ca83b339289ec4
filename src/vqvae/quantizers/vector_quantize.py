"""VectorQuantize: replace each vector by its nearest codebook entry.

The layer of the VQ-VAE (van den Oord et al., 2017), usable as a drop-in for
``vector_quantize_pytorch.VectorQuantize`` in the common case::

    vq = VectorQuantize(dim=256, codebook_size=512, decay=0.8, commitment_weight=1.0)
    quantized, indices, loss = vq(x)  # x: (..., 256)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import cpu_kernel, distributed
from .estimators import quantize
from .kmeans import kmeans, sample_rows
from .search import DEFAULT_BLOCK_BYTES, nearest_code, sample_code


class QuantizerInputError(ValueError, TypeError):
    """Input a quantizer cannot take: wrong shape, dtype or non-finite values.

    A ``ValueError`` and a ``TypeError`` at once, so either ``except`` catches it.
    """


class VQOutput(NamedTuple):
    quantized: Tensor  # x.shape, the code vectors (gradient reaches x by the estimator)
    indices: Tensor  # x.shape[:-1], int64 code indices
    loss: Tensor  # scalar: weighted commitment (+ codebook) loss


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

    State (codebook, EMA cluster sizes, whether k-means ran) lives in buffers or parameters, so
    it follows ``.to()`` and ``state_dict``. Calls in ``eval()`` mode never change it.

    Non-finite input: a batch containing NaN or Inf raises :class:`QuantizerInputError` before
    anything is updated, so such a batch never reaches the codebook.
    """

    codebook: Tensor
    cluster_size: Tensor
    initialized: Tensor
    steps: Tensor

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
        _require(isinstance(dim, int) and dim >= 1, f"dim must be a positive int, got {dim!r}")
        _require(isinstance(codebook_size, int) and codebook_size >= 1,
                 f"codebook_size must be a positive int, got {codebook_size!r}")
        _require(codebook_dim is None or (isinstance(codebook_dim, int) and codebook_dim >= 1),
                 f"codebook_dim must be None or a positive int, got {codebook_dim!r}")
        _require(decay is None or 0.0 <= decay < 1.0,
                 f"decay must be None (learnable codebook) or in [0, 1), got {decay!r}")
        _require(eps > 0, f"eps must be > 0, got {eps!r}")
        _require(commitment_weight >= 0 and codebook_weight >= 0,
                 "commitment_weight and codebook_weight must be >= 0")
        _require(kmeans_iters >= 1, f"kmeans_iters must be >= 1, got {kmeans_iters!r}")
        _require(threshold_ema_dead_code >= 0,
                 f"threshold_ema_dead_code must be >= 0, got {threshold_ema_dead_code!r}")
        _require(isinstance(dead_code_warmup_steps, int) and dead_code_warmup_steps >= 0,
                 f"dead_code_warmup_steps must be an int >= 0, got {dead_code_warmup_steps!r}")
        _require(threshold_ema_dead_code == 0 or decay is not None,
                 "threshold_ema_dead_code needs the EMA codebook (decay=float): dead codes are "
                 "found from the EMA cluster sizes")
        _require(sample_codebook_temp >= 0,
                 f"sample_codebook_temp must be >= 0, got {sample_codebook_temp!r}")
        _require(max_search_bytes >= 1, "max_search_bytes must be >= 1")

        self.dim = dim
        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim or dim
        self.decay = decay
        self.eps = eps
        self.commitment_weight = commitment_weight
        self.codebook_weight = codebook_weight
        self.kmeans_init = kmeans_init
        self.kmeans_iters = kmeans_iters
        self.threshold_ema_dead_code = threshold_ema_dead_code
        self.dead_code_warmup_steps = dead_code_warmup_steps
        self.use_cosine_sim = use_cosine_sim
        self.rotation_trick = rotation_trick
        self.stochastic_sample_codes = stochastic_sample_codes
        self.sample_codebook_temp = sample_codebook_temp
        self.sync_codebook = sync_codebook
        self.max_search_bytes = max_search_bytes

        self.has_projection = self.codebook_dim != dim
        self.project_in = nn.Linear(dim, self.codebook_dim) if self.has_projection \
            else nn.Identity()
        self.project_out = nn.Linear(self.codebook_dim, dim) if self.has_projection \
            else nn.Identity()

        codebook = torch.randn(codebook_size, self.codebook_dim)
        if use_cosine_sim:
            codebook = F.normalize(codebook, dim=-1)
        if decay is None:
            self.codebook = nn.Parameter(codebook)
        else:
            self.register_buffer("codebook", codebook)
        # EMA of how many vectors each code received per batch. Starting at 1 keeps a code that
        # is never chosen where it was, instead of pulling it to zero on the first update.
        self.register_buffer("cluster_size", torch.ones(codebook_size))
        self.register_buffer("initialized", torch.tensor(not kmeans_init))
        # training calls so far (a buffer: it is checkpointed and restored with the codebook)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    @property
    def is_ema(self) -> bool:
        return self.decay is not None

    def extra_repr(self) -> str:
        update = f"decay={self.decay}" if self.is_ema else "learnable"
        return f"dim={self.dim}, codebook_size={self.codebook_size}, " \
               f"codebook_dim={self.codebook_dim}, {update}"

    # ------------------------------------------------------------------ forward

    def forward(self, x: Tensor) -> VQOutput:
        self._check_input(x)
        shape = x.shape
        flat = x.reshape(-1, self.dim)  # (N, dim)
        if flat.shape[0] == 0:
            empty = torch.empty(shape[:-1], dtype=torch.long, device=x.device)
            return VQOutput(x.clone(), empty, x.sum().float() * 0.0)

        h = self.project_in(flat) if self.has_projection else flat  # (N, codebook_dim)
        h = h.float() if h.dtype in (torch.float16, torch.bfloat16) else h
        if self.use_cosine_sim:
            h = F.normalize(h, dim=-1)
        if self.training and self.kmeans_init and not bool(self.initialized):
            self._check_finite(h)
            self._initialize_from(h.detach())

        indices = self._search(h.detach())  # (N,)
        q = self.codebook.index_select(0, indices).to(h.dtype)  # (N, codebook_dim)
        out, loss = quantize(
            h, q, commitment_weight=self.commitment_weight, rotation=self.rotation_trick,
            codebook_weight=0.0 if self.is_ema else self.codebook_weight)
        # Any NaN/Inf in h makes the loss non-finite: one scalar check guards the updates below
        if not math.isfinite(loss.item()):
            self._check_finite(h)

        if self.training:
            statistics = self._code_statistics(h.detach(), indices) if self.is_ema else None
            self._update_codebook(statistics, h.detach())

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
                f"indices must be an integer tensor, got {_describe(indices)}")
        if indices.numel() and (int(indices.min()) < 0
                                or int(indices.max()) >= self.codebook_size):
            raise QuantizerInputError(
                f"indices must lie in [0, {self.codebook_size}), got values in "
                f"[{int(indices.min())}, {int(indices.max())}]")
        return self.project_out(F.embedding(indices.long(), self.codebook))

    # Name used by vector_quantize_pytorch.
    get_output_from_indices = decode

    # ------------------------------------------------------------------ pieces

    def _search(self, h: Tensor) -> Tensor:
        codebook = self.codebook.detach()
        if self.training and self.stochastic_sample_codes:
            return sample_code(h, codebook, self.sample_codebook_temp,
                               max_block_bytes=self.max_search_bytes)
        return nearest_code(h, codebook, max_block_bytes=self.max_search_bytes)

    def _smoothed_cluster_size(self, cluster_size: Tensor) -> Tensor:
        # Laplace smoothing: no code has a zero size, and the sizes still sum to n
        n = cluster_size.sum()
        return (cluster_size + self.eps) / (n + self.codebook_size * self.eps) * n

    def _code_statistics(self, h: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
        """This batch's ``(counts (K,), sums (K, D))`` of the vectors ``h`` assigned to each code.

        Split from :meth:`_apply_ema` so that a codebook shared by several quantizers (RQ-VAE)
        can add up the statistics of every depth and update once.
        """
        if cpu_kernel.supports_ema(h):  # one pass in C instead of four operations
            return cpu_kernel.code_statistics(h, indices, self.codebook_size)
        counts = torch.bincount(indices, minlength=self.codebook_size).to(h.dtype)  # (K,)
        sums = h.new_zeros(self.codebook.shape).index_add_(0, indices, h)  # (K, D)
        return counts, sums

    @torch.no_grad()
    def _update_codebook(self, statistics: tuple[Tensor, Tensor] | None,
                         rows: Tensor | Callable[[], Tensor]) -> None:
        """Everything a training step changes: the step count, the EMA of ``statistics``
        (counts, sums) and, after the warm-up, restarts of dead codes onto ``rows`` (a tensor,
        or a function that makes one, called only when some code is dead)."""
        self.steps += 1
        if not self.is_ema:
            return
        dead = self._apply_ema(*statistics)
        threshold = self.threshold_ema_dead_code
        if threshold > 0 and int(self.steps) > self.dead_code_warmup_steps \
                and (dead > 0 if dead is not None else bool((self.cluster_size < threshold).any())):
            self._restart_dead_codes(rows() if callable(rows) else rows)

    @torch.no_grad()
    def _apply_ema(self, counts: Tensor, sums: Tensor) -> int | None:
        """One EMA step of cluster sizes and sums; the codebook is their smoothed ratio.

        The running sum of vectors per code is not stored: it equals
        ``codebook · smoothed(cluster_size)``, so it is rebuilt from the codebook. The update is
        the usual one (Sonnet's ``VectorQuantizerEMA``), and a codebook written in place by the
        user stays written. Returns the number of codes left with an EMA cluster size below
        ``threshold_ema_dead_code`` when that comes for free (the C update), else None.
        """
        if distributed.should_sync(self.sync_codebook):
            distributed.all_reduce(counts)
            distributed.all_reduce(sums)
        codebook = self.codebook
        if cpu_kernel.supports_ema(codebook, self.cluster_size, counts, sums):
            # the same step in C: one call instead of some fifteen small operations
            dead = cpu_kernel.ema_update(codebook, self.cluster_size, counts, sums, self.decay,
                                         self.eps, self.threshold_ema_dead_code)
            if self.use_cosine_sim:
                codebook.copy_(F.normalize(codebook, dim=-1))
            return dead
        embed_sum = codebook * self._smoothed_cluster_size(self.cluster_size)[:, None]
        embed_sum.lerp_(sums.to(codebook.dtype), 1.0 - self.decay)
        self.cluster_size.lerp_(counts.to(self.cluster_size.dtype), 1.0 - self.decay)
        torch.div(embed_sum, self._smoothed_cluster_size(self.cluster_size)[:, None],
                  out=codebook)
        if self.use_cosine_sim:
            codebook.copy_(F.normalize(codebook, dim=-1))
        return None

    @torch.no_grad()
    def _initialize_from(self, h: Tensor) -> None:
        """k-means on the first training batch (all processes' vectors when synced)."""
        synced = distributed.should_sync(self.sync_codebook)
        data = distributed.gather_rows(h) if synced else h
        # One process runs k-means and the others receive its result, so codebooks stay equal
        if not synced or distributed.rank() == 0:
            centroids, counts = kmeans(data, self.codebook_size, self.kmeans_iters,
                                       use_cosine_sim=self.use_cosine_sim,
                                       max_block_bytes=self.max_search_bytes)
        else:
            centroids = torch.empty(self.codebook_size, h.shape[-1], dtype=h.dtype,
                                    device=h.device)
            counts = torch.empty(self.codebook_size, dtype=h.dtype, device=h.device)
        if synced:
            distributed.broadcast(centroids, src=0)
            distributed.broadcast(counts, src=0)
        self.codebook.data.copy_(centroids)
        if self.is_ema:
            # A centroid no vector chose gets size 1: the EMA keeps it in place, and dead-code
            # restarts (if enabled) soon move it onto data.
            self.cluster_size.copy_(counts.clamp(min=1))
        self.initialized.fill_(True)

    @torch.no_grad()
    def _restart_dead_codes(self, h: Tensor) -> None:
        dead = self.cluster_size < self.threshold_ema_dead_code  # (K,)
        num_dead = int(dead.sum())
        if num_dead == 0:
            return
        synced = distributed.should_sync(self.sync_codebook)
        data = distributed.gather_rows(h) if synced else h
        # One process draws the replacements; the others receive them, so codebooks stay equal
        if not synced or distributed.rank() == 0:
            replacements = sample_rows(data, num_dead)
        else:
            replacements = torch.empty(num_dead, h.shape[-1], dtype=h.dtype, device=h.device)
        if synced:
            distributed.broadcast(replacements, src=0)
        if self.use_cosine_sim:
            replacements = F.normalize(replacements, dim=-1)
        self.codebook[dead] = replacements.to(self.codebook.dtype)
        self.cluster_size[dead] = float(self.threshold_ema_dead_code)

    # ------------------------------------------------------------------ checks

    def _check_input(self, x: Tensor) -> None:
        check_input(x, self.dim)

    @staticmethod
    def _check_finite(h: Tensor) -> None:
        finite = torch.isfinite(h)
        if bool(finite.all()):
            return
        raise QuantizerInputError(
            f"input has {int((~finite).sum())} non-finite value(s) (NaN or Inf) out of "
            f"{h.numel()}; the codebook was not updated. Check the encoder output (learning "
            "rate, loss scale) before it reaches the quantizer.")


def check_input(x: object, dim: int) -> None:
    """Raise :class:`QuantizerInputError` unless ``x`` is a floating tensor ``(..., dim)``."""
    if not isinstance(x, Tensor):
        raise QuantizerInputError(f"expected a torch.Tensor, got {_describe(x)}")
    if not x.dtype.is_floating_point:
        raise QuantizerInputError(
            f"expected a floating-point tensor (float16/bfloat16/float32/float64), "
            f"got dtype {x.dtype}")
    if x.ndim < 1:
        raise QuantizerInputError(
            f"expected a tensor of shape (..., {dim}) with at least one dimension, "
            "got a 0-d tensor")
    if x.shape[-1] != dim:
        raise QuantizerInputError(
            f"expected the last dimension to be dim={dim} (channels last, "
            f"(..., {dim})), got shape {tuple(x.shape)}")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of dtype {value.dtype} and shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"
