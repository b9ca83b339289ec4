"""The fused Triton nearest-code search, checked on CPU through Triton's interpreter.

Triton chooses between compiler and interpreter when it is imported (its own ``tl.max`` and
friends are decorated then), so this module sets ``TRITON_INTERPRET=1`` when pytest imports it,
before anything has imported Triton. Nothing else in the test suite imports Triton in-process
(``test_triton_compile.py`` compiles in a subprocess without the variable), and on CPU tensors
nothing but an explicit ``backend="triton"`` reaches the kernels, so other tests are unaffected.

Every answer is compared with a float64 ``torch.cdist`` argmin. Shapes are small on purpose:
the interpreter runs each tile through numpy. Tests of the dispatch that need no kernel run
without Triton too.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vqvae import VectorQuantize
from vqvae.quantizers import search

HAS_TRITON = importlib.util.find_spec("triton") is not None
MODULE = "vqvae.quantizers.triton_search"
PRECISIONS = ("fp32", "tf32", "bf16")

if "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="module")
def ts():
    """:mod:`triton_search` with its kernels defined for the interpreter."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed (pip install triton; the dev extra has it on Linux)")
    module = importlib.import_module(MODULE)
    if not module.INTERPRETED:
        pytest.skip("Triton was imported before TRITON_INTERPRET=1 could be set: run this file "
                    "in a process of its own, or with TRITON_INTERPRET=1 in the environment")
    return module


def reference(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    # the direct Σ (x - c)², not the ||x||² + ||c||² - 2 x·c expansion cdist uses above 25 rows,
    # which turns exact duplicates and far-from-origin data into rounding noise
    distances = torch.cdist(x.double(), codebook.double(),
                            compute_mode="donot_use_mm_for_euclid_dist")
    return distances.argmin(-1)


def random_problem(n: int, dim: int, k: int, seed: int = 0, shift: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, dim, generator=g) + shift, torch.randn(k, dim, generator=g) + shift)


# ---------------------------------------------------------------------------- answers


CHUNKED = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_D": 16, "RESIDENT": False}
RESIDENT = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_D": 64, "RESIDENT": True}


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("n, dim, k, config", [
    (50, 20, 45, CHUNKED),  # rows, codes and D all leave partial tiles; D in two chunks
    (37, 3, 17, RESIDENT),  # D below the smallest dot tile, fewer codes than one tile
    (40, 40, 70, None),  # the default interpreter tiles
])
def test_matches_float64_argmin(ts, precision, n, dim, k, config):
    x, codebook = random_problem(n, dim, k, seed=n)
    codes = ts.nearest_code(x, codebook, precision=precision, min_approx_macs=0, config=config)
    assert codes.dtype == torch.long and codes.shape == (n,)
    assert torch.equal(codes, reference(x, codebook))


def test_fewer_codes_than_slots(ts):
    # bf16 keeps 8 candidates; with 5 codes the unused slots must never be returned
    x, codebook = random_problem(30, 16, 5, seed=1)
    codes = ts.nearest_code(x, codebook, precision="bf16", min_approx_macs=0)
    assert torch.equal(codes, reference(x, codebook))


def test_low_precision_inputs_are_searched_in_float32(ts):
    x, codebook = random_problem(40, 16, 30, seed=2)
    x16, codebook16 = x.to(torch.bfloat16), codebook.half()
    codes = ts.nearest_code(x16, codebook16, precision="tf32", min_approx_macs=0)
    assert torch.equal(codes, reference(x16, codebook16))


def test_data_far_from_the_origin_is_centred(ts):
    # ‖x‖·‖c‖ ~ 6400 here while neighbouring codes differ by ~1 in distance: without centring on
    # the codebook mean the bound would cover every code and send every row to the fallback.
    x, codebook = random_problem(40, 16, 40, seed=3, shift=20.0)
    stats = {}
    codes = ts.nearest_code(x, codebook, precision="tf32", min_approx_macs=0, stats=stats)
    assert torch.equal(codes, reference(x, codebook))
    assert stats["tf32_rows"] == 40 and stats["tf32_fallback"] == 0


