"""k-means as a pure function, used to initialise codebooks from data (SoundStream, §3.2).

The statistics of each step (cluster sizes and sums) pass through ``all_reduce`` before the
centroids are recomputed, so the same call gives one answer across processes when every process
passes ``torch.distributed.all_reduce`` and the same ``init``; on one process it is a no-op.

:func:`kmeans_fixed` is the variant that reads nothing back to the host (fixed shapes, a fixed
number of steps): what codebooks initialise with inside a compiled graph or a deferred call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import distributed
from .search import DEFAULT_BLOCK_BYTES, code_distances, distance_dtype, nearest_code


def noop(tensor: Tensor) -> Tensor:
    return tensor


class KMeansResult(NamedTuple):
    centroids: Tensor  # (K, D)
    counts: Tensor  # (K,) vectors assigned to each centroid by the last assignment step


def sample_rows(x: Tensor, num: int, generator: torch.Generator | None = None) -> Tensor:
    """``num`` rows of ``x`` drawn at random: without replacement when ``x`` has enough rows."""
    n = x.shape[0]
    device = generator.device if generator is not None else x.device
    if n >= num:
        index = torch.randperm(n, generator=generator, device=device)[:num]
    else:
        index = torch.randint(n, (num,), generator=generator, device=device)
    return x[index.to(x.device)]


@torch.no_grad()
def kmeans_plus_plus(x: Tensor, num_clusters: int, generator: torch.Generator | None = None,
                     max_rounds: int = 64) -> Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii, 2007): new seeds are rows of ``x`` drawn with
    probability proportional to their squared distance from the nearest seed so far.

    Random seeding often puts two seeds in one cluster and none in another, and Lloyd's steps
    cannot undo that; D² sampling makes it unlikely. To bound the cost for large codebooks, seeds
    are drawn in at most ``max_rounds`` rounds of ``ceil(K / max_rounds)`` seeds each (exact
    k-means++ when ``K <= max_rounds``), so the whole seeding costs about one Lloyd step.
    """
    n = x.shape[0]
    device = generator.device if generator is not None else x.device
    per_round = -(-num_clusters // max_rounds)
    x_sq = x.pow(2).sum(-1)  # (N,)
    seeds = [x[torch.randint(n, (1,), generator=generator, device=device).to(x.device)]]
    nearest_sq = torch.full_like(x_sq, float("inf"))
    chosen = 1
    while chosen < num_clusters:
        new = seeds[-1]  # (m, D)
        dist_sq = code_distances(x, new, x_sq.unsqueeze(-1) + new.pow(2).sum(-1))  # (N, m)
        torch.minimum(nearest_sq, dist_sq.amin(dim=-1).clamp_(min=0), out=nearest_sq)
        # Fewer distinct rows than clusters: once every row is a seed, any row will do
        weights = nearest_sq if float(nearest_sq.sum()) > 0 else torch.ones_like(nearest_sq)
        take = min(per_round, num_clusters - chosen)
        replacement = int((weights > 0).sum()) < take
        index = torch.multinomial(weights.to(device), take, replacement=replacement,
                                  generator=generator)
        seeds.append(x[index.to(x.device)])
        chosen += take
    return torch.cat(seeds)


def _prepared(x: Tensor, num_clusters: int, use_cosine_sim: bool) -> Tensor:
    """The rows as k-means compares them (the distance dtype, unit rows for cosine similarity),
    after checking that there are some and that K is positive."""
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"kmeans expects a non-empty (N, D) tensor, got shape {tuple(x.shape)}")
    if num_clusters < 1:
        raise ValueError(f"num_clusters must be >= 1, got {num_clusters}")
    x = x.to(distance_dtype(x.dtype))
    return F.normalize(x, dim=-1) if use_cosine_sim else x


def _moved(centroids: Tensor, sums: Tensor, counts: Tensor, use_cosine_sim: bool, *,
           least: float) -> Tensor:
    """Lloyd's update: each centroid to the mean of its rows, ``sums / counts`` with the counts
    at least ``least`` (unit length for cosine similarity); one that no row chose stays where
    it was."""
    means = sums / counts.clamp(min=least).unsqueeze(-1)
    if use_cosine_sim:
        means = F.normalize(means, dim=-1)
    return torch.where((counts > 0).unsqueeze(-1), means, centroids)


