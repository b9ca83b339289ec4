"""Nearest-code search: for each vector, the index of the closest codebook row.

The squared Euclidean distance is ``||x||² - 2 x·c + ||c||²``. ``||x||²`` is the same for every
code of a row, so the argmin only needs ``||c||² - 2 x·c``: one ``addmm`` per block of rows.
Rows are processed in blocks so that the ``(rows, codebook_size)`` distance block never holds
more than ``max_block_bytes``; a (65536, 256) batch against 8192 codes would otherwise need a
2 GiB distance matrix. On CPU the argmin of each block runs in two vectorised passes
(:func:`blockwise_argmin`): torch's own CPU argmin along rows is a scalar loop and cost more
than the matmul itself at 512 codes.

Distances are computed in float32 (float64 inputs stay float64), also for bf16/fp16 inputs and
under autocast: low-precision distances pick a different code for a few percent of vectors.

On CUDA, when Triton is installed, :func:`nearest_code` runs the fused kernel of
:mod:`vqvae.quantizers.triton_search` instead: the distance matrix is never written to memory,
and the ``precision`` setting lets the tensor cores (TF32 or bf16) do the bulk of the work, with
an exact float32 re-check of the few codes that rounding could have misordered. Which path runs
is the ``backend`` setting:

``"auto"`` (default)
    Triton for CUDA tensors when it is importable; on CPU, the C kernel of
    :mod:`vqvae.quantizers.cpu_kernel` for float32 vectors of up to 32 dimensions when a C
    compiler is at hand; the chunked ``addmm`` otherwise.
``"torch"``
    Always the chunked ``addmm`` (float32; ``precision`` does not apply).
``"c"``
    Always the C kernel (CPU, float32, up to 32 dimensions); an error if it cannot be built.
``"triton"``
    Always the fused kernel; an error if Triton is missing. CPU tensors need Triton's
    interpreter (``TRITON_INTERPRET=1`` in the environment before the first search), which is
    how the tests check the kernels without a GPU.

Both settings are taken, first match wins, from the call's keyword arguments, from
:func:`set_search_defaults` / :func:`search_settings`, from the environment variables
``VQVAE_SEARCH_PRECISION`` and ``VQVAE_SEARCH_BACKEND``, and finally from the built-in defaults
``"tf32"`` and ``"auto"``. ``"tf32"`` is the default because its re-check returns the float32
answer (up to float32 near-ties): it costs no accuracy, only the kernel's bookkeeping.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import warnings
from collections.abc import Iterator
from types import ModuleType

import torch
from torch import Tensor

from . import cpu_kernel

DEFAULT_BLOCK_BYTES = 64 * 2**20
# Columns per block of blockwise_argmin (CPU): amin over 64 floats vectorises well
ARGMIN_BLOCK = 64

PRECISIONS = ("fp32", "tf32", "bf16")
BACKENDS = ("auto", "torch", "triton", "c")
PRECISION_ENV = "VQVAE_SEARCH_PRECISION"
BACKEND_ENV = "VQVAE_SEARCH_BACKEND"
_BUILTIN = {"precision": "tf32", "backend": "auto"}
_ENV = {"precision": PRECISION_ENV, "backend": BACKEND_ENV}
_CHOICES = {"precision": PRECISIONS, "backend": BACKENDS}
# Set by set_search_defaults; None defers to the environment, then to _BUILTIN.
_defaults: dict[str, str | None] = {"precision": None, "backend": None}
# Set when the Triton path failed in "auto" mode: the rest of the process uses torch.
_triton_broken: str | None = None


def distance_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype distances are computed in: float64 stays, everything else becomes float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def code_distances(x: Tensor, codebook: Tensor, offset: Tensor) -> Tensor:
    """``offset - 2 x·cᵀ`` for every row ``x`` ``(N, D)`` and code ``c`` ``(K, D)``: ``(N, K)``.

    The one place the distance of the torch paths is written. With ``offset = ||c||²`` ``(K,)``
    it is the squared Euclidean distance less the row constant ``||x||²``, all an argmin needs;
    with ``offset = ||x||² + ||c||²`` ``(N, K)`` it is the squared distance itself. One
    ``addmm``: the matmul adds into the offset without a temporary. (The C and Triton kernels
    compute the same expression tile by tile.)
    """
    return torch.addmm(offset, x, codebook.t(), alpha=-2.0)


def _row_blocks(num_rows: int, codebook_size: int, itemsize: int, max_block_bytes: int):
    rows = max(1, max_block_bytes // max(1, codebook_size * itemsize))
    for start in range(0, num_rows, rows):
        yield start, min(num_rows, start + rows)


def _check_shapes(x: Tensor, codebook: Tensor) -> None:
    if not isinstance(x, Tensor) or not isinstance(codebook, Tensor):
        raise TypeError(f"expected tensors, got {type(x).__name__} and "
                        f"{type(codebook).__name__}")
    if x.ndim != 2 or codebook.ndim != 2 or x.shape[1] != codebook.shape[1]:
        raise ValueError(f"expected x of shape (N, D) and codebook of shape (K, D), got "
                         f"{tuple(x.shape)} and {tuple(codebook.shape)}")
    if codebook.shape[0] == 0:
        raise ValueError("the codebook is empty: nothing to search")


def _float_inputs(x: Tensor, codebook: Tensor) -> tuple[Tensor, Tensor]:
    if x.dtype == codebook.dtype == torch.float32:  # the common case, without dispatching
        return x, codebook
    dtype = distance_dtype(torch.promote_types(x.dtype, codebook.dtype))
    return x.to(dtype), codebook.to(dtype)


# ---------------------------------------------------------------------------- settings


def _check_choice(name: str, value: str, source: str) -> str:
    if value not in _CHOICES[name]:
        raise ValueError(f"{name} must be one of {_CHOICES[name]}, got {value!r} ({source})")
    return value


def _resolve(name: str, value: str | None) -> str:
    if value is not None:
        return _check_choice(name, value, "argument")
    if _defaults[name] is not None:
        return _defaults[name]
    env = os.environ.get(_ENV[name])
    if env:
        return _check_choice(name, env, f"environment variable {_ENV[name]}")
    return _BUILTIN[name]


def search_defaults() -> dict[str, str]:
    """The precision and backend a call without those arguments would use now."""
    return {name: _resolve(name, None) for name in _defaults}


def set_search_defaults(*, precision: str | None = None,
                        backend: str | None = None) -> dict[str, str | None]:
    """Set the process-wide default ``precision`` and/or ``backend``; returns the previous ones.

    Arguments left ``None`` are not changed. For a temporary change use :func:`search_settings`;
    :func:`reset_search_defaults` goes back to the environment and the built-in defaults.
    """
    previous = dict(_defaults)
    for name, value in (("precision", precision), ("backend", backend)):
        if value is not None:
            _defaults[name] = _check_choice(name, value, "set_search_defaults")
    return previous


def reset_search_defaults() -> None:
    """Forget :func:`set_search_defaults`: the environment, then the built-ins, decide again."""
    _defaults.update(precision=None, backend=None)


@contextlib.contextmanager
def search_settings(*, precision: str | None = None,
                    backend: str | None = None) -> Iterator[None]:
    """Context manager: :func:`set_search_defaults` inside, the previous defaults after."""
    previous = set_search_defaults(precision=precision, backend=backend)
    try:
        yield
    finally:
        _defaults.update(previous)


@functools.cache
def _triton_module() -> ModuleType | None:
    """:mod:`.triton_search`, or None when Triton cannot be imported."""
    try:
        return importlib.import_module(f"{__package__}.triton_search")
    except ImportError:
        return None


def triton_available() -> bool:
    """Whether the fused Triton search can be imported (Triton installed)."""
    return _triton_module() is not None


def _use_triton(x: Tensor, codebook: Tensor, backend: str) -> bool:
    if backend == "torch":
        return False
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' was asked for, but Triton is not installed "
                               "(pip install 'vqvae[gpu]' or pip install triton)")
        return True
    # auto: the fused kernel handles CUDA tensors of float32 and narrower
    return (_triton_broken is None and x.is_cuda and codebook.is_cuda
            and x.dtype != torch.float64 and codebook.dtype != torch.float64
            and triton_available())


def _use_c(x: Tensor, codebook: Tensor, backend: str) -> bool:
    if backend == "c":
        if not cpu_kernel.available():
            raise RuntimeError(f"backend='c' was asked for, but the C search cannot be built: "
                               f"{cpu_kernel.unavailable_reason()}")
        if not cpu_kernel.supports(x, codebook):
            raise ValueError(f"backend='c' takes float32 CPU vectors of at most "
                             f"{cpu_kernel.MAX_DIM} dimensions, got {x.dtype} "
                             f"{tuple(x.shape)} on {x.device}")
        return True
    return backend == "auto" and cpu_kernel.supports(x, codebook) and cpu_kernel.available()


# ---------------------------------------------------------------------------- search


@torch.no_grad()
def nearest_code(
    x: Tensor, codebook: Tensor, *, max_block_bytes: int = DEFAULT_BLOCK_BYTES,
    precision: str | None = None, backend: str | None = None,
) -> Tensor:
    """Index of the nearest codebook row for each row of ``x``.

    Args:
        x: ``(N, D)`` vectors.
        codebook: ``(K, D)`` codes.
        max_block_bytes: upper bound on the memory of one block of distances (chunked
            ``addmm`` path; the Triton and C kernels never hold more than one tile).
        precision: ``"fp32"``, ``"tf32"`` or ``"bf16"``: the arithmetic of the Triton
            kernel's distance matmul (the other paths compute in float32, or float64 for
            float64 input). All three return the float32 answer up to float32 near-ties (the
            low-precision modes re-check their close calls in float32). Default: see
            :func:`search_defaults`.
        backend: ``"auto"`` (Triton for CUDA tensors when it is installed, the C kernel for
            float32 CPU vectors of up to ``cpu_kernel.MAX_DIM`` dimensions when it builds, the
            chunked ``addmm`` otherwise), ``"torch"``, ``"c"`` or ``"triton"``; see the module
            docstring. Default: see :func:`search_defaults`.

    Returns:
        ``(N,)`` int64 indices, equal to ``torch.cdist(x, codebook).argmin(-1)`` up to ties.
    """
    global _triton_broken
    _check_shapes(x, codebook)
    if torch.compiler.is_exporting():
        # A traced program (vqvae.export): the plain addmm search, which every runtime has
        x, codebook = _float_inputs(x, codebook)
        return _plain_argmin(code_distances(x, codebook, codebook.pow(2).sum(-1)))
    precision = _resolve("precision", precision)
    backend = _resolve("backend", backend)
    if torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return nearest_code(x, codebook, max_block_bytes=max_block_bytes,
                                precision=precision, backend=backend)
    if _use_triton(x, codebook, backend):
        triton_search = _triton_module()
        if backend == "triton":
            return triton_search.nearest_code(x, codebook, precision=precision)
        try:
            return triton_search.nearest_code(x, codebook, precision=precision)
        except torch.cuda.OutOfMemoryError:
            raise  # says nothing about the kernels; the chunked path would not fit either
        except Exception as error:  # a GPU or Triton version the kernels do not compile for
            _triton_broken = f"{type(error).__name__}: {error}"
            warnings.warn(f"the fused Triton nearest-code search failed ({_triton_broken}); "
                          "this process now uses the chunked matmul search",
                          RuntimeWarning, stacklevel=2)
    x, codebook = _float_inputs(x, codebook)
    if _use_c(x, codebook, backend):
        return cpu_kernel.nearest_code(x, codebook)
    num_codes = codebook.shape[0]
    code_sq = codebook.pow(2).sum(-1)  # (K,)
    blockwise = x.device.type == "cpu" and num_codes >= 2 * ARGMIN_BLOCK
    padding = -num_codes % ARGMIN_BLOCK if blockwise else 0
    if padding:  # codes at infinite distance, so that the columns split into whole blocks
        codebook = torch.cat([codebook, codebook.new_zeros(padding, codebook.shape[1])])
        code_sq = torch.cat([code_sq, code_sq.new_full((padding,), float("inf"))])
    row_argmin = blockwise_argmin if blockwise else _plain_argmin
    blocks = list(_row_blocks(x.shape[0], codebook.shape[0], x.dtype.itemsize, max_block_bytes))
    if len(blocks) == 1:
        # (N, K) = ||c||² - 2 x·cᵀ, the squared distance less the row constant ||x||²
        out = row_argmin(code_distances(x, codebook, code_sq))
    else:
        out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
        for start, stop in blocks:
            out[start:stop] = row_argmin(code_distances(x[start:stop], codebook, code_sq))
    # a padding code wins only for rows whose distances are all NaN or infinite
    return out.clamp_(max=num_codes - 1) if padding else out


def _plain_argmin(distances: Tensor) -> Tensor:
    return distances.argmin(dim=-1)


def blockwise_argmin(distances: Tensor, block: int = ARGMIN_BLOCK) -> Tensor:
    """``distances.argmin(-1)`` of a contiguous ``(N, K)`` matrix whose ``K`` is a multiple of
    ``block``, in two passes that vectorise on CPU.

    torch's CPU ``argmin`` (and ``min`` with indices) walks each row one element at a time,
    while ``amin`` runs on SIMD lanes. The minimum of every block of ``block`` columns
    (``amin``), the first block holding the row's minimum (``argmin`` over ``K / block``
    values) and the first minimum within that block (``argmin`` over ``block`` values) give
    the first index of the row's minimum, as ``argmin`` does, at about half its time for
    512 codes. Rows with NaN get some index in range.
    """
    num_rows, num_codes = distances.shape
    if num_codes % block or not distances.is_contiguous():
        return distances.argmin(dim=-1)
    per_row = num_codes // block
    best_block = distances.view(num_rows, per_row, block).amin(-1).argmin(-1)  # (N,)
    # row n's best block is row n·per_row + best_block[n] of the (N·per_row, block) view
    rows = torch.arange(0, num_rows * per_row, per_row, device=distances.device)
    within = distances.view(-1, block).index_select(0, rows.add_(best_block)).argmin(-1)
    return torch.add(within, best_block, alpha=block)


@torch.no_grad()
def sample_code(
    x: Tensor,
    codebook: Tensor,
    temperature: float,
    *,
    generator: torch.Generator | None = None,
    max_block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> Tensor:
    """Sample a code per row from ``softmax(-distance / temperature)``.

    ``distance`` is the Euclidean distance (as ``torch.cdist``, not squared), the same choice as
    ``vector_quantize_pytorch``. Sampling uses the Gumbel-max trick block by block, so memory stays
    bounded like :func:`nearest_code`. ``temperature == 0`` is the nearest code.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return nearest_code(x, codebook, max_block_bytes=max_block_bytes)
    if torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return sample_code(x, codebook, temperature, generator=generator,
                               max_block_bytes=max_block_bytes)
    x, codebook = _float_inputs(x, codebook)
    code_sq = codebook.pow(2).sum(-1)  # (K,)
    x_sq = x.pow(2).sum(-1, keepdim=True)  # (N, 1)
    out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    tiny = torch.finfo(x.dtype).tiny
    for start, stop in _row_blocks(x.shape[0], codebook.shape[0], x.dtype.itemsize,
                                   max_block_bytes):
        sq = code_distances(x[start:stop], codebook, code_sq).add_(x_sq[start:stop])
        distance = sq.clamp_(min=0).sqrt_()  # (rows, K)
        uniform = torch.rand(distance.shape, generator=generator, dtype=x.dtype,
                             device=x.device)
        gumbel = uniform.clamp_(min=tiny).log_().neg_().log_().neg_()
        # argmax(-d/T + g) samples from softmax(-d/T)
        out[start:stop] = gumbel.add_(distance, alpha=-1.0 / temperature).argmax(dim=-1)
    return out