@pytest.mark.parametrize("precision", PRECISIONS)
def test_float32_is_exact_far_from_the_origin(ts, precision):
    # codes 1e-3 apart around a point 60 from the origin: ||c||² ≈ 3600 and 2 x·c cancel to
    # distances of ~4e-5, below float32's resolution at 3600 (2e-4) unless centred first
    g = torch.Generator().manual_seed(17)
    base = 10 * torch.randn(40, generator=g)
    codebook = base + 1e-3 * torch.randn(24, 40, generator=g)
    x = base + 1e-3 * torch.randn(40, 40, generator=g)
    expected = reference(x, codebook)
    uncentred = (codebook.pow(2).sum(1) - 2 * x @ codebook.t()).argmin(1)
    assert (uncentred != expected).sum() >= 10  # the data defeats uncentred float32
    codes = ts.nearest_code(x, codebook, precision=precision, min_approx_macs=0)
    assert torch.equal(codes, expected)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_ties_go_to_the_lowest_index(ts, precision):
    g = torch.Generator().manual_seed(4)
    # small integers: every distance below is exact in float32, so the ties are true ties
    codebook = torch.randint(-20, 20, (40, 8), generator=g).float()
    codebook[[21, 38]] = codebook[5].clone()  # duplicates in three code tiles of 16
    codebook[10] = codebook[9].clone()  # duplicates within one tile
    v = torch.randint(-20, 20, (8,), generator=g).float()
    e = torch.tensor([1.0, -2, 0, 1, 0, 0, 3, 1])
    codebook[30], codebook[7] = v - e, v + e  # x = v is equally far from both
    codebook[12], codebook[33] = v + 50 - e, v + 50 + e
    x = torch.stack([codebook[38], codebook[21], codebook[10], v, v + 50])
    expected = torch.tensor([5, 5, 9, 7, 12])
    codes = ts.nearest_code(x, codebook, precision=precision, min_approx_macs=0,
                            config=CHUNKED)
    assert torch.equal(codes, expected)
    assert torch.equal(search.nearest_code(x, codebook, backend="torch"), expected)


# ---------------------------------------------------------------------------- re-check


def near_tie_problem(seed: int = 5):
    """Codes in pairs 0.05 apart: the pair's distances to x differ by ~1e-2, far below the
    bf16 error bound (~0.5 here) and far above float32 rounding (~1e-4)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(16, 32, generator=g)
    codebook = torch.cat([base, base + 0.05 * torch.randn(16, 32, generator=g)])  # (32, 32)
    x = base[torch.arange(48) % 16] + 0.3 * torch.randn(48, 32, generator=g)
    return x, codebook


def test_bf16_close_calls_are_rechecked_in_float32(ts):
    x, codebook = near_tie_problem()
    expected = reference(x, codebook)
    found = ts.candidates(x, codebook, "bf16")
    raw = found.indices.gather(1, found.values.argmin(1, keepdim=True)).squeeze(1).long()
    wrong_before = int((raw != expected).sum())
    assert wrong_before >= 5  # bf16 alone gets these wrong, so the re-check has work to do

    stats = {}
    codes = ts.nearest_code(x, codebook, precision="bf16", min_approx_macs=0, stats=stats)
    assert torch.equal(codes, expected)
    assert stats["bf16_rechecked"] + stats["bf16_fallback"] >= wrong_before


def test_rows_with_more_close_calls_than_slots_fall_back(ts):
    g = torch.Generator().manual_seed(6)
    v = 3 * torch.randn(16, generator=g)
    # 12 codes within 1e-3 of v (more than bf16's 8 and tf32's 4 slots) among 28 others
    codebook = torch.cat([v + 1e-3 * torch.randn(12, 16, generator=g),
                          3 * torch.randn(28, 16, generator=g)])
    x = torch.cat([v + 0.1 * torch.randn(6, 16, generator=g), torch.randn(10, 16, generator=g)])
    stats = {}
    codes = ts.nearest_code(x, codebook, precision="bf16", min_approx_macs=0, stats=stats)
    assert torch.equal(codes, reference(x, codebook))
    assert stats["bf16_fallback"] >= 6  # the six rows near v: bf16 → tf32 → fp32
    assert stats["tf32_fallback"] >= 6 and stats["fp32_rows"] >= 6
    assert stats["bf16_rows"] == 16


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_error_bound_holds_and_is_not_vacuous(ts, precision):
    x, codebook = random_problem(64, 24, 48, seed=7, shift=1.0)
    found = ts.candidates(x, codebook, precision)
    center = codebook.double().mean(0)
    xc, cc = x.double() - center, codebook.double() - center
    exact = cc.pow(2).sum(1) - 2 * xc @ cc.t()  # (N, K) centred scores in float64
    idx = found.indices.long()
    alpha, beta, tau = ts.error_bound(precision, x.shape[1])
    a, b = xc.norm(dim=1, keepdim=True), cc.norm(dim=1)[idx]
    bound = alpha * a * b + beta * b * b + tau * (1 + a) * (1 + b)
    ratio = (found.values.double() - exact.gather(1, idx)).abs() / bound
    assert ratio.max() <= 1.0
    assert ratio.max() >= 0.01  # a bound 100× looser than any error seen would be a bug
    # the nearest code is always among those kept
    assert (idx == exact.argmin(1, keepdim=True)).any(1).all()


@pytest.mark.filterwarnings("ignore:overflow encountered")  # ‖3.4e38‖² in the interpreter
def test_inputs_are_rounded_to_nearest_even(ts):
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"),
                            1 + 2**-11, 1 + 3 * 2**-11, 1 + 2**-8, 1 + 3 * 2**-8,
                            3.4028235e38, -1e-40, 2.0**-130, 1 / 3])
    rows = torch.cat([special, torch.randn(19) * 10.0 ** torch.randint(-5, 5, (19,))])
    rows = rows.view(2, 16)
    zero = torch.zeros(16)

    def round_to(bits: int, t: torch.Tensor) -> torch.Tensor:
        """Independently, in float64: to ``bits`` significant bits, nearest even, with the
        format's subnormal spacing 2^(-126 - bits + 1) as the finest step."""
        t = t.double()
        _, exponent = torch.frexp(t)
        step = torch.exp2(torch.clamp(exponent - bits, min=-126 - bits + 1).double())
        return torch.where(torch.isfinite(t), torch.round(t / step) * step, t).float()

    tf32, sq = ts.prepare(rows, zero, "tf32")
    expected = round_to(11, rows)
    assert torch.equal(tf32.isnan(), rows.isnan())
    assert torch.equal(tf32[~rows.isnan()], expected[~rows.isnan()])
    assert tf32.dtype == torch.float32

    bf16, _ = ts.prepare(rows, zero, "bf16")
    assert bf16.dtype == torch.bfloat16
    assert torch.equal(bf16[~rows.isnan()], rows.to(torch.bfloat16)[~rows.isnan()])
    assert torch.equal(bf16.float()[~rows.isnan()], round_to(8, rows)[~rows.isnan()])

    x, codebook = random_problem(20, 40, 3, seed=8)
    _, sq = ts.prepare(x, codebook[0], "fp32")
    assert torch.allclose(sq.double(), (x.double() - codebook[0].double()).pow(2).sum(1),
                          rtol=1e-6)


