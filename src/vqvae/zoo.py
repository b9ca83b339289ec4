"""The built-in quantizers of ``vqvae train --quantizer NAME``: ours, the course's, the
library's behind our contract, and ``none`` for benchmarks. One :func:`register` each.

Every module built here follows the contract ``quantized, indices, loss = q(x)`` with ``x`` of
shape ``(..., dim)`` and has ``decode(indices)``.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor, nn

from .quantizers import GroupedResidualVQ, ResidualVQ, VectorQuantize, VQOutput
from .quantizers.course import CourseVectorQuantize
from .registry import register

#: Options of our VectorQuantize for the MNIST models (``--quantizer ours``), chosen by
#: measurement (README, "How the defaults were chosen"). Random N(0, 1) codes, not k-means:
#: k-means on the untrained encoder's outputs gives each of the 16 positions its own ~32
#: codes, 5 bits per position instead of 9. Restarts of dead codes wait for the encoder's
#: outputs to spread out, for the same reason. A slower EMA (0.95) and a light commitment
#: weight (0.1) let the encoder move more freely.
OURS_DEFAULTS: dict[str, Any] = {
    "decay": 0.95,
    "commitment_weight": 0.1,
    "kmeans_init": False,
    "threshold_ema_dead_code": 1.0,
    "dead_code_warmup_steps": 1000,
    # this project's choices where VectorQuantize's defaults follow the reference library
    "rotation_trick": False,
    "codebook_init": "normal",
}

#: Options of ours on the conv model, over the MNIST models' (README, "Beyond 28x28 digits",
#: has the measurements). Its 49 grid positions share one encoder, so the first batch's 6,272
#: vectors spread over the whole latent space and k-means on them is a fair start (on the MLP
#: each position would get its own few codes). Restarts after 100 steps, not 1000: with the
#: MLP's wait, restarts begin in the third epoch and the first two use 11-18 of 512 codes
#: (N(0, 1) codes far from the small outputs of the new encoder stay dead); 100 steps in, the
#: outputs have spread and restarted codes stay in use.
CONV_DEFAULTS: dict[str, Any] = {"kmeans_init": True, "dead_code_warmup_steps": 100}

#: Commitment weight of the residual presets before division by the depth. Every layer's loss
#: pulls the encoder toward its own partial sum (the first toward the coarsest), so the pull of
#: the mean of L layers is dominated by coarse errors a deep stack no longer makes. Measured with
#: the MLP on MNIST, 4 layers: commitment 0.1 gives test MSE 0.0070, 0.025 gives 0.0065, 0.01
#: gives 0.0060, 0.0025 gives 0.0062; 8 layers: 0.0125 gives 0.0058, 0.005 gives 0.0055.
RESIDUAL_COMMITMENT = 0.04

#: Ours for residual stacks: the commitment weight is divided by the depth (``_depth_scaled``).
RESIDUAL_DEFAULTS: dict[str, Any] = {**OURS_DEFAULTS, "commitment_weight": None}

#: The library's residual quantizers with the settings of ours that it has, so that a
#: comparison is like with like: the same decay, commitment weight, initialisation and dead-code
#: threshold, and straight-through gradients (the library's default is the rotation trick). It
#: has no warm-up before dead-code restarts: its restarts start at the first step.
LIBRARY_RESIDUAL_DEFAULTS: dict[str, Any] = {
    **{k: v for k, v in RESIDUAL_DEFAULTS.items()
       if k not in ("dead_code_warmup_steps", "codebook_init")},
    "rotation_trick": False,
}

#: The library's residual quantizers on the conv model: k-means as ours (it has no warm-up).
LIBRARY_CONV_DEFAULTS: dict[str, Any] = {"kmeans_init": True}

RESIDUAL = ("num_quantizers",)
GROUPED = ("groups", "num_quantizers")


def _depth_scaled(options: dict) -> dict:
    """``commitment_weight=None`` means ``RESIDUAL_COMMITMENT / num_quantizers``."""
    if options.get("commitment_weight") is not None:
        return options
    depth = options.get("num_quantizers", 1)
    return {**options, "commitment_weight": RESIDUAL_COMMITMENT / depth}


# ---------------------------------------------------------------------------- ours


@register("ours", help="our VectorQuantize", defaults=OURS_DEFAULTS,
          model_defaults={"conv": CONV_DEFAULTS})
def _ours(dim: int, codebook_size: int, options: dict) -> nn.Module:
    return VectorQuantize(dim=dim, codebook_size=codebook_size, **options)


class _ModelResidualVQ(ResidualVQ):
    """Ours behind the models' contract: the mean of the per-depth losses, and the gradient
    passed once to the encoder (``straight_through_sum``). State dict keys are ResidualVQ's."""

    def forward(self, x: Tensor) -> VQOutput:
        quantized, indices, losses = super().forward(x)
        return VQOutput(quantized, indices, losses.mean())


