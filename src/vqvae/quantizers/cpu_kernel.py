"""CPU kernels in C: nearest-code search for short vectors, and the EMA codebook update.

With short vectors (16 dimensions in the course's model) the chunked ``addmm`` spends most of
its time writing and re-reading the ``(N, K)`` distance matrix, not multiplying.
``cpu_search.c`` keeps each tile of distances in SIMD registers and only the running minimum per
lane, like the fused Triton kernel does on GPU. Measured on the project's 2-core CPU against
512 codes, one thread against torch's two: 0.20 ms against 0.39 ms for ``(2048, 16)``, 1.9 ms
against 13.7 ms for ``(16384, 16)``, 0.37 against 0.52 ms for ``(2048, 32)``. At 48 dimensions
and 2048 codes ``addmm`` (a tuned GEMM) catches up, hence ``MAX_DIM``.

The EMA update of a float32 CPU codebook (:func:`code_statistics`, :func:`ema_update`) runs
there too, for any dimension: two calls instead of some twenty tensor operations of a few
microseconds each, which on CPU cost more than their arithmetic.

Threads. Where torch runs on GNU OpenMP (its Linux builds), the kernels are built with
``-fopenmp`` against the very runtime torch loaded, and split their rows over torch's threads
(``torch.set_num_threads``); elsewhere, or with ``VQVAE_CPU_KERNEL_THREADS=0``, each runs on
the calling thread (:func:`parallel` says which).

Build and cache. The C file is compiled on first use with the system's C compiler (``$CC``, else
``cc`` or ``gcc``) and ``-O3 -march=native`` (held to AVX2 under ``ATEN_CPU_CAPABILITY=avx2``,
as torch is; see :data:`ISA_LIMITS`), into ``$XDG_CACHE_HOME/vqvae/kernels`` (``~/.cache``)
under a name that hashes the source, the compiler, the flags and the CPU, so a cache shared
between machines never hands one the other's instructions. Loading a shared library runs its
code, so the cache is treated as untrusted until checked:

- the directories are created ``0700`` whatever the umask; the kernel directory must belong to
  this user and not be writable by group or others, and no directory above it may be writable
  by anyone else (unless sticky, like ``/tmp``) or belong to anyone but this user or root;
- each build is stored with a digest file (SHA-256 of the library's bytes and the full build
  key), both written atomically; the library is read through a descriptor opened without
  following links and checked the same way, hashed, and only those verified bytes are loaded,
  from a copy written into a fresh private directory (so the file cannot change between the
  check and ``dlopen``);
- a library that fails its digest, fails to load, or lacks a symbol is rebuilt; a cache that
  fails the ownership checks is left alone and the kernel is built in a private temporary
  directory instead, with a one-line ``RuntimeWarning`` that says why.

Nothing is compiled at install time, and without a compiler (or with ``VQVAE_CPU_KERNEL=0``)
:func:`available` is false and the layers use torch operations (``addmm`` for the search);
:func:`unavailable_reason` says why.

Custom ops. The three entry points are also ``torch.library`` custom ops with fake
implementations, so that ``torch.compile`` sees them as single nodes:
``torch.ops.vqvae.nearest_code_cpu(x, codebook) -> indices``,
``torch.ops.vqvae.code_statistics_cpu(h, indices, codebook_size) -> (counts, sums)`` and
``torch.ops.vqvae.ema_update_cpu(codebook!, cluster_size!, counts, sums, decay, eps,
threshold) -> dead`` (in place; ``dead`` a 0-dim int64 tensor). The public functions call the
ops only while tracing; in eager mode they call the library directly, since the op dispatch
costs more than the whole search on small batches (``benchmarks/cpu_kernel_ops.py``: 8-30 µs
more per search call, and over 100 µs for the in-place update, whose wrapper torch writes in
Python, against 0.2-2 µs for the check that picks the direct path).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

SOURCE = Path(__file__).with_name("cpu_search.c")
FLAGS = ["-O3", "-march=native", "-shared", "-fPIC"]
#: torch's CPU capability (``torch.backends.cpu.get_cpu_capability()``, which
#: ``ATEN_CPU_CAPABILITY`` lowers) -> x86 flags that hold the kernels to the same instruction
#: set: ``ATEN_CPU_CAPABILITY=avx2`` then makes an AVX-512 machine run our code as an AVX2-only
#: one would (the bfloat16 pre-search, :mod:`.bf16_presearch`, follows the same setting).
ISA_LIMITS = {"AVX2": ["-mno-avx512f"], "DEFAULT": ["-mno-avx"]}
#: Longest vectors the kernel takes; from about 48 on, ``addmm`` is as fast or faster.
MAX_DIM = 32
ENV_SWITCH = "VQVAE_CPU_KERNEL"
#: ``VQVAE_CPU_KERNEL_THREADS=0`` builds the kernels without OpenMP: one thread each
THREADS_SWITCH = "VQVAE_CPU_KERNEL_THREADS"
# FSQ channels the FSQ kernels take (cpu_search.c's FSQ_MAX_CHANNELS)
FSQ_MAX_CHANNELS = 32

_reason: str | None = None


def _cpu_identity() -> str:
    """Model and instruction-set flags of this CPU (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def build_flags() -> list[str]:
    """The compiler flags: :data:`FLAGS`, on x86 the limit of :data:`ISA_LIMITS` that
    torch's CPU capability asks for, and ``-fopenmp`` where :func:`_shares_openmp`."""
    limit = []
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        limit = ISA_LIMITS.get(torch.backends.cpu.get_cpu_capability(), [])
    threads = _shares_openmp() and _openmp_refused is None
    return [*FLAGS, *limit, *(["-fopenmp"] if threads else [])]


#: why the compiler refused ``-fopenmp`` (say, a clang without an OpenMP library), after which
#: the kernels are built without it; None while it has not
_openmp_refused: str | None = None


@functools.cache
def _shares_openmp() -> bool:
    """Whether a ``-fopenmp`` build of the kernels would run on torch's own OpenMP threads.

    True on Linux where torch runs its parallel operations on OpenMP and the runtime it loaded
    is GNU's ``libgomp.so.1``: the build asks for a library of that name, which the loader
    then finds already loaded, so the kernels and torch share one runtime and one pool of
    worker threads (a second runtime would bring a second pool, each spinning against the
    other). Anything else (another OpenMP runtime, macOS, ``VQVAE_CPU_KERNEL_THREADS=0``):
    False, and the kernels run on the calling thread."""
    if os.environ.get(THREADS_SWITCH, "1") == "0" or platform.system() != "Linux":
        return False
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return False
    try:
        with open("/proc/self/maps") as maps:
            runtimes = {os.path.basename(line.split()[-1]) for line in maps
                        if "libgomp" in line or "libiomp" in line or "libomp" in line}
    except OSError:
        return False
    return runtimes == {"libgomp.so.1"}


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


# ---------------------------------------------------------------------------- build cache


class UnsafeCacheError(OSError):
    """The kernel cache, or a file in it, could have been written by someone else."""


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vqvae" / "kernels"


def _build_key(compiler: str) -> str:
    """SHA-256 of everything the library's bytes depend on."""
    return hashlib.sha256(b"\0".join([SOURCE.read_bytes(), compiler.encode(),
                                      " ".join(build_flags()).encode(),
                                      _cpu_identity().encode()])).hexdigest()


def _cache_paths(directory: Path, key: str) -> tuple[Path, Path]:
    """The library and its digest file for ``key`` in ``directory``."""
    name = f"cpu_search-{key[:16]}"
    return directory / f"{name}.so", directory / f"{name}.sha256"


def _refuse_unless_private(status: os.stat_result, path: Path | str) -> None:
    if status.st_uid != os.geteuid():
        raise UnsafeCacheError(f"{path} belongs to uid {status.st_uid}, not to this user "
                               f"(uid {os.geteuid()})")
    if status.st_mode & 0o022:
        raise UnsafeCacheError(f"{path} is writable by group or others "
                               f"(mode {stat.S_IMODE(status.st_mode):04o})")


def _refuse_unless_safe_above(directory: Path) -> None:
    """Refuse if someone other than this user and root could swap an entry on the way down to
    ``directory`` (resolved) or below it: a directory they own or can write, unless sticky
    (like /tmp, where they can add entries but not rename ours)."""
    for path in [directory, *directory.parents]:
        status = os.stat(path)
        if status.st_uid not in (os.geteuid(), 0):
            raise UnsafeCacheError(f"{path} belongs to uid {status.st_uid}, neither this user "
                                   "nor root")
        if status.st_mode & 0o022 and not status.st_mode & stat.S_ISVTX:
            raise UnsafeCacheError(f"{path} is writable by group or others "
                                   f"(mode {stat.S_IMODE(status.st_mode):04o}) and not sticky")


def _make_private_dirs(path: Path) -> Path:
    """Create the missing directories of ``path`` with mode 0700 whatever the umask, and check
    that nobody but this user (and root) can change what it leads to; returns it resolved."""
    missing = []
    for directory in [path, *path.parents]:
        if os.path.lexists(directory):
            # checked before creating anything in it, so that what we create stays ours
            _refuse_unless_safe_above(Path(os.path.realpath(directory)))
            break
        missing.append(directory)
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            continue  # made by a concurrent process: the checks below judge it
        # mkdir's mode went through the umask; through a descriptor, never a planted link
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | os.O_NOFOLLOW)
        try:
            os.fchmod(fd, 0o700)
        finally:
            os.close(fd)
    real = Path(os.path.realpath(path))
    _refuse_unless_private(os.stat(real), real)
    _refuse_unless_safe_above(real.parent)
    return real


