"""SimVQ: a vector quantizer whose codebook is a learned linear map of a frozen random codebook.

Zhu et al., 2024, "Addressing representation collapse in vector quantized models with one
linear layer" (arXiv 2411.02038). The codes are ``C = frozen · Wᵀ``: the ``(K, d₀)`` frozen
codebook (Gaussian, scale ``d₀^-1/2``) stays fixed and only the map ``W`` learns, so every
gradient step moves the whole codebook, not just the codes that were picked, and codes do not
die.

Per call the implicit codebook is computed once (one matmul), the nearest code is found with
:func:`vqvae.quantizers.search.nearest_code` (``||c||² - 2 x·cᵀ`` by blocks of ``addmm``; on
CPU for big enough searches by the same answer's faster two-stage search, an int8 pre-search
(:mod:`vqvae.quantizers.int8_presearch`) or a bfloat16 one
(:mod:`vqvae.quantizers.bf16_presearch`), each with a float32 re-check), and the output, loss
and gradients come from one fused autograd function (on CPU one pass over the rows each way in
C, :func:`.cpu_kernel.estimator_forward` and ``estimator_backward``, where built).

Loss, as in the reference library (``vector_quantize_pytorch.SimVQ``)::

    loss = commitment_weight · (mse(sg(x), q) + w_in · mse(x, sg(q)))

with ``w_in = input_to_quantize_commit_loss_weight``. The first term trains the linear map (moves
codes toward inputs), the second the encoder.
The output passes no gradient to the codes; its gradient reaches ``x`` by the rotation trick
(Fifty et al., 2024; the default) or straight through.

``kmeans_init`` (ours; the library's SimVQ has no such option, its ``VectorQuantize`` has) starts
the codes at the k-means centroids of the first training batch. The map ``W`` keeps the
directions it was initialised with but all its singular values become ``s =
kmeans_map_scale`` (``W ← s · U Vᵀ`` from ``W = U Σ Vᵀ``), and the frozen codebook becomes
``(centroids - b) · W / s²``, which the map sends back to the centroids. ``s`` sets how fast the
codes move under an adaptive optimiser: Adam moves each entry of ``W`` by about its learning rate
whatever the scale, and a code by that times its frozen row, whose size is the code's over
``s``. A random map's singular values spread over two orders of magnitude, so some directions
of the codebook learned 100 times faster than others. With the default
Gaussian start the codes are a cloud of norm about 0.6 wherever the encoder's outputs happen to
be, a few codes take every input at first (a perplexity of about 20 of 512 after the first MNIST
epoch) and how the run ends varies from seed to seed (README, "SimVQ's initialisation"). The
decision is made once on the host, as for ``VectorQuantize``: a Python flag mirrors the
``initted`` buffer (registered only with ``kmeans_init``), and deferred calls run
:func:`.kmeans.kmeans_fixed` and write only if the batch is usable.

Non-finite input (:mod:`vqvae.quantizers.guard`): SimVQ keeps no state that ``forward`` writes
(the codebook changes only by the optimiser), so a bad batch corrupts nothing; what matters is
that it is not hidden. An immediate call raises :class:`QuantizerInputError`. A deferred call
(compiled, or on an accelerator) reads nothing back: its ``quantized`` is NaN where the input
held a NaN or Inf, its loss is non-finite, and a training call counts itself refused, so
:func:`vqvae.train.train_step` raises the error at its loss read-back.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from . import cpu_kernel, distributed, guard
from .bf16_presearch import nearest
from .checks import check_finite
from .kmeans import kmeans_fixed, kmeans_synced
from .onednn_linear import linear, linear_with_grad
from .search import DEFAULT_BLOCK_BYTES
from .tracing import InitFlag, tracing
from .vector_quantize import QuantizerInputError, check_input


class SimVQOutput(NamedTuple):
    quantized: Tensor  # x.shape, the code vectors (gradient reaches x by the estimator)
    indices: Tensor  # x.shape without the feature axis, int64
    loss: Tensor  # scalar, the weighted commitment + codebook loss


def _identity(t: Tensor) -> Tensor:
    return t


def check_indices(indices: object, codebook_size: int) -> Tensor:
    """``indices`` as int64 after checking it is an integer tensor in ``[0, codebook_size)``."""
    if not isinstance(indices, Tensor) or indices.dtype.is_floating_point \
            or indices.dtype.is_complex or indices.dtype == torch.bool:
        got = f"a tensor of dtype {indices.dtype}" if isinstance(indices, Tensor) \
            else f"a {type(indices).__name__}"
        raise QuantizerInputError(f"indices must be an integer tensor, got {got}")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= codebook_size):
        raise QuantizerInputError(
            f"indices must lie in [0, {codebook_size}), got values in "
            f"[{int(indices.min())}, {int(indices.max())}]")
    return indices.long()


def _hooked(module: nn.Module) -> bool:
    """Whether calling ``module`` runs hooks (its own or global ones, e.g. a weight norm's
    pre-hook) that computing its function directly would skip."""
    from torch.nn.modules import module as module_hooks

    return bool(module._forward_hooks or module._forward_pre_hooks
                or module_hooks._global_forward_hooks
                or module_hooks._global_forward_pre_hooks)


def _same_values(copy: Tensor | None, tensor: Tensor | None) -> bool:
    """Whether ``tensor`` still holds the values ``copy`` was taken from (the O(size) check is
    cheaper than the codebook matmul it guards)."""
    if copy is None or tensor is None:
        return copy is None and tensor is None
    return (copy.shape == tensor.shape and copy.dtype == tensor.dtype
            and copy.device == tensor.device and torch.equal(copy, tensor))


# the library's norm floor (safe_div): a zero input or code keeps a finite gradient
NORM_EPS = 1e-6


class _Estimator(torch.autograd.Function):
    """Output ``q`` (exactly) and the loss, with the gradients of the rotation trick or of
    straight-through, in few passes over the batch.

    ``loss = (commitment + codebook) · mean((x - q)²)`` from one ``x - q``, whose gradient is
    ``2 · commitment / n · (x - q)`` for ``x`` and ``-2 · codebook / n · (x - q)`` for ``q``.

    Rotation trick (Fifty et al., 2024, §4.2): the output is taken as ``λ R x`` with
    ``R = I - 2 r rᵀ + 2 v uᵀ``, ``u = x̂``, ``v = q̂``, ``r = (u + v) / ||u + v||`` and
    ``λ = ||q|| / ||x||`` held constant, so ``x`` receives ``λ Rᵀ g``. Written out with
    per-row scalars ``a = u·g``, ``b = v·g``, ``s² = ||u + v||² = 2 + 2 u·v``::

        λ Rᵀ g = λ g + λ (2b - 2(a + b)/s²) / ||x|| · x - λ 2(a + b)/s² / ||q|| · q

    two row dot products and three fused passes instead of the textbook form's temporaries.
    """

    @staticmethod
    def forward(ctx, x: Tensor, q: Tensor, commitment: float, codebook: float,
                rotation: bool):
        ctx.weights = (commitment, codebook)
        ctx.rotation = rotation
        ctx.in_c = cpu_kernel.supports_rows(x, q)
        if ctx.in_c:  # one pass over the rows each way (cpu_kernel.estimator_forward)
            total, *norms = cpu_kernel.estimator_forward(x, q, rotation, NORM_EPS)
            ctx.save_for_backward(x, q, *(norms if rotation else ()))
            ctx.numel = x.numel()
            loss = torch.tensor(total * (commitment + codebook) / max(x.numel(), 1),
                                dtype=torch.float32)
            return q, loss
        diff = x - q  # (N, D)
        flat = diff.reshape(-1)
        loss = torch.dot(flat, flat).mul_((commitment + codebook) / flat.numel())
        if rotation:
            x_norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_(min=NORM_EPS)
            q_norm = torch.linalg.vector_norm(q, dim=-1, keepdim=True).clamp_(min=NORM_EPS)
            cos = torch.linalg.vecdot(x, q).unsqueeze(-1) / (x_norm * q_norm)  # u·v, (N, 1)
            ctx.save_for_backward(diff, x, q, x_norm, q_norm, cos)
        else:
            ctx.save_for_backward(diff)
        return q, loss

    @staticmethod
    def backward(ctx, grad_out: Tensor, grad_loss: Tensor):
        commitment, codebook = ctx.weights
        if ctx.in_c:
            x, q, *norms = ctx.saved_tensors
        if ctx.in_c and ctx.needs_input_grad[0] and grad_out.dtype == torch.float32 \
                and grad_out.shape == x.shape:
            scale = 2.0 * float(grad_loss) / max(ctx.numel, 1)
            # (contiguous: the gradient of a sum arrives as one expanded value)
            return (*cpu_kernel.estimator_backward(
                grad_out.contiguous(), x, q, norms if ctx.rotation else None,
                scale * commitment, -scale * codebook, NORM_EPS**2, ctx.needs_input_grad[1]),
                None, None, None)
        if ctx.in_c:  # (the rare call the kernel does not take: the same in tensor operations)
            saved = [x, q, *(n.unsqueeze(1) for n in norms)] if ctx.rotation else []
            diff = x - q
        else:
            diff, *saved = ctx.saved_tensors
        scale = 2.0 * grad_loss / diff.numel()
        grad_x = grad_q = None
        if ctx.needs_input_grad[0]:
            if ctx.rotation:
                x, q, x_norm, q_norm, cos = saved
                ratio = q_norm / x_norm  # λ, (N, 1)
                a = torch.linalg.vecdot(x, grad_out).unsqueeze(-1) / x_norm
                b = torch.linalg.vecdot(q, grad_out).unsqueeze(-1) / q_norm
                # s² = ||u + v||², floored as the library's l2norm floors ||u + v||
                pull = 2.0 * (a + b) / (2.0 + 2.0 * cos).clamp_(min=NORM_EPS**2)
                grad_x = torch.mul(grad_out, ratio)
                grad_x.addcmul_(x, ratio * (2.0 * b - pull) / x_norm)
                grad_x.addcmul_(q, -ratio * pull / q_norm)
                # (one pass, where diff * s then add_ makes a temporary and two)
                grad_x.addcmul_(diff, scale * commitment) if commitment else None
            else:
                grad_x = torch.addcmul(grad_out, diff, scale * commitment) if commitment \
                    else grad_out
        if ctx.needs_input_grad[1]:
            grad_q = diff * (-scale * codebook)
        return grad_x, grad_q, None, None, None


class _LinearCodes(torch.autograd.Function):
    """Rows ``indices`` of the codebook ``frozen · Wᵀ + b`` (already computed as ``codebook``),
    with the gradient of ``W`` (and ``b``) from the rows that were picked only.

    Through autograd, the gradient of the gathered rows is scattered into a dense ``(K, dim)``
    matrix that then meets the whole frozen codebook in ``Wᵀ``'s gradient, though only the codes
    used by the batch have non-zero rows (about 60% at 1024 codes for 1024 vectors).

    ``fixed_shapes``: the dense form after all, for calls that must not read back (the number
    of codes used is data-dependent: a compiled graph cannot hold it, an accelerator would
    stall to learn it).
    """

    @staticmethod
    def forward(ctx, weight: Tensor, bias: Tensor | None, frozen: Tensor, codebook: Tensor,
                 indices: Tensor, fixed_shapes: bool) -> Tensor:
        ctx.save_for_backward(frozen, indices)
        ctx.has_bias = bias is not None
        ctx.fixed_shapes = fixed_shapes
        return codebook.index_select(0, indices)  # (N, dim)

    @staticmethod
    def backward(ctx, grad: Tensor):
        frozen, indices = ctx.saved_tensors
        if ctx.fixed_shapes:
            per_code = grad.new_zeros(frozen.shape[0], grad.shape[1]).index_add_(0, indices, grad)
            grad_weight = linear(per_code.t(), frozen.to(grad.dtype).t())  # (dim, d0)
            grad_bias = per_code.sum(0) if ctx.has_bias and ctx.needs_input_grad[1] else None
            return grad_weight, grad_bias, None, None, None, None
        used, inverse = torch.unique(indices, return_inverse=True)  # (U,), (N,)
        per_code = grad.new_zeros(used.shape[0], grad.shape[1]).index_add_(0, inverse, grad)
        grad_weight = linear(per_code.t(), frozen.index_select(0, used).to(grad.dtype).t())
        grad_bias = per_code.sum(0) if ctx.has_bias and ctx.needs_input_grad[1] else None
        return grad_weight, grad_bias, None, None, None, None


class SimVQ(InitFlag, nn.Module):
    """SimVQ quantizer, a drop-in for ``vector_quantize_pytorch.SimVQ``.

    Tensor contract: ``x`` is ``(B, ..., dim)`` channels last, or ``(B, dim, ...)`` with
    ``channel_first=True`` (image or video feature maps); any floating dtype. The result is
    ``(quantized, indices, loss)``: ``quantized`` has ``x``'s shape and dtype, ``indices`` is int64
    of ``x``'s shape without the feature axis, ``loss`` a float32 scalar.

    Args:
        dim: feature size of the input and of the codes.
        codebook_size: number of codes K.
        codebook_transform: module mapping the frozen ``(K, frozen_codebook_dim)`` codebook to the
            ``(K, dim)`` codes; default ``Linear(frozen_codebook_dim, dim, bias=False)``.
        init_fn: applied once to the frozen Gaussian codebook at construction.
        channel_first: the feature axis is axis 1.
        rotation_trick: gradient to ``x`` by the rotation trick; ``False``: straight-through.
        input_to_quantize_commit_loss_weight: weight of the term that moves ``x`` toward its code.
        commitment_weight: weight of the whole loss.
        frozen_codebook_dim: width of the frozen codebook (default ``dim``).
        max_search_bytes: memory bound of one block of the distance matrix.
        kmeans_init: on the first training call, set the frozen codebook so that the codes are
            the k-means centroids of the batch (the transform must be an ``nn.Linear`` whose
            weight has full row rank, e.g. the default); not in the library's SimVQ. In a
            distributed run rank 0 clusters the rows of all processes and sends the result.
        kmeans_iters: Lloyd iterations of that k-means.
        kmeans_map_scale: the singular values the map gets at that initialisation: a code moves
            by about the optimiser's step over this, relative to its size.

    Differences from the library, on purpose:

    - ``quantized`` equals the code vectors exactly (the library's rotated vector equals them up
      to rounding), so ``indices_to_codes(indices)`` reproduces it bit for bit; an input row of
      zeros gets its code (the library returns zeros there).
    - bf16/fp16 inputs are searched in float32 against the float32 codebook (the library's
      ``torch.cdist`` refuses mixed dtypes); ``quantized`` comes back in the input's dtype.
    - ``codebook_dim`` exists (``dim``): the library's ``ResidualSimVQ.codebook_dim`` reads it
      from its layers, which lack it, and raises ``AttributeError``.
    - NaN/Inf input raises :class:`QuantizerInputError` (in a deferred call: NaN output, and
      the error at the trainer's next read-back; see the module docstring).
    """

    frozen_codebook: Tensor

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        codebook_transform: nn.Module | None = None,
        init_fn: Callable[[Tensor], Tensor] = _identity,
        channel_first: bool = False,
        rotation_trick: bool = True,
        input_to_quantize_commit_loss_weight: float = 0.25,
        commitment_weight: float = 1.0,
        frozen_codebook_dim: int | None = None,
        *,
        max_search_bytes: int = DEFAULT_BLOCK_BYTES,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        kmeans_map_scale: float = 0.03,
    ):
        super().__init__()
        if not (isinstance(dim, int) and dim >= 1):
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if not (isinstance(codebook_size, int) and codebook_size >= 1):
            raise ValueError(f"codebook_size must be a positive int, got {codebook_size!r}")
        frozen_codebook_dim = dim if frozen_codebook_dim is None else frozen_codebook_dim
        if not (isinstance(frozen_codebook_dim, int) and frozen_codebook_dim >= 1):
            raise ValueError(
                f"frozen_codebook_dim must be a positive int, got {frozen_codebook_dim!r}")
        if not (isinstance(kmeans_iters, int) and kmeans_iters >= 0):
            raise ValueError(f"kmeans_iters must be an int >= 0, got {kmeans_iters!r}")
        if not (isinstance(kmeans_map_scale, (int, float)) and kmeans_map_scale > 0
                and math.isfinite(kmeans_map_scale)):
            raise ValueError(
                f"kmeans_map_scale must be a finite number > 0, got {kmeans_map_scale!r}")
        if input_to_quantize_commit_loss_weight < 0 or commitment_weight < 0:
            raise ValueError("input_to_quantize_commit_loss_weight and commitment_weight must "
                             "be >= 0")
        self.dim = dim
        self.codebook_size = codebook_size
        self.codebook_dim = dim
        self.frozen_codebook_dim = frozen_codebook_dim
        self.channel_first = channel_first
        self.rotation_trick = rotation_trick
        self.input_to_quantize_commit_loss_weight = input_to_quantize_commit_loss_weight
        self.commitment_weight = commitment_weight
        self.max_search_bytes = max_search_bytes

        # Gaussian with unit expected row norm: the codes start at the scale of normalised inputs
        frozen = torch.randn(codebook_size, frozen_codebook_dim) * frozen_codebook_dim ** -0.5
        self.register_buffer("frozen_codebook", init_fn(frozen))
        if codebook_transform is None:
            codebook_transform = nn.Linear(frozen_codebook_dim, dim, bias=False)
        self.code_transform = codebook_transform
        self.kmeans_init = bool(kmeans_init)
        self.kmeans_iters = kmeans_iters
        self.kmeans_map_scale = float(kmeans_map_scale)
        if self.kmeans_init:
            if type(codebook_transform) is not nn.Linear:
                raise ValueError(
                    "kmeans_init solves the linear map for the frozen codebook: it needs "
                    "codebook_transform to be an nn.Linear (the default), got "
                    f"{type(codebook_transform).__name__}")
            if frozen_codebook_dim < dim:
                raise ValueError(
                    f"kmeans_init needs frozen_codebook_dim >= dim (a map from "
                    f"{frozen_codebook_dim} to {dim} dimensions cannot reach every centroid)")
        self._register_init_flag(self.kmeans_init)
        guard.register_counter(self)

    @property
    def codebook(self) -> Tensor:
        """The implicit ``(K, dim)`` codebook, ``code_transform(frozen_codebook)``."""
        transform = self.code_transform
        if type(transform) is nn.Linear and not _hooked(transform):
            # the oneDNN route on CPU (2.5x MKL's speed on the AMD EPYC with AVX-512), and the
            # one route forward, decode and the evaluation cache all take: their bits agree
            return linear_with_grad(self.frozen_codebook, transform.weight, transform.bias)
        return transform(self.frozen_codebook)

    @property
    def kmeans_pending(self) -> bool:
        """Whether k-means initialisation is still to run (see ``InitFlag.init_pending``)."""
        return self.init_pending

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, codebook_size={self.codebook_size}, "
                f"frozen_codebook_dim={self.frozen_codebook_dim}, "
                f"rotation_trick={self.rotation_trick}, channel_first={self.channel_first}"
                + (", kmeans_init=True" if self.kmeans_init else ""))

    @torch.no_grad()
    def initialize(self, rows: Tensor, ok: Tensor | None = None) -> None:
        """Make the codes the k-means centroids of ``rows`` ``(N, dim)`` and mark the codebook
        initialised: the map becomes ``s · U Vᵀ`` (its own singular vectors, every singular
        value ``s``) and the frozen codebook ``(centroids - b) · W / s²``, which that map sends
        back to the centroids.
        Raises on non-finite rows, changing nothing; with ``ok`` (a deferred call) nothing is
        read back and nothing changes unless ``ok`` is true."""
        linear = self.code_transform
        rows = rows.detach().float()
        if ok is None:
            check_finite(rows)
            centroids = kmeans_synced(rows, self.codebook_size, self.kmeans_iters,
                                      synced=distributed.should_sync(None),
                                      max_block_bytes=self.max_search_bytes).centroids
        else:
            if distributed.should_sync(None):
                raise QuantizerInputError(
                    "k-means initialisation synchronised across processes reads sizes back to "
                    "the host: use immediate input checks (vqvae.set_input_checks('immediate')) "
                    "and call eagerly")
            safe = torch.where(ok, rows, torch.zeros_like(rows))  # no NaN in the random draws
            centroids = kmeans_fixed(safe, self.codebook_size, self.kmeans_iters,
                                     max_block_bytes=self.max_search_bytes).centroids
        scale = self.kmeans_map_scale
        u, _, vh = torch.linalg.svd(linear.weight.double(),
                                         full_matrices=False)  # (dim, dim), (dim, d0)
        weight = (u @ vh) * scale  # rows orthogonal, each of norm s
        shift = centroids.double()
        if linear.bias is not None:
            shift = shift - linear.bias.double()
        frozen = (shift @ weight / scale**2).to(self.frozen_codebook.dtype)
        weight = weight.to(linear.weight.dtype)
        if ok is None:
            self.frozen_codebook.copy_(frozen)
            linear.weight.copy_(weight)
            self.initted.fill_(True)
        else:
            self.frozen_codebook.copy_(torch.where(ok, frozen, self.frozen_codebook))
            linear.weight.copy_(torch.where(ok, weight, linear.weight))
            self.initted.copy_(self.initted | ok)
        self._initted_known = True

    # ------------------------------------------------------------------ forward

    def forward(self, x: Tensor) -> SimVQOutput:
        self._check_input(x)
        h = x.movedim(1, -1) if self.channel_first else x
        quantized, indices, loss = self.quantize_last(h)
        if self.channel_first:
            quantized = quantized.movedim(-1, 1)
        return SimVQOutput(quantized, indices, loss)

    def quantize_last(self, h: Tensor, codebook: Tensor | None = None) -> SimVQOutput:
        """Quantize channels-last ``h`` ``(..., dim)``; ``codebook`` if the caller computed it."""
        shape = h.shape
        flat = h.reshape(-1, self.dim)  # (N, dim)
        if flat.dtype in (torch.float16, torch.bfloat16):
            flat = flat.float()
        deferred = guard.deferred(flat)
        if codebook is None and self.training and flat.shape[0] and self.kmeans_pending:
            self.initialize(flat, guard.usable(flat) if deferred else None)
        linear = self._plain_linear()
        if codebook is None:
            # float32 codes under autocast too: the search, loss and gradients then match a
            # float32 run (a bfloat16 codebook rounds the codes and their gradient to 8 bits)
            with torch.autocast(flat.device.type, enabled=False):
                if linear is not None:  # gradient by _LinearCodes; the search needs no graph
                    with torch.no_grad():
                        codebook = self.codebook
                elif not torch.is_grad_enabled() and type(self.code_transform) is nn.Linear \
                        and not tracing():  # (a compiled graph computes it anyway)
                    codebook = self._cached_codebook()
                else:
                    codebook = self.codebook  # (K, dim)
        if flat.dtype != codebook.dtype:
            flat = flat.to(codebook.dtype)
        if flat.shape[0] == 0:
            empty = torch.empty(shape[:-1], dtype=torch.long, device=h.device)
            return SimVQOutput(h.clone(), empty, codebook.sum().float() * 0.0)
        indices = nearest(flat.detach(), codebook.detach(),
                          max_block_bytes=self.max_search_bytes)  # (N,)
        if linear is not None and not codebook.requires_grad:
            q = _LinearCodes.apply(linear.weight, linear.bias, self.frozen_codebook, codebook,
                                   indices, deferred)
        else:
            q = codebook.index_select(0, indices)  # (N, dim)
        weight = float(self.commitment_weight)
        out, loss = _Estimator.apply(
            flat, q, weight * float(self.input_to_quantize_commit_loss_weight), weight,
            bool(self.rotation_trick))
        if deferred:
            if self.training:
                guard.record(self, guard.usable(flat))
            # a code vector looks valid whatever the input was: NaN where the input was not
            # (x - x is 0 for a finite x, NaN for NaN and ±Inf)
            out = out + (flat.detach() - flat.detach())
        elif not math.isfinite(loss.item()):
            # NaN/Inf in the input makes the loss non-finite: one scalar check finds it
            check_finite(h)
        return SimVQOutput(out.reshape(shape).to(h.dtype), indices.reshape(shape[:-1]),
                           loss.float())

    def _cached_codebook(self) -> Tensor:
        """The implicit codebook without autograd, recomputed only when the frozen codebook or
        the linear map changed: evaluation calls then skip the ``(K, d₀) x (d₀, dim)`` matmul.

        The map's parameters are compared by value with copies taken when the cache was
        filled, not by tensor versions: a fused optimizer step (``Adam(fused=True)``, what
        training uses) updates them in place without bumping their version counter, and a
        cache keyed on versions returned the codebook of the previous evaluation. The frozen
        codebook, a buffer no optimizer steps, is matched by identity and version (a copy of
        it would double the largest tensor).
        """
        linear = self.code_transform
        frozen = self.frozen_codebook
        params = (linear.weight, linear.bias)
        cached = self.__dict__.get("_codebook_cache")
        if cached is not None and cached[0] is frozen and cached[1] == frozen._version \
                and all(_same_values(a, b) for a, b in zip(cached[2], params, strict=True)):
            return cached[3]
        codebook = self.codebook
        if torch.is_inference_mode_enabled():  # an inference tensor must not leak out of it
            return codebook
        copies = tuple(None if t is None else t.detach().clone() for t in params)
        # the cache holds the buffer itself, so `is` cannot match a new tensor that took a
        # freed one's address
        self.__dict__["_codebook_cache"] = (frozen, frozen._version, copies, codebook)
        return codebook

    def _plain_linear(self) -> nn.Linear | None:
        """The transform when it is a plain ``nn.Linear`` (the default) and autograd is on."""
        transform = self.code_transform
        if type(transform) is nn.Linear and torch.is_grad_enabled() \
                and not self.frozen_codebook.requires_grad:
            return transform
        return None

    # ------------------------------------------------------------------ decode

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """Code vectors for ``indices`` (any shape): ``(*indices.shape, dim)``, or channel-first
        ``(B, dim, ...)`` with ``channel_first=True``. Equal to ``quantized`` of the call that
        produced ``indices``."""
        indices = check_indices(indices, self.codebook_size)
        # the whole codebook, as forward computes it: a transform of only the rows asked for
        # could round differently (other matmul blocking)
        codes = self.codebook[indices]
        if self.channel_first and codes.ndim >= 2:
            codes = codes.movedim(-1, 1)
        return codes

    decode = indices_to_codes
    get_output_from_indices = indices_to_codes

    def _check_input(self, x: Tensor) -> None:
        if self.channel_first:
            if not isinstance(x, Tensor) or x.ndim < 2:
                raise QuantizerInputError(
                    f"channel_first=True expects (B, {self.dim}, ...), got "
                    f"{'shape ' + str(tuple(x.shape)) if isinstance(x, Tensor) else type(x)}")
            check_input(x.movedim(1, -1), self.dim)
        else:
            check_input(x, self.dim)
