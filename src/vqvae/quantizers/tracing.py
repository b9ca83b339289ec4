"""What the quantizers do differently while ``torch.compile`` or ``torch.export`` traces them.

Their non-finite input check reads a value back to the host (``float(x.sum())``,
``bool(isfinite(x).all())``) and raises from Python; a single graph (``fullgraph=True``, an
exported program) cannot hold either. While tracing, the check is therefore left out, and
:func:`spread_nonfinite` makes sure what it guarded against cannot pass silently: an Inf that a
bounded activation (tanh, a clamp, a sign) would turn into a valid-looking code becomes NaN, so
the output and the loss come out NaN instead.

What is guaranteed where, for the quantizers without state (the stateful ones, VectorQuantize,
the residual family and SimVQ, follow :mod:`.guard`; both are summarised in docs/compile.md):

- eager calls: non-finite input raises :class:`~.checks.QuantizerInputError` before anything
  is computed from it (as documented by each quantizer);
- compiled or exported calls: no error is raised. FSQ, ResidualFSQ, GroupedResidualFSQ, LFQ,
  ResidualLFQ and GroupedResidualLFQ give NaN quantized values for the positions whose input
  held a NaN or Inf (their indices are then meaningless). LatentQuantize and FSP give a
  non-finite loss (LatentQuantize in training, FSP always), but their quantized values for
  such entries can look valid, an eval-mode LatentQuantize reports nothing at all: check the
  input (or call eagerly) where that matters.
- in every case no state changes: these quantizers hold no buffer that a forward call
  writes (but for LFQ's ``centre_init``, whose first training call sets the projection's bias
  and its ``initted`` flag only from a finite batch), so a bad batch corrupts nothing;
  parameters change only by the optimiser, which a training loop can skip on a non-finite
  loss.
"""

from __future__ import annotations

import torch
from torch import Tensor


def tracing() -> bool:
    """Whether this call is being traced by ``torch.compile`` or ``torch.export``."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


def host_flag(flag: Tensor, known: bool) -> bool:
    """The value of the 0-d bool buffer ``flag`` for the host to branch on: read from the
    buffer on the CPU outside tracing (free there, and it sees a buffer written directly);
    while tracing, or on another device, ``known``, the host's copy of it (no read-back)."""
    if tracing() or flag.device.type != "cpu":
        return known
    return bool(flag)


class InitFlag:
    """Mixin for a module with an optional data-dependent start on its first training call
    (SimVQ's ``kmeans_init``, LFQ's ``centre_init``): an ``initted`` buffer, registered only
    when the start is enabled (:meth:`_register_init_flag`), mirrored on the host in
    ``_initted_known``. Loading fits the state dict to it: a state without the flag (the
    library's, or one saved without the option) holds weights someone chose, so they count as
    initialised; with the option off the flag is dropped."""

    _init_enabled = False

    def _register_init_flag(self, enabled: bool) -> None:
        self._init_enabled = enabled
        if enabled:
            self.register_buffer("initted", torch.tensor(False))
        # the host's copy of ``initted``: what a traced or accelerator call branches on
        self._initted_known = not enabled

    @property
    def init_pending(self) -> bool:
        """Whether the start is still to run: read from ``initted`` on the CPU outside tracing
        (free there); while tracing, or on another device, from the host's copy of it (no
        read-back), see :func:`host_flag`."""
        if not self._init_enabled:
            return False
        self._initted_known = host_flag(self.initted, self._initted_known)
        return not self._initted_known

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "initted"
        if self._init_enabled and key not in state_dict:
            state_dict[key] = torch.tensor(True)
        elif not self._init_enabled:
            state_dict.pop(key, None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if self._init_enabled:
            self._initted_known = bool(self.initted)


def spread_nonfinite(x: Tensor) -> Tensor:
    """``x`` with each ±Inf entry turned into NaN; finite entries keep their value (``x - x``
    is 0 for them and NaN for ±Inf and NaN). One elementwise op, fused by the compiler."""
    return x + (x - x)
