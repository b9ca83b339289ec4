"""The int8 pre-search (vqvae.quantizers.int8_presearch): its indices against an independent
float64 brute-force nearest code, on random, adversarial, duplicated and badly scaled codes,
that it is the path actually taken where the dispatcher says, and SimVQ through it."""

from __future__ import annotations

import pytest
import torch

from vqvae import QuantizerInputError, SimVQ
from vqvae.quantizers import bf16_presearch, cpu_kernel, int8_presearch, presearch
from vqvae.quantizers.search import nearest_code

pytestmark = pytest.mark.skipif(not int8_presearch.levels() is not None,
                                reason="torch._int_mm does not run on CPU in this torch")


def float64_check(indices: torch.Tensor, x: torch.Tensor, codes: torch.Tensor) -> int:
    """Each index is nearest in float64 up to float32 rounding, and is the float64 argmin
    wherever the runner-up is further than that; returns how many rows were that clear."""
    x64, c64 = x.double(), codes.double()
    # (N, K) squared distances in float64, every pair (its rounding is some 1e-16 of the
    # terms, far below the float32 slack)
    d = x64.pow(2).sum(1, keepdim=True) - 2 * x64 @ c64.T + c64.pow(2).sum(1)
    # float32's ||c||² - 2 x·c errs by less than this (generous) slack
    slack = 4e-6 * (c64.pow(2).sum(-1).max() + 2 * x64.norm(dim=1) * c64.norm(dim=1).max())
    best, second = d.topk(2, dim=1, largest=False).values.unbind(1)
    chosen = d.gather(1, indices[:, None]).squeeze(1)
    assert bool((chosen - best <= slack).all())
    clear = second - best > slack
    assert torch.equal(indices[clear], d.argmin(1)[clear])
    return int(clear.sum())


class Spy:
    """Counts calls of a module function while forwarding them."""

    def __init__(self, monkeypatch, module, name):
        self.calls = 0
        original = getattr(module, name)

        def spy(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)


