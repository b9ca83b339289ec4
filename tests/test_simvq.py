"""SimVQ, ResidualSimVQ, RandomProjectionQuantizer, HierarchicalVQ and Sequential: checked
against float64 / NumPy re-computations, autograd on the textbook expressions, and the library
(vector_quantize_pytorch) where it is right."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vqvae
from vqvae import (
    HierarchicalVQ,
    QuantizerInputError,
    RandomProjectionQuantizer,
    ResidualSimVQ,
    Sequential,
    SimVQ,
)
from vqvae.quantizers import cpu_kernel

lib = pytest.importorskip("vector_quantize_pytorch")


def cdist_argmin(x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Nearest code in float64 by torch.cdist: the independent reference search."""
    x64 = x.detach().double().reshape(-1, codes.shape[-1])
    return torch.cdist(x64, codes.detach().double()).argmin(-1)


# ---------------------------------------------------------------------------- SimVQ


def check_against_float64(indices, x, codes):
    """Our indices are nearest in float64 up to float32 rounding, and equal to the float64
    argmin wherever the float64 gap to the runner-up exceeds that rounding."""
    x64, c64 = x.double(), codes.double()
    d = (c64.pow(2).sum(-1) - 2 * x64 @ c64.T)  # (N, K), less ||x||²
    # float32 evaluates ||c||² - 2 x·c with error below this (generous) slack
    slack = 4e-6 * (c64.pow(2).sum(-1).max() + 2 * x64.norm(dim=-1, keepdim=True)
                    * c64.norm(dim=-1).max())
    best, second = d.topk(2, dim=1, largest=False).values.unbind(1)
    chosen = d.gather(1, indices.unsqueeze(1)).squeeze(1)
    assert bool((chosen - best <= slack.squeeze(1)).all())
    clear = (second - best) > slack.squeeze(1)
    assert bool((indices[clear] == d.argmin(1)[clear]).all())
    return int(clear.sum())


