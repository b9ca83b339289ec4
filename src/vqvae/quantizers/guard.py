"""The non-finite input rule of the stateful quantizers, decided on the device when it must be.

A quantizer that keeps state (an EMA codebook, a step counter, k-means initialisation,
dead-code restarts) must never let a batch holding a NaN, an Inf, or values too large to square
change that state, and the user must learn of such a batch with a clear error. Raising from
``forward`` needs the answer on the host (``bool(...)``): free on the CPU, a stall of the whole
queue on an accelerator, and impossible inside one compiled graph (``torch.compile(...,
fullgraph=True)``, ``torch.export``). So there are two ways to apply the rule:

- **immediate**: the check is read back in ``forward``, which raises
  :class:`~.checks.QuantizerInputError` before anything is computed from the batch;
- **deferred**: ``forward`` computes the verdict as a 0-d tensor :func:`usable`, makes every
  state update conditional on it (``torch.where``, no branch), and counts refused calls in a
  non-persistent buffer ``nonfinite_calls`` (:func:`record`). The error is raised by
  :func:`raise_deferred` at a synchronisation point the caller already has:
  :func:`vqvae.train.train_step` calls it each step, where it reads the loss anyway.

Which applies (:func:`deferred`): while ``torch.compile`` or ``torch.export`` traces, always
deferred; otherwise as :func:`set_input_checks` says: ``"auto"`` (the default) is immediate for
CPU tensors, where reading back costs nothing, and deferred on any other device;
``"immediate"`` and ``"deferred"`` force one. In both, a refused batch changes no state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from .checks import QuantizerInputError
from .tracing import tracing

__all__ = ["deferred", "input_checks", "raise_deferred", "record", "register_counter",
           "set_input_checks", "usable"]

MODES = ("auto", "immediate", "deferred")
COUNTER = "nonfinite_calls"
_mode = "auto"


def set_input_checks(mode: str) -> None:
    """Choose when non-finite input is reported: ``"auto"`` (immediate on CPU, deferred on other
    devices), ``"immediate"`` or ``"deferred"`` (see the module docstring)."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"input checks must be one of {', '.join(MODES)}, got {mode!r}")
    _mode = mode


def get_input_checks() -> str:
    return _mode


@contextlib.contextmanager
def input_checks(mode: str) -> Iterator[None]:
    """:func:`set_input_checks` for the duration of a ``with`` block."""
    previous = _mode
    set_input_checks(mode)
    try:
        yield
    finally:
        set_input_checks(previous)


def deferred(x: Tensor) -> bool:
    """Whether a call on ``x`` checks on the device instead of raising in ``forward``."""
    if tracing():
        return True
    if _mode == "auto":
        return x.device.type != "cpu"
    return _mode == "deferred"


def usable(rows: Tensor) -> Tensor:
    """0-d bool tensor: every value of ``rows`` is finite and small enough that squared
    distances stay finite. NaN/Inf propagate into the sum of squares, and so do values whose
    squares overflow: one reduction decides, on the device."""
    flat = rows.detach().reshape(-1)
    if flat.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=rows.device)
    return torch.isfinite(torch.dot(flat, flat))


def register_counter(module: nn.Module) -> None:
    """Give ``module`` the 0-d int64 buffer that counts its refused calls. Not persistent: a
    checkpoint does not carry it, and loading one leaves it alone."""
    module.register_buffer(COUNTER, torch.zeros((), dtype=torch.long), persistent=False)


def record(module: nn.Module, ok: Tensor) -> None:
    """Count a refused call of ``module`` (``ok`` false) on the device, without reading it."""
    getattr(module, COUNTER).add_((~ok).to(torch.long))


def raise_deferred(model: nn.Module) -> None:
    """Raise :class:`~.checks.QuantizerInputError` if any quantizer in ``model`` refused a call
    since the last check (and reset the counts). One read back for the whole model."""
    named = [(name or type(model).__name__, counter) for name, module in model.named_modules()
             if isinstance(counter := getattr(module, COUNTER, None), Tensor)]
    if not named:
        return
    device = named[0][1].device
    counts = torch.stack([counter.to(device) for _, counter in named]).cpu()
    if not bool(counts.any()):
        return
    refused = [f"{name} ({int(n)} call(s))" for (name, _), n in zip(named, counts, strict=True)
               if int(n)]
    for _, counter in named:
        counter.zero_()
    raise QuantizerInputError(
        "non-finite input (NaN or Inf, or values too large to square) reached "
        f"{', '.join(refused)} since the last check; those calls changed no quantizer state. "
        "Check the encoder output (learning rate, loss scale) before it reaches the quantizer.")
