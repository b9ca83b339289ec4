"""The C kernels' build cache: private directories, ownership checks, digests, rebuilds.

Loading a shared library runs its code (its constructors first), so a library that someone else
could have placed or changed must never be loaded. Each test points ``$XDG_CACHE_HOME`` at a
fresh directory and clears the loaded library, so the public functions build or load anew.
"""

import hashlib
import os
import stat
import subprocess
import warnings

import pytest
import torch

from vqvae.quantizers import cpu_kernel

COMPILER = cpu_kernel._compiler()
needs_compiler = pytest.mark.skipif(
    COMPILER is None or subprocess.run([COMPILER, "--version"], capture_output=True).returncode,
    reason="no C compiler")
pytestmark = needs_compiler


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """The kernel directory under a fresh ``$XDG_CACHE_HOME``; the library is reloaded."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(cpu_kernel.ENV_SWITCH, raising=False)
    cpu_kernel._library.cache_clear()
    yield tmp_path / "cache" / "vqvae" / "kernels"
    cpu_kernel._library.cache_clear()


def _works() -> bool:
    """The loaded library is the real kernel: it finds the nearest codes."""
    torch.manual_seed(0)
    x, codebook = torch.randn(300, 16), torch.randn(70, 16)
    return torch.equal(cpu_kernel.nearest_code(x, codebook),
                       torch.cdist(x.double(), codebook.double()).argmin(-1))


def _planted(tmp_path, body: str) -> bytes:
    """A shared library compiled from ``body``."""
    source, library = tmp_path / "planted.c", tmp_path / "planted.so"
    source.write_text(body)
    subprocess.run([COMPILER, "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    return library.read_bytes()


def _marker_library(tmp_path) -> tuple[bytes, object]:
    """A library whose constructor, run by dlopen, writes a marker file; and that file."""
    marker = tmp_path / "constructor-ran"
    image = _planted(tmp_path, f"""
        #include <stdio.h>
        __attribute__((constructor)) static void planted(void) {{
            FILE *f = fopen("{marker}", "w");
            if (f) fclose(f);
        }}
        int vq_simd_lanes(void) {{ return 8; }}
    """)
    return image, marker


def _paths(directory):
    key = cpu_kernel._build_key(COMPILER)
    return (*cpu_kernel._cache_paths(directory, key), key)


def _plant(directory, image: bytes, *, with_digest: bool) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    library_path, digest_path, key = _paths(directory)
    library_path.write_bytes(image)
    if with_digest:  # a digest that matches: only the ownership checks can stop this one
        digest_path.write_text(f"sha256 {hashlib.sha256(image).hexdigest()}\nkey {key}\n")


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_planted_library_without_digest_is_not_loaded(cache, tmp_path):
    # the file name is predictable; a library put there must not run, and the real kernel is
    # built over it
    image, marker = _marker_library(tmp_path)
    _plant(cache, image, with_digest=False)
    os.chmod(cache, 0o700)
    assert cpu_kernel.available(), cpu_kernel.unavailable_reason()
    assert not marker.exists()
    assert _works()
    library_path, digest_path, key = _paths(cache)
    assert library_path.read_bytes() != image
    built = hashlib.sha256(library_path.read_bytes()).hexdigest()
    assert digest_path.read_text() == f"sha256 {built}\nkey {key}\n"


def test_directories_are_private_under_umask_000(cache):
    previous = os.umask(0)
    try:
        assert cpu_kernel.available(), cpu_kernel.unavailable_reason()
    finally:
        os.umask(previous)
    assert _mode(cache) == 0o700 and _mode(cache.parent) == 0o700
    assert _mode(cache.parent.parent) == 0o700  # $XDG_CACHE_HOME itself was missing too
    for path in cache.iterdir():
        assert _mode(path) & 0o077 == 0, path  # 0600: no build or load leftovers either
    assert sorted(p.suffix for p in cache.iterdir()) == [".sha256", ".so"]


@pytest.mark.parametrize("which", ["kernels", "vqvae"])
def test_group_writable_directory_is_refused(cache, tmp_path, which):
    image, marker = _marker_library(tmp_path)
    _plant(cache, image, with_digest=True)
    os.chmod(cache if which == "kernels" else cache.parent, 0o770)
    with pytest.warns(RuntimeWarning, match="writable by group or others") as caught:
        assert cpu_kernel.available(), cpu_kernel.unavailable_reason()
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    assert not marker.exists()
    assert _works()  # built in a private temporary directory instead
    assert _paths(cache)[0].read_bytes() == image  # a cache it does not trust, it leaves alone


def _foreign_fstat(monkeypatch, victim):
    """Make ``os.fstat`` report ``victim`` as another user's file."""
    real_fstat, inode = os.fstat, os.stat(victim).st_ino

    def fstat(fd):
        status = real_fstat(fd)
        if status.st_ino != inode:
            return status
        fields = list(status[:10])
        fields[4] = os.geteuid() + 1  # st_uid
        return os.stat_result(fields)

    monkeypatch.setattr(cpu_kernel.os, "fstat", fstat)


