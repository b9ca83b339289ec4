"""Implicit neural codebooks (QINCo, Huijben et al., 2024, arXiv 2401.14732): the codes of a
residual depth are generated per vector by an MLP from a base codebook and what the earlier
depths already chose.

    codes_l(x) = MLP_l(E_l, condition = q_1(x) + … + q_{l-1}(x))      (K, D) per vector

:class:`CodeMLP` is vector_quantize_pytorch's ``MLP`` (the same parameter names, so checkpoints
load): ``z = proj_in([condition, code])``, then ``depth`` blocks ``z = z + W_2 SiLU(W_1 z)``,
unit rows if ``l2norm_output``. :class:`ConditionedCodes` is the codebook a depth searches for
a batch of conditions: it has the ``search`` / ``lookup`` of a :class:`~.codebook.Codebook`,
over one ``(K, D)`` set of codes per row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class CodeMLP(nn.Module):
    """``(K, D)`` base codes and ``(N, D)`` conditions to ``(N, K, D)`` codes."""

    def __init__(self, dim: int, dim_hidden: int | None = None, depth: int = 4,
                 l2norm_output: bool = False):
        super().__init__()
        dim_hidden = dim_hidden or dim
        self.proj_in = nn.Linear(2 * dim, dim)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, dim_hidden), nn.SiLU(), nn.Linear(dim_hidden, dim))
            for _ in range(depth))
        self.l2norm_output = l2norm_output

    def forward(self, codes: Tensor, condition: Tensor) -> Tensor:
        count, (size, dim) = condition.shape[0], codes.shape
        pair = torch.cat([condition.unsqueeze(1).expand(count, size, dim),
                          codes.unsqueeze(0).expand(count, size, dim)], dim=-1)  # (N, K, 2D)
        z = self.proj_in(pair)
        for block in self.layers:
            z = block(z) + z
        return F.normalize(z, dim=-1) if self.l2norm_output else z


class ConditionedCodes:
    """The codes one depth offers each row: ``mlp(base, condition)`` ``(N, K, D)``."""

    def __init__(self, mlp: CodeMLP, base: Tensor, condition: Tensor):
        self.codes = mlp(base, condition.to(base.dtype))

    def search(self, x: Tensor, *, temperature: float | None = None) -> Tensor:
        """``(N,)`` index of each row's nearest own code (squared Euclidean distance)."""
        # a with-block, not the decorator: torch.compile cannot wrap a decorated method of an
        # object made inside the graph
        with torch.no_grad():
            return (x.unsqueeze(1) - self.codes.detach()).pow(2).sum(-1).argmin(-1)

    def lookup(self, indices: Tensor) -> Tensor:
        """``(N, D)``: row ``n``'s code ``indices[n]`` (with the MLP's gradient)."""
        index = indices.reshape(-1, 1, 1).expand(-1, 1, self.codes.shape[-1])
        return self.codes.gather(1, index).squeeze(1)
