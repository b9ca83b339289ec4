"""The oneDNN route of float32 CPU products (vqvae.quantizers.onednn_linear) and the searches
and layers that take it: values against float64, gradients against autograd on F.linear."""

import pytest
import torch
import torch.nn.functional as F

from vqvae import SimVQ
from vqvae.quantizers import onednn_linear
from vqvae.quantizers.bf16_presearch import nearest_code_f32

requires_onednn = pytest.mark.skipif(not onednn_linear.available(),
                                     reason="torch built without oneDNN")


def float64_product(x, weight, bias=None):
    out = x.double() @ weight.double().t()
    return out if bias is None else out + bias.double()


@requires_onednn
@pytest.mark.parametrize("shape", [(1024, 512, 300), (300, 64, 200), (8192, 4, 256)])
def test_linear_matches_float64(shape):
    n, inner, out = shape
    g = torch.Generator().manual_seed(n)
    x, weight, bias = (torch.randn(n, inner, generator=g), torch.randn(out, inner, generator=g),
                       torch.randn(out, generator=g))
    assert onednn_linear.routed(x, weight)
    for b in (None, bias):
        got = onednn_linear.linear(x, weight, b)
        assert got.dtype == torch.float32 and got.shape == (n, out)
        torch.testing.assert_close(got.double(), float64_product(x, weight, b),
                                   rtol=1e-5, atol=1e-5 * inner ** 0.5)
    # transposed (non-contiguous) operands, as the weight gradients pass them
    got = onednn_linear.linear(x.t().contiguous().t(), weight.t().contiguous().t())
    torch.testing.assert_close(got.double(), float64_product(x, weight), rtol=1e-5,
                               atol=1e-5 * inner ** 0.5)


def test_small_float64_and_graph_operands_keep_torchs_route():
    x, weight = torch.randn(8, 4), torch.randn(8, 4)
    assert not onednn_linear.routed(x, weight)  # too small to pay
    big = torch.randn(1024, 512), torch.randn(512, 512)
    assert not onednn_linear.routed(big[0].double(), big[1].double())
    needs_grad = big[1].clone().requires_grad_()
    assert not onednn_linear.routed(big[0], needs_grad)  # linear() has no gradient
    with torch.no_grad():
        assert onednn_linear.routed(big[0], needs_grad) == onednn_linear.available()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not onednn_linear.routed(*big)
    torch.testing.assert_close(onednn_linear.linear(x.double(), weight.double()),
                               x.double() @ weight.double().t())


@requires_onednn
def test_linear_with_grad_gives_f_linears_gradients():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(700, 96, generator=g, requires_grad=True)
    weight = torch.randn(128, 96, generator=g, requires_grad=True)
    bias = torch.randn(128, generator=g, requires_grad=True)
    upstream = torch.randn(700, 128, generator=g)
    out = onednn_linear.linear_with_grad(x, weight, bias)
    grads = torch.autograd.grad(out, (x, weight, bias), upstream)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, weight, bias))
    expected = F.linear(x64, w64, b64)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)
    for got, want in zip(grads, torch.autograd.grad(expected, (x64, w64, b64),
                                                    upstream.double()), strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("num_codes,block_bytes", [(1024, None), (1000, None), (512, 40_000)])
def test_float32_search_picks_the_float64_nearest_code(num_codes, block_bytes):
    g = torch.Generator().manual_seed(num_codes)
    x = torch.randn(900, 96, generator=g)
    codes = torch.randn(num_codes, 96, generator=g)
    codes[5] = x[3]  # an exact hit
    kwargs = {} if block_bytes is None else {"max_block_bytes": block_bytes}
    got = nearest_code_f32(x, codes, **kwargs)
    d = torch.cdist(x.double(), codes.double())
    best = d.topk(2, dim=1, largest=False).values
    clear = (best[:, 1] - best[:, 0]) > 1e-4  # ties aside
    assert int(got[3]) == 5
    assert torch.equal(got[clear], d.argmin(1)[clear]) and int(clear.sum()) > 850


@requires_onednn
def test_simvq_decode_gives_the_forwards_bits_on_the_onednn_route():
    torch.manual_seed(0)
    vq = SimVQ(dim=256, codebook_size=1024).train()
    weight = vq.code_transform.weight
    assert onednn_linear.routed(vq.frozen_codebook, weight.detach())
    x = torch.randn(2, 300, 256, requires_grad=True)
    quantized, indices, loss = vq(x)
    (quantized.sum() + loss).backward()
    assert torch.equal(vq.indices_to_codes(indices), quantized)
    with torch.no_grad():
        assert torch.equal(vq.indices_to_codes(indices), quantized)
    # the weight gradient (rows of used codes only) against autograd through F.linear
    w64 = weight.detach().double().requires_grad_()
    codes = F.linear(vq.frozen_codebook.double(), w64)[indices]  # (2, 300, 256)
    x64 = x.detach().double()
    commit = F.mse_loss(x64, codes) * (1 + vq.input_to_quantize_commit_loss_weight)
    # quantized.sum() passes nothing to the codes (rotation trick: the gradient goes to x)
    (grad,) = torch.autograd.grad(commit * vq.commitment_weight / (
        1 + vq.input_to_quantize_commit_loss_weight), (w64,))
    torch.testing.assert_close(weight.grad.double(), grad, rtol=1e-4, atol=1e-6)
