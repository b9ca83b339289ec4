"""A trained model as two self-contained programs: images to codes and codes to images.

``export_model(model, out_dir, format="onnx")`` writes ``encode.onnx`` (float32 images
``(N, C, H, W)`` in [0, 1] to int64 codes ``(N, *code_shape)``, each row laid out as in the
codes file of ``vqvae encode``) and ``decode.onnx`` (those codes to float32 images
``(N, C, H, W)``), both with a dynamic batch axis; ``format="torch"`` writes the same two
programs as ``torch.export`` archives, ``encode.pt2`` and ``decode.pt2``
(``torch.export.load(path).module()(images)``). ``export.json`` beside them says what goes in
and comes out.

What is traced is not the training module but an eval-only twin of its quantizer (a
:class:`QuantizerProgram`), built from the quantizer's public state: the codes
(:meth:`Codebook.vectors`), the projections and, for residual stacks, each depth's codebook.
The search in it is the plain one, ``argmin(||c||² - 2 x·cᵀ)`` with one matmul
(:func:`.quantizers.search.code_distances`), which picks the same codes as the C and Triton
kernels of the eager search; those kernels, the input checks that read values back to the host
and every training-time state change have no place in a file that runs without our code.
:func:`register_program` adds such a twin for another quantizer class; a quantizer without one
is traced as it is (``q(z)[1]`` in eval mode and ``q.decode``), which works when its eval
forward and decode are traceable.

The exported programs check nothing: the caller passes finite images of the trained size and
codes in range (an out-of-range code is an error of the runtime's gather, not ours).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .models import VQVAE
from .quantizers import GroupedResidualVQ, ResidualVQ, VectorQuantize
from .quantizers.search import code_distances
from .rundir import atomic_file, atomic_write_text

__all__ = ["FORMATS", "DecodeProgram", "EncodeProgram", "QuantizerProgram", "export_model",
           "quantizer_program", "register_program"]

FORMATS = ("onnx", "torch")
SUFFIX = {"onnx": ".onnx", "torch": ".pt2"}
#: Opset of the ONNX files: the one torch's exporter targets by default in this release line.
ONNX_OPSET = 18
#: Batch size of the example inputs the programs are traced with. Not 1: a batch of 1 would be
#: specialised (torch.export treats sizes 0 and 1 as constants).
EXAMPLE_BATCH = 2


# ---------------------------------------------------------------------------- quantizers


class QuantizerProgram(nn.Module):
    """The eval-mode search and decode of one quantizer, traceable end to end.

    ``encode(z)`` maps ``(..., dim)`` vectors to the indices the quantizer's eval forward
    returns; ``decode(indices)`` maps them to the vectors its ``decode`` returns.
    """

    def encode(self, z: Tensor) -> Tensor:
        raise NotImplementedError

    def decode(self, indices: Tensor) -> Tensor:
        raise NotImplementedError


_PROGRAMS: dict[type, Callable[[nn.Module], QuantizerProgram]] = {}


def register_program(cls: type) -> Callable:
    """Decorator: ``@register_program(MyQuantizer)`` on a ``MyQuantizer -> QuantizerProgram``
    builder makes :func:`quantizer_program` use it for that class and its subclasses."""

    def decorate(builder: Callable[[nn.Module], QuantizerProgram]):
        _PROGRAMS[cls] = builder
        return builder

    return decorate


def quantizer_program(quantizer: nn.Module) -> QuantizerProgram:
    """The traceable twin of ``quantizer``: the registered builder of its class (or the nearest
    base class), or the quantizer itself behind :class:`DirectProgram`."""
    for cls in type(quantizer).__mro__:
        if cls in _PROGRAMS:
            return _PROGRAMS[cls](quantizer)
    return DirectProgram(quantizer)


def nearest(x: Tensor, codes: Tensor) -> Tensor:
    """``(N,)`` index of the nearest row of ``codes`` ``(K, D)`` to each row of ``x`` ``(N, D)``:
    the eager search's distance, ``||c||² - 2 x·cᵀ``, and its first minimum."""
    return code_distances(x, codes, codes.pow(2).sum(-1)).argmin(dim=-1)


class DirectProgram(QuantizerProgram):
    """A quantizer whose eval forward and ``decode`` trace as they are."""

    def __init__(self, quantizer: nn.Module):
        super().__init__()
        self.quantizer = quantizer

    def encode(self, z: Tensor) -> Tensor:
        return self.quantizer(z)[1]

    def decode(self, indices: Tensor) -> Tensor:
        return self.quantizer.decode(indices)


