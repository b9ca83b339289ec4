"""BEST-RQ random-projection quantizer (Chiu et al., 2022, arXiv 2202.01855).

Targets for self-supervised speech models: each input vector is normalised (zero mean, unit
variance), projected by a frozen random matrix, and labelled with the index of the frozen
random unit code of largest cosine similarity. Nothing in it learns; it only gives indices (and,
with ``indices=`` given, the cross-entropy of the cosine similarities against them).

A drop-in for ``vector_quantize_pytorch.RandomProjectionQuantizer``.

NaN/Inf input raises :class:`QuantizerInputError` in an immediate call; a deferred call
(compiled, or on an accelerator; see :mod:`vqvae.quantizers.guard`) cannot raise, and labels
such rows ``-1`` (no code, which the cross-entropy ignores) instead of a valid-looking index;
its cross-entropy comes out NaN. Nothing here has state, so nothing else can go wrong.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import guard
from .bf16_presearch import nearest
from .checks import all_finite
from .simvq import check_finite
from .vector_quantize import QuantizerInputError, check_input


class RandomProjectionQuantizer(nn.Module):
    """Frozen random projection + frozen normalised codebook, one per codebook head.

    Tensor contract: ``x`` is ``(..., dim)`` (the library: ``(B, N, dim)``). ``forward(x)``
    returns int64 indices ``x.shape[:-1]`` for ``num_codebooks=1`` or
    ``(*x.shape[:-1], num_codebooks)``; ``forward(x, indices)`` returns the scalar
    cross-entropy of the cosine similarities (the logits) against ``indices`` (``-1`` ignored).

    Args:
        dim: input size.
        codebook_size: codes per head.
        codebook_dim: size of the projected space.
        num_codebooks: independent heads, each with its projection and codebook.
        norm: normalise each input vector to zero mean and unit variance first (LayerNorm
            without affine parameters), as the paper does to prevent collapse.
        **kwargs: options of the library's inner ``VectorQuantize``; they configure training of
            its codebook, which this quantizer never trains, so they are accepted and unused.

    Difference from the library, on purpose: with ``num_codebooks > 1`` the library's inner
    ``VectorQuantize`` gets ``dim = codebook_dim · num_codebooks`` and, its own ``codebook_dim``
    defaulting to that, a further random ``Linear`` (with bias) from each head's projection to
    ``codebook_dim · num_codebooks²`` features that mixes the heads; its codebooks are then
    ``codebook_dim · num_codebooks`` wide. Here each head is BEST-RQ as the paper has it: its own
    projection straight to ``codebook_dim``, its own codebook, independent of the other heads.

    Search: the argmax of ``p·ĉ`` over unit codes ``ĉ`` does not depend on ``||p||``, so the
    projection is searched as is (``||ĉ||² - 2 p·ĉ`` with ``||ĉ|| = 1``, by
    :func:`vqvae.quantizers.bf16_presearch.nearest`: the float32 answer, on CPU through an int8
    or bfloat16 pre-search with an exact re-check where one pays, see ``presearch_kind``)
    and the input's LayerNorm variance scaling is skipped on that path (it too only scales
    ``p``). The cosine similarities are formed only for the cross-entropy.
    """

    rand_projs: Tensor
    codebook: Tensor

    def __init__(self, *, dim: int, codebook_size: int, codebook_dim: int,
                 num_codebooks: int = 1, norm: bool = True, **kwargs):
        super().__init__()
        for name, value in (("dim", dim), ("codebook_size", codebook_size),
                            ("codebook_dim", codebook_dim), ("num_codebooks", num_codebooks)):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.dim = dim
        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim
        self.num_codebooks = num_codebooks
        self.normalise = bool(norm)
        self.unused_options = dict(kwargs)
        projections = torch.empty(num_codebooks, dim, codebook_dim)
        nn.init.xavier_normal_(projections)
        self.register_buffer("rand_projs", projections)
        codes = F.normalize(torch.randn(num_codebooks, codebook_size, codebook_dim), dim=-1)
        self.register_buffer("codebook", codes)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, codebook_size={self.codebook_size}, "
                f"codebook_dim={self.codebook_dim}, num_codebooks={self.num_codebooks}, "
                f"norm={self.normalise}")

    def project(self, x: Tensor) -> Tensor:
        """``(num_codebooks, N, codebook_dim)`` projections of ``x`` ``(..., dim)``, after the
        LayerNorm (without affine parameters) when ``norm=True``."""
        flat = x.reshape(-1, self.dim)
        flat = flat.float() if flat.dtype in (torch.float16, torch.bfloat16) else flat
        if self.normalise:
            flat = F.layer_norm(flat, (self.dim,))
        return torch.matmul(flat.unsqueeze(0), self.rand_projs.to(flat.dtype))

    def forward(self, x: Tensor, indices: Tensor | None = None) -> Tensor:
        check_input(x, self.dim)
        deferred = guard.deferred(x)
        if not deferred and not all_finite(x):  # one sum; the exact test only when not finite
            check_finite(x)
        lead = x.shape[:-1]
        if indices is not None:
            return self._cross_entropy(x, indices)
        flat = x.detach().reshape(-1, self.dim)
        flat = flat.float() if flat.dtype in (torch.float16, torch.bfloat16) else flat
        if self.normalise:  # centring changes the direction; dividing by σ does not
            flat = flat - flat.mean(-1, keepdim=True)
        codes = self.codebook.to(flat.dtype)
        heads = [nearest(flat @ self.rand_projs[h].to(flat.dtype), codes[h])
                 for h in range(self.num_codebooks)]
        if deferred:
            finite = torch.isfinite(flat).all(-1)  # (N,)
            heads = [torch.where(finite, head, -1) for head in heads]
        if self.num_codebooks == 1:
            return heads[0].reshape(lead)
        return torch.stack(heads, dim=-1).reshape(*lead, self.num_codebooks)

    def _cross_entropy(self, x: Tensor, indices: Tensor) -> Tensor:
        expected = x.shape[:-1] if self.num_codebooks == 1 \
            else (*x.shape[:-1], self.num_codebooks)
        if not isinstance(indices, Tensor) or indices.dtype.is_floating_point \
                or tuple(indices.shape) != tuple(expected):
            got = f"dtype {indices.dtype}, shape {tuple(indices.shape)}" \
                if isinstance(indices, Tensor) else type(indices).__name__
            raise QuantizerInputError(
                f"indices must be an integer tensor of shape {tuple(expected)}, got {got}")
        p = F.normalize(self.project(x), dim=-1)  # (h, N, e)
        logits = torch.matmul(p, self.codebook.to(p.dtype).transpose(1, 2))  # (h, N, K)
        targets = indices.reshape(-1, self.num_codebooks).t().long()  # (h, N)
        return F.cross_entropy(logits.reshape(-1, self.codebook_size), targets.reshape(-1),
                               ignore_index=-1)