def near_tie_data(seed: int, n: int = 384, k: int = 512, dim: int = 48, scale: float = 1.0,
                  twin: float = 1e-2, shift: float = 3e-2):
    """Codes in pairs about as close as bfloat16 resolves, and inputs near the bisecting planes
    of pairs, so that the bfloat16 distances alone get many wrong (asserted where used)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(k // 2, dim, generator=g)
    twins = base + twin * torch.randn(k // 2, dim, generator=g)
    codes = torch.cat([base, twins]) * scale
    pick = torch.randint(0, k // 2, (n,), generator=g)
    mid = (codes[pick] + codes[pick + k // 2]) / 2
    x = mid + shift * scale * torch.randn(n, dim, generator=g)
    return x, codes


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_bf16_presearch_gives_the_float32_answer_on_near_ties(scale):
    from vqvae.quantizers.bf16_presearch import nearest_code_bf16
    from vqvae.quantizers.search import nearest_code

    x, codes = near_tie_data(0, scale=scale)
    ours = nearest_code_bf16(x, codes)
    # the bf16 distances alone would not do: they pick another code on many rows
    bf = (codes.bfloat16().float().pow(2).sum(-1)
          - 2 * x.bfloat16().float() @ codes.bfloat16().float().T).argmin(1)
    assert int((bf != cdist_argmin(x, codes)).sum()) > 10
    assert check_against_float64(ours, x, codes) > x.shape[0] // 2
    # and the float32 search agrees except on float32 near-ties
    fp32 = nearest_code(x, codes, backend="torch", precision="fp32")
    d = codes.double().pow(2).sum(-1) - 2 * x.double() @ codes.double().T
    differ = ours != fp32
    gap = (d.gather(1, ours[:, None]) - d.gather(1, fp32[:, None])).abs().squeeze(1)
    assert bool((gap[differ] < 1e-5 * (1 + d.abs().max())).all())


def test_bf16_presearch_on_ties_finer_than_float32():
    from vqvae.quantizers.bf16_presearch import nearest_code_bf16

    # twins 3e-3 apart and inputs 1e-3 off their planes: float32 itself cannot tell most apart,
    # the answer must still be a nearest code up to float32 rounding
    x, codes = near_tie_data(4, twin=3e-3, shift=1e-3)
    check_against_float64(nearest_code_bf16(x, codes), x, codes)


def test_bf16_presearch_on_random_and_skewed_codebooks():
    from vqvae.quantizers.bf16_presearch import nearest_code_bf16

    g = torch.Generator().manual_seed(1)
    x = torch.randn(400, 64, generator=g) * 5
    codes = torch.randn(700, 64, generator=g)
    codes[:100] *= 10  # code norms over two decades
    codes[100:200] *= 0.1
    codes[300] = x[7]  # an exact hit
    codes[301] = 0.0
    ours = nearest_code_bf16(x, codes)
    assert int(ours[7]) == 300
    assert check_against_float64(ours, x, codes) > 390


def test_bf16_presearch_dispatch_and_row_blocks():
    from vqvae.quantizers import bf16_presearch
    from vqvae.quantizers.search import search_settings

    x, codes = near_tie_data(2, n=600, k=512)
    whole = bf16_presearch.nearest(x, codes)
    blocks = bf16_presearch.nearest(x, codes, max_block_bytes=3 * 512 * 50)  # 12 row blocks
    assert torch.equal(whole, blocks)
    check_against_float64(whole, x, codes)
    with search_settings(backend="torch"):  # an explicit backend is honoured: float32 search
        assert not bf16_presearch.usable(x.double(), codes.double())
        check_against_float64(bf16_presearch.nearest(x, codes), x, codes)
    small = x[:10]
    assert not bf16_presearch.usable(small, codes)  # too small to pay: float32 search
    narrow = torch.randn(600, bf16_presearch.MIN_DIM - 1), torch.randn(512, 32)
    assert not bf16_presearch.usable(*narrow)  # the C kernel's widths: float32 search


def test_bf16_presearch_falls_back_to_float32_when_its_bound_is_loose():
    """Codes far from the origin and close together (a trained codebook): the worst-case bound
    of the bf16 distances admits most codes; the search still gives float32's answer, without
    re-checking them pair by pair."""
    from vqvae.quantizers import bf16_presearch
    from vqvae.quantizers.search import nearest_code

    g = torch.Generator().manual_seed(5)
    centre = 300 * torch.randn(64, generator=g)
    codes = centre + torch.randn(256, 64, generator=g)
    x = centre + torch.randn(1200, 64, generator=g)
    code_sq = codes.pow(2).sum(-1)
    approx = torch.addmm(code_sq.bfloat16(), x.bfloat16(), codes.bfloat16().t(), alpha=-2.0)
    low = approx.amin(1).float()
    bound = low + bf16_presearch._margin(x, x.bfloat16(), codes, codes.bfloat16(), code_sq, low)
    admitted = int((approx.float() <= bound.unsqueeze(1)).sum())
    assert admitted > bf16_presearch.MAX_CANDIDATES_PER_ROW * len(x)  # the loose case
    assert torch.equal(bf16_presearch.nearest_code_bf16(x, codes), nearest_code(x, codes))


def test_simvq_indices_on_near_ties_at_a_size_that_takes_the_bf16_path():
    from vqvae.quantizers import bf16_presearch

    x, codes = near_tie_data(3, n=600, k=512, dim=40)
    vq = SimVQ(dim=40, codebook_size=512, frozen_codebook_dim=40)
    with torch.no_grad():  # the implicit codebook equals `codes`: W = I, frozen = codes
        vq.frozen_codebook.copy_(codes)
        vq.code_transform.weight.copy_(torch.eye(40))
    assert bf16_presearch.usable(x, vq.codebook) == bf16_presearch.native_bf16()
    _, indices, _ = vq(x.unsqueeze(0))
    check_against_float64(indices.squeeze(0), x, vq.codebook.detach())


def test_simvq_codes_are_the_linear_map_of_the_frozen_codebook():
    torch.manual_seed(0)
    vq = SimVQ(dim=8, codebook_size=16, frozen_codebook_dim=5)
    frozen = vq.frozen_codebook.double().numpy()
    weight = vq.code_transform.weight.detach().double().numpy()
    np.testing.assert_allclose(vq.codebook.detach().double().numpy(), frozen @ weight.T,
                               rtol=1e-5, atol=1e-6)
    assert vq.frozen_codebook.shape == (16, 5)
    assert "frozen_codebook" in dict(vq.named_buffers())
    assert [n for n, _ in vq.named_parameters()] == ["code_transform.weight"]


def test_simvq_nearest_code_matches_float64_cdist():
    torch.manual_seed(1)
    vq = SimVQ(dim=12, codebook_size=200)
    x = torch.randn(3, 70, 12)
    _, indices, _ = vq(x)
    assert indices.shape == (3, 70) and indices.dtype == torch.int64
    assert torch.equal(indices.reshape(-1), cdist_argmin(x, vq.codebook))


def _rotation_textbook(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Fifty et al. 2024: output = sg(λ R) x, R = I - 2 r rᵀ + 2 v uᵀ, built as matrices."""
    u = (x / x.norm(dim=-1, keepdim=True)).detach()
    v = (q / q.norm(dim=-1, keepdim=True)).detach()
    r = F.normalize(u + v, dim=-1)
    eye = torch.eye(x.shape[-1], dtype=x.dtype)
    rot = eye - 2 * r[:, :, None] * r[:, None, :] + 2 * v[:, :, None] * u[:, None, :]
    scale = (q.norm(dim=-1) / x.norm(dim=-1)).detach()
    return scale[:, None] * torch.einsum("nij,nj->ni", rot, x)


