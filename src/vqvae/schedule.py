"""The learning-rate schedule of the VQ-VAE and of the prior: linear warm-up, cosine decay."""

from __future__ import annotations

import math


def warmup_cosine(step: int, total_steps: int, warmup_fraction: float) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based) of ``total_steps``.

    Rises linearly over the first ``warmup_fraction`` of the steps (at least one step) to 1 at
    the end of the warm-up, then falls along half a cosine to 0 at ``total_steps``.
    """
    warmup = max(1, int(warmup_fraction * total_steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
