"""The C kernels of the int8 pre-search (vqvae.quantizers.cpu_kernel.quantize_rows and
int8_recheck) against NumPy re-implementations of their rules, at widths that take whole SIMD
vectors, a tail, or only the tail."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vqvae.quantizers import cpu_kernel, int8_presearch

pytestmark = pytest.mark.skipif(not cpu_kernel.available(),
                                reason=f"no C kernels: {cpu_kernel.unavailable_reason()}")


def numpy_quantize(v: np.ndarray, qmax: int, pairs: bool, per_row: bool):
    """int8_presearch.quantize_rows's rule in float32 NumPy: the peak (of |v| or of adjacent
    pairs' |v₂ᵢ| + |v₂ᵢ₊₁|), floored; q = rint(v · fl(qmax / peak)); scale = fl(peak / qmax)."""
    magnitude = np.abs(v)
    if pairs:
        magnitude = magnitude[:, 0::2] + magnitude[:, 1::2]
    peak = magnitude.max(1) if per_row else np.full(v.shape[0], magnitude.max(), np.float32)
    peak = np.maximum(peak, np.float32(int8_presearch.PEAK_FLOOR)).astype(np.float32)
    multiplier = (np.float32(qmax) / peak).astype(np.float32)
    q = np.rint((v * multiplier[:, None]).astype(np.float32))
    scale = (peak / np.float32(qmax)).astype(np.float32)
    residual = np.linalg.norm(v.astype(np.float64) - scale[:, None].astype(np.float64) * q, axis=1)
    return q.astype(np.int8), scale, residual


@pytest.mark.parametrize("dim", [2, 22, 64, 130])
@pytest.mark.parametrize("qmax, pairs, per_row",
                         [(127, False, True), (64, False, True), (127, True, True),
                          (127, False, False), (127, True, False)])
def test_quantize_rows_matches_numpy(dim, qmax, pairs, per_row):
    g = torch.Generator().manual_seed(dim + qmax)
    v = torch.randn(50, dim, generator=g) * torch.logspace(-4, 4, 50)[:, None]
    v[3] = 0.0
    v[4, :] = 0.5  # every entry at the peak (exact halves after scaling: ties to even)
    q, scale, residual = cpu_kernel.quantize_rows(v, qmax, pairs, per_row,
                                                  int8_presearch.PEAK_FLOOR)
    q_np, scale_np, residual_np = numpy_quantize(v.numpy(), qmax, pairs, per_row)
    np.testing.assert_array_equal(q.numpy(), q_np)
    np.testing.assert_array_equal(scale.numpy(), scale_np)
    np.testing.assert_allclose(residual.numpy(), residual_np, rtol=2e-5, atol=1e-30)
    assert not q[3].any() and int(q.abs().max()) <= qmax


def test_quantize_rows_reports_non_finite_rows_by_their_scale():
    v = torch.randn(6, 40)
    v[1, 7], v[4, 0] = float("nan"), float("inf")
    _, scale, _ = cpu_kernel.quantize_rows(v, 127, False, True, int8_presearch.PEAK_FLOOR)
    assert torch.isfinite(scale).tolist() == [True, False, True, True, False, True]
    _, shared, _ = cpu_kernel.quantize_rows(v, 127, False, False, int8_presearch.PEAK_FLOOR)
    assert not bool(torch.isfinite(shared).any())  # one scale: every row sees the NaN


def numpy_recheck(products, row_scale, code_sq, x, codebook, slack):
    """The re-check's rule: approximate distances in float32, the anchor at their first
    minimum, the candidates within the slack of the anchor's exact distance, and the first
    candidate at the smallest exact distance (here in float64)."""
    approx = code_sq[None, :] - np.float32(2) * (products.astype(np.float32) * row_scale[:, None])
    exact = (code_sq[None, :].astype(np.float64)
             - 2 * x.astype(np.float64) @ codebook.astype(np.float64).T)
    anchor = approx.argmin(1)
    rows = np.arange(x.shape[0])
    threshold = exact[rows, anchor] + slack
    passed = approx <= threshold[:, None]
    masked = np.where(passed, exact, np.inf)
    count = passed.sum(1)
    # a row without candidates (only with a slack below the true bound, as here) gets the
    # last index, in range
    return np.where(count > 0, masked.argmin(1), codebook.shape[0] - 1), count, approx, threshold


@pytest.mark.parametrize("dim", [5, 16, 48, 131])
def test_int8_recheck_matches_numpy(dim):
    g = torch.Generator().manual_seed(dim)
    x = torch.randn(90, dim, generator=g)
    codebook = torch.randn(200, dim, generator=g) * 0.5
    codebook[17] = codebook[11]  # duplicates: the first index wins
    x[0] = codebook[11]
    qx, sx, _ = int8_presearch.quantize_rows(x)
    qc, sc, _ = int8_presearch.quantize_rows(codebook, per_row=False)
    products = qx.int() @ qc.int().t()
    row_scale = sx * sc[0]
    code_sq = codebook.pow(2).sum(1)
    slack = torch.rand(90, generator=g) * 2.0 - 0.2  # none to several candidates a row
    got = cpu_kernel.int8_recheck(products, row_scale, code_sq, x, codebook, slack, 10**6)
    want, count, approx, threshold = numpy_recheck(
        products.numpy(), row_scale.numpy(), code_sq.numpy(), x.numpy(), codebook.numpy(),
        slack.numpy())
    # rows whose candidate set or winner could flip with float32 rounding are left out
    near = np.abs(approx - threshold[:, None]).min(1) < 1e-3
    clear = ~near
    assert clear.sum() > 60 and (count[clear] > 1).sum() > 10
    np.testing.assert_array_equal(got.numpy()[clear], want[clear])
    assert int(got[0]) == 11


def test_int8_recheck_gives_up_past_its_limit_and_takes_every_code_on_a_nan_slack():
    g = torch.Generator().manual_seed(1)
    x, codebook = torch.randn(30, 40, generator=g), torch.randn(64, 40, generator=g)
    products = torch.zeros(30, 64, dtype=torch.int32)  # every approximate distance ||c||²
    code_sq = codebook.pow(2).sum(1)
    args = (products, torch.ones(30), code_sq, x, codebook)
    assert cpu_kernel.int8_recheck(*args, torch.full((30,), float("inf")), 30 * 64 - 1) is None
    every = cpu_kernel.int8_recheck(*args, torch.full((30,), float("nan")), 30 * 64)
    exact = code_sq.double() - 2 * x.double() @ codebook.double().t()
    assert torch.equal(every, exact.argmin(1))


def test_int8_recheck_refuses_mismatched_inputs():
    x, codebook = torch.randn(4, 8), torch.randn(6, 8)
    products = torch.zeros(4, 6, dtype=torch.int32)
    with pytest.raises(ValueError, match="int32 products"):
        cpu_kernel.int8_recheck(products.float(), torch.ones(4), codebook.pow(2).sum(1), x,
                                codebook, torch.ones(4), 10)
    with pytest.raises(ValueError, match="int32 products"):
        cpu_kernel.int8_recheck(products, torch.ones(5), codebook.pow(2).sum(1), x, codebook,
                                torch.ones(4), 10)