@pytest.mark.parametrize("path", ["c", "tensor"])
@pytest.mark.parametrize("dim", [6, 37])  # (37: whole SIMD vectors and a tail in C)
@pytest.mark.parametrize("rotation", [True, False])
def test_simvq_loss_and_gradients_match_autograd_on_the_textbook_expression(rotation, dim, path,
                                                                             monkeypatch):
    if path == "c" and not cpu_kernel.available():
        pytest.skip(f"no C kernels: {cpu_kernel.unavailable_reason()}")
    if path == "tensor":
        monkeypatch.setattr(cpu_kernel, "supports_rows", lambda *tensors: False)
    torch.manual_seed(2)
    vq = SimVQ(dim=dim, codebook_size=10, rotation_trick=rotation, commitment_weight=0.7,
               input_to_quantize_commit_loss_weight=0.3)
    x = torch.randn(40, dim, requires_grad=True)
    grad_out = torch.randn(40, dim)
    quantized, indices, loss = vq(x)
    (quantized * grad_out).sum().add(loss * 1.3).backward()

    # textbook, float64, plain autograd
    weight = vq.code_transform.weight.detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    codebook = vq.frozen_codebook.double() @ weight.t()
    idx = torch.cdist(x64.detach(), codebook.detach()).argmin(-1)
    assert torch.equal(idx, indices)
    q = codebook[idx]
    ref_loss = 0.7 * (F.mse_loss(x64.detach(), q) + 0.3 * F.mse_loss(x64, q.detach()))
    out = _rotation_textbook(x64, q.detach()) if rotation else x64 + (q - x64).detach()
    np.testing.assert_allclose(out.detach().numpy(), quantized.detach().double().numpy(),
                               rtol=1e-5, atol=1e-5)
    (out * grad_out.double()).sum().add(ref_loss * 1.3).backward()
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    np.testing.assert_allclose(x.grad.double().numpy(), x64.grad.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(vq.code_transform.weight.grad.double().numpy(),
                               weight.grad.numpy(), rtol=1e-4, atol=1e-6)


def test_simvq_gradient_through_a_custom_transform():
    torch.manual_seed(3)
    transform = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 6))
    vq = SimVQ(dim=6, codebook_size=10, codebook_transform=transform)
    x = torch.randn(20, 6)
    _, indices, loss = vq(x)
    loss.backward()
    # textbook: only the codebook term reaches the transform
    clone = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 6))
    clone.load_state_dict(transform.state_dict())
    q = clone(vq.frozen_codebook)[indices]
    (F.mse_loss(x, q) + 0.25 * F.mse_loss(x, q.detach())).backward()
    for ours, ref in zip(transform.parameters(), clone.parameters(), strict=True):
        torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-5, atol=1e-7)


def test_simvq_matches_the_library_with_the_same_weights():
    torch.manual_seed(4)
    reference = lib.SimVQ(dim=16, codebook_size=64)
    ours = SimVQ(dim=16, codebook_size=64)
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(2, 30, 16)
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    qr, ir, lr = reference(xr)
    qo, io, lo = ours(xo)
    assert torch.equal(ir, io)
    torch.testing.assert_close(qo, qr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lo, lr)
    (qr.square().sum() + lr).backward()
    (qo.square().sum() + lo).backward()
    torch.testing.assert_close(xo.grad, xr.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours.code_transform.weight.grad,
                               reference.code_transform.weight.grad, rtol=1e-4, atol=1e-7)


