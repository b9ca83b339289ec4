"""``Sequential``: modules in a row, exactly one of them a quantizer, returning its outputs.

A drop-in for ``vector_quantize_pytorch.utils.Sequential``: ``Sequential(proj_in, vq,
proj_out)(x)`` runs ``x`` through the modules in order; the quantizer's extra outputs
(indices, loss, ...) are returned after the final tensor, and keyword arguments of the call go
to the quantizer only.
"""

from __future__ import annotations

import importlib

from torch import Tensor, nn

#: Classes that count as quantizers, as "module:Class" names (resolved when first needed, so
#: that optional families do not have to be importable).
QUANTIZER_CLASSES: list[str] = [
    "vqvae.quantizers.vector_quantize:VectorQuantize",
    "vqvae.quantizers.residual:ResidualVQ",
    "vqvae.quantizers.residual:GroupedResidualVQ",
    "vqvae.quantizers.simvq:SimVQ",
    "vqvae.quantizers.residual_simvq:ResidualSimVQ",
    "vqvae.quantizers.random_projection:RandomProjectionQuantizer",
    "vqvae.quantizers.hierarchical:HierarchicalVQ",
    "vqvae.quantizers.fsq:FSQ",
    "vqvae.quantizers.residual_fsq:ResidualFSQ",
    "vqvae.quantizers.residual_fsq:GroupedResidualFSQ",
    "vqvae.quantizers.fsp:FSP",
    "vqvae.quantizers.latent_quantize:LatentQuantize",
    "vqvae.quantizers.lfq:LFQ",
    "vqvae.quantizers.residual_lfq:ResidualLFQ",
    "vqvae.quantizers.residual_lfq:GroupedResidualLFQ",
]


def register_quantizer(cls: type) -> type:
    """Let :class:`Sequential` treat instances of ``cls`` as quantizers (usable as decorator)."""
    name = f"{cls.__module__}:{cls.__qualname__}"
    if name not in QUANTIZER_CLASSES:
        QUANTIZER_CLASSES.append(name)
    return cls


def quantizer_classes() -> tuple[type, ...]:
    classes = []
    for name in QUANTIZER_CLASSES:
        module, _, attr = name.partition(":")
        try:
            classes.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            continue  # a family that is not installed
    return tuple(classes)


def is_quantizer(module: nn.Module) -> bool:
    return isinstance(module, quantizer_classes())


class Sequential(nn.Module):
    """Modules in order; exactly one is a quantizer (see :data:`QUANTIZER_CLASSES`)."""

    def __init__(self, *fns: nn.Module):
        super().__init__()
        found = [i for i, fn in enumerate(fns) if is_quantizer(fn)]
        if len(found) != 1:
            raise ValueError(
                f"Sequential must contain exactly one quantizer, got {len(found)} among "
                f"{[type(fn).__name__ for fn in fns]}")
        self.fns = nn.ModuleList(fns)
        self.quantizer_index = found[0]

    def forward(self, x: Tensor, **kwargs):
        rest: tuple = ()
        for index, fn in enumerate(self.fns):
            if index == self.quantizer_index:
                x, *extra = fn(x, **kwargs)
                rest = tuple(extra)
            else:
                x = fn(x)
        return (x, *rest)