class Rechecks:
    """Counts the blocks whose candidates were re-checked (the tensor path's ``resolve``, or
    the C re-check when it did not give up)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        resolve, recheck = int8_presearch.resolve, cpu_kernel.int8_recheck

        def counted_resolve(*args, **kwargs):
            self.calls += 1
            return resolve(*args, **kwargs)

        def counted_recheck(*args, **kwargs):
            found = recheck(*args, **kwargs)
            self.calls += found is not None
            return found

        monkeypatch.setattr(int8_presearch, "resolve", counted_resolve)
        monkeypatch.setattr(cpu_kernel, "int8_recheck", counted_recheck)


@pytest.fixture(autouse=True, params=["c", "tensor"])
def second_stage(request, monkeypatch):
    """Every test here runs with the rounding and re-check in C and in tensor operations."""
    if request.param == "c" and not cpu_kernel.available():
        pytest.skip(f"no C kernels: {cpu_kernel.unavailable_reason()}")
    if request.param == "tensor":
        monkeypatch.setattr(int8_presearch, "_c_kernels", lambda: False)
    return request.param


def spies(monkeypatch):
    return (Rechecks(monkeypatch), Spy(monkeypatch, int8_presearch, "float32_search"))


@pytest.mark.parametrize("dim", [33, 64, 200, 512, 1024])
def test_random_codes_give_the_float64_nearest_code_without_falling_back(dim, monkeypatch):
    g = torch.Generator().manual_seed(dim)
    x = torch.randn(300, dim, generator=g)
    codes = torch.randn(448, dim, generator=g) * dim ** -0.5
    resolved, fell_back = spies(monkeypatch)
    got = int8_presearch.nearest_code_int8(x, codes)
    assert (resolved.calls, fell_back.calls) == (1, 0)  # the two stages answered
    assert float64_check(got, x, codes) > 290
    assert torch.equal(got, nearest_code(x, codes, backend="torch"))


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_near_ties_that_int8_alone_gets_wrong(scale, monkeypatch):
    g = torch.Generator().manual_seed(7)
    base = torch.randn(256, 64, generator=g)
    codes = torch.cat([base, base + 1e-2 * torch.randn(256, 64, generator=g)]) * scale
    pick = torch.randint(0, 256, (500,), generator=g)
    x = (codes[pick] + codes[pick + 256]) / 2 + 3e-2 * scale * torch.randn(500, 64, generator=g)
    qx, sx, _ = int8_presearch.quantize_rows(x)
    qc, sc, _ = int8_presearch.quantize_rows(codes)
    int8_alone = (codes.pow(2).sum(-1) - 2 * sx[:, None] * sc * (qx.float() @ qc.float().T))
    truth = torch.cdist(x.double(), codes.double()).argmin(1)
    assert int((int8_alone.argmin(1) != truth).sum()) > 50  # the re-check has work to do
    resolved, fell_back = spies(monkeypatch)
    got = int8_presearch.nearest_code_int8(x, codes)
    assert (resolved.calls, fell_back.calls) == (1, 0)
    assert float64_check(got, x, codes) > 250


def test_duplicate_codes_give_the_first_index_as_argmin_does():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(200, 96, generator=g)
    codes = torch.cat([base, base[:56]])  # codes 200..255 repeat codes 0..55
    codes = codes[torch.randperm(256, generator=g)]
    x = torch.randn(1200, 96, generator=g)
    x[:40] = codes[:40]  # exact hits
    got = int8_presearch.nearest_code_int8(x, codes)
    float64_check(got, x, codes)
    first = torch.tensor([int((codes == codes[i]).all(1).nonzero()[0]) for i in range(256)])
    assert torch.equal(got, first[got])  # never the later copy of a duplicate
    assert torch.equal(got, nearest_code(x, codes, backend="torch"))


def test_norms_over_many_decades():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(600, 80, generator=g) * torch.logspace(-3, 3, 600)[:, None]
    codes = torch.randn(512, 80, generator=g)
    codes[:128] *= 1e3
    codes[128:256] *= 1e-3
    codes[300] = 0.0
    x[5] = 0.0  # a zero row: nearest is the zero code
    x[6] = codes[400]
    got = int8_presearch.nearest_code_int8(x, codes)
    assert int(got[5]) == 300 and int(got[6]) == 400
    float64_check(got, x, codes)


def test_loose_bound_falls_back_to_the_float32_search(monkeypatch):
    # codes far from the origin and close together (a trained codebook): too many candidates
    g = torch.Generator().manual_seed(5)
    centre = 300 * torch.randn(64, generator=g)
    codes = centre + torch.randn(256, 64, generator=g)
    x = centre + torch.randn(1200, 64, generator=g)
    resolved, fell_back = spies(monkeypatch)
    got = int8_presearch.nearest_code_int8(x, codes)
    assert (resolved.calls, fell_back.calls) == (0, 1)
    assert torch.equal(got, presearch.float32_search(x, codes))


def test_row_blocks_and_non_tile_codebooks():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(700, 48, generator=g)
    for k in (512, 500):  # a multiple of the tile and not
        codes = torch.randn(k, 48, generator=g)
        whole = int8_presearch.nearest_code_int8(x, codes)
        blocks = int8_presearch.nearest_code_int8(x, codes, max_block_bytes=9 * k * 64)
        assert torch.equal(whole, blocks)
        float64_check(whole, x, codes)


def test_non_finite_rows_get_the_float32_index(monkeypatch):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(600, 64, generator=g)
    x[3, 5] = float("nan")
    x[9, 0] = float("inf")
    codes = torch.randn(512, 64, generator=g)
    resolved, fell_back = spies(monkeypatch)
    got = int8_presearch.nearest_code_int8(x, codes)
    assert fell_back.calls == 1 and resolved.calls == 0
    assert torch.equal(got, presearch.float32_search(x, codes))


def test_dispatch_follows_the_environment(monkeypatch):
    x, codes = torch.randn(1024, 256), torch.randn(1024, 256)
    monkeypatch.setenv(bf16_presearch.PRESEARCH_ENV, "int8")
    assert bf16_presearch.presearch_kind(x, codes) == "int8"
    assert bf16_presearch.presearch_kind(x[:1000], codes) is None  # too small to pay
    assert bf16_presearch.presearch_kind(x[:, :128], codes[:, :128]) is None
    assert bf16_presearch.presearch_kind(x.double(), codes.double()) is None
    assert bf16_presearch.presearch_kind(torch.randn(600, 32), torch.randn(512, 32)) is None
    monkeypatch.setenv(bf16_presearch.PRESEARCH_ENV, "off")
    assert bf16_presearch.presearch_kind(x, codes) is None
    monkeypatch.setenv(bf16_presearch.PRESEARCH_ENV, "int9")
    with pytest.raises(ValueError, match="VQVAE_CPU_PRESEARCH"):
        bf16_presearch.presearch_kind(x, codes)
    monkeypatch.delenv(bf16_presearch.PRESEARCH_ENV)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        for native in (False, True):  # AVX2 only, or with bf16 dot products: int8 first
            monkeypatch.setattr(bf16_presearch, "native_bf16", lambda native=native: native)
            assert bf16_presearch.presearch_kind(x, codes) == "int8"
        torch.set_num_threads(2)  # more threads: int8 with its second stage in C, else
        # the previous choice, bf16 where native
        c_kernels = int8_presearch._c_kernels()
        assert bf16_presearch.presearch_kind(x, codes) == ("int8" if c_kernels else "bf16")
        monkeypatch.setattr(bf16_presearch, "native_bf16", lambda: False)
        assert bf16_presearch.presearch_kind(x, codes) == ("int8" if c_kernels else None)
        torch.set_num_threads(1)
        monkeypatch.setattr(bf16_presearch, "native_bf16", lambda: True)
        monkeypatch.setattr(int8_presearch, "levels", lambda: None)  # no exact int8 product
        assert bf16_presearch.presearch_kind(x, codes) == "bf16"
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setenv(bf16_presearch.PRESEARCH_ENV, "int8")
    assert bf16_presearch.presearch_kind(x, codes) is None


def test_nearest_takes_the_int8_path(monkeypatch):
    monkeypatch.setenv(bf16_presearch.PRESEARCH_ENV, "int8")
    called = Spy(monkeypatch, int8_presearch, "nearest_code_int8")
    g = torch.Generator().manual_seed(8)
    x, codes = torch.randn(1024, 256, generator=g), torch.randn(1024, 256, generator=g)
    got = bf16_presearch.nearest(x, codes)
    assert called.calls == 1
    float64_check(got, x, codes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_simvq_through_the_int8_path(dtype, monkeypatch):
    monkeypatch.setenv(bf16_presearch.PRESEARCH_ENV, "int8")
    called = Spy(monkeypatch, int8_presearch, "nearest_code_int8")
    torch.manual_seed(0)
    vq = SimVQ(dim=256, codebook_size=1024).train()
    x = torch.randn(2, 512, 256).to(dtype).requires_grad_()
    quantized, indices, loss = vq(x)
    (quantized.float().sum() + loss).backward()
    assert called.calls == 1
    codes = vq.codebook.detach()
    float64_check(indices.reshape(-1), x.detach().float().reshape(-1, 256), codes)
    assert torch.equal(quantized.detach(), codes[indices].to(dtype))
    monkeypatch.setenv(bf16_presearch.PRESEARCH_ENV, "off")  # the float32 search's gradients
    grad = x.grad.clone()
    x.grad = None
    weight_grad = vq.code_transform.weight.grad.clone()
    vq.code_transform.weight.grad = None
    quantized, again, loss = vq(x)
    (quantized.float().sum() + loss).backward()
    assert torch.equal(again, indices)
    assert torch.equal(x.grad, grad)
    assert torch.equal(vq.code_transform.weight.grad, weight_grad)


def test_simvq_non_finite_input_raises_and_changes_nothing(monkeypatch):
    monkeypatch.setenv(bf16_presearch.PRESEARCH_ENV, "int8")
    torch.manual_seed(0)
    vq = SimVQ(dim=256, codebook_size=1024).train()
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    x = torch.randn(1, 1024, 256)
    x[0, 17, 3] = float("nan")
    with pytest.raises(QuantizerInputError):
        vq(x)
    after = vq.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_levels_give_exact_integer_products():
    """The ranges chosen for this CPU (held to AVX2, torch's int8 product saturates at ±127 on
    both sides) multiply exactly: checked in int64 at the extremes and at random."""
    qx, qc, pairs = int8_presearch.levels()
    g = torch.Generator().manual_seed(9)
    a = torch.randint(-qx, qx + 1, (300, 1024), generator=g, dtype=torch.int8)
    b = torch.randint(-qc, qc + 1, (200, 1024), generator=g, dtype=torch.int8)
    if pairs:  # adjacent codebook entries at most 128 together: 127 beside 1, and so on
        b[:, 1::2] = (b[:, 1::2].long().sign() * (128 - b[:, ::2].long().abs())).to(torch.int8)
        assert int((b[:, ::2].long().abs() + b[:, 1::2].long().abs()).max()) <= 128
    a[:4], b[:4] = qx, qc
    a[4:8], b[4:8] = -qx, -qc
    if pairs:
        b[:8, 1::2] = (b[:8, 1::2].long().sign() * (128 - qc)).to(torch.int8)
    assert torch.equal(torch._int_mm(a, b.t()).long(), a.long() @ b.long().t())


def test_quantisation_respects_the_levels():
    g = torch.Generator().manual_seed(10)
    v = torch.randn(300, 64, generator=g) * torch.logspace(-2, 2, 300)[:, None]
    v[7] = 0.0
    for qmax, pairs in ((127, False), (64, False), (127, True)):
        q, scale, residual = int8_presearch.quantize_rows(v, qmax, pairs)
        q64 = q.long()
        assert int(q64.abs().max()) == qmax or pairs
        if pairs:
            assert int((q64[:, ::2].abs() + q64[:, 1::2].abs()).max()) <= qmax + 1
        assert not bool(q64[7].any())
        exact = (v.double() - scale.double()[:, None] * q64.double()).norm(dim=1)
        assert torch.allclose(residual.double(), exact, rtol=1e-5, atol=0)
        # rounding to the nearest step: no entry off by more than half a step
        assert bool(((v.double() / scale.double()[:, None] - q64).abs() <= 0.5 + 1e-5).all())