def test_simvq_output_is_the_code_exactly_and_decodes_back():
    torch.manual_seed(5)
    vq = SimVQ(dim=8, codebook_size=32)
    x = torch.randn(4, 9, 8)
    x[0, 0] = 0.0  # the library returns zeros here; the code is right
    quantized, indices, _ = vq(x)
    assert torch.equal(quantized, vq.indices_to_codes(indices))
    assert torch.equal(quantized[0, 0], vq.codebook[indices[0, 0]])


def test_simvq_channel_first_feature_maps():
    torch.manual_seed(6)
    vq = SimVQ(dim=8, codebook_size=32, channel_first=True)
    x = torch.randn(2, 8, 5, 3)
    quantized, indices, _ = vq(x)
    assert quantized.shape == x.shape and indices.shape == (2, 5, 3)
    assert torch.equal(indices.reshape(-1), cdist_argmin(x.movedim(1, -1), vq.codebook))
    assert torch.equal(vq.indices_to_codes(indices), quantized)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_simvq_half_precision_inputs(dtype):
    torch.manual_seed(7)
    vq = SimVQ(dim=8, codebook_size=32)
    x = torch.randn(50, 8).to(dtype).requires_grad_()
    quantized, indices, loss = vq(x)
    assert quantized.dtype == dtype and loss.dtype == torch.float32
    assert torch.equal(indices, cdist_argmin(x.float(), vq.codebook))
    (quantized.float().sum() + loss).backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad.float()).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_simvq_non_finite_input_at_search_sizes_raises_the_input_error(bad):
    # big enough for the bfloat16 pre-search or the oneDNN float32 search (whichever this CPU
    # takes), whose rows without a candidate must still get an index in range
    from vqvae.quantizers.bf16_presearch import nearest

    vq = SimVQ(dim=64, codebook_size=1024)
    x = torch.randn(2, 512, 64)
    x[1, 7, 3] = bad
    with pytest.raises(QuantizerInputError, match="non-finite"):
        vq(x)
    found = nearest(x.view(-1, 64), vq.codebook.detach())
    assert int(found.min()) >= 0 and int(found.max()) < 1024
    clean = torch.ones(1024, dtype=torch.bool)
    clean[512 + 7] = False
    assert torch.equal(found[clean], cdist_argmin(x.view(-1, 64)[clean], vq.codebook))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_simvq_non_finite_input_raises_and_changes_nothing(bad):
    vq = SimVQ(dim=4, codebook_size=8)
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    x = torch.randn(5, 4)
    x[2, 1] = bad
    with pytest.raises(QuantizerInputError, match="non-finite"):
        vq(x)
    assert all(torch.equal(before[k], v) for k, v in vq.state_dict().items())
    with pytest.raises(QuantizerInputError, match="dim=4"):
        vq(torch.randn(5, 3))
    with pytest.raises(QuantizerInputError, match=r"\[0, 8\)"):
        vq.indices_to_codes(torch.tensor([8]))


def test_simvq_readme_example():
    sim_vq = vqvae.SimVQ(dim=512, codebook_size=1024, rotation_trick=True)
    x = torch.randn(1, 64, 512)
    quantized, indices, commit_loss = sim_vq(x)
    assert x.shape == quantized.shape
    assert torch.allclose(quantized, sim_vq.indices_to_codes(indices), atol=1e-6)


# ---------------------------------------------------------------------------- ResidualSimVQ


def test_residual_simvq_matches_a_hand_loop():
    torch.manual_seed(10)
    rvq = ResidualSimVQ(dim=6, num_quantizers=3, codebook_size=20)
    x = torch.randn(2, 15, 6)
    quantized, indices, losses = rvq(x)
    assert indices.shape == (2, 15, 3) and losses.shape == (3,)
    residual = x.double().reshape(-1, 6)
    total = torch.zeros_like(residual)
    for layer_index, layer in enumerate(rvq.layers):
        codes = layer.codebook.detach().double()
        idx = torch.cdist(residual, codes).argmin(-1)
        assert torch.equal(idx, indices[..., layer_index].reshape(-1))
        q = codes[idx]
        expected = 1.25 * ((residual - q) ** 2).mean()
        assert losses[layer_index].item() == pytest.approx(expected.item(), rel=1e-5)
        total += q
        residual = residual - q
    torch.testing.assert_close(quantized.double().reshape(-1, 6), total, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rvq.get_output_from_indices(indices), quantized,
                               rtol=1e-6, atol=1e-6)


