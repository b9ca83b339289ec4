"""The C nearest-code search (CPU, float32, short vectors): codes, ties, fallback, build cache."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from vqvae import VectorQuantize
from vqvae.quantizers import cpu_kernel
from vqvae.quantizers.search import nearest_code, search_settings

requires_kernel = pytest.mark.skipif(
    not cpu_kernel.available(), reason=f"C search not built: {cpu_kernel.unavailable_reason()}")


@requires_kernel
@pytest.mark.parametrize("num_rows,dim,num_codes", [
    (1, 1, 1), (3, 2, 5), (37, 16, 512), (1001, 16, 1000), (2049, 8, 300), (64, 3, 32),
    (500, 32, 700), (9, 31, 40),
])
def test_codes_match_float64_cdist(num_rows, dim, num_codes):
    torch.manual_seed(num_rows + dim)
    x = torch.randn(num_rows, dim)
    codebook = torch.randn(num_codes, dim)
    expected = torch.cdist(x.double(), codebook.double()).argmin(-1)
    got = cpu_kernel.nearest_code(x, codebook)
    assert got.dtype == torch.long and got.shape == (num_rows,)
    assert torch.equal(got, expected)
    assert torch.equal(nearest_code(x, codebook, backend="c"), expected)


def _expected_lanes() -> int | None:
    """The register width in floats that -march=native gives this CPU, read from its flags."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith(("flags", "Features"))).split()
    except (OSError, StopIteration):
        return None
    # torch's capability (lowered by ATEN_CPU_CAPABILITY) caps the kernels' instruction set
    cap = {"AVX2": 8, "DEFAULT": 4}.get(torch.backends.cpu.get_cpu_capability(), 16)
    for flag, lanes in [("avx512f", 16), ("avx", 8), ("sse2", 4), ("asimd", 4)]:
        if flag in flags:
            return min(lanes, cap) if os.uname().machine == "x86_64" else lanes
    return None


@requires_kernel
def test_kernels_use_the_cpus_widest_vectors():
    # built with -march=native: the widest registers the CPU has (emulated wider ones are 45x
    # slower, and narrower ones leave half the machine unused)
    expected = _expected_lanes()
    if expected is None:
        pytest.skip("no /proc/cpuinfo flags to compare with")
    assert cpu_kernel.simd_lanes() == expected


@requires_kernel
@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86-64 instruction sets")
def test_aten_cpu_capability_avx2_holds_the_kernels_to_avx2(tmp_path):
    # an AVX-512 machine stands in for an AVX2-only one when torch is told so: our kernels
    # must follow, or a benchmark under ATEN_CPU_CAPABILITY=avx2 would time AVX-512 code
    if (_expected_lanes() or 0) < 8:
        pytest.skip("this CPU has no AVX2")
    script = textwrap.dedent("""
        import torch
        from vqvae.quantizers import cpu_kernel
        print(torch.backends.cpu.get_cpu_capability(), cpu_kernel.simd_lanes(),
              "-mno-avx512f" in cpu_kernel.build_flags())
    """)
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2", XDG_CACHE_HOME=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["AVX2", "8", "True"]


@requires_kernel
@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86-64 macro names")
def test_a_build_without_simd_is_refused(tmp_path, monkeypatch):
    # with the instruction-set macros undefined the C file falls back to emulated vectors; such
    # a build must not be used
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    undefine = ["-U__AVX512F__", "-U__AVX__", "-U__SSE2__"]
    monkeypatch.setattr(cpu_kernel, "FLAGS", [*cpu_kernel.FLAGS, *undefine])
    compiler = cpu_kernel._compiler()
    with pytest.raises(cpu_kernel.NoSimdError, match="no SIMD instruction set"):
        cpu_kernel._open(compiler)


@requires_kernel
def test_first_index_among_equal_distances():
    # integer-valued data: many exact ties; torch's argmin on the exact distances takes the
    # first index, and so must the kernel (across SIMD lanes and code groups)
    torch.manual_seed(0)
    x = torch.randint(-2, 3, (500, 4)).float()
    codebook = torch.randint(-2, 3, (200, 4)).float()
    exact = ((x[:, None, :] - codebook[None]) ** 2).sum(-1)  # small integers: exact in float32
    assert torch.equal(cpu_kernel.nearest_code(x, codebook), exact.argmin(-1))
    duplicated = torch.cat([codebook, codebook])  # every code twice: the first copy wins
    assert int(cpu_kernel.nearest_code(x, duplicated).max()) < 200