def _read_private(path: Path) -> bytes | None:
    """The bytes of the regular file ``path`` if it exists, read through one descriptor that
    was checked for owner and mode; None if it does not exist."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None
    except OSError as error:  # O_NOFOLLOW on a link: ELOOP
        raise UnsafeCacheError(f"{path} cannot be opened as a plain file: {error}") from error
    with os.fdopen(fd, "rb") as f:
        status = os.fstat(f.fileno())
        if not stat.S_ISREG(status.st_mode):
            raise UnsafeCacheError(f"{path} is not a regular file")
        _refuse_unless_private(status, path)
        return f.read()


def _digest_text(image: bytes, key: str) -> bytes:
    return f"sha256 {hashlib.sha256(image).hexdigest()}\nkey {key}\n".encode()


def _read_verified(directory: Path, key: str) -> bytes | None:
    """The cached library for ``key`` if its bytes match its digest file, else None (missing,
    corrupt, or built for another key). Raises :class:`UnsafeCacheError` for a file that
    someone else could have written."""
    library_path, digest_path = _cache_paths(directory, key)
    image, digest = _read_private(library_path), _read_private(digest_path)
    if image is None or digest is None or digest != _digest_text(image, key):
        return None
    return image


def _write_atomically(path: Path, data: bytes) -> None:
    """Write ``path`` (mode 0600) so that a reader sees the old file or the whole new one."""
    fd, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except BaseException:
        os.unlink(partial)
        raise


def _compile(compiler: str, directory: Path) -> bytes:
    """The bytes of a fresh build, compiled in a private directory under ``directory``."""
    with tempfile.TemporaryDirectory(dir=directory, prefix=".build-") as work:
        output = Path(work) / "cpu_search.so"
        result = subprocess.run([compiler, *build_flags(), "-o", str(output), str(SOURCE)],
                                capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-500:]}")
        return output.read_bytes()


def _build_into(directory: Path, compiler: str, key: str) -> bytes:
    """Compile, store the library and then its digest in ``directory``; return the bytes."""
    image = _compile(compiler, directory)
    library_path, digest_path = _cache_paths(directory, key)
    _write_atomically(library_path, image)
    _write_atomically(digest_path, _digest_text(image, key))
    return image


def _load(image: bytes, directory: Path) -> ctypes.CDLL:
    """``dlopen`` exactly ``image``: from a copy written into a fresh 0700 directory (removed
    once loaded; the mapping stays), so nothing can swap the file after it was verified."""
    with tempfile.TemporaryDirectory(dir=directory, prefix=".load-") as private:
        path = os.path.join(private, "cpu_search.so")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(image)
        return ctypes.CDLL(path)


class NoSimdError(RuntimeError):
    """The build targets no vector instruction set that ``cpu_search.c`` knows."""


def _configure(library: ctypes.CDLL, compiler: str) -> ctypes.CDLL:
    """Declare the C signatures; AttributeError if a symbol is missing."""
    library.vq_simd_lanes.restype = ctypes.c_int
    library.vq_parallel.restype = ctypes.c_int
    if library.vq_simd_lanes() <= 0:
        # emulated vectors are many times slower than torch's kernels
        raise NoSimdError(f"{compiler} targets no SIMD instruction set that cpu_search.c knows")
    pointer, size, number = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    signatures = {
        "vq_nearest_code": ([pointer, pointer, size, size, size, pointer], ctypes.c_int),
        "vq_code_statistics": ([pointer, pointer, size, size, size, pointer, pointer],
                               ctypes.c_int),
        "vq_ema_update": ([pointer, pointer, pointer, pointer, size, size, number, number,
                           number], size),
        "vq_quantize_rows": ([pointer, size, size, number, ctypes.c_int, ctypes.c_int, number,
                              pointer, pointer, pointer], None),
        "vq_estimator_forward": ([pointer, pointer, size, size, ctypes.c_int, number, pointer,
                                  pointer, pointer], ctypes.c_double),
        "vq_estimator_backward": ([pointer, pointer, pointer, pointer, pointer, pointer, size,
                                   size, ctypes.c_int, number, number, number, pointer,
                                   pointer], None),
        "vq_fsq_forward": ([pointer, pointer, size, size] + [pointer] * 6
                           + [ctypes.c_int, pointer, size, pointer, pointer, pointer],
                           ctypes.c_int),
        "vq_fsq_backward": ([pointer] * 7 + [ctypes.c_int, size, size, size, size]
                            + [pointer] * 5,
                            ctypes.c_int),
        "vq_int8_recheck": ([pointer, pointer, pointer, pointer, pointer, pointer, size, size,
                             size, size, pointer], ctypes.c_int),
    }
    for name, (arguments, result) in signatures.items():
        function = getattr(library, name)
        function.argtypes, function.restype = arguments, result
    return library


def _open(compiler: str) -> ctypes.CDLL:
    """The library for this compiler, flags, source and CPU: from the cache when it verifies,
    else freshly built (into the cache, or into a private temporary directory when the cache
    is not safe to use)."""
    key = _build_key(compiler)
    try:
        directory = _make_private_dirs(_cache_dir())
        image = _read_verified(directory, key)
    except OSError as error:  # unsafe, or not writable (a read-only home, say)
        warnings.warn(f"vqvae: not using the C kernel cache ({error}); building the kernel in "
                      "a private temporary directory", RuntimeWarning, stacklevel=4)
        with tempfile.TemporaryDirectory(prefix="vqvae-kernels-") as private:
            return _configure(_load(_compile(compiler, Path(private)), Path(private)), compiler)
    if image is not None:
        try:
            return _configure(_load(image, directory), compiler)
        except (OSError, AttributeError):
            pass  # verified, yet not a loadable kernel (say, written by hand): build it again
    return _configure(_load(_build_into(directory, compiler, key), directory), compiler)


def _open_or_without_openmp(compiler: str) -> ctypes.CDLL:
    """:func:`_open`, and if the compiler fails with ``-fopenmp``, :func:`_open` without it
    (kernels on the calling thread; :data:`_openmp_refused` keeps the compiler's message)."""
    global _openmp_refused
    try:
        return _open(compiler)
    except NoSimdError:
        raise
    except RuntimeError as error:
        if "-fopenmp" not in build_flags():
            raise
        _openmp_refused = str(error)
        return _open(compiler)


@functools.cache
def _library() -> ctypes.CDLL | None:
    global _reason
    if os.environ.get(ENV_SWITCH, "1") == "0":
        _reason = f"turned off by {ENV_SWITCH}=0"
        return None
    compiler = _compiler()
    if compiler is None:
        _reason = "no C compiler found ($CC, cc or gcc)"
        return None
    try:
        return _open_or_without_openmp(compiler)
    except NoSimdError as error:
        _reason = str(error)
    except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as error:
        _reason = f"{type(error).__name__}: {error}"
    return None


def constant_to_compile(fn):
    """``torch.compiler.assume_constant_result`` (torch.compile takes ``fn``'s result as a
    constant) without importing ``torch._dynamo``, which that wrapper does and which took a
    second of every ``import vqvae`` (2.8 s in all). It sets the mark that Dynamo's own
    decorator sets; ``tests/test_cpu_kernel_ops.py`` checks that the two still agree."""
    fn._dynamo_marked_constant = True
    return fn


# a constant to torch.compile: built and loaded once, outside the graph
@constant_to_compile
def simd_lanes() -> int:
    """Floats per SIMD register of the built kernels (16 with AVX-512, 8 with AVX2, 4 with SSE2
    or NEON), or 0 when they are not available."""
    library = _library()
    return library.vq_simd_lanes() if library is not None else 0


# a constant to torch.compile: built and loaded once, outside the graph
@constant_to_compile
def parallel() -> bool:
    """Whether the built kernels split their rows over torch's threads (an OpenMP build, see
    :func:`_shares_openmp`); False also when they are not available."""
    library = _library()
    return library is not None and bool(library.vq_parallel())


# a constant to torch.compile: built and loaded once, outside the graph
@constant_to_compile
def available() -> bool:
    """Whether the C search could be built and loaded here (built on the first call)."""
    return _library() is not None


# a constant to torch.compile: built and loaded once, outside the graph
@constant_to_compile
def unavailable_reason() -> str | None:
    """Why :func:`available` is false, or None."""
    available()
    return _reason


def _tracing() -> bool:
    """Whether the call is being traced (torch.compile, export, make_fx, fake tensors), where
    the custom ops must be called so that the graph records them."""
    return torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None


def _checked_library() -> ctypes.CDLL:
    library = _library()
    if library is None:
        raise RuntimeError(f"the C CPU kernels are not available: {_reason}")
    return library


# ---------------------------------------------------------------------------- search


def supports(x: Tensor, codebook: Tensor) -> bool:
    """Whether :func:`nearest_code` takes these inputs: CPU float32, dim <= ``MAX_DIM``."""
    return (x.device.type == "cpu" and codebook.device.type == "cpu"
            and x.dtype == torch.float32 and codebook.dtype == torch.float32
            and x.ndim == 2 and codebook.ndim == 2 and x.shape[1] == codebook.shape[1]
            and 0 < x.shape[1] <= MAX_DIM)


def _check_search_inputs(x: Tensor, codebook: Tensor) -> None:
    if not supports(x, codebook):
        raise ValueError(f"expected float32 CPU tensors with at most {MAX_DIM} columns, got "
                         f"{x.dtype} {tuple(x.shape)} on {x.device} and {codebook.dtype} "
                         f"{tuple(codebook.shape)} on {codebook.device}")


def nearest_code(x: Tensor, codebook: Tensor) -> Tensor:
    """Index of the nearest row of ``codebook`` ``(K, D)`` for each row of ``x`` ``(N, D)``.

    float32 on CPU, ``D <= MAX_DIM``; the first index among equal distances. The rows are
    split over torch's threads in an OpenMP build (:func:`parallel`); a thread of our own,
    started per call, had lost more to torch's spinning worker threads than it gained.
    """
    if _tracing():
        return torch.ops.vqvae.nearest_code_cpu(x, codebook)
    return _nearest_code(x, codebook)


def _nearest_code(x: Tensor, codebook: Tensor) -> Tensor:
    library = _library()
    if library is None:
        raise RuntimeError(f"the C nearest-code search is not available: {_reason}")
    _check_search_inputs(x, codebook)
    x, codebook = x.contiguous(), codebook.contiguous()
    num_rows, dim = x.shape
    out = torch.empty(num_rows, dtype=torch.long)
    if num_rows:
        status = library.vq_nearest_code(x.data_ptr(), codebook.data_ptr(), num_rows, dim,
                                         codebook.shape[0], out.data_ptr())
        if status != 0:
            raise MemoryError("vq_nearest_code could not allocate its copy of the codebook")
    return out


@torch.library.custom_op("vqvae::nearest_code_cpu", mutates_args=(), device_types="cpu")
def _nearest_code_op(x: Tensor, codebook: Tensor) -> Tensor:
    return _nearest_code(x, codebook)


@_nearest_code_op.register_fake
def _(x: Tensor, codebook: Tensor) -> Tensor:
    _check_search_inputs(x, codebook)
    return x.new_empty(x.shape[0], dtype=torch.long)  # (N,)


# ---------------------------------------------------------------------------- EMA update


def supports_ema(*tensors: Tensor) -> bool:
    """Whether :func:`code_statistics` / :func:`ema_update` take these tensors (CPU float32,
    contiguous) and the library is built."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()
               for t in tensors) and available()


def code_statistics(h: Tensor, indices: Tensor, codebook_size: int) -> tuple[Tensor, Tensor]:
    """``(counts (K,), sums (K, D))`` of the rows of ``h`` ``(N, D)`` assigned to each code:
    ``bincount`` and ``index_add_`` in one pass over ``h``."""
    indices = indices.to(torch.long).contiguous()
    if _tracing():
        return torch.ops.vqvae.code_statistics_cpu(h, indices, codebook_size)
    return _code_statistics(h, indices, codebook_size)


def _code_statistics(h: Tensor, indices: Tensor, codebook_size: int) -> tuple[Tensor, Tensor]:
    counts = h.new_empty(codebook_size)
    sums = h.new_empty(codebook_size, h.shape[1])
    status = _checked_library().vq_code_statistics(h.data_ptr(), indices.data_ptr(),
                                                   h.shape[0], h.shape[1], codebook_size,
                                                   counts.data_ptr(), sums.data_ptr())
    if status != 0:
        raise ValueError(f"code indices must lie in [0, {codebook_size})")
    return counts, sums


def ema_update(codebook: Tensor, cluster_size: Tensor, counts: Tensor, sums: Tensor,
               decay: float, eps: float, threshold: float = 0.0) -> int:
    """One EMA step of ``cluster_size`` and ``codebook``, in place (``_apply_ema``'s formulas);
    returns how many codes end with a cluster size below ``threshold``."""
    if _tracing():
        return int(torch.ops.vqvae.ema_update_cpu(codebook, cluster_size, counts, sums, decay,
                                                  eps, threshold))
    return _ema_update(codebook, cluster_size, counts, sums, decay, eps, threshold)


def _ema_update(codebook: Tensor, cluster_size: Tensor, counts: Tensor, sums: Tensor,
                decay: float, eps: float, threshold: float) -> int:
    return _checked_library().vq_ema_update(codebook.data_ptr(), cluster_size.data_ptr(),
                                            counts.data_ptr(), sums.data_ptr(),
                                            codebook.shape[0], codebook.shape[1], decay, eps,
                                            threshold)


def _check_ema_inputs(*tensors: Tensor) -> None:
    for t in tensors:
        if t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"expected contiguous float32 CPU tensors, got {t.dtype} "
                             f"{tuple(t.shape)} on {t.device}")


def _check_statistics_inputs(h: Tensor, indices: Tensor) -> None:
    _check_ema_inputs(h)
    if h.ndim != 2 or indices.shape != h.shape[:1] or indices.dtype != torch.long \
            or not indices.is_contiguous():
        raise ValueError(f"expected h (N, D) and contiguous int64 indices (N,), got "
                         f"{tuple(h.shape)} and {indices.dtype} {tuple(indices.shape)}")


def _check_update_inputs(codebook: Tensor, cluster_size: Tensor, counts: Tensor,
                         sums: Tensor) -> None:
    _check_ema_inputs(codebook, cluster_size, counts, sums)
    if codebook.ndim != 2 or cluster_size.shape != codebook.shape[:1] \
            or counts.shape != codebook.shape[:1] or sums.shape != codebook.shape:
        raise ValueError(f"expected codebook (K, D), cluster_size and counts (K,), sums (K, D), "
                         f"got {tuple(codebook.shape)}, {tuple(cluster_size.shape)}, "
                         f"{tuple(counts.shape)}, {tuple(sums.shape)}")


@torch.library.custom_op("vqvae::code_statistics_cpu", mutates_args=(), device_types="cpu")
def _code_statistics_op(h: Tensor, indices: Tensor, codebook_size: int) -> tuple[Tensor, Tensor]:
    _check_statistics_inputs(h, indices)
    return _code_statistics(h, indices, codebook_size)


@_code_statistics_op.register_fake
def _(h: Tensor, indices: Tensor, codebook_size: int) -> tuple[Tensor, Tensor]:
    _check_statistics_inputs(h, indices)
    return h.new_empty(codebook_size), h.new_empty(codebook_size, h.shape[1])  # (K,), (K, D)


# the count comes back as a 0-dim tensor: a Python int would be data-dependent in a graph
@torch.library.custom_op("vqvae::ema_update_cpu", mutates_args=("codebook", "cluster_size"),
                         device_types="cpu")
def _ema_update_op(codebook: Tensor, cluster_size: Tensor, counts: Tensor, sums: Tensor,
                   decay: float, eps: float, threshold: float) -> Tensor:
    _check_update_inputs(codebook, cluster_size, counts, sums)
    dead = _ema_update(codebook, cluster_size, counts, sums, decay, eps, threshold)
    return torch.tensor(dead, dtype=torch.long)


@_ema_update_op.register_fake
def _(codebook: Tensor, cluster_size: Tensor, counts: Tensor, sums: Tensor, decay: float,
      eps: float, threshold: float) -> Tensor:
    _check_update_inputs(codebook, cluster_size, counts, sums)
    return codebook.new_empty((), dtype=torch.long)  # how many codes are below threshold


# The row kernels below split their rows over torch's threads in an OpenMP build (see
# _shares_openmp). Splitting them over a pool thread of our own (ctypes lets go of the GIL) had
# been slower on two threads: right after torch's parallel operations that thread waited
# behind torch's spinning workers (SimVQ's call: 5.9 ms in two blocks against 5.5 in one,
# AVX-512). Handing the rows to those same workers has no such wait.


# ---------------------------------------------------------------------------- int8 re-check


def int8_recheck(products: Tensor, row_scale: Tensor, code_sq: Tensor, x: Tensor,
                 codebook: Tensor, slack: Tensor, max_candidates: int) -> Tensor | None:
    """The second stage of the int8 pre-search (:mod:`.int8_presearch`) for a block of rows:
    ``(N,)`` int64 indices, or None when the block has more than ``max_candidates``
    candidates (the caller then searches it in float32).

    ``products`` ``(N, K)`` int32 (``qx·qcᵀ``), ``row_scale`` ``(N,)`` (``sx·sc``): approximate
    distances ``code_sq - 2·row_scale·products``; ``x`` ``(N, D)`` and ``codebook`` ``(K, D)``
    float32, ``slack`` ``(N,)`` each row's error allowance. Each row's candidates are the codes
    within its slack of the float32 distance of the code at its smallest approximate one; the
    answer is the first candidate at the smallest float32 distance. Two passes over each row of
    ``products`` in C, where the tensor form took some thirty operations over the block
    (2.9 against 0.5 ms for 1024 rows against 1024 codes of 512 dimensions, held to AVX2).
    Not for tracing: the candidate count is data-dependent, so only eager calls take this.
    """
    num_rows, num_codes = products.shape
    tensors = (row_scale, code_sq, x, codebook, slack)
    if products.dtype != torch.int32 or any(t.dtype != torch.float32 for t in tensors) \
            or x.shape != (num_rows, codebook.shape[1]) or codebook.shape[0] != num_codes \
            or row_scale.shape != (num_rows,) or slack.shape != (num_rows,) \
            or code_sq.shape != (num_codes,) \
            or any(t.device.type != "cpu" for t in (products, *tensors)):
        raise ValueError(
            f"expected int32 products (N, K) and float32 row_scale (N,), code_sq (K,), x (N, D), "
            f"codebook (K, D), slack (N,) on CPU, got {products.dtype} "
            f"{tuple(products.shape)}, "
            + ", ".join(f"{t.dtype} {tuple(t.shape)}" for t in tensors))
    products, row_scale, code_sq, x, codebook, slack = (
        t.contiguous() for t in (products, *tensors))
    out = torch.empty(num_rows, dtype=torch.long)
    if num_rows == 0:
        return out
    status = _checked_library().vq_int8_recheck(
        products.data_ptr(), row_scale.data_ptr(), code_sq.data_ptr(), x.data_ptr(),
        codebook.data_ptr(), slack.data_ptr(), num_rows, x.shape[1], num_codes,
        max_candidates, out.data_ptr())
    return out if status == 0 else None


def quantize_rows(v: Tensor, qmax: int, pairs: bool, per_row: bool,
                  peak_floor: float) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`.int8_presearch.quantize_rows` of float32 CPU ``v`` ``(R, D)`` in two passes over
    it: ``(q int8 (R, D), scale (R,), residual_norm (R,))``, the same ``q`` and ``scale`` and
    the residual norm up to its float32 rounding (0.1 against 0.5 ms for a (1024, 512) block
    held to AVX2). ``pairs`` needs an even ``D``."""
    if v.dtype != torch.float32 or v.device.type != "cpu" or v.ndim != 2 \
            or (pairs and v.shape[1] % 2):
        raise ValueError(f"expected a float32 CPU matrix (with an even width for pairs), got "
                         f"{v.dtype} {tuple(v.shape)} on {v.device}")
    v = v.contiguous()
    q = torch.empty(v.shape, dtype=torch.int8)
    scale, residual = v.new_empty(v.shape[0]), v.new_empty(v.shape[0])
    if not v.numel():
        return q, scale, residual
    _checked_library().vq_quantize_rows(v.data_ptr(), v.shape[0], v.shape[1], float(qmax),
                                        int(pairs), int(per_row), peak_floor, q.data_ptr(),
                                        scale.data_ptr(), residual.data_ptr())
    return q, scale, residual


# ---------------------------------------------------------------------------- SimVQ estimator


def supports_rows(*tensors: Tensor) -> bool:
    """Whether the row kernels below take these tensors: contiguous float32 CPU matrices of one
    shape, no tracing, and the library built."""
    first = tensors[0]
    return (not _tracing() and first.ndim == 2
            and all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()
                    and t.shape == first.shape for t in tensors)
            and available())


def estimator_forward(x: Tensor, q: Tensor, rotation: bool,
                      eps: float) -> tuple[float, Tensor | None, Tensor | None, Tensor | None]:
    """One pass over ``x`` and ``q`` ``(N, D)``: ``(Σ||x - q||², ||x||, ||q||, cos)``, the norms
    ``(N,)`` floored at ``eps`` and ``cos = x·q / (||x||·||q||)``, or three None without
    ``rotation``. The forward of :class:`.simvq._Estimator`."""
    num_rows, dim = x.shape
    norms = [x.new_empty(num_rows) for _ in range(3)] if rotation else None
    pointers = [t.data_ptr() for t in norms] if rotation else [None] * 3
    total = _checked_library().vq_estimator_forward(
        x.data_ptr(), q.data_ptr(), num_rows, dim, int(rotation), eps, *pointers) \
        if num_rows else 0.0
    return (total, *norms) if rotation else (total, None, None, None)


def estimator_backward(grad: Tensor, x: Tensor, q: Tensor, norms: tuple[Tensor, ...] | None,
                       commit: float, codebook: float, floor: float,
                       with_grad_q: bool) -> tuple[Tensor, Tensor | None]:
    """``(grad_x, grad_q)`` of :class:`.simvq._Estimator` in one pass over the rows: the
    rotation trick's gradient (``norms``: ``(||x||, ||q||, cos)`` from the forward; None:
    straight through) plus ``commit·(x - q)``, and ``codebook·(x - q)`` for ``q``."""
    num_rows, dim = x.shape
    grad_x = torch.empty_like(x)
    grad_q = torch.empty_like(q) if with_grad_q else None
    if num_rows:
        pointers = [t.data_ptr() for t in norms] if norms is not None else [None] * 3
        _checked_library().vq_estimator_backward(
            grad.data_ptr(), x.data_ptr(), q.data_ptr(), *pointers, num_rows, dim,
            int(norms is not None), commit, codebook, floor, grad_x.data_ptr(),
            grad_q.data_ptr() if grad_q is not None else None)
    return grad_x, grad_q


# ---------------------------------------------------------------------------- FSQ

#: ``bound`` of :func:`fsq_backward`: tanh (saved ``t``), clamp, inward clamp (saved ``u``)
FSQ_TANH, FSQ_CLAMP, FSQ_INWARD = 0, 1, 2


def fsq_forward(u: Tensor, bounded: Tensor | None, constants: tuple[Tensor, ...],
                levels: Tensor, basis: Tensor, symmetric: bool, rows: Tensor | None
                ) -> tuple[Tensor | None, Tensor, Tensor] | None:
    """The projected FSQ call past ``project_in``, one pass over the rows: ``u`` ``(N, c)`` is
    ``project_in(x) + shift``, ``bounded`` its tanh (None: the clamp, taken here). Returns
    ``(out (N, dim), index (N,) int64, code (N, c))``, ``out`` gathered from ``rows``
    (``project_out`` of every code, in index order; None without ``rows``), or None where
    ``u`` is not finite.
    ``constants``: the bound's ``(scale, bias, centre, step)`` per channel (float32);
    ``levels`` (int32, as FSQ keeps them) and ``basis`` (int64) per channel."""
    num_rows, channels = u.shape
    scale, bias, centre, step = (t.contiguous() for t in constants)
    levels = levels.to(torch.int32).contiguous()  # (no copy for FSQ's own)
    basis = basis.to(torch.int64).contiguous()
    rows = rows.contiguous() if rows is not None else None
    out = u.new_empty(num_rows, rows.shape[1]) if rows is not None else None
    index = torch.empty(num_rows, dtype=torch.long)
    code = torch.empty_like(u)
    if num_rows and _checked_library().vq_fsq_forward(
            u.data_ptr(), bounded.data_ptr() if bounded is not None else None, num_rows,
            channels, scale.data_ptr(), bias.data_ptr(), centre.data_ptr(), step.data_ptr(),
            levels.data_ptr(), basis.data_ptr(), int(symmetric),
            rows.data_ptr() if rows is not None else None,
            rows.shape[1] if rows is not None else 0,
            out.data_ptr() if out is not None else None, index.data_ptr(), code.data_ptr()):
        return None
    return out, index, code


def fsq_backward(grad: Tensor, x: Tensor, saved: Tensor, code: Tensor, w_in: Tensor,
                 w_out: Tensor, slope: Tensor, bound: int, in_bias: bool,
                 out_bias: bool, in_place: bool = False) -> tuple[Tensor, ...]:
    """``(grad_x, grad_w_in, grad_b_in, grad_w_out, grad_b_out)`` of that call (biases None
    when absent), one pass over the rows; ``bound`` one of :data:`FSQ_TANH`
    (``saved`` the bounded ``t``), :data:`FSQ_CLAMP`, :data:`FSQ_INWARD` (``saved`` ``u``; the
    clamp's gradient as :func:`.fsq.clamp_gradient` keeps it). ``grad`` float32 ``(N, dim)``
    with contiguous rows, or one row broadcast to all (row stride 0, as the gradient of a sum
    arrives: read where it is, not copied ``N`` times). ``in_place``: ``grad_x`` is written
    over ``grad`` (each row is read before it is written), no new ``(N, dim)`` buffer."""
    num_rows, dim = x.shape
    if grad.dtype != torch.float32 or grad.shape != x.shape or grad.stride(-1) != 1 \
            or grad.stride(0) not in (0, dim) or (in_place and grad.stride(0) == 0):
        raise ValueError(f"expected a float32 gradient {tuple(x.shape)} with contiguous or "
                         f"broadcast rows, got {grad.dtype} {tuple(grad.shape)} strides "
                         f"{grad.stride()}")
    channels = saved.shape[1]
    if channels > FSQ_MAX_CHANNELS:
        raise ValueError(f"the FSQ kernels take at most {FSQ_MAX_CHANNELS} channels, "
                         f"got {channels}")
    grad_x = grad if in_place else torch.empty_like(x)
    cd = channels * dim
    sums = x.new_zeros(2 * cd + channels + dim)  # w_in, w_out, b_in, b_out
    if num_rows and _checked_library().vq_fsq_backward(
            grad.data_ptr(), x.data_ptr(), saved.data_ptr(), code.data_ptr(), w_in.data_ptr(),
            w_out.data_ptr(), slope.contiguous().data_ptr(), bound, num_rows, channels, dim,
            grad.stride(0), grad_x.data_ptr(), sums.data_ptr(), sums[2 * cd].data_ptr(),
            sums[cd].data_ptr(), sums[2 * cd + channels].data_ptr()):
        raise MemoryError("vq_fsq_backward could not allocate its sums")
    grad_w_in = sums[:cd].view(channels, dim)
    grad_w_out = sums[cd:2 * cd].view(dim, channels)
    grad_b_in = sums[2 * cd:2 * cd + channels] if in_bias else None
    grad_b_out = sums[2 * cd + channels:] if out_bias else None
    return grad_x, grad_w_in, grad_b_in, grad_w_out, grad_b_out