def test_residual_simvq_matches_the_library_with_the_same_weights():
    torch.manual_seed(11)
    for channel_first in (False, True):
        reference = lib.ResidualSimVQ(dim=8, num_quantizers=3, codebook_size=16,
                                      channel_first=channel_first)
        ours = ResidualSimVQ(dim=8, num_quantizers=3, codebook_size=16,
                             channel_first=channel_first)
        ours.load_state_dict(reference.state_dict())
        x = torch.randn(2, 8, 4, 3) if channel_first else torch.randn(2, 10, 8)
        xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
        qr, ir, lr, cr = reference(xr, return_all_codes=True)
        qo, io, lo, co = ours(xo, return_all_codes=True)
        assert torch.equal(ir, io)
        torch.testing.assert_close(qo, qr, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lo, lr)
        torch.testing.assert_close(co, cr)
        (qr.square().sum() + lr.sum()).backward()
        (qo.square().sum() + lo.sum()).backward()
        torch.testing.assert_close(xo.grad, xr.grad, rtol=1e-4, atol=1e-6)


def test_residual_simvq_quantize_dropout():
    torch.manual_seed(12)
    rvq = ResidualSimVQ(dim=4, num_quantizers=4, codebook_size=8, quantize_dropout=True)
    x = torch.randn(2, 3, 5, 4)  # image, channels last: the library fails to stack here
    seed = next(s for s in range(100)
                if __import__("random").Random(s).randrange(0, 4) == 1)
    quantized, indices, losses = rvq(x, rand_quantize_dropout_fixed_seed=seed)
    assert indices.shape == (2, 3, 5, 4)
    assert (indices[..., 2:] == -1).all() and (indices[..., :2] >= 0).all()
    assert torch.equal(losses[2:], torch.zeros(2)) and (losses[:2] > 0).all()
    torch.testing.assert_close(rvq.get_output_from_indices(indices), quantized)
    torch.testing.assert_close(rvq.get_output_from_indices(indices[..., :2]), quantized)
    rvq.eval()
    assert (rvq(x)[1] >= 0).all()


def test_residual_simvq_codebook_dim_works_unlike_the_library():
    ours = ResidualSimVQ(dim=4, num_quantizers=2, codebook_size=8)
    assert ours.codebook_dim == 4 and ours.codebooks.shape == (2, 8, 4)
    with pytest.raises(AttributeError):
        _ = lib.ResidualSimVQ(dim=4, num_quantizers=2, codebook_size=8).codebook_dim


def test_residual_simvq_non_finite_input():
    rvq = ResidualSimVQ(dim=4, num_quantizers=2, codebook_size=8)
    with pytest.raises(QuantizerInputError, match="non-finite"):
        rvq(torch.full((3, 4), float("nan")))


def test_residual_simvq_readme_example():
    residual_sim_vq = vqvae.ResidualSimVQ(dim=512, num_quantizers=4, codebook_size=1024,
                                          rotation_trick=True)
    x = torch.randn(1, 64, 512)
    quantized, indices, commit_loss = residual_sim_vq(x)
    assert x.shape == quantized.shape
    assert torch.allclose(quantized, residual_sim_vq.get_output_from_indices(indices), atol=1e-6)


# ---------------------------------------------------------------------------- BEST-RQ


def best_rq_numpy(x, projections, codebook, norm=True):
    """Chiu et al. 2022: normalise, project, nearest normalised code by cosine similarity."""
    x = x.astype(np.float64).reshape(-1, x.shape[-1])
    if norm:
        x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    out = []
    for proj, codes in zip(projections.astype(np.float64), codebook.astype(np.float64),
                           strict=True):
        p = x @ proj
        p /= np.linalg.norm(p, axis=-1, keepdims=True)
        c = codes / np.linalg.norm(codes, axis=-1, keepdims=True)
        out.append(p @ c.T)
    return np.stack(out, axis=-1)  # (N, K, h): cosine similarities


