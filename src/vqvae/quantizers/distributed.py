"""The few collective operations quantizers need, as no-ops on one process.

Quantizers call these to keep every process's codebook identical under
``torch.distributed``: statistics are summed with :func:`all_reduce`, and random choices
(k-means seeds, dead-code replacements) are made by rank 0 on the rows of all processes
(:func:`gather_rows`) and sent to the others with :func:`broadcast`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def should_sync(sync: bool | None) -> bool:
    """``sync=None`` means: sync when running on more than one process."""
    return is_distributed() if sync is None else (sync and is_distributed())


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def all_reduce(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` in place over all processes."""
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


def broadcast(tensor: Tensor, src: int = 0) -> Tensor:
    if is_distributed():
        dist.broadcast(tensor, src=src)
    return tensor


def gather_rows(x: Tensor) -> Tensor:
    """Concatenate the ``(N_i, D)`` tensors of all processes, in rank order."""
    if not is_distributed():
        return x
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
    longest = int(max(int(s) for s in sizes))
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[: int(n)] for part, n in zip(parts, sizes, strict=True)])