@torch.no_grad()
def kmeans(
    x: Tensor,
    num_clusters: int,
    num_iters: int = 10,
    *,
    init: Tensor | str = "kmeans++",
    use_cosine_sim: bool = False,
    all_reduce: Callable[[Tensor], object] = noop,
    generator: torch.Generator | None = None,
    max_block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> KMeansResult:
    """Lloyd's k-means on the rows of ``x``.

    Args:
        x: ``(N, D)`` data.
        num_clusters: K.
        num_iters: assignment + update steps.
        init: ``"kmeans++"`` (D² seeding), ``"random"`` (K rows of ``x``), or a ``(K, D)``
            tensor of starting centroids (pass the same one on every process when distributed).
        use_cosine_sim: cluster directions (spherical k-means): centroids are unit vectors.
        all_reduce: sums a tensor in place across processes (default: nothing to sum).
        generator: random source for the seeding.

    A centroid that loses all its points keeps its previous position, so every centroid stays a
    point of (or a mean of points of) the data, never a zero vector.
    """
    x = _prepared(x, num_clusters, use_cosine_sim)
    dtype = x.dtype
    if isinstance(init, Tensor):
        if init.shape != (num_clusters, x.shape[1]):
            raise ValueError(f"init must have shape {(num_clusters, x.shape[1])}, "
                             f"got {tuple(init.shape)}")
        centroids = init.to(dtype).clone()
    elif init == "kmeans++":
        centroids = kmeans_plus_plus(x, num_clusters, generator)
    elif init == "random":
        centroids = sample_rows(x, num_clusters, generator)
    else:
        raise ValueError(f"init must be 'kmeans++', 'random' or a tensor, got {init!r}")
    counts = torch.zeros(num_clusters, dtype=dtype, device=x.device)
    for _ in range(num_iters):
        assignment = nearest_code(x, centroids, max_block_bytes=max_block_bytes)  # (N,)
        counts = torch.bincount(assignment, minlength=num_clusters).to(dtype)  # (K,)
        sums = torch.zeros_like(centroids).index_add_(0, assignment, x)  # (K, D)
        all_reduce(counts)
        all_reduce(sums)
        centroids = _moved(centroids, sums, counts, use_cosine_sim, least=1)
    return KMeansResult(centroids, counts)


def kmeans_synced(rows: Tensor, num_clusters: int, num_iters: int, *, synced: bool,
                  use_cosine_sim: bool = False,
                  max_block_bytes: int = DEFAULT_BLOCK_BYTES) -> KMeansResult:
    """:func:`kmeans` of ``rows`` ``(N, D)``, or with ``synced`` of every process's rows: rank 0
    clusters them all and sends the result, so that every process starts from the same
    codebook."""
    data = distributed.gather_rows(rows) if synced else rows
    if not synced or distributed.rank() == 0:
        centroids, counts = kmeans(data, num_clusters, num_iters,
                                   use_cosine_sim=use_cosine_sim, max_block_bytes=max_block_bytes)
    else:
        centroids = rows.new_empty(num_clusters, rows.shape[-1])
        counts = rows.new_empty(num_clusters)
    if synced:
        distributed.broadcast(centroids, src=0)
        distributed.broadcast(counts, src=0)
    return KMeansResult(centroids, counts)


@torch.no_grad()
def kmeans_fixed(
    x: Tensor,
    num_clusters: int,
    num_iters: int = 10,
    *,
    use_cosine_sim: bool = False,
    weight: Tensor | None = None,
    max_rounds: int = 64,
    max_block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> KMeansResult:
    """:func:`kmeans` with k-means++ seeding, without a single value read back to the host:
    every shape is known from those of the arguments, so it runs inside one compiled graph and
    never stalls an accelerator. What a compiled quantizer initialises its codebook with.

    Differences from :func:`kmeans`, each so that no decision waits for a value: seeds are
    drawn with replacement (two rounds may pick one row twice when ``K > max_rounds``; Lloyd's
    steps then keep the spare centroid where it is); when every row already is a seed, the next
    ones are drawn uniformly. ``weight`` ``(N,)`` weighs each row's part in the seeding and the
    means (0 leaves a row out: a padding mask); rows all of weight 0 count as weight 1.
    """
    x = _prepared(x, num_clusters, use_cosine_sim)
    dtype = x.dtype
    n = x.shape[0]
    ones = x.new_ones(n)
    if weight is None:
        weight = ones
    else:
        weight = weight.to(dtype)
        weight = torch.where(weight.sum() > 0, weight, ones)
    # k-means++ (D² seeding) in at most max_rounds rounds, as kmeans_plus_plus
    per_round = -(-num_clusters // max_rounds)
    x_sq = x.pow(2).sum(-1)  # (N,)
    seeds = [x[torch.multinomial(weight, 1)]]
    nearest_sq = torch.full_like(x_sq, float("inf"))
    chosen = 1
    while chosen < num_clusters:
        new = seeds[-1]  # (m, D)
        dist_sq = code_distances(x, new, x_sq.unsqueeze(-1) + new.pow(2).sum(-1))  # (N, m)
        nearest_sq = torch.minimum(nearest_sq, dist_sq.amin(dim=-1).clamp(min=0))
        odds = nearest_sq * weight
        odds = torch.where(odds.sum() > 0, odds, weight)
        take = min(per_round, num_clusters - chosen)
        seeds.append(x[torch.multinomial(odds, take, replacement=True)])
        chosen += take
    centroids = torch.cat(seeds)  # (K, D)
    counts = x.new_zeros(num_clusters)
    weighted = x * weight[:, None]
    for _ in range(num_iters):
        assignment = nearest_code(x, centroids, max_block_bytes=max_block_bytes)  # (N,)
        counts = x.new_zeros(num_clusters).index_add_(0, assignment, weight)  # (K,)
        sums = torch.zeros_like(centroids).index_add_(0, assignment, weighted)  # (K, D)
        centroids = _moved(centroids, sums, counts, use_cosine_sim, least=1e-12)
    return KMeansResult(centroids, counts)