@pytest.mark.parametrize("heads,norm", [(1, True), (3, True), (2, False)])
def test_random_projection_matches_numpy(heads, norm):
    torch.manual_seed(20)
    rpq = RandomProjectionQuantizer(dim=12, codebook_size=40, codebook_dim=6,
                                    num_codebooks=heads, norm=norm)
    x = torch.randn(2, 25, 12) * 3 + 1
    indices = rpq(x)
    sims = best_rq_numpy(x.numpy(), rpq.rand_projs.numpy(), rpq.codebook.numpy(), norm)
    expected = sims.argmax(1).reshape(2, 25, heads)
    assert indices.shape == ((2, 25) if heads == 1 else (2, 25, heads))
    np.testing.assert_array_equal(indices.reshape(2, 25, heads).numpy(), expected)
    # cross-entropy of the cosine similarities, -1 ignored
    targets = torch.randint(0, 40, indices.shape)
    targets.view(-1)[:7] = -1
    logits = sims.transpose(0, 2, 1).reshape(-1, 40)  # (N·h, K), row n·h + head
    flat = targets.reshape(-1).numpy()
    keep = flat >= 0
    log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected_ce = -log_softmax[keep, flat[keep]].mean()
    assert rpq(x, indices=targets).item() == pytest.approx(expected_ce, rel=1e-5)


def test_random_projection_heads_are_independent_unlike_the_library():
    torch.manual_seed(21)
    rpq = RandomProjectionQuantizer(dim=8, codebook_size=16, codebook_dim=4, num_codebooks=2)
    x = torch.randn(1, 30, 8)
    before = rpq(x)
    rpq.rand_projs[1].normal_()
    after = rpq(x)
    assert torch.equal(before[..., 0], after[..., 0]) and not torch.equal(before, after)
    # the library mixes the heads through an extra random Linear
    reference = lib.RandomProjectionQuantizer(dim=8, codebook_size=16, codebook_dim=4,
                                              num_codebooks=2)
    assert isinstance(reference.vq.project_in, nn.Linear)


def test_random_projection_matches_the_library_with_one_codebook():
    torch.manual_seed(22)
    reference = lib.RandomProjectionQuantizer(dim=16, codebook_size=32, codebook_dim=8)
    ours = RandomProjectionQuantizer(dim=16, codebook_size=32, codebook_dim=8)
    ours.rand_projs.copy_(reference.rand_projs)
    ours.codebook.copy_(reference.vq._codebook.embed)
    x = torch.randn(2, 40, 16)
    assert torch.equal(ours(x), reference(x))
    targets = reference(x)
    torch.testing.assert_close(ours(x, indices=targets), reference(x, indices=targets))


def test_random_projection_dtypes_and_bad_input():
    torch.manual_seed(23)
    rpq = RandomProjectionQuantizer(dim=8, codebook_size=16, codebook_dim=4)
    x = torch.randn(1, 20, 8)
    for dtype in (torch.bfloat16, torch.float16):
        low = x.to(dtype)
        assert torch.equal(rpq(low), rpq(low.float()))
    before = {k: v.clone() for k, v in rpq.state_dict().items()}
    x[0, 3, 2] = float("nan")
    with pytest.raises(QuantizerInputError, match="non-finite"):
        rpq(x)
    assert all(torch.equal(before[k], v) for k, v in rpq.state_dict().items())


def test_random_projection_readme_example():
    quantizer = vqvae.RandomProjectionQuantizer(dim=512, num_codebooks=16, codebook_dim=256,
                                                codebook_size=1024)
    x = torch.randn(1, 64, 512)
    indices = quantizer(x)
    assert indices.shape == (1, 64, 16)


# ---------------------------------------------------------------------------- HierarchicalVQ


