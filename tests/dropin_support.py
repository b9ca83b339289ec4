"""What the drop-in tests share: the float64 NumPy side of their independent computations."""

import numpy as np
import torch


def f64(t: torch.Tensor) -> np.ndarray:
    """A float64 NumPy copy of ``t``, detached from autograd."""
    return t.detach().double().numpy()


def sq_dist(x: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances of the rows of ``x`` (N, D) to ``codes`` (K, D): (N, K)."""
    return ((x[:, None, :] - codes[None, :, :]) ** 2).sum(-1)
