"""Codebook: the code vectors of a quantizer, their state, and every operation on them.

A :class:`Codebook` owns ``C`` sets (one per head, usually one) of ``K`` codes of ``D`` values,
in the layout of ``vector_quantize_pytorch`` so that checkpoints move between the two:

    embed         (C, K, D)  the codes (a buffer for the EMA, an ``nn.Parameter`` when learnable)
    embed_avg     (C, K, D)  EMA of the per-code sums of assigned vectors
    cluster_size  (C, K)     EMA of the per-code counts
    initted       ()         False until k-means initialisation ran (when asked for)

It offers the operations a quantizer composes, each a public method with one job:

    x = book.prepare(h)                    # float32 (from half), unit rows for cosine search
    book.initialize(x)                     # k-means on the first batch, when asked for
    indices = book.search(x)               # nearest code (or sampled, with a temperature)
    q = book.lookup(indices)               # the code vectors, differentiable for a learnable book
    stats = book.statistics(x, indices)    # this batch's per-code counts and sums
    book.update(stats, rows=x)             # step count, EMA step, dead-code restarts

Rows are ``(N, D)`` for a single codebook or ``(C, N, D)`` (one block of rows per codebook);
indices are ``(N,)`` or ``(C, N)`` accordingly. Statistics are a separate value from the update
so that a caller can weight them (a mask, a weight per row), add up several (the depths of a
shared RVQ codebook, micro-batches) and apply the sum once. The distance the torch paths
minimise is written once, in :func:`.search.code_distances` (the C and Triton kernels of the
fast paths compute the same expression).

State lives in buffers (or the parameter), so it follows ``.to()`` and ``state_dict``.
:meth:`search`, :meth:`lookup`, :meth:`statistics` and :meth:`distances` change nothing; only
:meth:`initialize`, :meth:`update` (and the :meth:`apply_ema`, :meth:`update_ema` and
:meth:`restart_dead_codes` it calls) do, and the caller decides when (in ``train()`` mode).
State dicts of the earlier single-codebook layout (``codebook`` (K, D), ``cluster_size`` (K,),
``initialized``, ``steps``) still load: they are converted on the way in.

Subclasses whose codes are computed from the stored ones (an affine map, a learned bridge)
override :meth:`vectors`; search and lookup read the codes only through it.

Deferred calls (:mod:`.guard`): the changing methods take ``ok``, the 0-d bool verdict of
:func:`.guard.usable` on the batch. With it they never read a value back to the host and change
nothing unless ``ok`` is true, each write a ``torch.where`` on it: the step count, the EMA,
k-means (:func:`.kmeans.kmeans_fixed`, fixed shapes) and dead-code restarts (a random
permutation of the rows and of the codes: the ``j``-th dead code takes the ``j``-th row).
Whether k-means is still to run is a Python flag that mirrors ``initted`` (read from the
buffer on the CPU outside tracing, set by :meth:`initialize` and by loading a state dict), so a
compiled graph branches on a constant and is compiled again once after initialisation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import cpu_kernel, distributed
from .checks import QuantizerInputError, check_finite, require
from .kmeans import kmeans_fixed, kmeans_synced
from .search import DEFAULT_BLOCK_BYTES, nearest_code, sample_code
from .tracing import host_flag, tracing

#: Starting codes: ``"kaiming_uniform"`` (U(-b, b), b = sqrt(6 / (K·D)), as
#: ``nn.init.kaiming_uniform_`` on the (C, K, D) tensor, the reference library's choice) or
#: ``"normal"`` (N(0, 1)). k-means initialisation starts from zeros instead.
CODEBOOK_INITS = ("kaiming_uniform", "normal")

#: Keys of the earlier single-codebook state dict, converted by ``_load_from_state_dict``.
LEGACY_KEYS = ("codebook", "cluster_size", "initialized", "steps")


class CodeStatistics(NamedTuple):
    """What one batch tells the EMA: per code, the (weighted) number of vectors assigned to it
    and their (weighted) sum."""

    counts: Tensor  # (C, K), or (K,) for rows given as (N, D)
    sums: Tensor  # (C, K, D), or (K, D)

    def add_(self, other: CodeStatistics) -> CodeStatistics:
        """Add ``other`` into these tensors in place (returns ``self``): statistics of several
        batches or depths summed, to be applied by one :meth:`Codebook.update`."""
        self.counts.add_(other.counts)
        self.sums.add_(other.sums)
        return self


class Codebook(nn.Module):
    """``num_codebooks`` sets of ``codebook_size`` codes of ``dim`` values, EMA or learnable.

    Args:
        codebook_size: number of codes K.
        dim: size of each code D.
        num_codebooks: C, one per head for separate per-head codebooks.
        decay: rate of the EMA, in [0, 1] (1 freezes the statistics). ``None``: a learnable
            codebook without EMA (shorthand for ``learnable=True``).
        eps: Laplace smoothing of the EMA cluster sizes.
        learnable: the codes are an ``nn.Parameter`` (trained through :meth:`lookup`, or
            reached by a regulariser while the EMA sets them). Default: ``decay is None``.
        ema_update: the codes are recomputed from the EMA statistics after each update.
            Default: not ``learnable``.
        manual_ema_update: the statistics are updated but the codes only when
            :meth:`update_ema` is called.
        use_cosine_sim: codes (and the inputs :meth:`prepare` returns) are unit vectors.
        kmeans_init: codes start as the k-means centroids of the first batch passed to
            :meth:`initialize` (``kmeans_iters`` Lloyd steps), zeros until then.
        init: the starting codes otherwise, one of :data:`CODEBOOK_INITS`.
        threshold_ema_dead_code: :meth:`update` moves codes whose EMA cluster size is below
            this onto random rows of the batch (0 disables restarts) ...
        dead_code_warmup_steps: ... once more than this many steps were counted.
        sync: all-reduce statistics and share random choices across processes; ``None`` does
            so when ``torch.distributed`` runs more than one process.
        max_search_bytes: memory bound of one block of the distance matrix.
    """

    embed: Tensor
    embed_avg: Tensor
    cluster_size: Tensor
    initted: Tensor
    steps: Tensor

    def __init__(
        self,
        codebook_size: int,
        dim: int,
        *,
        num_codebooks: int = 1,
        decay: float | None = 0.8,
        eps: float = 1e-5,
        learnable: bool | None = None,
        ema_update: bool | None = None,
        manual_ema_update: bool = False,
        use_cosine_sim: bool = False,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        init: str = "kaiming_uniform",
        threshold_ema_dead_code: float = 0.0,
        dead_code_warmup_steps: int = 0,
        sync: bool | None = None,
        max_search_bytes: int = DEFAULT_BLOCK_BYTES,
    ):
        super().__init__()
        require(isinstance(codebook_size, int) and codebook_size >= 1,
                f"codebook_size must be a positive int, got {codebook_size!r}")
        require(isinstance(dim, int) and dim >= 1, f"dim must be a positive int, got {dim!r}")
        require(isinstance(num_codebooks, int) and num_codebooks >= 1,
                f"num_codebooks must be a positive int, got {num_codebooks!r}")
        require(decay is None or 0.0 <= decay <= 1.0,
                f"decay must be None (learnable codebook) or in [0, 1], got {decay!r}")
        require(eps > 0, f"eps must be > 0, got {eps!r}")
        require(kmeans_iters >= 1, f"kmeans_iters must be >= 1, got {kmeans_iters!r}")
        require(threshold_ema_dead_code >= 0,
                f"threshold_ema_dead_code must be >= 0, got {threshold_ema_dead_code!r}")
        require(isinstance(dead_code_warmup_steps, int) and dead_code_warmup_steps >= 0,
                f"dead_code_warmup_steps must be an int >= 0, got {dead_code_warmup_steps!r}")
        require(init in CODEBOOK_INITS, f"init must be one of {CODEBOOK_INITS}, got {init!r}")
        require(max_search_bytes >= 1, "max_search_bytes must be >= 1")
        learnable = decay is None if learnable is None else bool(learnable)
        ema_update = not learnable if ema_update is None else bool(ema_update)

        self.codebook_size = codebook_size
        self.dim = dim
        self.num_codebooks = num_codebooks
        self.decay = 0.8 if decay is None else float(decay)
        self.eps = eps
        self.learnable = learnable
        self.ema_update = ema_update
        self.manual_ema_update = manual_ema_update
        self.use_cosine_sim = use_cosine_sim
        self.kmeans_init = kmeans_init
        self.kmeans_iters = kmeans_iters
        self.threshold_ema_dead_code = threshold_ema_dead_code
        self.dead_code_warmup_steps = dead_code_warmup_steps
        self.sync = sync
        self.max_search_bytes = max_search_bytes
        # statistics of micro-batches waiting for the next update (accumulate())
        self._pending: CodeStatistics | None = None

        shape = (num_codebooks, codebook_size, dim)
        if kmeans_init:
            embed = torch.zeros(shape)
        elif init == "normal":
            embed = torch.randn(codebook_size, dim).expand(shape).clone() \
                if num_codebooks == 1 else torch.randn(shape)
        else:
            embed = nn.init.kaiming_uniform_(torch.empty(shape))
        if use_cosine_sim:
            embed = F.normalize(embed, dim=-1)
        # buffer order of the reference library's state dict: initted, cluster_size, embed_avg,
        # embed (a parameter is listed before every buffer anyway)
        self.register_buffer("initted", torch.tensor(not kmeans_init))
        # the host's copy of ``initted``: what a traced or accelerator call branches on
        self._initted_known = not kmeans_init
        # Starting at 1 keeps a code that is never chosen where it was, instead of pulling it
        # to zero on the first update.
        self.register_buffer("cluster_size", torch.ones(num_codebooks, codebook_size))
        self.register_buffer("embed_avg", embed.clone())
        if learnable:
            self.embed = nn.Parameter(embed)
        else:
            self.register_buffer("embed", embed)
        # training steps so far: for the dead-code warm-up only, so not saved (the reference
        # layout has no such key); an earlier checkpoint's count is still read back
        self.register_buffer("steps", torch.zeros((), dtype=torch.long), persistent=False)

    # ------------------------------------------------------------------ settings

    @property
    def is_ema(self) -> bool:
        """Whether the codes follow the EMA statistics (not a learnable codebook)."""
        return self.ema_update

    @property
    def tracks_statistics(self) -> bool:
        """Whether :meth:`update` keeps the EMA statistics: for the EMA itself, or to find
        dead codes."""
        return self.ema_update or self.threshold_ema_dead_code > 0

    @property
    def kmeans_pending(self) -> bool:
        """Whether :meth:`initialize` is still to run (k-means asked for, not yet done).

        Read from ``initted`` on the CPU (free there, and it sees a buffer written directly);
        while tracing, or on another device, from the host's copy of it (no read-back)."""
        if not self.kmeans_init:
            return False
        self._initted_known = host_flag(self.initted, self._initted_known)
        return not self._initted_known

    @property
    def codebook(self) -> Tensor:
        """The stored codes: ``(K, D)`` for one codebook, else ``(C, K, D)`` (a view)."""
        return self.embed[0] if self.num_codebooks == 1 else self.embed

    @property
    def initialized(self) -> Tensor:
        return self.initted

    def extra_repr(self) -> str:
        update = f"decay={self.decay}" if self.ema_update else "learnable" \
            if self.learnable else "frozen"
        heads = f"num_codebooks={self.num_codebooks}, " if self.num_codebooks > 1 else ""
        return f"{heads}codebook_size={self.codebook_size}, dim={self.dim}, {update}"

    # ------------------------------------------------------------------ reading

    def vectors(self) -> Tensor:
        """The ``(C, K, D)`` codes that search and lookup use (with their gradient, if any)."""
        return self.embed

    def _blocks(self, x: Tensor) -> tuple[Tensor, bool]:
        """``x`` as ``(C, N, D)``, and whether it came as ``(N, D)`` (one codebook)."""
        if x.ndim == 2:
            if self.num_codebooks != 1:
                raise QuantizerInputError(
                    f"rows for {self.num_codebooks} codebooks must be (C, N, D), got "
                    f"{tuple(x.shape)}")
            return x.unsqueeze(0), True
        return x, False

    def _deferred_blocks(self, x: Tensor, row_weight: Tensor | None, refusal: str
                         ) -> tuple[Tensor, Tensor | None]:
        """:meth:`_blocks` of ``x`` and of its row weights (``(C, N)`` or None) for a deferred
        call, which cannot serve a synchronised codebook: syncing reads sizes back to the host,
        so that raises ``refusal``."""
        if distributed.should_sync(self.sync):
            raise QuantizerInputError(refusal)
        blocks, single = self._blocks(x)
        if row_weight is not None and single:
            row_weight = row_weight.unsqueeze(0)
        return blocks, row_weight

    def prepare(self, x: Tensor) -> Tensor:
        """Vectors as the codebook compares them: float32 for half-precision input
        (distances in half precision pick other codes), unit rows with cosine similarity."""
        x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        return F.normalize(x, dim=-1) if self.use_cosine_sim else x

    def search(self, x: Tensor, *, temperature: float | None = None,
               codes: Tensor | None = None) -> Tensor:
        """Index of the nearest code to each row of ``x`` (``(N, D)`` -> ``(N,)``, or
        ``(C, N, D)`` -> ``(C, N)``), among ``codes`` (default :meth:`vectors`).

        With a ``temperature``, codes are instead sampled from ``softmax(-distance /
        temperature)`` (Euclidean distance; 0 is the nearest code). The backend (torch, C or
        Triton) is chosen by :func:`.search.nearest_code`. No gradient, no state change.
        """
        blocks, single = self._blocks(x)
        codes = (self.vectors() if codes is None else codes).detach()
        found = [sample_code(rows, book, temperature, max_block_bytes=self.max_search_bytes)
                 if temperature is not None else
                 nearest_code(rows, book, max_block_bytes=self.max_search_bytes)
                 for rows, book in zip(blocks, codes, strict=True)]
        if single:
            return found[0]
        return found[0].unsqueeze(0) if len(found) == 1 else torch.stack(found)

    def lookup(self, indices: Tensor, codes: Tensor | None = None) -> Tensor:
        """Code vectors of ``indices`` (``(...)`` for one codebook -> ``(..., D)``;
        ``(C, ...)`` -> ``(C, ..., D)``); a learnable codebook gets their gradient."""
        codes = self.vectors() if codes is None else codes
        if codes.shape[0] == 1:  # one codebook: indices of any shape
            return F.embedding(indices, codes[0])
        # codebook c's code j is row c·K + j of one (C·K, D) table. An embedding, not a
        # gather: inductor recomputes a gather in backward from the codes, which the EMA
        # update has overwritten by then (a wrong rotation-trick gradient); it saves an
        # embedding's result instead, as for one codebook.
        num, k = codes.shape[:2]
        offsets = torch.arange(0, num * k, k, device=indices.device)
        flat = indices.reshape(num, -1) + offsets[:, None]  # (C, M)
        picked = F.embedding(flat, codes.reshape(num * k, codes.shape[-1]))
        return picked.reshape(*indices.shape, codes.shape[-1])

    @torch.no_grad()
    def distances(self, x: Tensor, indices: Tensor) -> Tensor:
        """Squared Euclidean distance of each row of ``x`` to its code ``indices``."""
        diff = x - self.lookup(indices).detach().to(x.dtype)
        return diff.pow(2).sum(-1)

    def statistics(self, x: Tensor, indices: Tensor,
                   weight: Tensor | None = None) -> CodeStatistics:
        """This batch's per-code counts and sums of the rows of ``x`` assigned by ``indices``:
        ``(N, D)``, ``(N,)`` -> ``counts (K,)``, ``sums (K, D)``; ``(C, N, D)``, ``(C, N)`` ->
        ``(C, K)``, ``(C, K, D)``.

        ``weight`` (the shape of ``indices``) scales each row's contribution (0 leaves a row
        out: a mask). Nothing is changed; pass the result (or a sum of several) to
        :meth:`update`.
        """
        blocks, single = self._blocks(x)
        idx = indices.unsqueeze(0) if single else indices
        if weight is not None and weight.shape != indices.shape:
            raise QuantizerInputError(f"weight must have the shape of indices "
                                      f"{tuple(indices.shape)} (one per row), got "
                                      f"{tuple(weight.shape)}")
        num, k = blocks.shape[0], self.codebook_size
        if weight is None and num == 1 and cpu_kernel.supports_ema(blocks[0]):
            # one pass in C instead of four operations
            counts, sums = cpu_kernel.code_statistics(blocks[0], idx[0], k)
            counts, sums = counts.unsqueeze(0), sums.unsqueeze(0)
        else:
            # codebook c's code j is row c·K + j of one (C·K, D) table
            flat = (idx + torch.arange(num, device=idx.device)[:, None] * k).reshape(-1)
            rows = blocks.reshape(-1, blocks.shape[-1])
            if weight is None and blocks.device.type == "cpu" and not tracing():
                counts = torch.bincount(flat, minlength=num * k).to(blocks.dtype)
            elif weight is None:
                # bincount's length depends on the largest index: a read-back elsewhere
                counts = blocks.new_zeros(num * k).index_add_(
                    0, flat, blocks.new_ones(flat.shape[0]))
            else:
                w = (weight.unsqueeze(0) if single else weight).reshape(-1).to(blocks.dtype)
                counts = blocks.new_zeros(num * k).index_add_(0, flat, w)
                rows = rows * w[:, None]
            sums = blocks.new_zeros(num * k, blocks.shape[-1]).index_add_(0, flat, rows)
            counts, sums = counts.view(num, k), sums.view(num, k, -1)
        if single:
            return CodeStatistics(counts[0], sums[0])
        return CodeStatistics(counts, sums)

    @staticmethod
    def check_finite(x: Tensor) -> None:
        """Raise :class:`QuantizerInputError` if ``x`` holds NaN or Inf: such a batch must
        never reach :meth:`initialize` or :meth:`update`."""
        check_finite(x)

    # ------------------------------------------------------------------ changing

    @torch.no_grad()
    def set_codes(self, codes: Tensor) -> None:
        """Write the codes (the shape of :attr:`codebook` or of ``embed``) and the EMA sums
        that keep them where they are written: the EMA recomputes the codes from the sums, so
        writing ``embed`` alone lasts until the next update."""
        self.embed.data.copy_(codes.reshape(self.embed.shape))
        self.embed_avg.copy_(self.embed.detach() * self.smoothed_cluster_size()[..., None])

    def accumulate(self, statistics: CodeStatistics, ok: Tensor | None = None) -> None:
        """Keep ``statistics`` for the next :meth:`apply_ema`, which adds them to its own
        (micro-batches: two accumulated halves make the update of the whole). With ``ok``
        false (a deferred call's refused batch) zeros are kept instead. Eager only: the
        pending sums live in a Python attribute across calls."""
        if tracing():
            raise QuantizerInputError(
                "accum_ema_update cannot be compiled or exported: the pending statistics live "
                "in a Python attribute between calls; call the layer eagerly for it")
        counts, sums = statistics
        if counts.ndim == 1:
            counts, sums = counts.unsqueeze(0), sums.unsqueeze(0)
        if ok is not None:
            counts = torch.where(ok, counts, torch.zeros_like(counts))
            sums = torch.where(ok, sums, torch.zeros_like(sums))
        stats = CodeStatistics(counts.detach().clone(), sums.detach().clone())
        self._pending = stats if self._pending is None else self._pending.add_(stats)

    @torch.no_grad()
    def update(self, statistics: CodeStatistics | None,
               rows: Tensor | Callable[[], Tensor],
               weight: Tensor | Callable[[Tensor, Tensor], Tensor] | None = None, *,
               ema_update: bool | None = None, ok: Tensor | None = None,
               row_weight: Tensor | None = None) -> None:
        """Everything a training step changes: the step count, the EMA step with
        ``statistics`` (skipped when ``None`` or when the codebook keeps none), the codes
        recomputed from it (EMA codebook, unless manual; ``ema_update`` overrides the setting
        for this call), and, after the warm-up, restarts of dead codes onto ``rows`` (a tensor
        ``(N, D)`` / ``(C, N, D)``, or a function that makes one, called only when some code is
        dead). ``weight`` as in :meth:`apply_ema`.

        ``ok`` (a 0-d bool tensor) makes this a deferred update: nothing is read back, and
        nothing changes unless ``ok`` is true; ``row_weight`` (the shape of ``rows`` less its
        last axis) then marks the rows a restart may pick (> 0), e.g. a padding mask."""
        if ok is not None:
            self._update_deferred(statistics, rows, weight, ema_update, ok, row_weight)
            return
        self.steps += 1
        ema_update = self.ema_update if ema_update is None else ema_update
        if statistics is None or not (ema_update or self.threshold_ema_dead_code > 0):
            return
        self.apply_ema(statistics, weight)
        if ema_update and not self.manual_ema_update:
            self.update_ema()
        threshold = self.threshold_ema_dead_code
        if threshold > 0 and int(self.steps) > self.dead_code_warmup_steps \
                and bool((self.cluster_size < threshold).any()):
            self.restart_dead_codes(rows() if callable(rows) else rows)

    def _update_deferred(self, statistics, rows, weight, ema_update, ok: Tensor,
                         row_weight: Tensor | None) -> None:
        """:meth:`update` decided on the device: every write is conditional on ``ok``."""
        self.steps.add_(ok.to(self.steps.dtype))
        ema_update = self.ema_update if ema_update is None else ema_update
        if statistics is None or not (ema_update or self.threshold_ema_dead_code > 0):
            return
        self.apply_ema(statistics, weight, ok=ok)
        if ema_update and not self.manual_ema_update:
            self.update_ema(ok=ok)
        if self.threshold_ema_dead_code > 0:
            # the warm-up too is decided on the device: no int(steps)
            allowed = ok & (self.steps > self.dead_code_warmup_steps)
            self.restart_dead_codes(rows() if callable(rows) else rows, ok=allowed,
                                    row_weight=row_weight)

    @torch.no_grad()
    def apply_ema(self, statistics: CodeStatistics,
                  weight: Tensor | Callable[[Tensor, Tensor], Tensor] | None = None, *,
                  ok: Tensor | None = None) -> None:
        """One EMA step of the cluster sizes and sums (plus any :meth:`accumulate`\\ d ones):
        ``s <- s + (1 - decay) · w · (batch - s)``.

        ``weight`` ``w`` is a per-code rate factor ``(K,)`` / ``(C, K)``, or a function of the
        batch's ``(sums (C, K, D), counts (C, K))`` returning one; default 1. With ``ok`` (0-d
        bool) the step is kept only where ``ok`` is true (a NaN statistic cannot leak through a
        zero rate: ``0 · NaN`` is NaN, so the choice is a ``where``).
        """
        counts, sums = statistics
        if counts.ndim == 1:
            counts, sums = counts.unsqueeze(0), sums.unsqueeze(0)
        if distributed.should_sync(self.sync):
            counts, sums = counts.clone(), sums.clone()
            distributed.all_reduce(counts)
            distributed.all_reduce(sums)
        if self._pending is not None:
            counts, sums = counts + self._pending.counts, sums + self._pending.sums
            self._pending = None
        rate = 1.0 - self.decay
        if callable(weight):
            weight = weight(sums, counts)
        if ok is not None:
            counts, sums = counts.to(self.cluster_size.dtype), sums.to(self.embed_avg.dtype)
            if weight is not None:
                weight = torch.as_tensor(weight, dtype=self.cluster_size.dtype,
                                         device=self.cluster_size.device)
                rate = rate * weight.expand_as(self.cluster_size)  # (C, K)
                size = self.cluster_size + rate * (counts - self.cluster_size)
                avg = self.embed_avg + rate[..., None] * (sums - self.embed_avg)
            else:
                size = self.cluster_size.lerp(counts, rate)
                avg = self.embed_avg.lerp(sums, rate)
            self.cluster_size.copy_(torch.where(ok, size, self.cluster_size))
            self.embed_avg.copy_(torch.where(ok, avg, self.embed_avg))
            return
        if weight is None:
            self.cluster_size.lerp_(counts.to(self.cluster_size.dtype), rate)
            self.embed_avg.lerp_(sums.to(self.embed_avg.dtype), rate)
            return
        weight = torch.as_tensor(weight, dtype=self.cluster_size.dtype,
                                 device=self.cluster_size.device)
        rate = rate * weight.expand_as(self.cluster_size)  # (C, K)
        self.cluster_size.add_(rate * (counts - self.cluster_size))
        self.embed_avg.add_(rate[..., None] * (sums - self.embed_avg))

    @torch.no_grad()
    def update_ema(self, ok: Tensor | None = None) -> None:
        """Codes = EMA sums / Laplace-smoothed EMA sizes (unit rows for cosine similarity);
        with ``ok`` (0-d bool), only where it is true."""
        codes = self.embed_avg / self.smoothed_cluster_size()[..., None]
        if self.use_cosine_sim:
            codes = F.normalize(codes, dim=-1)
        if ok is not None:
            codes = torch.where(ok, codes, self.embed.detach())
        self.embed.data.copy_(codes)

    def smoothed_cluster_size(self) -> Tensor:
        """Laplace smoothing: no code has a zero size, and the sizes still sum to n."""
        size = self.cluster_size
        n = size.sum(-1, keepdim=True)
        return (size + self.eps) / (n + self.codebook_size * self.eps) * n

    @torch.no_grad()
    def initialize(self, x: Tensor, ok: Tensor | None = None,
                   row_weight: Tensor | None = None) -> None:
        """Set the codes to the k-means centroids of ``x`` (``(N, D)`` or ``(C, N, D)``; all
        processes' rows when synced) and mark the codebook initialised. Raises on non-finite
        ``x``, changing nothing.

        With ``ok`` (0-d bool tensor; a deferred call) nothing is read back: the k-means of
        :func:`.kmeans.kmeans_fixed` (rows weighted by ``row_weight``, the shape of ``x`` less
        its last axis, 0 leaves a row out) is written only where ``ok`` is true, and the host's
        flag counts the codebook as initialised either way (a refused batch leaves ``initted``
        false and the codes as they were; the error comes from :func:`.guard.raise_deferred`).
        """
        if ok is not None:
            self._initialize_deferred(x, ok, row_weight)
            return
        check_finite(x)
        blocks, _ = self._blocks(x)
        synced = distributed.should_sync(self.sync)
        for c, rows in enumerate(blocks):
            centroids, counts = kmeans_synced(rows, self.codebook_size, self.kmeans_iters,
                                              synced=synced, use_cosine_sim=self.use_cosine_sim,
                                              max_block_bytes=self.max_search_bytes)
            self.embed.data[c].copy_(centroids)
            # A centroid no vector chose gets size 1: the EMA keeps it in place (instead of
            # pulling it to zero), and dead-code restarts (if enabled) soon move it onto data.
            self.cluster_size[c].copy_(counts.clamp(min=1))
        # the sums that give back the centroids
        self.embed_avg.copy_(self.embed.detach() * self.smoothed_cluster_size()[..., None])
        self.initted.fill_(True)
        self._initted_known = True

    def _initialize_deferred(self, x: Tensor, ok: Tensor, row_weight: Tensor | None) -> None:
        blocks, weights = self._deferred_blocks(
            x, row_weight,
            "k-means initialisation synchronised across processes reads sizes back to the "
            "host: use immediate input checks (vqvae.set_input_checks('immediate')) and call "
            "eagerly, or sync_kmeans=False")
        for c, rows in enumerate(blocks):
            # a refused batch is clustered as zeros (no NaN reaches the random draws), and
            # the result is then thrown away
            safe = torch.where(ok, rows, torch.zeros_like(rows))
            centroids, counts = kmeans_fixed(
                safe, self.codebook_size, self.kmeans_iters, use_cosine_sim=self.use_cosine_sim,
                weight=None if weights is None else weights[c],
                max_block_bytes=self.max_search_bytes)
            self.embed.data[c].copy_(torch.where(ok, centroids.to(self.embed.dtype),
                                                 self.embed.detach()[c]))
            self.cluster_size[c].copy_(torch.where(ok, counts.clamp(min=1).to(
                self.cluster_size.dtype), self.cluster_size[c]))
        self.embed_avg.copy_(torch.where(
            ok, self.embed.detach() * self.smoothed_cluster_size()[..., None], self.embed_avg))
        self.initted.copy_(self.initted | ok)
        self._initted_known = True

    @torch.no_grad()
    def restart_dead_codes(self, rows: Tensor, ok: Tensor | None = None,
                           row_weight: Tensor | None = None) -> None:
        """Move every code whose EMA cluster size is below ``threshold_ema_dead_code`` onto a
        distinct random row of ``rows`` (``(N, D)`` or ``(C, N, D)``; drawn by rank 0 from all
        processes' rows when synced); its cluster size becomes the threshold and its sum the
        row times the threshold. With more dead codes than rows, a random subset of them is
        moved now, the rest at later steps.

        With ``ok`` (0-d bool tensor) the same happens with fixed shapes and only if ``ok``
        is true: a random order of the codes and one of the rows (those with ``row_weight``
        > 0 first, when given); the ``j``-th dead code in the codes' order takes the ``j``-th
        row, if there is one."""
        if ok is not None:
            self._restart_deferred(rows, ok, row_weight)
            return
        blocks, _ = self._blocks(rows)
        threshold = float(self.threshold_ema_dead_code)
        synced = distributed.should_sync(self.sync)
        for c, data in enumerate(blocks):
            dead = (self.cluster_size[c] < threshold).nonzero().squeeze(-1)  # (num_dead,)
            data = distributed.gather_rows(data) if synced else data
            if dead.numel() == 0 or data.shape[0] == 0:
                continue
            num = min(dead.numel(), data.shape[0])
            if not synced or distributed.rank() == 0:
                if num < dead.numel():
                    dead = dead[torch.randperm(dead.numel(), device=dead.device)[:num]]
                picked = data[torch.randperm(data.shape[0], device=data.device)[:num]]
            else:
                picked = data.new_empty(num, data.shape[-1])
            if synced:
                distributed.broadcast(dead, src=0)
                distributed.broadcast(picked, src=0)
            if self.use_cosine_sim:
                picked = F.normalize(picked, dim=-1)
            picked = picked.to(self.embed.dtype)
            self.embed.data[c, dead] = picked
            self.cluster_size[c, dead] = threshold
            self.embed_avg[c, dead] = picked * threshold

    def _restart_deferred(self, rows: Tensor, ok: Tensor, row_weight: Tensor | None) -> None:
        blocks, weights = self._deferred_blocks(
            rows, row_weight,
            "dead-code restarts synchronised across processes read sizes back to the host: "
            "use immediate input checks (vqvae.set_input_checks('immediate')) and call eagerly")
        threshold = float(self.threshold_ema_dead_code)
        k = self.codebook_size
        for c, data in enumerate(blocks):
            n = data.shape[0]
            if n == 0:
                continue
            device = data.device
            dead = (self.cluster_size[c] < threshold) & ok  # (K,)
            code_order = _random_order(k, device)
            # rank of each dead code among the dead ones, in the random order of the codes
            rank_in_order = dead.index_select(0, code_order).to(torch.long).cumsum(0) - 1
            rank = torch.empty_like(rank_in_order).scatter_(0, code_order, rank_in_order)
            row_order = _random_order(n, device)  # (N,)
            if weights is None:
                available = torch.full((), n, dtype=torch.long, device=device)
            else:
                usable_row = weights[c].index_select(0, row_order) > 0
                # the rows a restart may take first, still in random order
                row_order = row_order[torch.argsort((~usable_row).to(torch.uint8), stable=True)]
                available = usable_row.sum()
            take = dead & (rank < available)  # (K,)
            picked = data.index_select(0, row_order[rank.clamp(0, n - 1)])  # (K, D)
            if self.use_cosine_sim:
                picked = F.normalize(picked, dim=-1)
            picked = picked.to(self.embed.dtype)
            move = take[:, None]
            self.embed.data[c].copy_(torch.where(move, picked, self.embed.detach()[c]))
            self.cluster_size[c].copy_(torch.where(
                take, self.cluster_size.new_full((), threshold), self.cluster_size[c]))
            self.embed_avg[c].copy_(torch.where(move, picked * threshold, self.embed_avg[c]))

    # ------------------------------------------------------------------ checkpoints

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        if prefix + "steps" in state_dict:  # saved by earlier versions; not saved any more
            self.steps.copy_(state_dict.pop(prefix + "steps"))
        if prefix + "codebook" in state_dict and prefix + "embed" not in state_dict:
            convert_legacy_state(state_dict, prefix, self.eps)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        # the host's copy follows the loaded value (loading is eager: one read, once)
        self._initted_known = bool(self.initted)


def _random_order(n: int, device: torch.device) -> Tensor:
    """A uniformly random permutation of ``0..n-1`` (the order of ``n`` uniform draws). Not
    ``randperm``: inductor rewrites ``x[randperm(len(x))]`` with a pattern that fails to compile
    when the permutation is not sliced."""
    return torch.rand(n, device=device).argsort()


def convert_legacy_state(state: dict, prefix: str, eps: float) -> None:
    """The earlier layout (``codebook`` (K, D), ``cluster_size`` (K,), ``initialized``) in
    place of the current one. The EMA sums were not stored then: they were, implicitly, the
    codes times the smoothed cluster sizes, which is what ``embed_avg`` becomes."""
    codebook = state.pop(prefix + "codebook")
    size = state.pop(prefix + "cluster_size")
    n = size.sum()
    smoothed = (size + eps) / (n + size.shape[-1] * eps) * n
    state[prefix + "embed"] = codebook.unsqueeze(0)
    state[prefix + "embed_avg"] = (codebook * smoothed[:, None]).unsqueeze(0)
    state[prefix + "cluster_size"] = size.unsqueeze(0)
    state[prefix + "initted"] = state.pop(prefix + "initialized")