def _hierarchical_loop(hvq: HierarchicalVQ, x: torch.Tensor):
    """The library's definition, written as a plain loop in float64 (2-d maps, channel first,
    scales dividing the map so that adaptive pooling is a block mean)."""
    b, c, height, width = x.shape
    residual = x.double()
    recon = torch.zeros_like(residual)
    all_indices = []
    for level, (sh, sw) in enumerate(hvq.level_shapes):
        pooled = residual.reshape(b, c, sh, height // sh, sw, width // sw).mean((3, 5))
        rows = pooled.permute(0, 2, 3, 1).reshape(-1, c)
        codes = hvq.get_vq(level).codebook.double()
        idx = torch.cdist(rows, codes).argmin(-1)
        q = codes[idx].reshape(b, sh, sw, c).permute(0, 3, 1, 2)
        if (sh, sw) != (height, width):
            q = F.interpolate(q, size=(height, width), mode="bilinear", align_corners=False)
        phi = hvq.choose_phi(level)
        conv = F.conv2d(q, phi.conv.weight.double(), phi.conv.bias.double(), padding=1)
        u = q + phi.resi_ratio * (conv - q)
        recon = recon + u
        residual = residual - u
        all_indices.append(idx.reshape(b, sh, sw))
    return recon, all_indices


@pytest.mark.parametrize("shared", [True, False])
def test_hierarchical_matches_an_independent_loop(shared):
    torch.manual_seed(30)
    hvq = HierarchicalVQ(dim=4, codebook_size=16, scales=(1, 2, 4, 8), accept_image_fmap=True,
                         shared_codebook=shared, share_quant_resi=1 if shared else 3,
                         kmeans_init=False).eval()
    x = torch.randn(2, 4, 8, 8)
    recon, indices, loss = hvq(x)
    expected, expected_indices = _hierarchical_loop(hvq, x)
    for ours, ref in zip(indices, expected_indices, strict=True):
        assert torch.equal(ours, ref)
    torch.testing.assert_close(recon.double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(hvq.get_output_from_indices(indices, full_shape=(8, 8)), recon)


def _copy_codebooks(reference, ours):
    pairs = zip([reference.vq] if reference.vq is not None else list(reference.vqs),
                [ours.vq] if ours.vq is not None else list(ours.vqs), strict=True)
    for theirs, mine in pairs:
        theirs._codebook.initted.fill_(True)
        mine.codebook.data.copy_(theirs._codebook.embed[0])
        mine.initialized.fill_(True)
    phi = {k: v for k, v in reference.state_dict().items() if k.startswith("phi")}
    ours.load_state_dict({**ours.state_dict(), **phi})


def test_hierarchical_matches_the_library_in_eval():
    torch.manual_seed(31)
    options = dict(dim=8, codebook_size=32, scales=(1, 3, 8), channel_first=False,
                   shared_codebook=False, share_quant_resi=2)
    reference, ours = lib.HierarchicalVQ(**options), HierarchicalVQ(**options)
    _copy_codebooks(reference, ours)
    reference.eval(), ours.eval()
    x = torch.randn(2, 8, 8)
    mask = torch.rand(2, 8) > 0.3
    for kwargs in ({}, {"mask": mask}):
        rr, ir, _ = reference(x, **kwargs)
        ro, io, _ = ours(x, **kwargs)
        torch.testing.assert_close(ro, rr)
        assert all(torch.equal(a, b) for a, b in zip(ir, io, strict=True))
    assert (ours(x, mask=mask)[0][~mask] == 0).all()


def test_hierarchical_training_updates_eval_does_not_and_non_finite_is_refused():
    torch.manual_seed(32)
    hvq = HierarchicalVQ(dim=4, codebook_size=8, scales=(1, 2, 4), accept_image_fmap=True)
    x = torch.randn(4, 4, 4, 4, requires_grad=True)
    state = {k: v.clone() for k, v in hvq.state_dict().items()}
    bad = x.detach().clone()
    bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(QuantizerInputError, match="non-finite"):
        hvq(bad)
    assert all(torch.equal(state[k], v) for k, v in hvq.state_dict().items())
    recon, indices, loss = hvq(x)
    (recon.sum() + loss).backward()
    assert x.grad is not None and hvq.phi_shared.conv.weight.grad is not None
    assert not torch.equal(state["vq._codebook.embed"][0], hvq.vq.codebook)
    hvq.eval()
    state = {k: v.clone() for k, v in hvq.state_dict().items()}
    hvq(x)
    assert all(torch.equal(state[k], v) for k, v in hvq.state_dict().items())


def test_hierarchical_nested_dropout_keeps_a_prefix_of_levels():
    torch.manual_seed(33)
    hvq = HierarchicalVQ(dim=4, codebook_size=8, scales=(1, 2, 4, 4), accept_image_fmap=True,
                         nested_dropout=1.0, kmeans_init=False, decay=0.5,
                         threshold_ema_dead_code=0)
    cutoffs = {hvq(torch.randn(2, 4, 4, 4), return_cutoff=True)[3] for _ in range(12)}
    assert cutoffs <= {0, 1, 2} and len(cutoffs) > 1
    hvq.eval()
    assert hvq(torch.randn(2, 4, 4, 4), return_cutoff=True)[3] is None


# ---------------------------------------------------------------------------- Sequential


def test_sequential_runs_the_modules_and_returns_the_quantizer_outputs():
    torch.manual_seed(40)
    proj_in, vq, proj_out = nn.Linear(6, 4), SimVQ(dim=4, codebook_size=8), nn.Linear(4, 6)
    model = Sequential(proj_in, vq, proj_out)
    x = torch.randn(2, 5, 6)
    out, indices, loss = model(x)
    quantized, expected_indices, expected_loss = vq(proj_in(x))
    torch.testing.assert_close(out, proj_out(quantized))
    assert torch.equal(indices, expected_indices) and torch.equal(loss, expected_loss)
    with pytest.raises(ValueError, match="exactly one quantizer"):
        Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="exactly one quantizer"):
        Sequential(SimVQ(dim=4, codebook_size=8), vqvae.VectorQuantize(4, 8))
    # keyword arguments go to the quantizer
    residual = ResidualSimVQ(dim=6, num_quantizers=2, codebook_size=8)
    outputs = Sequential(nn.Identity(), residual)(x, return_all_codes=True)
    assert len(outputs) == 4 and outputs[3].shape == (2, 2, 5, 6)


@pytest.mark.parametrize("make", [
    lambda: vqvae.FSQ(levels=[5, 4, 3], dim=4),
    lambda: vqvae.ResidualFSQ(levels=[5, 4, 3], dim=4, num_quantizers=2),
    lambda: vqvae.GroupedResidualFSQ(levels=[5, 4, 3], dim=4, groups=2, num_quantizers=2),
    lambda: vqvae.FSP(levels=[5, 4, 3], dim=4),
    lambda: vqvae.LatentQuantize(levels=[5, 4, 3], dim=4),
    lambda: vqvae.LFQ(dim=4, codebook_size=16),
    lambda: vqvae.ResidualLFQ(dim=4, codebook_size=16, num_quantizers=2),
    lambda: vqvae.GroupedResidualLFQ(dim=4, codebook_size=16, groups=2, num_quantizers=2),
    lambda: vqvae.VectorQuantize(dim=4, codebook_size=8),
    lambda: vqvae.RandomProjectionQuantizer(dim=4, codebook_size=8, codebook_dim=4),
], ids=lambda make: type(make()).__name__)
def test_sequential_takes_every_quantizer_class_the_library_takes(make):
    quantizer = make()
    model = Sequential(nn.Linear(4, 4), quantizer)  # refused before
    assert model(torch.randn(2, 3, 4)) is not None
    with pytest.raises(ValueError, match="exactly one quantizer, got 2"):
        Sequential(quantizer, make())


def test_simvq_eval_reuses_the_codebook_until_the_map_changes():
    torch.manual_seed(0)
    vq = SimVQ(dim=16, codebook_size=32).eval()
    x = torch.randn(2, 10, 16)
    calls = []
    vq.code_transform.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        first = vq(x)
        second = vq(x)
    assert len(calls) == 1 and torch.equal(first.quantized, second.quantized)
    # an optimizer step changes the map in place: the next call sees the new codebook
    optimizer = torch.optim.SGD(vq.parameters(), lr=0.5)
    _, _, loss = vq(x)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        after = vq(x)
    codes = vq.codebook.detach()
    assert torch.allclose(after.quantized, codes[after.indices])
    assert torch.equal(after.indices, cdist_argmin(x, codes).reshape(2, 10))
    # so does loading other weights, and replacing the frozen codebook
    other = SimVQ(dim=16, codebook_size=32)
    vq.load_state_dict(other.state_dict())
    with torch.no_grad():
        loaded = vq(x)
        assert torch.equal(loaded.quantized, other.codebook[loaded.indices])
        vq.frozen_codebook.mul_(2.0)
        doubled = vq(x)
        assert torch.equal(doubled.quantized, vq.codebook[doubled.indices])


@pytest.mark.parametrize("fused", [False, True])
def test_simvq_eval_sees_every_optimizer_step(fused):
    # Adam(fused=True), what training uses, updates the map in place without bumping its
    # version counter: evaluation after a step must still use the new codebook
    torch.manual_seed(1)
    vq = SimVQ(dim=16, codebook_size=64)
    optimizer = torch.optim.Adam(vq.parameters(), lr=0.05, fused=fused)
    x = torch.randn(200, 16)
    for _ in range(3):
        vq.eval()
        with torch.no_grad():
            quantized, indices, _ = vq(x)
        codes = vq.frozen_codebook.double() @ vq.code_transform.weight.detach().double().T
        assert torch.equal(indices, torch.cdist(x.double(), codes).argmin(-1))
        torch.testing.assert_close(quantized.double(), codes[indices], rtol=1e-6, atol=1e-6)
        vq.train()
        optimizer.zero_grad()
        vq(x)[2].backward()
        optimizer.step()
