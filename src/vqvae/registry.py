"""The quantizers a model can be built with, by name: one entry each.

An entry holds the builder, the default options, a one-line help (the CLI lists it) and the
layout of the codes: which model settings add codebook axes to each position
(``num_quantizers``, ``groups``), how many values one index takes and so how many bits an image
costs. Models, the CLI, ``compare`` and the prior read the entries; none of them names a
quantizer. Registering one::

    from vqvae.registry import register

    @register("fsq", help="finite scalar quantization", defaults={"levels": [8, 5, 5, 5]},
              codes=lambda config: math.prod(config.quantizer_options["levels"]))
    def _fsq(dim, codebook_size, options):
        return FSQ(dim=dim, **options)

The built-in entries are registered in :mod:`vqvae.zoo` and :mod:`vqvae.zoo_families`,
loaded on the first look-up.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from .models import ModelConfig

#: ``build(dim, codebook_size, options) -> nn.Module``; ``options`` are the entry's defaults
#: updated by the config's ``quantizer_options``, plus the layout's model settings.
Builder = Callable[[int, int, dict[str, Any]], nn.Module]

#: The model settings a layout may name: each adds an axis to the codes of a position.
LAYOUT_SETTINGS = ("groups", "num_quantizers")


@dataclass(frozen=True)
class QuantizerEntry:
    """One quantizer: how to build it and what its codes look like."""

    name: str
    build: Builder
    help: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    #: Model settings (``ModelConfig`` fields) that the builder takes and that give the codes
    #: of a position their axes, in this order: ``("groups", "num_quantizers")`` for codes of
    #: shape ``(..., groups, num_quantizers)``.
    layout: tuple[str, ...] = ()
    #: Extra codebook axes that come from the options (e.g. an ``num_codebooks`` option), after
    #: the layout's; ``None`` for none.
    extra_axes: Callable[[ModelConfig], tuple[int, ...]] | None = None
    #: Values one index takes; ``None`` means ``config.codebook_size``. Quantizers without a
    #: codebook size (levels, bits) say it here.
    codes: Callable[[ModelConfig], int] | None = None
    #: Offered by the CLI; ``False`` for entries that only benchmarks build (``none``).
    listed: bool = True
    #: Options for one model only, over ``defaults``: ``{"conv": {...}}``.
    model_defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def defaults_for(self, model: str) -> dict[str, Any]:
        """The default options on ``model``: ``defaults`` updated by its ``model_defaults``."""
        return {**self.defaults, **self.model_defaults.get(model, {})}

    def codebook_axes(self, config: ModelConfig) -> tuple[int, ...]:
        """The codes of one position: ``()`` for one codebook, ``(num_quantizers,)``, ..."""
        axes = tuple(getattr(config, name) for name in self.layout)
        return axes + (tuple(self.extra_axes(config)) if self.extra_axes else ())

    def vocab_size(self, config: ModelConfig) -> int:
        """How many values one index takes (the codebook size of a codebook quantizer)."""
        return int(self.codes(config)) if self.codes else config.codebook_size

    def bits_per_image(self, config: ModelConfig) -> float:
        return math.prod(config.code_shape) * math.log2(self.vocab_size(config))


_ENTRIES: dict[str, QuantizerEntry] = {}
_builtins_loaded = False


def register(name: str, *, help: str, defaults: Mapping[str, Any] | None = None,
             layout: tuple[str, ...] = (), extra_axes=None, codes=None, listed: bool = True,
             replace: bool = False, model_defaults: Mapping[str, Mapping[str, Any]] | None = None
             ) -> Callable[[Builder], Builder]:
    """Register the decorated builder as quantizer ``name`` (see the module docstring).

    ``model_defaults`` maps a model (``"conv"``) to options that replace ``defaults`` on it.
    A second registration of a name is an error unless ``replace=True``.
    """
    if not isinstance(name, str) or not name or name != name.strip() or "," in name:
        raise ValueError(f"a quantizer name must be a non-empty word without commas, "
                         f"got {name!r}")
    if not isinstance(help, str) or not help.strip() or "\n" in help:
        raise ValueError(f"quantizer {name!r}: help must be one non-empty line")
    unknown = [s for s in layout if s not in LAYOUT_SETTINGS]
    if unknown:
        raise ValueError(f"quantizer {name!r}: layout settings {unknown} unknown; choose from "
                         f"{list(LAYOUT_SETTINGS)}")

    def decorator(build: Builder) -> Builder:
        if not callable(build):
            raise TypeError(f"quantizer {name!r}: the builder must be callable")
        if name in _ENTRIES and not replace:
            raise ValueError(f"quantizer {name!r} is already registered")
        _ENTRIES[name] = QuantizerEntry(name, build, help.strip(), dict(defaults or {}),
                                        tuple(layout), extra_axes, codes, listed,
                                        {m: dict(o) for m, o in (model_defaults or {}).items()})
        return build

    return decorator


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        from . import zoo, zoo_families  # noqa: F401  (register the built-in entries)


def get(name: str) -> QuantizerEntry:
    """The entry of ``name``; an unknown name is a ``ValueError`` listing the known ones."""
    _load_builtins()
    try:
        return _ENTRIES[name]
    except KeyError:
        raise ValueError(f"unknown quantizer {name!r}; choose one of {names()}") from None


def names(listed_only: bool = True) -> list[str]:
    """Registered names, sorted; ``listed_only`` leaves out benchmark-only entries."""
    _load_builtins()
    return sorted(n for n, e in _ENTRIES.items() if e.listed or not listed_only)


def entries(listed_only: bool = True) -> list[QuantizerEntry]:
    """Registered entries in the order they were registered."""
    _load_builtins()
    return [e for e in _ENTRIES.values() if e.listed or not listed_only]


def takers(setting: str) -> list[str]:
    """Quantizers whose layout takes the model setting ``setting`` (e.g. ``groups``)."""
    return [e.name for e in entries() if setting in e.layout]