class _LargestTensor(TorchDispatchMode):
    """Records the size in bytes of the largest tensor any torch op returns."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.bytes = max(self.bytes, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("precision", PRECISIONS)
def test_no_tensor_of_n_by_k_distances(ts, precision):
    n, k = 24, 200
    x, codebook = random_problem(n, 8, k, seed=9)
    with _LargestTensor() as largest:
        codes = ts.nearest_code(x, codebook, precision=precision, min_approx_macs=0)
    assert torch.equal(codes, reference(x, codebook))
    # nothing larger than the codebook itself (6400 bytes); (N, K) distances would be 19200
    assert largest.bytes <= codebook.numel() * 4
    with _LargestTensor() as chunked:  # the check does see the chunked path's distances
        search.nearest_code(x, codebook, backend="torch")
    assert chunked.bytes >= n * k * 4


# ---------------------------------------------------------------------------- dispatch


@pytest.fixture
def spy(ts, monkeypatch):
    calls = []
    original = ts.nearest_code

    def recording(x, codebook, **kwargs):
        calls.append(kwargs)
        return original(x, codebook, **kwargs)

    monkeypatch.setattr(ts, "nearest_code", recording)
    return calls


def test_backend_triton_runs_the_kernel_on_cpu(ts, spy):
    x, codebook = random_problem(30, 16, 20, seed=10)
    codes = search.nearest_code(x, codebook, backend="triton", precision="bf16")
    assert spy == [{"precision": "bf16"}]
    assert torch.equal(codes, reference(x, codebook))


def test_auto_backend_keeps_cpu_tensors_on_the_chunked_path(ts, spy):
    x, codebook = random_problem(30, 16, 20, seed=11)
    assert torch.equal(search.nearest_code(x, codebook), reference(x, codebook))
    assert spy == []


def test_environment_forces_backend_and_precision(ts, spy, monkeypatch):
    monkeypatch.setenv(search.BACKEND_ENV, "triton")
    monkeypatch.setenv(search.PRECISION_ENV, "fp32")
    x, codebook = random_problem(30, 16, 20, seed=12)
    assert torch.equal(search.nearest_code(x, codebook), reference(x, codebook))
    assert spy == [{"precision": "fp32"}]


def test_settings_precedence(ts, spy, monkeypatch):
    monkeypatch.setenv(search.PRECISION_ENV, "fp32")
    x, codebook = random_problem(10, 16, 20, seed=13)
    before = search.search_defaults()
    with search.search_settings(backend="triton", precision="bf16"):
        assert search.search_defaults() == {"precision": "bf16", "backend": "triton"}
        search.nearest_code(x, codebook)  # the settings beat the environment
        search.nearest_code(x, codebook, precision="tf32")  # the argument beats both
    assert search.search_defaults() == before == {"precision": "fp32", "backend": "auto"}
    assert spy == [{"precision": "bf16"}, {"precision": "tf32"}]
    try:
        search.set_search_defaults(precision="bf16")
        assert search.search_defaults()["precision"] == "bf16"
        search.reset_search_defaults()
        assert search.search_defaults()["precision"] == "fp32"  # the environment again
    finally:
        search.reset_search_defaults()


def test_vector_quantize_through_the_kernel_matches_the_chunked_path(ts, monkeypatch):
    monkeypatch.setattr(ts, "APPROX_MIN_MACS", 0)  # tiny problem, but take the bf16 path
    torch.manual_seed(14)
    x = torch.randn(2, 30, 16)
    layers = [VectorQuantize(16, 40, decay=0.8) for _ in range(2)]
    layers[1].load_state_dict(layers[0].state_dict())
    out_torch = layers[0](x)
    with search.search_settings(backend="triton", precision="bf16"):
        out_triton = layers[1](x)
    assert torch.equal(out_triton.indices, out_torch.indices)
    assert torch.equal(out_triton.quantized, out_torch.quantized)
    assert torch.equal(layers[1].codebook, layers[0].codebook)  # same EMA step


def test_bad_settings_and_inputs_raise_clear_errors(monkeypatch):
    x, codebook = random_problem(4, 8, 5)
    with pytest.raises(ValueError, match="precision must be one of"):
        search.nearest_code(x, codebook, precision="fp16")
    with pytest.raises(ValueError, match="backend must be one of"):
        search.set_search_defaults(backend="cuda")
    monkeypatch.setenv(search.PRECISION_ENV, "half")
    with pytest.raises(ValueError, match=search.PRECISION_ENV):
        search.nearest_code(x, codebook)
    monkeypatch.delenv(search.PRECISION_ENV)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        search.nearest_code(x, codebook[:, :4])
    with pytest.raises(ValueError, match="empty"):
        search.nearest_code(x, codebook[:0])


def test_kernel_rejects_what_it_cannot_search(ts):
    x, codebook = random_problem(4, 8, 5)
    with pytest.raises(ValueError, match="float64"):
        ts.nearest_code(x.double(), codebook)
    with pytest.raises(ValueError, match="precision"):
        ts.nearest_code(x, codebook, precision="int8")


def test_everything_works_without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    monkeypatch.delitem(sys.modules, MODULE, raising=False)
    search._triton_module.cache_clear()
    try:
        assert not search.triton_available()
        x, codebook = random_problem(30, 16, 20, seed=15)
        assert torch.equal(search.nearest_code(x, codebook), reference(x, codebook))
        with pytest.raises(RuntimeError, match="Triton is not installed"):
            search.nearest_code(x, codebook, backend="triton")
        quantized, indices, _ = VectorQuantize(16, 20)(x)
        assert indices.shape == (30,)
    finally:
        search._triton_module.cache_clear()


def test_auto_backend_survives_a_failing_kernel(monkeypatch):
    """In auto mode a kernel that fails (say, a GPU it cannot compile for) costs one warning,
    and the process continues on the chunked path; running out of memory is not such a case."""
    import types

    calls = []

    def failing(x, codebook, **kwargs):
        calls.append(kwargs)
        raise RuntimeError("PTX for an unknown GPU")

    monkeypatch.setattr(search, "_triton_module", lambda: types.SimpleNamespace(
        nearest_code=failing))
    monkeypatch.setattr(search, "_triton_broken", None)
    # pretend the CPU tensors are CUDA ones as far as the auto dispatch is concerned
    monkeypatch.setattr(search, "_use_triton", lambda x, codebook, backend:
                        backend != "torch" and search._triton_broken is None)
    x, codebook = random_problem(30, 16, 20, seed=16)
    with pytest.warns(RuntimeWarning, match="PTX for an unknown GPU"):
        codes = search.nearest_code(x, codebook)
    assert torch.equal(codes, reference(x, codebook))
    assert torch.equal(search.nearest_code(x, codebook), codes)  # no second try, no warning
    assert len(calls) == 1

    def out_of_memory(x, codebook, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(search, "_triton_module", lambda: types.SimpleNamespace(
        nearest_code=out_of_memory))
    monkeypatch.setattr(search, "_triton_broken", None)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        search.nearest_code(x, codebook)
    assert search._triton_broken is None
