"""The scalar, lookup-free and SimVQ quantizer families in the registry, ours and the library's.

One :func:`register` each: ``fsq``, ``rfsq``, ``grfsq``, ``latent`` (codes from per-channel
levels), ``lfq``, ``rlfq``, ``grlfq`` (codes from bits), ``simvq``, ``rsimvq`` (a codebook), and
the library's ``lucidrains-fsq``, ``lucidrains-lfq``, ``lucidrains-simvq`` with the same
settings as ours, so a comparison is like with like.

The classes' own calls differ from the registry's contract ``quantized, indices, loss = q(x)``
on channels-last ``(..., dim)``: FSQ returns no loss, the residual classes return one loss per
depth, the grouped ones put the group axis first, and several read a 4-D input as a
channel-first feature map (LatentQuantize even a 3-D one whose axis 1 happens to equal
``dim``). :class:`Adapted` flattens every input to one sequence the class reads as channels
last and puts the results back in our layout, so one adapter serves ours and the library's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from .quantizers import (
    FSQ,
    LFQ,
    GroupedResidualFSQ,
    GroupedResidualLFQ,
    LatentQuantize,
    ResidualFSQ,
    ResidualLFQ,
    ResidualSimVQ,
    SimVQ,
    VQOutput,
)
from .registry import register

#: FSQ levels for the MLP's 16 positions of dimension 16: 8·8·8 = 512 values, 9 bits a position
#: as the 512-code VQ. Chosen by measurement (README, "How the FSQ, LFQ and SimVQ defaults were
#: chosen"); the class projects the 16 dimensions to len(levels) and back.
FSQ_DEFAULTS: dict[str, Any] = {"levels": [8, 8, 8]}

#: Ours also bounds with a clamp whose gradient outside the range is kept where it points back
#: in (``inward_clamp``, an option the library's FSQ lacks): over ten seeded runs (5 seeds, bf16
#: and fp32) test MSE below the library's (README, "FSQ's bound").
FSQ_OURS_DEFAULTS: dict[str, Any] = {**FSQ_DEFAULTS, "inward_clamp": True}

#: Options of our FSQ that the library's does not take.
FSQ_OURS_ONLY = ("inward_clamp",)

#: The residual LFQ stacks: ``codebook_size`` (the model's, 512 = 9 bits) decides the bits; these
#: are the loss weights (the library's defaults), unmeasured on the residual stacks.
RESIDUAL_LFQ_DEFAULTS: dict[str, Any] = {"entropy_loss_weight": 0.1,
                                         "commitment_loss_weight": 0.0, "diversity_gamma": 1.0}

#: LFQ: the library's loss weights on the unit sphere (``spherical``, binary spherical
#: quantisation, Zhao et al. 2024). Without it the entropy penalty lets the codes collapse
#: (README, "How the FSQ, LFQ and SimVQ defaults were chosen"): its gradient reaches only inputs
#: within about 1 / (4 inv_temperature) of a sign change, and the per-sample term rewards an
#: encoder that grows its outputs (to ~3e6 in 5 epochs), so fewer and fewer inputs get any push
#: toward unused codes. On the sphere the scale is fixed and a steady share of inputs stays in
#: reach: all 512 codes in use. ``lucidrains-lfq`` gets the same options.
LFQ_DEFAULTS: dict[str, Any] = {**RESIDUAL_LFQ_DEFAULTS, "spherical": True}

#: Ours also centres each projected feature on the first batch (``centre_init``, an option the
#: library's LFQ lacks): over ten seeded runs test MSE below the library's (README, "LFQ's
#: start").
LFQ_OURS_DEFAULTS: dict[str, Any] = {**LFQ_DEFAULTS, "centre_init": True}

#: Options of our LFQ that the library's does not take.
LFQ_OURS_ONLY = ("centre_init",)

#: SimVQ with the model's ``codebook_size`` codes; the estimator chosen by measurement. These
#: are the options the library's SimVQ shares (``lucidrains-simvq`` gets them; ``rsimvq`` too).
SIMVQ_SHARED_DEFAULTS: dict[str, Any] = {"rotation_trick": True}

#: Ours also starts its codes at the k-means centroids of the first batch (an option the
#: library's SimVQ lacks): over ten seeded runs (5 seeds, bf16 and fp32) test MSE 0.94x the
#: library's on average, against 1.00x from the Gaussian start (README, "SimVQ's
#: initialisation").
SIMVQ_DEFAULTS: dict[str, Any] = {**SIMVQ_SHARED_DEFAULTS, "kmeans_init": True}

#: Options of our SimVQ that the library's does not take.
SIMVQ_OURS_ONLY = ("kmeans_init", "kmeans_iters", "kmeans_map_scale", "max_search_bytes")

#: LatentQuantize: the FSQ levels, with learnable values.
LATENT_DEFAULTS: dict[str, Any] = {"levels": [8, 8, 8]}

RESIDUAL = ("num_quantizers",)
GROUPED = ("groups", "num_quantizers")


def _levels_codes(config) -> int:
    """Values one index takes for a quantizer of ``levels``: their product."""
    return math.prod(int(level) for level in config.quantizer_options["levels"])


def _refuse_ours_only(name: str, cls: str, options: dict, ours_only: tuple[str, ...]) -> None:
    given = sorted(set(options) & set(ours_only))
    if given:
        raise ValueError(f"{name}: {', '.join(given)} is an option of our {cls} only; the "
                         f"library's {cls} does not take it")


def _no_codebook_size(name: str, options: dict) -> dict:
    if "codebook_size" in options:
        raise ValueError(f"{name} takes its codes from levels, not codebook_size "
                         f"(set the levels option)")
    return options


def _power_of_two(name: str, codebook_size: int) -> int:
    if codebook_size < 2 or codebook_size & (codebook_size - 1):
        raise ValueError(f"{name} needs a codebook size that is a power of 2 (one bit per "
                         f"factor 2), got {codebook_size}")
    return codebook_size


def _split_inv_temperature(name: str, options: dict) -> tuple[dict, dict]:
    """LFQ's options without ``inv_temperature``, and the call options that pass it (it is an
    argument of LFQ's forward, not of its constructor)."""
    options = dict(options)
    if "inv_temperature" not in options:
        return options, {}
    value = options.pop("inv_temperature")
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: inv_temperature must be a positive finite number, "
                         f"got {value!r}")
    return options, {"inv_temperature": float(value)}


