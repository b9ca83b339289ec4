"""LFQ family: sign quantisation, index order, exact entropies, gradients, dtypes, bad input,
and drop-in agreement with vector_quantize_pytorch where the library is right."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import vector_quantize_pytorch as library

from vqvae import LFQ, BinaryMapper, EvoLFQ, GroupedResidualLFQ, QuantizerInputError, ResidualLFQ


def np_lfq(x: np.ndarray, k: int, scale: float, spherical: bool = False):
    """Sign quantisation from the paper: code = scale * sign(x) (zero goes to -), index =
    the bits x_d > 0 read most significant first."""
    a = scale / math.sqrt(k) if spherical else scale
    q = np.where(x > 0, a, -a)
    idx = ((x > 0) * (2 ** np.arange(k - 1, -1, -1))).sum(-1)
    return q, idx


def full_entropies(x: np.ndarray, k: int, a: float, temp: float):
    """Per-sample and batch entropy from the full distribution q(c|x) = softmax(-T||x-c||^2)
    over all 2^k codes, float64: x is (M, C, k)."""
    bits = np.array(list(itertools.product([0, 1], repeat=k)), dtype=np.float64)
    codes = (2 * bits - 1) * a  # (2^k, k), row j has the bits of j, most significant first
    d2 = ((x[..., None, :] - codes) ** 2).sum(-1)  # (M, C, 2^k)
    logits = -temp * d2
    logits -= logits.max(-1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(-1, keepdims=True)
    h = lambda q: -(q * np.log(np.where(q > 0, q, 1))).sum(-1)  # noqa: E731
    return h(p).mean(), h(p.mean(0)).mean()


# quantisation and indices


@pytest.mark.parametrize("spherical", [False, True])
def test_sign_quantisation_matches_numpy(spherical):
    torch.manual_seed(0)
    lfq = LFQ(dim=6, codebook_scale=0.5, spherical=spherical).eval()
    x = torch.randn(3, 40, 6)
    x[0, 0, 2] = 0.0  # zero quantises to the negative code
    q, idx, loss = lfq(x)
    xn = x.numpy()
    if spherical:
        xn = xn / np.linalg.norm(xn, axis=-1, keepdims=True)
    q_ref, idx_ref = np_lfq(xn, 6, 0.5, spherical)
    np.testing.assert_allclose(q.numpy(), q_ref, rtol=1e-6)
    np.testing.assert_array_equal(idx.numpy(), idx_ref)
    assert idx.dtype == torch.int64 and loss.item() == 0.0


def test_index_code_round_trip_over_whole_code_space():
    lfq = LFQ(codebook_size=64, num_codebooks=2).eval()
    every = torch.arange(64)
    indices = torch.stack([every, every.flip(0)], -1)[None]  # (1, 64, 2)
    codes = lfq.indices_to_codes(indices)  # (1, 64, 12)
    assert set(codes.unique().tolist()) == {-1.0, 1.0}
    q, back, _ = lfq(codes)
    assert torch.equal(back, indices) and torch.equal(q, codes)
    assert len({tuple(c) for c in codes[0, :, :6].tolist()}) == 64


def test_indices_and_codes_agree_with_library():
    torch.manual_seed(0)
    ours = LFQ(codebook_size=256, num_codebooks=2, dim=20).eval()
    ref = library.LFQ(codebook_size=256, num_codebooks=2, dim=20).eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 20, 5, 3)
    q, idx, _ = ours(x)
    q_ref, idx_ref, _ = ref(x)
    assert torch.equal(idx, idx_ref) and torch.allclose(q, q_ref, atol=1e-6)
    assert torch.allclose(ours.indices_to_codes(idx), ref.indices_to_codes(idx_ref), atol=1e-6)
    assert torch.equal(ours.codebook, ref.codebook)


# entropies


@pytest.mark.parametrize("k,codebooks,scale,spherical,temp", [
    (4, 1, 1.0, False, 100.0), (7, 2, 0.5, False, 3.0), (10, 1, 2.0, True, 1.0),
    (9, 1, 1.0, False, 0.2)])
def test_entropies_match_full_distribution(k, codebooks, scale, spherical, temp):
    torch.manual_seed(k)
    lfq = LFQ(codebook_size=2**k, num_codebooks=codebooks, codebook_scale=scale,
              spherical=spherical, commitment_loss_weight=0.3, diversity_gamma=0.7)
    x = torch.randn(2, 30, k * codebooks) * 0.3
    (q, _, loss), parts = lfq(x, inv_temperature=temp, return_loss_breakdown=True)
    xn = x.double().numpy().reshape(60, codebooks, k)
    a = scale
    if spherical:
        xn = scale * xn / np.linalg.norm(xn, axis=-1, keepdims=True)
        a = scale / math.sqrt(k)
    per_sample, batch = full_entropies(xn, k, a, temp)
    assert parts.per_sample_entropy.item() == pytest.approx(per_sample, rel=1e-4, abs=1e-5)
    assert parts.batch_entropy.item() == pytest.approx(batch, rel=1e-5)
    commit = ((xn - np.where(xn > 0, a, -a)) ** 2).mean()
    assert parts.commitment.item() == pytest.approx(commit, rel=1e-5)
    # MAGVIT-v2: weight * (E[H(q)] - gamma H(E[q])) + commitment weight * commitment
    expected = 0.1 * (per_sample - 0.7 * batch) + 0.3 * commit
    assert loss.item() == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_entropy_gradient_matches_autograd_on_the_textbook_expression():
    torch.manual_seed(1)
    k, temp = 6, 2.0
    x = torch.randn(40, k, dtype=torch.float64) * 0.4
    codes = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=k)), dtype=torch.float64)
    x_ref = x.clone().requires_grad_()
    p = (-temp * torch.cdist(x_ref, codes) ** 2).softmax(-1)
    h = lambda q: -(q * q.log()).sum(-1)  # noqa: E731
    (h(p).mean() - h(p.mean(0))).backward()

    lfq = LFQ(dim=k, entropy_loss_weight=1.0)
    x_ours = x.float()[None].requires_grad_()
    _, _, loss = lfq(x_ours, inv_temperature=temp)
    loss.backward()
    assert torch.allclose(x_ours.grad[0].double(), x_ref.grad, rtol=1e-3, atol=1e-6)


def test_straight_through_and_commitment_gradients():
    lfq = LFQ(dim=4, entropy_loss_weight=0.0, commitment_loss_weight=1.0)
    x = torch.tensor([[[0.3, -2.0, 1.5, -0.1]]], requires_grad=True)
    q, _, loss = lfq(x)
    (q.sum() + loss).backward()
    # d/dx [sum(q) via identity] + d/dx mean((x - sign x)^2) = 1 + 2 (x - sign x) / 4
    expected = 1 + 2 * (x.detach() - torch.sign(x.detach())) / 4
    assert torch.allclose(x.grad, expected)


def test_saturated_temperature_stays_finite():
    lfq = LFQ(codebook_size=2**12)
    x = (torch.randn(1, 64, 12) * 5).requires_grad_()
    (_, _, loss), parts = lfq(x, inv_temperature=1e4, return_loss_breakdown=True)
    loss.backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(loss)
    assert parts.per_sample_entropy.item() < 1e-3  # near-certain codes


def test_mask_uses_only_kept_tokens_library_diversity_term_vanishes():
    torch.manual_seed(2)
    x = torch.randn(2, 10, 5) * 0.3
    mask = torch.rand(2, 10) > 0.4
    lfq = LFQ(dim=5, commitment_loss_weight=1.0)
    _, parts = lfq(x, inv_temperature=1.0, mask=mask, return_loss_breakdown=True)
    _, kept = lfq(x[mask][None], inv_temperature=1.0, return_loss_breakdown=True)
    for a, b in zip(parts, kept, strict=True):
        assert a.item() == pytest.approx(b.item(), rel=1e-6)
    assert parts.batch_entropy > parts.per_sample_entropy + 0.1
    # the library's masked "batch" entropy is the per-sample one (its mean runs over no axis)
    _, ref = library.LFQ(dim=5)(x, inv_temperature=1.0, mask=mask, return_loss_breakdown=True)
    assert ref.batch_entropy.item() == pytest.approx(ref.per_sample_entropy.item(), rel=1e-5)


def test_exact_where_library_log_clamp_underestimates():
    torch.manual_seed(11)
    x = torch.randn(1, 40, 12) * 0.05
    _, parts = LFQ(dim=12)(x, inv_temperature=10.0, return_loss_breakdown=True)
    _, ref = library.LFQ(dim=12)(x, inv_temperature=10.0, return_loss_breakdown=True)
    per_sample, batch = full_entropies(x.double().numpy().reshape(40, 1, 12), 12, 1.0, 10.0)
    assert parts.per_sample_entropy.item() == pytest.approx(per_sample, rel=1e-5)
    assert parts.batch_entropy.item() == pytest.approx(batch, rel=1e-5)
    # the library's log(max(p, 1e-5)) drops -p log(p / 1e-5) for every code below 1e-5
    assert ref.per_sample_entropy.item() < per_sample - 2e-3


def test_agrees_with_library_loss_where_library_is_right():
    torch.manual_seed(3)
    ours, ref = LFQ(codebook_size=128, dim=24), library.LFQ(codebook_size=128, dim=24)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 6, 24) * 0.3
    (q, i, loss), parts = ours(x, inv_temperature=1.0, return_loss_breakdown=True)
    (q_r, i_r, loss_r), parts_r = ref(x, inv_temperature=1.0, return_loss_breakdown=True)
    assert torch.equal(i, i_r) and torch.allclose(q, q_r, atol=1e-6)
    assert loss.item() == pytest.approx(loss_r.item(), rel=1e-4)
    assert parts.batch_entropy.item() == pytest.approx(parts_r.batch_entropy.item(), rel=1e-5)


def test_gradient_at_the_default_temperature_matches_textbook_and_library():
    # the preset's setting (2^9 codes, inv_temperature 100): ours, the library in float32 and
    # autograd on the textbook expression in float64 give the entropy penalty one gradient, so
    # the codes collapsing without `spherical` is the penalty's doing, not a formula's
    torch.manual_seed(4)
    k, temp = 9, 100.0
    x = torch.randn(300, k, dtype=torch.float64) * 0.02
    codes = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=k)), dtype=torch.float64)
    x_ref = x.clone().requires_grad_()
    p = (2 * temp * x_ref @ codes.T).softmax(-1)  # -T ||x - c||^2 up to a per-row constant
    h = lambda q: -(q * q.clamp_min(1e-300).log()).sum(-1)  # noqa: E731
    (h(p).mean() - h(p.mean(0))).backward()
    grads = []
    for quantizer in (LFQ(dim=k, entropy_loss_weight=1.0),
                      library.LFQ(dim=k, entropy_loss_weight=1.0)):
        xi = x.float()[None].requires_grad_()
        quantizer(xi, inv_temperature=temp)[2].backward()
        grads.append(xi.grad[0].double())
    scale = x_ref.grad.norm()
    assert (grads[0] - x_ref.grad).norm() < 1e-4 * scale
    assert (grads[1] - x_ref.grad).norm() < 2e-2 * scale  # the library's clamp at 1e-5


def test_entropy_penalty_rewards_growing_inputs_unless_spherical():
    # the per-sample entropy falls and the batch entropy's gradient vanishes as the inputs grow
    # (so an encoder can escape the penalty by growing its outputs); on the sphere the scale
    # does not exist
    torch.manual_seed(5)
    k, temp = 9, 100.0
    x = torch.randn(1, 500, k) * 0.05
    per_sample, grad_norm = [], []
    for factor in (1.0, 100.0):
        xi = (x * factor).requires_grad_()
        (_, _, _), parts = LFQ(dim=k)(xi, inv_temperature=temp, return_loss_breakdown=True)
        parts.batch_entropy.backward()
        per_sample.append(parts.per_sample_entropy.item())
        grad_norm.append(xi.grad.norm().item())  # what reaches the encoder
    xn = (x / x.norm(dim=-1, keepdim=True)).double().numpy().reshape(500, 1, k)
    assert per_sample[1] < 0.05 * per_sample[0] and grad_norm[1] < 0.3 * grad_norm[0]
    spherical = LFQ(dim=k, spherical=True)
    expected = full_entropies(xn, k, 1 / math.sqrt(k), temp)  # unit inputs, codes of norm 1
    for factor in (1.0, 100.0):
        _, parts = spherical(x * factor, inv_temperature=temp, return_loss_breakdown=True)
        assert parts.per_sample_entropy.item() == pytest.approx(expected[0], rel=1e-4, abs=1e-5)
        assert parts.batch_entropy.item() == pytest.approx(expected[1], rel=1e-5)


def test_options_frac_softclamp_softplus_rotation_cosine():
    torch.manual_seed(4)
    x = torch.randn(2, 16, 12)
    lfq = LFQ(dim=12, codebook_size=256, frac_per_sample_entropy=0.5, soft_clamp_input_value=2.0,
              experimental_softplus_entropy_loss=True, orthogonal_rotation=True,
              cosine_sim_project_in=True)
    (q, idx, loss), parts = lfq(x, return_loss_breakdown=True)
    assert q.shape == x.shape and idx.shape == (2, 16) and loss > 0
    lfq.eval()
    q, idx, _ = lfq(x)
    assert torch.allclose(lfq.indices_to_codes(idx), q, atol=1e-6)


# dtypes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(dtype):
    torch.manual_seed(5)
    lfq = LFQ(dim=8)
    x = torch.randn(2, 16, 8)
    q32, i32, l32 = lfq(x)
    q, i, loss = lfq(x.to(dtype))
    assert q.dtype == dtype and torch.equal(i, i32) and torch.equal(q.float(), q32)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(l32.item(), abs=0.02)


def test_cpu_autocast_keeps_entropy_in_float32():
    torch.manual_seed(6)
    lfq = LFQ(dim=32, codebook_size=2**10)
    x = torch.randn(2, 50, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (q, i, loss), parts = lfq(x, inv_temperature=1.0, return_loss_breakdown=True)
        projected = lfq.project_in(x)  # what the quantiser saw: bfloat16
    assert projected.dtype == torch.bfloat16
    assert loss.dtype == torch.float32 and q.dtype == torch.bfloat16
    # the entropies of exactly that input, in float64: no bfloat16 rounding inside them
    seen = projected.detach().double().numpy().reshape(100, 1, 10)
    per_sample, batch = full_entropies(seen, 10, 1.0, 1.0)
    assert parts.per_sample_entropy.item() == pytest.approx(per_sample, rel=1e-5)
    assert parts.batch_entropy.item() == pytest.approx(batch, rel=1e-5)
    assert torch.equal(i, (projected > 0).long() @ (2 ** torch.arange(9, -1, -1)))
    # the library turns off CUDA autocast only: on CPU its entropies come out bfloat16-rounded
    ref = library.LFQ(dim=32, codebook_size=2**10)
    ref.load_state_dict(lfq.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, ref_parts = ref(x, inv_temperature=1.0, return_loss_breakdown=True)
    ref_error = abs(ref_parts.per_sample_entropy.item() - per_sample)
    assert ref_error > 10 * abs(parts.per_sample_entropy.item() - per_sample)


# bad input


def test_non_finite_and_bad_input_raise():
    lfq = LFQ(dim=4)
    for bad in (float("nan"), float("inf")):
        x = torch.zeros(1, 3, 4)
        x[0, 1, 2] = bad
        with pytest.raises(QuantizerInputError, match="NaN or infinite"):
            lfq(x)
    with pytest.raises(QuantizerInputError, match="size 4"):
        lfq(torch.zeros(1, 3, 5))
    with pytest.raises(QuantizerInputError, match="floating"):
        lfq(torch.zeros(1, 3, 4, dtype=torch.long))
    with pytest.raises(QuantizerInputError, match=r"\[0, 16\)"):
        lfq.indices_to_codes(torch.tensor([[16]]))
    with pytest.raises(QuantizerInputError, match="mask"):
        lfq(torch.zeros(1, 3, 4), mask=torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="power of 2"):
        LFQ(codebook_size=100)
    rlfq = ResidualLFQ(dim=8, codebook_size=16, num_quantizers=2)
    before = {k: v.clone() for k, v in rlfq.state_dict().items()}
    with pytest.raises(QuantizerInputError):
        rlfq(torch.full((1, 2, 8), float("nan")))
    assert all(torch.equal(v, rlfq.state_dict()[k]) for k, v in before.items())


# the library's README examples, import swapped


def test_readme_examples():
    quantizer = LFQ(codebook_size=65536, dim=16, entropy_loss_weight=0.1, diversity_gamma=1.0)
    image_feats = torch.randn(1, 16, 32, 32)
    quantized, indices, entropy_aux_loss = quantizer(image_feats, inv_temperature=100.0)
    assert quantized.shape == (1, 16, 32, 32) and indices.shape == (1, 32, 32)
    assert entropy_aux_loss.shape == ()
    assert (quantized == quantizer.indices_to_codes(indices)).all()

    seq = torch.randn(1, 32, 16)
    quantized, *_ = quantizer(seq)
    assert seq.shape == quantized.shape
    video_feats = torch.randn(1, 16, 10, 32, 32)
    quantized, *_ = quantizer(video_feats)
    assert video_feats.shape == quantized.shape

    quantizer = LFQ(codebook_size=4096, dim=16, num_codebooks=4)
    quantized, indices, entropy_aux_loss = quantizer(image_feats)
    assert quantized.shape == image_feats.shape and indices.shape == (1, 32, 32, 4)
    assert (quantized == quantizer.indices_to_codes(indices)).all()

    residual_lfq = ResidualLFQ(dim=256, codebook_size=256, num_quantizers=8)
    x = torch.randn(1, 1024, 256)
    residual_lfq.eval()
    quantized, indices, commit_loss = residual_lfq(x)
    assert quantized.shape == x.shape and indices.shape == (1, 1024, 8)
    assert commit_loss.shape == (8,)
    assert torch.all(quantized == residual_lfq.get_output_from_indices(indices))


# residual and grouped


def test_residual_matches_library_and_decodes_dropped_layers_to_zero():
    torch.manual_seed(7)
    ours = ResidualLFQ(dim=32, codebook_size=64, num_quantizers=4, quantize_dropout=True)
    ref = library.ResidualLFQ(dim=32, codebook_size=64, num_quantizers=4, quantize_dropout=True)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 9, 32)
    out = ours(x, rand_quantize_dropout_fixed_seed=5, return_all_codes=True)
    out_r = ref(x, rand_quantize_dropout_fixed_seed=5, return_all_codes=True)
    assert torch.equal(out[1], out_r[1]) and (out[1] == -1).any()
    for a, b in zip(out, out_r, strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-5)
    assert torch.equal(ours.codebooks, ref.codebooks)
    codes = ours.get_codes_from_indices(out[1])
    assert (codes[(out[1] == -1).movedim(-1, 0)] == 0).all()
    # layer i codes are +-2^-i
    kept = codes[1][out[1][..., 1] != -1]
    assert set(kept.abs().unique().tolist()) == {0.5}


def test_grouped_residual_matches_library():
    torch.manual_seed(8)
    kw = dict(dim=32, groups=2, codebook_size=16, num_quantizers=3)
    ours, ref = GroupedResidualLFQ(**kw), library.GroupedResidualLFQ(**kw)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 7, 32)
    q, idx, losses = ours(x)
    q_r, idx_r, losses_r = ref(x)
    assert torch.equal(idx, idx_r) and idx.shape == (2, 2, 7, 3) and losses.shape == (2, 3)
    assert torch.allclose(q, q_r, atol=1e-6) and torch.allclose(losses, losses_r, rtol=1e-4)
    ours.eval()
    q, idx, _ = ours(x)
    assert torch.equal(q, ours.get_output_from_indices(idx))


# BinaryMapper


def test_binary_mapper_probabilities_log_prob_and_aux_loss():
    torch.manual_seed(9)
    mapper = BinaryMapper(bits=4)
    logits = torch.randn(3, 5, 4, requires_grad=True)
    one_hot, idx, aux = mapper(logits, return_indices=True)
    assert one_hot.shape == (3, 5, 16) and torch.equal(one_hot.argmax(-1), idx)
    p = torch.sigmoid(logits.detach()).double().numpy()
    bits = ((np.arange(16)[:, None] >> np.arange(4)) & 1).astype(bool)  # least significant first
    probs = np.where(bits, p[..., None, :], 1 - p[..., None, :]).prod(-1)  # (3, 5, 16)
    grad_soft = torch.autograd.grad((one_hot * torch.arange(16.0)).sum(), logits,
                                    retain_graph=True)[0]
    probs_t = torch.tensor(probs, requires_grad=True)
    logits64 = logits.detach().double().requires_grad_()
    q = torch.where(torch.tensor(bits), torch.sigmoid(logits64)[..., None, :],
                    1 - torch.sigmoid(logits64)[..., None, :]).prod(-1)
    (q * torch.arange(16.0, dtype=torch.float64)).sum().backward()
    assert torch.allclose(grad_soft.double(), logits64.grad, atol=1e-5) and probs_t is not None
    logp = mapper.log_prob(logits.detach(), indices=idx).double().numpy()
    np.testing.assert_allclose(logp, np.log(np.take_along_axis(probs, idx.numpy()[..., None],
                                                               -1)[..., 0]), rtol=1e-5)
    h = -(probs * np.log(probs)).sum(-1)
    assert aux.item() == pytest.approx(np.maximum(4 * math.log(2) - h - math.log(2), 0).mean(),
                                       rel=1e-5)


def test_binary_mapper_matches_library_and_deterministic_eval():
    logits = torch.randn(6, 8)
    ours, ref = BinaryMapper(bits=8, deterministic_on_eval=True), library.BinaryMapper(bits=8)
    torch.manual_seed(0)
    a = ours(logits, return_indices=True)
    torch.manual_seed(0)
    b = ref(logits, return_indices=True)
    assert torch.equal(a[1], b[1]) and torch.allclose(a[2], b[2], atol=1e-6)
    ours.eval()
    one, _ = ours(logits)
    assert torch.equal(one.argmax(-1), ((logits > 0).long() * 2 ** torch.arange(8)).sum(-1))
    with pytest.raises(QuantizerInputError):
        ours(torch.full((2, 8), float("nan")))


# EvoLFQ


def test_evo_lfq_best_gene_earns_its_fitness():
    torch.manual_seed(10)
    encoder, decoder = torch.nn.Linear(5, 6), torch.nn.Identity()
    evo = EvoLFQ(encoder, decoder, dim=6, pop_size=16, generations=8)
    target = torch.tensor([1.0, -1, 1, 1, -1, -1])

    def fitness(decoded, bits):
        return -(decoded - target).square().sum(-1)

    results = list(evo.evolve(fitness, shape=(6,)))
    last = results[-1]
    assert fitness(evo.decode_bits(last.best_gene[None]), None).item() == last.best_fitness
    assert last.best_fitness >= results[0].best_fitness
    bits = evo.encode(torch.randn(4, 5))
    assert torch.equal(evo.decode_bits(bits), evo.lfq.indices_to_codes(
        (bits.long() * 2 ** torch.arange(5, -1, -1)).sum(-1)[:, None])[:, 0])
    out = evo(torch.randn(3, 5))
    assert out.reconstructed.shape == (3, 6) and out.indices.shape == (3,)


def test_mean_distribution_at_2_to_18_codes_matches_direct_products():
    from vqvae.quantizers.lfq_entropy import mean_distribution

    torch.manual_seed(12)
    logits = torch.randn(1, 64, 18) * 2
    avg = mean_distribution(logits)[0]  # (2^18,), never an N x 2^18 matrix
    assert avg.shape == (2**18,) and avg.sum().item() == pytest.approx(1.0, abs=1e-5)
    p = torch.sigmoid(logits[0].double())  # (64, 18): probability that each bit is set
    for j in torch.randint(0, 2**18, (6,)).tolist() + [0, 2**18 - 1]:
        bits = torch.tensor([(j >> (17 - d)) & 1 for d in range(18)], dtype=torch.bool)
        direct = torch.where(bits, p, 1 - p).prod(-1).mean().item()
        assert avg[j].item() == pytest.approx(direct, rel=1e-4, abs=1e-12)


def test_evo_lfq_encode_and_decode_match_library():
    torch.manual_seed(13)
    encoder, decoder = torch.nn.Linear(5, 8), torch.nn.Linear(8, 3)
    kw = dict(codebook_size=16, num_codebooks=2)
    ours = EvoLFQ(encoder, decoder, **kw)
    ref = library.EvoLFQ(encoder, decoder, **kw)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 5)
    assert torch.equal(ours.encode(x), ref.encode(x))
    assert torch.equal(ours.encode(x, return_signs=True), ref.encode(x, return_signs=True))
    bits = ours.init_random_population(pop_size=6, shape=(8,))
    assert torch.allclose(ours.decode_bits(bits), ref.decode_bits(bits), atol=1e-6)
    assert ours.training and ours.lfq.training  # encode/decode left the modes as they were
    with pytest.raises(QuantizerInputError):
        ours.decode_bits(torch.ones(2, 5))


def test_finite_values_whose_sum_overflows_are_accepted():
    lfq = LFQ(dim=4).eval()
    x = torch.full((1, 2, 4), 3e38)  # finite; their float32 sum is inf
    q, idx, _ = lfq(x)
    assert (idx == 15).all() and (q == 1).all()
    grouped = GroupedResidualLFQ(dim=8, groups=2, codebook_size=4, num_quantizers=2)
    with pytest.raises(QuantizerInputError, match="NaN or infinite"):
        grouped(torch.tensor([[[0.0] * 7 + [float("-inf")]]]))


def test_mean_distribution_stays_a_distribution_for_huge_logits():
    """Logits of the size a diverging encoder gives (1e6..1e9): every setting's probability
    must stay in [0, 1] and sum to 1. Written as log sigmoid(-l) + l, log P cancelled terms of
    the logits' size and the rounding left positive values whose exp overflowed (a training
    loss of 1e22, then NaN)."""
    from vqvae.quantizers.lfq_entropy import batch_entropy, mean_distribution

    gen = torch.Generator().manual_seed(0)
    for scale in (1e6, 1e9):
        logits = torch.randn(1, 64, 9, generator=gen) * scale
        avg = mean_distribution(logits)
        assert torch.isfinite(avg).all()
        assert (avg >= 0).all() and (avg <= 1 + 1e-6).all()
        torch.testing.assert_close(avg.sum(-1), torch.ones(1), rtol=1e-5, atol=1e-5)
        # the nearly one-hot rows: the entropy of their mean is at most log(64 samples)
        assert 0 <= float(batch_entropy(logits)) <= math.log(64) + 1e-4