class _ModelGroupedResidualVQ(GroupedResidualVQ):
    """As :class:`_ModelResidualVQ`; codes laid out ``(..., groups, num_quantizers)``."""

    def forward(self, x: Tensor) -> VQOutput:
        quantized, indices, losses = super().forward(x)
        return VQOutput(quantized, indices.movedim(0, -2), losses.mean())

    def decode(self, indices: Tensor) -> Tensor:
        return super().decode(indices.movedim(-2, 0))


@register("rvq", help="our ResidualVQ", defaults=RESIDUAL_DEFAULTS, layout=RESIDUAL,
          model_defaults={"conv": CONV_DEFAULTS})
def _residual(dim: int, codebook_size: int, options: dict) -> nn.Module:
    return _ModelResidualVQ(dim=dim, codebook_size=codebook_size, straight_through_sum=True,
                            **_depth_scaled(options))


# Temperature for this model's latent scale: on a trained 4-layer MLP model the nearest code is
# ~0.06 away at depth 1 and the 10th ~0.18; at 0.1 (the library README's value) codes are
# sampled among dozens, at 0.01 the second-nearest is ~e^-3 as likely as the nearest.
register("rqvae", help="ResidualVQ with a shared codebook and stochastic code sampling",
         defaults={**RESIDUAL_DEFAULTS, "shared_codebook": True,
                   "stochastic_sample_codes": True, "sample_codebook_temp": 0.01},
         layout=RESIDUAL, model_defaults={"conv": CONV_DEFAULTS})(_residual)


@register("grvq", help="our GroupedResidualVQ", defaults=RESIDUAL_DEFAULTS, layout=GROUPED,
          model_defaults={"conv": CONV_DEFAULTS})
def _grouped(dim: int, codebook_size: int, options: dict) -> nn.Module:
    return _ModelGroupedResidualVQ(dim=dim, codebook_size=codebook_size,
                                   straight_through_sum=True, **_depth_scaled(options))


@register("naive", help="the course's own layer (Exercise 2)")
def _naive(dim: int, codebook_size: int, options: dict) -> nn.Module:
    if options:
        raise ValueError(f"the course's layer takes no options, got {sorted(options)}")
    return CourseVectorQuantize(codebook_size=codebook_size, dim=dim)


# ---------------------------------------------------------------------------- the library's


def flatten_positions(x: Tensor) -> Tensor:
    """``(B, *positions, D)`` as ``(B, N, D)``. The library's layers take channels-last
    sequences ``(B, N, D)``: given the conv model's grid ``(B, 7, 7, D)`` they fail at the
    first training step (a shape mismatch in the EMA update), and their ``accept_image_fmap``
    wants channels first, ``(B, D, H, W)``, which our contract is not."""
    return x.reshape(x.shape[0], -1, x.shape[-1]) if x.ndim > 3 else x


def unflatten_positions(indices: Tensor, positions: tuple[int, ...]) -> Tensor:
    """Indices ``(B, N, *axes)`` back to ``(B, *positions, *axes)``."""
    return indices.reshape(*positions, *indices.shape[2:]) if len(positions) > 2 else indices


@functools.cache
def library_vector_quantize() -> type[nn.Module]:
    """The library's ``VectorQuantize`` behind our contract, on inputs of any
    ``(B, *positions, dim)``: positions are flattened into one sequence for the library, and
    the output and indices take the positions' shape back. A subclass, so that its parameters
    keep the library's own names; made on first use, since the library is optional."""
    from vector_quantize_pytorch import VectorQuantize as LibraryVQ

    class LibraryVectorQuantize(LibraryVQ):
        def forward(self, x: Tensor, *args, **kwargs) -> VQOutput:
            quantized, indices, loss = super().forward(flatten_positions(x), *args, **kwargs)
            return VQOutput(quantized.reshape(x.shape),
                            unflatten_positions(indices, tuple(x.shape[:-1])), loss)

        def decode(self, indices: Tensor) -> Tensor:
            flat = indices.reshape(indices.shape[0], -1) if indices.ndim > 2 else indices
            out = self.get_output_from_indices(flat)
            return out.reshape(*indices.shape, out.shape[-1])

    return LibraryVectorQuantize