class Adapted(nn.Module):
    """A quantizer of the families behind the registry's contract.

    ``forward(x)`` takes channels-last ``(..., dim)`` and returns ``VQOutput(quantized,
    indices, loss)``: ``quantized`` of ``x``'s shape, ``indices`` of ``x.shape[:-1] + axes``
    (``axes``: ``()``, ``(num_quantizers,)`` or ``(groups, num_quantizers)``), a scalar
    ``loss`` (zero for classes without one, the mean over depths and groups for stacks).
    ``decode(indices)`` gives the ``quantized`` of the call that produced the indices.

    Args:
        module: the class instance.
        code_axes: how many codebook axes its indices have after the position (0, 1 or 2).
        decode: ``decode(module, indices)`` on indices of shape ``(1, N, *axes)`` (grouped:
            ``(groups, 1, N, num_quantizers)``) -> ``(1, N, dim)``.
        grouped: the module puts the group axis first in its indices.
        channel_first_input: call the module on ``(N, dim, 1)`` (a class that reads axis 1 as
            the features whenever its size is ``dim``) instead of ``(1, N, dim)``.
        call_options: keyword arguments of every call of the module (LFQ's
            ``inv_temperature``, a forward argument rather than a constructor one).
    """

    def __init__(self, module: nn.Module, decode: Callable[[nn.Module, Tensor], Tensor], *,
                 code_axes: int = 0, grouped: bool = False, channel_first_input: bool = False,
                 call_options: dict[str, Any] | None = None):
        super().__init__()
        self.module = module
        self.call_options = dict(call_options or {})
        self._decode = decode
        self.code_axes = code_axes
        self.grouped = grouped
        self.channel_first_input = channel_first_input

    def forward(self, x: Tensor) -> VQOutput:
        shape, dim = x.shape, x.shape[-1]
        if self.channel_first_input:
            out = self.module(x.reshape(-1, dim, 1), **self.call_options)
            quantized = out[0].reshape(shape)
        else:
            out = self.module(x.reshape(1, -1, dim), **self.call_options)
            quantized = out[0].reshape(shape)
        indices = out[1].long()  # the library's FSQ gives int32
        if self.grouped:
            indices = indices.movedim(0, -2)  # (1, N, groups, num_quantizers)
        axes = indices.shape[indices.ndim - self.code_axes:] if self.code_axes else ()
        indices = indices.reshape(*shape[:-1], *axes)
        loss = out[2].mean() if len(out) > 2 else x.new_zeros(())
        return VQOutput(quantized, indices, loss)

    def decode(self, indices: Tensor) -> Tensor:
        lead = indices.shape[:indices.ndim - self.code_axes]
        flat = indices.reshape(1, -1, *indices.shape[len(lead):])
        if self.grouped:
            flat = flat.movedim(-2, 0)
        codes = self._decode(self.module, flat)
        return codes.reshape(*lead, codes.shape[-1])


def _indices_to_codes(module: nn.Module, indices: Tensor) -> Tensor:
    return module.indices_to_codes(indices)


def _output_from_indices(module: nn.Module, indices: Tensor) -> Tensor:
    return module.get_output_from_indices(indices)


# ---------------------------------------------------------------------------- FSQ


@register("fsq", help="our FSQ (codes from levels; no codebook)", defaults=FSQ_OURS_DEFAULTS,
          codes=_levels_codes)
def _fsq(dim: int, codebook_size: int, options: dict) -> nn.Module:
    return Adapted(FSQ(dim=dim, **_no_codebook_size("fsq", options)), _indices_to_codes)


@register("rfsq", help="our ResidualFSQ", defaults=FSQ_DEFAULTS, codes=_levels_codes,
          layout=RESIDUAL)
