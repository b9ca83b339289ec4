"""Input checks shared by the quantizers, and the error they raise.

Kept apart from the modules that use them so that :mod:`.codebook` and the quantizers built on it
raise one error type with one wording.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class QuantizerInputError(ValueError, TypeError):
    """Input a quantizer cannot take: wrong shape, dtype or non-finite values.

    A ``ValueError`` and a ``TypeError`` at once, so either ``except`` catches it.
    """


def check_input(x: object, dim: int) -> None:
    """Raise :class:`QuantizerInputError` unless ``x`` is a floating tensor ``(..., dim)``."""
    if not isinstance(x, Tensor):
        raise QuantizerInputError(f"expected a torch.Tensor, got {describe(x)}")
    if not x.dtype.is_floating_point:
        raise QuantizerInputError(
            f"expected a floating-point tensor (float16/bfloat16/float32/float64), "
            f"got dtype {x.dtype}")
    if x.ndim < 1:
        raise QuantizerInputError(
            f"expected a tensor of shape (..., {dim}) with at least one dimension, "
            "got a 0-d tensor")
    if x.shape[-1] != dim:
        raise QuantizerInputError(
            f"expected the last dimension to be dim={dim} (channels last, "
            f"(..., {dim})), got shape {tuple(x.shape)}")


def all_finite(x: Tensor) -> bool:
    """Whether ``x`` holds only finite values. A sum is finite unless an entry is NaN/Inf or
    the sum overflows, so the exact test runs only when the cheap one fails."""
    x = x.detach()
    return math.isfinite(float(x.sum())) or bool(torch.isfinite(x).all())


def check_finite(x: Tensor, what: str = "input") -> None:
    """Raise :class:`QuantizerInputError` if ``x`` (named ``what`` in the message) holds a NaN
    or an Inf."""
    if all_finite(x):
        return
    finite = torch.isfinite(x)
    raise QuantizerInputError(
        f"{what} has {int((~finite).sum())} non-finite value(s) (NaN or Inf) out of "
        f"{x.numel()}; the codebook was not updated. Check the encoder output (learning "
        "rate, loss scale) before it reaches the quantizer.")


def require(condition: bool, message: str) -> None:
    """A constructor argument check: ``ValueError(message)`` unless ``condition``."""
    if not condition:
        raise ValueError(message)


def describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of dtype {value.dtype} and shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


# ---------------------------------------------------------------------------- constructor arguments


def _is_number(value: object) -> bool:
    """An ``int`` or ``float`` that is not a ``bool`` (``True`` is an ``int`` to Python)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_positive_int(name: str, value: object) -> None:
    """:class:`QuantizerInputError` unless ``value`` is an ``int`` >= 1 (a ``bool`` is not)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise QuantizerInputError(f"{name} must be a positive int, got {value!r} "
                                  f"({type(value).__name__})")


def check_optional_probability(name: str, value: object, *, include_one: bool = False) -> None:
    """:class:`QuantizerInputError` unless ``value`` is ``None`` or a finite number in [0, 1)
    (in [0, 1] with ``include_one``)."""
    if value is None:
        return
    if not _is_number(value) or not (0 <= value < 1 or (include_one and value == 1)):
        bound = "]" if include_one else ")"
        raise QuantizerInputError(f"{name} must be None or a number in [0, 1{bound}, got "
                                  f"{value!r} ({type(value).__name__})")


def check_not_meta(what: str) -> None:
    """:class:`QuantizerInputError` when modules would be built on the ``meta`` device: a
    quantizer's codebook is drawn and updated from values, which ``meta`` tensors do not hold."""
    if torch.empty(0).device.type == "meta":
        raise QuantizerInputError(
            f"{what} cannot be built on the 'meta' device (the default device is meta): its "
            "codebook needs real values; build it on 'cpu' or 'cuda'")


def too_large_to_square(x: Tensor) -> QuantizerInputError:
    """The error for finite values whose squared distances overflow ``x``'s dtype (about 1e19 in
    float32): refused like NaN, before anything is updated."""
    return QuantizerInputError(
        f"input values are too large to quantize: the largest magnitude is "
        f"{float(x.detach().abs().max()):.3g}, and the squared distances overflow {x.dtype}; "
        f"nothing was updated (scale the inputs down)")