@register("lucidrains", help="the library's VectorQuantize (the course's Exercise 1)",
          defaults={"decay": 0.8, "commitment_weight": 1.0})
def _lucidrains(dim: int, codebook_size: int, options: dict) -> nn.Module:
    return library_vector_quantize()(dim=dim, codebook_size=codebook_size, **options)


class LibraryResidual(nn.Module):
    """The library's ``ResidualVQ`` / ``GroupedResidualVQ`` behind our contract.

    The library returns one loss per depth (and group) and puts the group axis first; this
    returns a scalar loss reduced as ours is (the mean over depths and groups) and indices laid
    out as ours, ``(..., num_quantizers)`` or ``(..., groups, num_quantizers)``. (The library
    pads the depths quantize dropout skipped with zero losses; the comparisons use no dropout.)
    """

    def __init__(self, module: nn.Module, grouped: bool):
        super().__init__()
        self.module = module
        self.grouped = grouped

    def forward(self, x: Tensor) -> VQOutput:
        quantized, indices, losses = self.module(flatten_positions(x))
        if self.grouped:
            indices = indices.movedim(0, -2)
        return VQOutput(quantized.reshape(x.shape),
                        unflatten_positions(indices, tuple(x.shape[:-1])), losses.mean())

    def decode(self, indices: Tensor) -> Tensor:
        axes = 2 if self.grouped else 1  # (groups,) num_quantizers
        positions = indices.shape[:indices.ndim - axes]
        flat = indices.reshape(positions[0], -1, *indices.shape[-axes:]) \
            if len(positions) > 2 else indices
        if self.grouped:
            flat = flat.movedim(-2, 0)  # (groups, B, N, num_quantizers)
        out = self.module.get_output_from_indices(flat)
        return out.reshape(*positions, out.shape[-1])


@register("lucidrains-rvq", help="the library's ResidualVQ, with the settings of ours",
          defaults=LIBRARY_RESIDUAL_DEFAULTS, layout=RESIDUAL,
          model_defaults={"conv": LIBRARY_CONV_DEFAULTS})
def _lucidrains_residual(dim: int, codebook_size: int, options: dict) -> nn.Module:
    from vector_quantize_pytorch import ResidualVQ as LibraryResidualVQ

    return LibraryResidual(LibraryResidualVQ(dim=dim, codebook_size=codebook_size,
                                             **_depth_scaled(options)), grouped=False)


@register("lucidrains-grvq", help="the library's GroupedResidualVQ, with the settings of ours",
          defaults=LIBRARY_RESIDUAL_DEFAULTS, layout=GROUPED,
          model_defaults={"conv": LIBRARY_CONV_DEFAULTS})
def _lucidrains_grouped(dim: int, codebook_size: int, options: dict) -> nn.Module:
    from vector_quantize_pytorch import GroupedResidualVQ as LibraryGroupedResidualVQ

    return LibraryResidual(LibraryGroupedResidualVQ(dim=dim, codebook_size=codebook_size,
                                                    **_depth_scaled(options)), grouped=True)


# ---------------------------------------------------------------------------- none


class Identity(nn.Module):
    """No quantizer: the input goes through unchanged, with a zero loss and one index value
    (0) per position, so an image costs 0 bits. What the benchmarks measure a network without
    a quantizer with; it cannot decode, since codes carry nothing."""

    def forward(self, x: Tensor) -> VQOutput:
        indices = x.new_zeros(x.shape[:-1], dtype=torch.long)
        return VQOutput(x, indices, x.new_zeros(()))

    def decode(self, indices: Tensor) -> Tensor:
        raise ValueError("the 'none' quantizer has no codes to decode")


@register("none", help="no quantizer: the encoder's output goes to the decoder (benchmarks)",
          codes=lambda config: 1, listed=False)
def _none(dim: int, codebook_size: int, options: dict) -> nn.Module:
    if options:
        raise ValueError(f"the 'none' quantizer takes no options, got {sorted(options)}")
    return Identity()