class VectorQuantizeProgram(QuantizerProgram):
    """:class:`VectorQuantize`: project in, prepare (unit rows for cosine), nearest code;
    decode is the code vector projected out."""

    def __init__(self, vq: VectorQuantize):
        super().__init__()
        if vq.heads != 1:
            raise NotImplementedError(
                f"exporting a VectorQuantize with heads={vq.heads} is not supported: the "
                "exported search is one nearest code per vector in one codebook")
        self.vq = vq

    def encode(self, z: Tensor) -> Tensor:
        vq = self.vq
        h = vq.book.prepare(vq.project_in(z.reshape(-1, vq.dim)))  # (N, codebook_dim)
        return nearest(h, vq.book.vectors()[0]).reshape(z.shape[:-1])

    def decode(self, indices: Tensor) -> Tensor:
        return self.vq.project_out(self.vq.book.lookup(indices))


class ResidualProgram(QuantizerProgram):
    """:class:`ResidualVQ`: each depth takes the nearest code to what the depths before it
    left; decode sums the depths' codes in depth order, as the quantizer does."""

    #: Settings of :class:`ResidualVQ` whose eval search this twin does not reproduce
    UNSUPPORTED = ("implicit_neural_codebook", "diveq", "layer_forward")

    def __init__(self, rvq: ResidualVQ):
        super().__init__()
        unsupported = [name for name in self.UNSUPPORTED if getattr(rvq, name, False)]
        if (getattr(rvq, "eval_beam_size", None) or 1) > 1:
            unsupported.append("eval_beam_size")
        if unsupported:
            raise NotImplementedError(
                f"exporting a ResidualVQ with {', '.join(unsupported)} is not supported: the "
                "exported search is the plain nearest code per depth")
        self.rvq = rvq

    def encode(self, z: Tensor) -> Tensor:
        rvq = self.rvq
        residual = rvq.layers[0].book.prepare(rvq.project_in(z.reshape(-1, rvq.dim)))
        codes = []
        for depth in range(rvq.num_quantizers):
            book = rvq.layer_at(depth).book
            index = nearest(residual, book.vectors()[0])  # (N,)
            residual = residual - book.lookup(index).to(residual.dtype)
            codes.append(index)
        return torch.stack(codes, dim=-1).reshape(*z.shape[:-1], rvq.num_quantizers)

    def decode(self, indices: Tensor) -> Tensor:
        total = None
        for depth in range(self.rvq.num_quantizers):
            code = self.rvq.layer_at(depth).book.lookup(indices[..., depth])
            total = code if total is None else total + code
        return self.rvq.project_out(total)


class GroupedResidualProgram(QuantizerProgram):
    """:class:`GroupedResidualVQ`: a :class:`ResidualProgram` per group of features; indices
    ``(..., groups, num_quantizers)``."""

    def __init__(self, grvq: GroupedResidualVQ):
        super().__init__()
        self.group_dim = grvq.group_dim
        self.groups = nn.ModuleList(ResidualProgram(rvq) for rvq in grvq.rvqs)

    def encode(self, z: Tensor) -> Tensor:
        parts = z.split(self.group_dim, dim=-1)
        return torch.stack([group.encode(part) for group, part in
                            zip(self.groups, parts, strict=True)], dim=-2)

    def decode(self, indices: Tensor) -> Tensor:
        return torch.cat([group.decode(indices[..., g, :])
                          for g, group in enumerate(self.groups)], dim=-1)


register_program(VectorQuantize)(VectorQuantizeProgram)
register_program(ResidualVQ)(ResidualProgram)
register_program(GroupedResidualVQ)(GroupedResidualProgram)


# ---------------------------------------------------------------------------- models


class EncodeProgram(nn.Module):
    """Images ``(N, C, H, W)`` to codes ``(N, *code_shape)`` int64: the model's encoder and its
    quantizer's eval search."""

    def __init__(self, model: VQVAE):
        super().__init__()
        self.encoder = model.encoder
        self.quantizer = quantizer_program(model.quantizer)

    def forward(self, images: Tensor) -> Tensor:
        return self.quantizer.encode(self.encoder(images)).long()


