"""``torch.compile`` for training: the whole VQ-VAE as one graph where its quantizer allows.

    forward = compile_model(model)   # forward.mode: "whole", or "parts" after a fallback

The model's ``forward`` (encoder, quantizer, decoder) is compiled with ``fullgraph=True``, so
the quantizer's search, estimator and buffer updates fuse with the networks around them and no
step reads back to the host (the quantizers take their deferred, device-side input checks while
traced; :func:`vqvae.train.train_step` reports refused batches at its loss read-back).

A quantizer that cannot be traced into one graph (the library's ``VectorQuantize`` and
residual adapters, whose code branches on tensor values; any other that fails while traced,
the compiler's own failures included) is found out at the first call that traces it, before
that call changes anything: tracing runs on fake tensors. The model then falls back, for good,
to compiling only the encoder and the decoder, with one warning line that says why, and runs
that call eagerly. A trace that fails on the traced code's own error (images of the wrong
shape, say) is not a reason to fall back: the call runs eagerly and raises that error.

Either way the modules stay the same objects: parameter names, ``state_dict`` and checkpoints
do not change (``torch.compile(model)`` would prefix every key with ``_orig_mod.``).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch
from torch import nn

__all__ = ["CompiledForward", "compile_model", "compile_networks"]


def compile_networks(model: nn.Module) -> None:
    """``torch.compile`` the encoder's and decoder's ``forward`` in place (the quantizer stays
    eager)."""
    for network in (model.encoder, model.decoder):
        network.forward = torch.compile(network.forward)


class CompiledForward:
    """The model's ``forward``, compiled as one graph until a trace fails, then the eager
    ``forward`` around compiled encoder and decoder. :attr:`mode` says which: ``"whole"`` or
    ``"parts"``; :attr:`reason` the first line of the error that caused the fallback."""

    def __init__(self, model: nn.Module, **options):
        self.model = model
        self.eager = model.forward  # the class's forward, bound to the model
        self.compiled = torch.compile(self.eager, fullgraph=True, **options)
        self.mode = "whole"
        self.reason: str | None = None

    def __call__(self, *args, **kwargs):
        if self.mode == "whole":
            try:
                return self.compiled(*args, **kwargs)
            except torch._dynamo.exc.TorchDynamoException as error:
                if raised_by_traced_code(error):
                    # bad input, say: the eager call raises that error itself, and the model
                    # stays compiled; if it does not, fall back
                    out = self.eager(*args, **kwargs)
                    self.fall_back(error)
                    return out
                self.fall_back(error)
        return self.eager(*args, **kwargs)

    def fall_back(self, error: BaseException) -> None:
        self.reason = describe(error)
        self.mode = "parts"
        compile_networks(self.model)
        quantizer = type(getattr(self.model, "quantizer", None)).__name__
        warnings.warn(
            f"--compile: the {quantizer} quantizer cannot be traced into one graph with the "
            f"model ({self.reason}); compiling the encoder and decoder only",
            RuntimeWarning, stacklevel=3)


def raised_by_traced_code(error: BaseException) -> bool:
    """Whether a failed trace is the traced code's own error (an exception it raised, an op
    refusing its arguments) rather than code that cannot be traced."""
    return isinstance(error, torch._dynamo.exc.TorchRuntimeError) \
        or "Observed exception" in str(error)


def describe(error: BaseException) -> str:
    """One line: the error's first line and the user code it points at (dynamo's messages
    name it as ``# file:line in function`` or ``File "file", line n, in function``)."""
    text = str(error)
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    first = first if len(first) <= 120 else first[:117] + "..."
    places = re.findall(r'File "([^"]+)", line (\d+), in (\w+)', text) \
        or re.findall(r"# (\S+):(\d+) in (\w+)", text)
    where = ""
    if places:
        path, line, function = places[-1]
        where = f" at {Path(path).name}:{line} in {function}"
    return f"{type(error).__name__}: {first}{where}"


def compile_model(model: nn.Module, **options) -> CompiledForward:
    """Compile ``model`` (a :class:`~vqvae.models.VQVAE`) in place for training, as the module
    docstring describes; ``options`` go to ``torch.compile`` (``backend``, ``mode``). Returns
    the installed forward, whose ``mode`` tells whether the whole model is one graph."""
    if isinstance(model.__dict__.get("forward"), CompiledForward):
        return model.forward  # already compiled
    forward = CompiledForward(model, **options)
    model.forward = forward
    return forward
