"""The C kernels on several threads (an OpenMP build sharing torch's runtime): the build is
made that way where it can be, each kernel gives on two threads what it gives on one (row by
row exactly; sums over rows up to their rounding), and the int8 re-check's candidate limit
counts the candidates of every thread."""

from __future__ import annotations

import os
import platform

import pytest
import torch

from vqvae.quantizers import cpu_kernel, int8_presearch

pytestmark = pytest.mark.skipif(not cpu_kernel.available(),
                                reason=f"no C kernels: {cpu_kernel.unavailable_reason()}")


@pytest.fixture
def threads():
    """Run a callable on one torch thread, then on two; give back both results."""
    before = torch.get_num_threads()

    def both(fn):
        results = []
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append(fn())
        return results

    yield both
    torch.set_num_threads(before)


def openmp_runtimes() -> set[str]:
    with open("/proc/self/maps") as maps:
        return {line.split()[-1] for line in maps if "gomp" in line or "omp.so" in line}


@pytest.mark.skipif(platform.system() != "Linux"
                    or "parallel backend: OpenMP" not in torch.__config__.parallel_info(),
                    reason="torch without OpenMP threads, or not Linux")
def test_the_build_runs_on_torchs_own_openmp_threads():
    if os.environ.get(cpu_kernel.THREADS_SWITCH) == "0":
        pytest.skip("kernel threads turned off")
    before = openmp_runtimes()
    assert "-fopenmp" in cpu_kernel.build_flags() and cpu_kernel.parallel()
    cpu_kernel.nearest_code(torch.randn(4096, 16), torch.randn(512, 16))
    assert openmp_runtimes() == before and len(before) == 1  # torch's, not a second one


def test_threads_switch_builds_for_one_thread(monkeypatch):
    monkeypatch.setenv(cpu_kernel.THREADS_SWITCH, "0")
    cpu_kernel._shares_openmp.cache_clear()
    try:
        assert "-fopenmp" not in cpu_kernel.build_flags()
    finally:
        monkeypatch.undo()
        cpu_kernel._shares_openmp.cache_clear()


def test_a_compiler_without_openmp_builds_for_one_thread(tmp_path, monkeypatch):
    if "-fopenmp" not in cpu_kernel.build_flags():
        pytest.skip("this build has no OpenMP to refuse")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    compile_for_real = cpu_kernel._compile

    def no_openmp(compiler, directory):
        if "-fopenmp" in cpu_kernel.build_flags():
            raise RuntimeError("cc failed: unsupported option '-fopenmp'")
        return compile_for_real(compiler, directory)

    monkeypatch.setattr(cpu_kernel, "_compile", no_openmp)
    try:
        library = cpu_kernel._open_or_without_openmp(cpu_kernel._compiler())
        assert library.vq_parallel() == 0 and "-fopenmp" not in cpu_kernel.build_flags()
        assert "unsupported option" in cpu_kernel._openmp_refused
    finally:
        monkeypatch.setattr(cpu_kernel, "_openmp_refused", None)


def test_nearest_code_and_rounding_give_the_one_thread_answer(threads):
    g = torch.Generator().manual_seed(0)
    x, codebook = torch.randn(4099, 16, generator=g), torch.randn(515, 16, generator=g)
    one, two = threads(lambda: cpu_kernel.nearest_code(x, codebook))
    assert torch.equal(one, two)
    v = torch.randn(2001, 66, generator=g) * torch.logspace(-3, 3, 2001)[:, None]
    for per_row in (True, False):
        one, two = threads(lambda per_row=per_row: cpu_kernel.quantize_rows(
            v, 127, True, per_row, int8_presearch.PEAK_FLOOR))
        for a, b in zip(one, two, strict=True):
            assert torch.equal(a, b)


def recheck_inputs(rows: int, codes: int, dim: int):
    g = torch.Generator().manual_seed(rows)
    x, codebook = torch.randn(rows, dim, generator=g), torch.randn(codes, dim, generator=g)
    qx, sx, _ = int8_presearch.quantize_rows(x)
    qc, sc, _ = int8_presearch.quantize_rows(codebook, per_row=False)
    return (qx.int() @ qc.int().t(), sx * sc[0], codebook.pow(2).sum(1), x, codebook)


def test_int8_recheck_gives_the_one_thread_answer_and_counts_every_threads_candidates(
        threads):
    args = recheck_inputs(1500, 300, 48)
    slack = torch.rand(1500, generator=torch.Generator().manual_seed(1)) * 3.0
    one, two = threads(lambda: cpu_kernel.int8_recheck(*args, slack, 10**9))
    assert torch.equal(one, two)
    # zero products and an infinite slack: every code of every row is a candidate
    products = torch.zeros_like(args[0])
    every = (products, torch.ones(1500), *args[2:], torch.full((1500,), float("inf")))
    total = products.numel()
    assert threads(lambda: cpu_kernel.int8_recheck(*every, total - 1)) == [None, None]
    found = threads(lambda: cpu_kernel.int8_recheck(*every, total))
    assert found[0] is not None and torch.equal(found[0], found[1])


def test_simvq_estimator_gives_the_one_thread_answer(threads):
    g = torch.Generator().manual_seed(2)
    x, q, grad = (torch.randn(3000, 40, generator=g) for _ in range(3))
    for rotation in (False, True):
        one, two = threads(lambda rotation=rotation: cpu_kernel.estimator_forward(
            x, q, rotation, 1e-6))
        assert one[0] == pytest.approx(two[0], rel=1e-12)  # per-thread double sums
        for a, b in zip(one[1:], two[1:], strict=True):
            assert (a is None and b is None) or torch.equal(a, b)
        norms = one[1:] if rotation else None
        one, two = threads(lambda norms=norms: cpu_kernel.estimator_backward(
            grad, x, q, norms, 0.25, 1.0, 1e-6, True))
        assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