class DecodeProgram(nn.Module):
    """Codes ``(N, *code_shape)`` int64 to images ``(N, C, H, W)`` in [0, 1]."""

    def __init__(self, model: VQVAE):
        super().__init__()
        self.quantizer = quantizer_program(model.quantizer)
        self.decoder = model.decoder

    def forward(self, codes: Tensor) -> Tensor:
        return self.decoder(self.quantizer.decode(codes))


def image_shape(model: VQVAE) -> tuple[int, int, int]:
    """``(C, H, W)`` of the images the model was trained on."""
    config = model.config
    channels = config.channels_in if config.model == "conv" else 1
    return (channels, config.image_size, config.image_size)


def trace(model: VQVAE) -> dict[str, torch.export.ExportedProgram]:
    """The two programs of ``model`` as :class:`torch.export.ExportedProgram` s, traced in eval
    mode without gradients, with a dynamic batch axis. The model's mode is left as it was."""
    config = model.config
    device = next(model.parameters()).device
    images = torch.rand(EXAMPLE_BATCH, *image_shape(model), device=device)
    batch = torch.export.Dim("batch", min=1)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            codes = model.encode(images)
            if tuple(codes.shape[1:]) != config.code_shape:
                raise ValueError(f"the model's codes have shape {tuple(codes.shape[1:])}, its "
                                 f"config says {config.code_shape}")
            return {
                "encode": torch.export.export(EncodeProgram(model), (images,),
                                              dynamic_shapes=({0: batch},), strict=False),
                "decode": torch.export.export(DecodeProgram(model), (codes,),
                                              dynamic_shapes=({0: batch},), strict=False),
            }
    finally:
        model.train(was_training)


def describe_programs(model: VQVAE, format: str) -> dict[str, Any]:
    """What ``export.json`` says: the files, their inputs and outputs."""
    config = model.config
    channels, height, width = image_shape(model)
    suffix = SUFFIX[format]
    return {
        "format": f"vqvae-export/1 ({format})",
        "encode": {"file": f"encode{suffix}", "input": "images", "output": "codes",
                   "input_shape": ["N", channels, height, width], "input_dtype": "float32",
                   "output_shape": ["N", *config.code_shape], "output_dtype": "int64"},
        "decode": {"file": f"decode{suffix}", "input": "codes", "output": "images",
                   "input_shape": ["N", *config.code_shape], "input_dtype": "int64",
                   "output_shape": ["N", channels, height, width], "output_dtype": "float32"},
        "vocab_size": config.vocab_size,
        "quantizer": config.quantizer,
        "model": config.to_dict(),
    }


def export_model(model: VQVAE, out_dir: str | Path, format: str = "onnx") -> dict[str, Path]:
    """Write the encode and decode programs of ``model`` to ``out_dir`` in ``format``
    (``"onnx"`` or ``"torch"``) and ``export.json``; returns ``{"encode": path, "decode":
    path, "meta": path}``."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = {"encode": ("images", "codes"), "decode": ("codes", "images")}
    paths: dict[str, Path] = {}
    for name, program in trace(model).items():
        path = out / f"{name}{SUFFIX[format]}"
        if format == "torch":
            with atomic_file(path, suffix=path.suffix) as tmp:
                torch.export.save(program, tmp)
        else:
            write_onnx(program, path, *names[name])
        paths[name] = path
    paths["meta"] = out / "export.json"
    atomic_write_text(paths["meta"], json.dumps(describe_programs(model, format), indent=2))
    return paths


def write_onnx(program: torch.export.ExportedProgram, path: Path, input_name: str,
               output_name: str) -> None:
    """One traced program as an ONNX file with named inputs and outputs; batch axis ``N``."""
    try:
        import onnx  # noqa: F401  (the exporter needs it; the error below says how to get it)
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise RuntimeError(f"ONNX export needs onnx and onnxscript ({error}); install them "
                           "with pip install 'vqvae[export]'") from None
    # The exporter warns about every torchvision operator it cannot register when torchvision
    # is not installed; none of them is used here.
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        onnx_program = torch.onnx.export(program, dynamo=True, opset_version=ONNX_OPSET,
                                         input_names=[input_name],
                                         output_names=[output_name], verbose=False)
    finally:
        registration.setLevel(level)
    with atomic_file(path, suffix=path.suffix) as tmp:
        onnx_program.save(str(tmp))