@pytest.mark.parametrize("how", ["chown", "simulated"])
def test_file_owned_by_someone_else_is_refused(cache, tmp_path, monkeypatch, how):
    image, marker = _marker_library(tmp_path)
    _plant(cache, image, with_digest=True)
    os.chmod(cache, 0o700)
    library_path = _paths(cache)[0]
    if how == "chown":
        if os.geteuid() != 0:
            pytest.skip("only root can give a file away")
        os.chown(library_path, 4242, -1)
    else:
        _foreign_fstat(monkeypatch, library_path)
    with pytest.warns(RuntimeWarning, match="belongs to uid"):
        assert cpu_kernel.available(), cpu_kernel.unavailable_reason()
    assert not marker.exists()
    assert _works()


def test_directory_owned_by_someone_else_is_refused(cache, monkeypatch):
    cache.mkdir(parents=True, mode=0o700)
    real_stat, inode = os.stat, os.stat(cache).st_ino

    def stat_(path, *args, **kwargs):
        status = real_stat(path, *args, **kwargs)
        if status.st_ino != inode:
            return status
        fields = list(status[:10])
        fields[4] = os.geteuid() + 1
        return os.stat_result(fields)

    monkeypatch.setattr(cpu_kernel.os, "stat", stat_)
    with pytest.warns(RuntimeWarning, match="belongs to uid"):
        assert cpu_kernel.available(), cpu_kernel.unavailable_reason()
    assert list(cache.iterdir()) == []  # nothing written into it


def test_symlinked_library_is_refused(cache, tmp_path):
    image, marker = _marker_library(tmp_path)
    elsewhere = tmp_path / "elsewhere.so"
    elsewhere.write_bytes(image)
    _plant(cache, image, with_digest=True)
    os.chmod(cache, 0o700)
    library_path = _paths(cache)[0]
    library_path.unlink()
    library_path.symlink_to(elsewhere)
    with pytest.warns(RuntimeWarning, match="plain file"):
        assert cpu_kernel.available(), cpu_kernel.unavailable_reason()
    assert not marker.exists()


@pytest.mark.parametrize("with_digest", [False, True])
def test_garbage_in_the_cache_is_rebuilt(cache, with_digest):
    _plant(cache, b"not a shared library\n" * 50, with_digest=with_digest)
    os.chmod(cache, 0o700)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a corrupt build is repaired quietly
        assert cpu_kernel.available(), cpu_kernel.unavailable_reason()
    assert _works()
    library_path, digest_path, _ = _paths(cache)
    assert library_path.read_bytes()[:4] == b"\x7fELF" or os.uname().sysname != "Linux"
    assert hashlib.sha256(library_path.read_bytes()).hexdigest() in digest_path.read_text()


def test_library_without_the_symbols_is_rebuilt(cache, tmp_path):
    # it loads, it even matches its digest, but it is not the kernel: build the kernel again
    # rather than fail with AttributeError on every call or fall back to torch for good
    stranger = _planted(tmp_path, "int unrelated(void) { return 1; }\n")
    _plant(cache, stranger, with_digest=True)
    os.chmod(cache, 0o700)
    assert cpu_kernel.available(), cpu_kernel.unavailable_reason()
    assert _works()
    assert _paths(cache)[0].read_bytes() != stranger


def _count_compiles(monkeypatch) -> list:
    calls = []
    real = cpu_kernel._compile

    def counting(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(cpu_kernel, "_compile", counting)
    return calls


def test_digest_for_another_key_is_rebuilt(cache, monkeypatch):
    assert cpu_kernel.available()
    library_path, digest_path, key = _paths(cache)
    digest_path.write_text(digest_path.read_text().replace(key, "0" * 64))
    cpu_kernel._library.cache_clear()
    compiles = _count_compiles(monkeypatch)
    assert cpu_kernel.available()
    assert len(compiles) == 1 and f"key {key}\n" in digest_path.read_text()


def test_verified_build_is_reused(cache, monkeypatch):
    assert cpu_kernel.available()
    cpu_kernel._library.cache_clear()
    compiles = _count_compiles(monkeypatch)
    assert cpu_kernel.available(), cpu_kernel.unavailable_reason()
    assert compiles == [] and _works()


def test_unwritable_cache_builds_privately(cache, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(cache))

    monkeypatch.setattr(cpu_kernel, "_make_private_dirs", refuse)
    with pytest.warns(RuntimeWarning, match="Permission denied"):
        assert cpu_kernel.available(), cpu_kernel.unavailable_reason()
    assert _works()


@pytest.mark.parametrize("mode,trusted", [(0o1777, True), (0o777, False)])
def test_world_writable_parent_is_trusted_only_when_sticky(tmp_path, monkeypatch, mode,
                                                           trusted):
    # like /tmp: others may add entries to a sticky directory, but not rename or remove ours
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, mode)
    monkeypatch.setenv("XDG_CACHE_HOME", str(shared / "cache"))
    cpu_kernel._library.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert cpu_kernel.available(), cpu_kernel.unavailable_reason()
    finally:
        cpu_kernel._library.cache_clear()
    messages = [str(w.message) for w in caught if w.category is RuntimeWarning]
    if trusted:
        assert messages == [] and _mode(shared / "cache") == 0o700
    else:
        assert len(messages) == 1 and "and not sticky" in messages[0]
        assert not (shared / "cache").exists()  # nothing made where others can swap it
