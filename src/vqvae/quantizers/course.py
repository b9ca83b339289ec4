"""The course's own quantizer (its Exercise 2), exactly as the course writes it.

Kept as a baseline: a learnable codebook initialised with ``torch.rand`` (uniform in [0, 1)),
``torch.cdist`` + argmin, the straight-through trick, commitment + codebook MSE. Trained on MNIST
it collapses onto a handful of codes, which is what our defaults are built to avoid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .vector_quantize import VQOutput


class CourseVectorQuantize(torch.nn.Module):
    def __init__(self, *, codebook_size: int, dim: int):
        super().__init__()
        self.codebook_size = codebook_size
        self.dim = dim
        self.codebook = torch.nn.Parameter(torch.rand(codebook_size, dim, requires_grad=True))

    def forward(self, x: Tensor) -> VQOutput:
        distances = torch.cdist(x, self.codebook)  # (..., K)
        codes = distances.argmin(dim=-1)
        quantized = self.codebook[codes]
        vq = (quantized - x).detach() + x
        commit_loss = F.mse_loss(x, quantized.detach())
        codebook_loss = F.mse_loss(x.detach(), quantized)
        return VQOutput(vq, codes, commit_loss + codebook_loss)

    def decode(self, indices: Tensor) -> Tensor:
        return self.codebook[indices]