def _rfsq(dim: int, codebook_size: int, options: dict) -> nn.Module:
    module = ResidualFSQ(dim=dim, **_no_codebook_size("rfsq", options))
    return Adapted(module, _output_from_indices, code_axes=1)


@register("grfsq", help="our GroupedResidualFSQ", defaults=FSQ_DEFAULTS, codes=_levels_codes,
          layout=GROUPED)
def _grfsq(dim: int, codebook_size: int, options: dict) -> nn.Module:
    module = GroupedResidualFSQ(dim=dim, **_no_codebook_size("grfsq", options))
    return Adapted(module, _output_from_indices, code_axes=2, grouped=True)


@register("latent", help="our LatentQuantize (FSQ levels with learnable values)",
          defaults=LATENT_DEFAULTS, codes=_levels_codes)
def _latent(dim: int, codebook_size: int, options: dict) -> nn.Module:
    module = LatentQuantize(dim=dim, **_no_codebook_size("latent", options))
    return Adapted(module, lambda m, i: m.indices_to_codes(i, channel_first=False),
                   channel_first_input=True)


@register("lucidrains-fsq", help="the library's FSQ, with the settings of ours",
          defaults=FSQ_DEFAULTS, codes=_levels_codes)
def _lucidrains_fsq(dim: int, codebook_size: int, options: dict) -> nn.Module:
    from vector_quantize_pytorch import FSQ as LibraryFSQ

    _refuse_ours_only("lucidrains-fsq", "FSQ", options, FSQ_OURS_ONLY)
    return Adapted(LibraryFSQ(dim=dim, **_no_codebook_size("lucidrains-fsq", options)),
                   _indices_to_codes)


# ---------------------------------------------------------------------------- LFQ


@register("lfq", help="our LFQ (log2 of the codebook size bits; no codebook)",
          defaults=LFQ_OURS_DEFAULTS)
def _lfq(dim: int, codebook_size: int, options: dict) -> nn.Module:
    options, call = _split_inv_temperature("lfq", options)
    module = LFQ(dim=dim, codebook_size=_power_of_two("lfq", codebook_size), **options)
    return Adapted(module, _indices_to_codes, call_options=call)


@register("rlfq", help="our ResidualLFQ", defaults=RESIDUAL_LFQ_DEFAULTS, layout=RESIDUAL)
def _rlfq(dim: int, codebook_size: int, options: dict) -> nn.Module:
    module = ResidualLFQ(dim=dim, codebook_size=_power_of_two("rlfq", codebook_size), **options)
    return Adapted(module, _output_from_indices, code_axes=1)


@register("grlfq", help="our GroupedResidualLFQ", defaults=RESIDUAL_LFQ_DEFAULTS,
          layout=GROUPED)
def _grlfq(dim: int, codebook_size: int, options: dict) -> nn.Module:
    module = GroupedResidualLFQ(dim=dim, codebook_size=_power_of_two("grlfq", codebook_size),
                                **options)
    return Adapted(module, _output_from_indices, code_axes=2, grouped=True)


@register("lucidrains-lfq", help="the library's LFQ, with the settings of ours",
          defaults=LFQ_DEFAULTS)
def _lucidrains_lfq(dim: int, codebook_size: int, options: dict) -> nn.Module:
    from vector_quantize_pytorch import LFQ as LibraryLFQ

    _refuse_ours_only("lucidrains-lfq", "LFQ", options, LFQ_OURS_ONLY)
    options, call = _split_inv_temperature("lucidrains-lfq", options)
    module = LibraryLFQ(dim=dim, codebook_size=_power_of_two("lucidrains-lfq", codebook_size),
                        **options)
    return Adapted(module, _indices_to_codes, call_options=call)


# ---------------------------------------------------------------------------- SimVQ


@register("simvq", help="our SimVQ (a learned linear map of a frozen codebook)",
          defaults=SIMVQ_DEFAULTS)
def _simvq(dim: int, codebook_size: int, options: dict) -> nn.Module:
    return Adapted(SimVQ(dim=dim, codebook_size=codebook_size, **options), _indices_to_codes)


@register("rsimvq", help="our ResidualSimVQ", defaults=SIMVQ_SHARED_DEFAULTS,
          layout=RESIDUAL)
def _rsimvq(dim: int, codebook_size: int, options: dict) -> nn.Module:
    module = ResidualSimVQ(dim=dim, codebook_size=codebook_size, **options)
    return Adapted(module, _output_from_indices, code_axes=1)


@register("lucidrains-simvq", help="the library's SimVQ, with the settings of ours",
          defaults=SIMVQ_SHARED_DEFAULTS)
def _lucidrains_simvq(dim: int, codebook_size: int, options: dict) -> nn.Module:
    from vector_quantize_pytorch import SimVQ as LibrarySimVQ

    _refuse_ours_only("lucidrains-simvq", "SimVQ", options, SIMVQ_OURS_ONLY)

    return Adapted(LibrarySimVQ(dim=dim, codebook_size=codebook_size, **options),
                   _indices_to_codes)