@requires_kernel
def test_non_contiguous_and_degenerate_inputs():
    torch.manual_seed(0)
    codebook = torch.randn(100, 16)
    x = torch.randn(16, 50).t()  # (50, 16), not contiguous
    expected = torch.cdist(x.double(), codebook.double()).argmin(-1)
    assert torch.equal(cpu_kernel.nearest_code(x, codebook), expected)
    assert cpu_kernel.nearest_code(torch.empty(0, 16), codebook).shape == (0,)
    bad = x.clone()
    bad[0] = float("nan")  # the quantizer refuses such input afterwards; the index stays in range
    assert 0 <= int(cpu_kernel.nearest_code(bad, codebook)[0]) < 100


@requires_kernel
def test_backend_c_refuses_what_it_cannot_take():
    with pytest.raises(ValueError, match="float32 CPU vectors of at most 32"):
        nearest_code(torch.randn(4, 64), torch.randn(8, 64), backend="c")
    with pytest.raises(ValueError, match="float32 CPU vectors"):
        nearest_code(torch.randn(4, 8, dtype=torch.float64), torch.randn(8, 8,
                     dtype=torch.float64), backend="c")


@requires_kernel
def test_quantizer_gives_the_same_codes_with_either_search():
    torch.manual_seed(0)
    vq = VectorQuantize(dim=16, codebook_size=512).eval()
    x = torch.randn(64, 16, 16)
    _, with_c, _ = vq(x)
    with search_settings(backend="torch"):
        _, with_torch, _ = vq(x)
    # both are the float32 argmin; on random data they can only differ at near-ties
    assert (with_c == with_torch).float().mean() > 0.999


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **env})


@pytest.mark.slow
def test_without_a_compiler_the_search_falls_back_to_addmm(tmp_path):
    result = _python("""
        import torch
        from vqvae.quantizers import cpu_kernel
        from vqvae.quantizers.search import nearest_code, search_settings
        assert not cpu_kernel.available()
        print(cpu_kernel.unavailable_reason())
        x, c = torch.randn(100, 16), torch.randn(50, 16)
        assert torch.equal(nearest_code(x, c), torch.cdist(x, c).argmin(-1))
        try:
            nearest_code(x, c, backend="c")
        except RuntimeError as error:
            print("refused:", error)
    """, CC=str(tmp_path / "no-such-cc"), XDG_CACHE_HOME=str(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr
    assert "no-such-cc" in result.stdout and "refused: backend='c'" in result.stdout
    off = _python("""
        from vqvae.quantizers import cpu_kernel
        print(cpu_kernel.available(), cpu_kernel.unavailable_reason())
    """, VQVAE_CPU_KERNEL="0")
    assert off.stdout.strip() == "False turned off by VQVAE_CPU_KERNEL=0"


@requires_kernel
def test_build_is_cached_and_keyed_by_source(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    compiler = cpu_kernel._compiler()
    cpu_kernel._open(compiler)
    directory = tmp_path / "vqvae" / "kernels"
    library, digest = cpu_kernel._cache_paths(directory, cpu_kernel._build_key(compiler))
    # the library and its digest, no temporary left
    assert sorted(p.name for p in directory.iterdir()) == sorted([library.name, digest.name])

    def no_compiling(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(cpu_kernel.subprocess, "run", no_compiling)
    cpu_kernel._open(compiler)  # found in the cache
    changed = tmp_path / "cpu_search.c"
    changed.write_text(cpu_kernel.SOURCE.read_text() + "\n/* changed */\n")
    monkeypatch.setattr(cpu_kernel, "SOURCE", changed)
    with pytest.raises(AssertionError, match="compiled again"):
        cpu_kernel._open(compiler)  # another source: another name, so a build


@requires_kernel
@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86-64 instruction sets")
@pytest.mark.parametrize("target,lanes", [(["-march=native", "-mno-avx512f"], 8),
                                          (["-march=x86-64"], 4)])
def test_narrower_simd_builds_give_the_same_codes(target, lanes, tmp_path, monkeypatch):
    # the machines users have may lack AVX-512: the AVX2 and SSE2 builds must agree too
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    flags = [f for f in cpu_kernel.FLAGS if not f.startswith("-march")] + target
    monkeypatch.setattr(cpu_kernel, "FLAGS", flags)
    library = cpu_kernel._open(cpu_kernel._compiler())
    if library.vq_simd_lanes() != lanes:
        pytest.skip(f"this CPU or compiler gives {library.vq_simd_lanes()} lanes for {target}")
    torch.manual_seed(0)
    x, codebook = torch.randn(1003, 16), torch.randn(500, 16)
    out = torch.empty(1003, dtype=torch.long)
    assert library.vq_nearest_code(x.data_ptr(), codebook.data_ptr(), 1003, 16, 500,
                                   out.data_ptr()) == 0
    assert torch.equal(out, torch.cdist(x.double(), codebook.double()).argmin(-1))
