"""ResidualVQ, its RQ-VAE form (shared codebook, stochastic sampling) and GroupedResidualVQ,
against independent NumPy / float64 / plain-autograd computations."""

import copy
import functools
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_state_equal, state

from vqvae import GroupedResidualVQ, QuantizerInputError, ResidualVQ
from vqvae.quantizers.estimators import quantize

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def numpy_residual(x: np.ndarray, codebooks: list[np.ndarray]):
    """Textbook residual VQ in float64: indices, sum of codes, residuals, per-layer MSE."""
    residual, total = x.copy(), np.zeros_like(x)
    indices, residuals, mses = [], [], []
    for codebook in codebooks:
        d2 = ((residual[:, None, :] - codebook[None, :, :]) ** 2).sum(-1)
        index = d2.argmin(1)
        q = codebook[index]
        residuals.append(residual)
        mses.append(((residual - q) ** 2).mean())
        indices.append(index)
        total = total + q
        residual = residual - q
    return np.stack(indices, -1), total, residuals, mses


def reference_forward(x: torch.Tensor, codebooks: list[torch.Tensor], commitment_weight: float,
                      codebook_weight: float = 0.0):
    """Residual VQ with textbook autograd expressions (no custom autograd function)."""
    residual, total, loss = x, torch.zeros_like(x), x.new_zeros(())
    for codebook in codebooks:
        index = torch.cdist(residual.detach(), codebook.detach()).argmin(-1)
        q = F.embedding(index, codebook)
        loss = loss + commitment_weight * F.mse_loss(residual, q.detach())
        loss = loss + codebook_weight * F.mse_loss(residual.detach(), q)
        residual = residual - q.detach()
        total = total + q.detach()
    return x + (total - x).detach(), loss / len(codebooks)


# ---------------------------------------------------------------- the residual computation


@pytest.mark.parametrize("num_quantizers", [1, 3])
def test_matches_numpy_residual_quantization(num_quantizers):
    torch.manual_seed(0)
    rvq = ResidualVQ(6, 16, num_quantizers, commitment_weight=0.7).double()
    x = torch.randn(3, 40, 6, dtype=torch.float64)
    quantized, indices, loss = rvq(x, freeze_codebook=True)  # training: losses (L,), per depth
    codebooks = [c.numpy() for c in rvq.codebooks]
    expected_indices, total, _, mses = numpy_residual(x.reshape(-1, 6).numpy(), codebooks)
    assert indices.shape == (3, 40, num_quantizers) and indices.dtype == torch.int64
    np.testing.assert_array_equal(indices.reshape(-1, num_quantizers).numpy(), expected_indices)
    np.testing.assert_allclose(quantized.reshape(-1, 6).numpy(), total, rtol=1e-12, atol=1e-12)
    # each depth's loss is that layer's commitment loss
    np.testing.assert_allclose(loss.numpy(), 0.7 * np.asarray(mses), rtol=1e-6)
    assert not rvq.eval()(x).loss.any()  # zero in eval, as the library


@pytest.mark.parametrize("kwargs", [dict(), dict(commitment_weight=0.3),
                                    dict(decay=None, codebook_weight=0.5),
                                    dict(decay=None, shared_codebook=True)])
def test_gradients_match_textbook_autograd(kwargs):
    torch.manual_seed(1)
    # straight_through_sum: the output's gradient reaches x once (the models' setting)
    rvq = ResidualVQ(5, 12, 3, straight_through_sum=True, **kwargs).double()
    x = torch.randn(30, 5, dtype=torch.float64, requires_grad=True)
    g = torch.randn(30, 5, dtype=torch.float64)
    quantized, _, losses = rvq(x, freeze_codebook=True)
    loss = losses.mean()
    ((quantized * g).sum() + 3.0 * loss).backward()

    reference = copy.deepcopy(rvq)
    x_ref = x.detach().clone().requires_grad_(True)
    out, ref_loss = reference_forward(x_ref, list(reference.codebooks),
                                      kwargs.get("commitment_weight", 1.0),
                                      kwargs.get("codebook_weight", 1.0) if "decay" in kwargs
                                      else 0.0)
    ((out * g).sum() + 3.0 * ref_loss).backward()
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)  # the loss is float32
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-12)
    if "decay" in kwargs:  # learnable codebooks get the codebook term's gradient
        for ours, ref in zip(rvq.parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-10, atol=1e-12)


def test_rotation_trick_rotates_onto_the_whole_sum():
    torch.manual_seed(2)
    rvq = ResidualVQ(5, 12, 3, rotation_trick=True, commitment_weight=0.0,
                     straight_through_sum=True).double().eval()
    x = torch.randn(20, 5, dtype=torch.float64, requires_grad=True)
    g = torch.randn(20, 5, dtype=torch.float64)
    quantized, indices, _ = rvq(x)
    (quantized * g).sum().backward()
    # the single-layer estimator, applied from x to the decoded sum, is the reference
    x_ref = x.detach().clone().requires_grad_(True)
    out, _ = quantize(x_ref, rvq.decode(indices), commitment_weight=0.0, rotation=True)
    (out * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(x.grad, g)  # not straight-through


@functools.cache
def encoder_like_vectors() -> torch.Tensor:
    """MNIST test digits through the course's MLP encoder (seeded, untrained): (500·16, 16)."""
    from vqvae.data import DATASETS, find_dataset_dir, load_dataset
    from vqvae.models import VQVAE, ModelConfig

    if not os.environ.get("VQVAE_DATA_DIR") and SHARED_MNIST.is_dir():
        os.environ["VQVAE_DATA_DIR"] = str(SHARED_MNIST)
    if find_dataset_dir(DATASETS["mnist"]) is None:
        pytest.skip("MNIST not found locally: set VQVAE_DATA_DIR (tests never download)")
    images = load_dataset("mnist", "test", progress=False).as_float()[:500].unsqueeze(1)
    torch.manual_seed(3)
    with torch.no_grad():
        return VQVAE(ModelConfig()).encoder(images).reshape(-1, 16)


@pytest.mark.parametrize("kwargs", [dict(), dict(shared_codebook=True)])
def test_residual_norm_does_not_grow_on_encoder_like_data(kwargs):
    z = encoder_like_vectors()
    rvq = ResidualVQ(16, 64, 6, kmeans_init=True, threshold_ema_dead_code=1.0, **kwargs)
    # k-means on the first call, then EMA steps. A shared codebook starts at the first depth's
    # scale, and a few steps pass before the EMA has moved codes down to the residuals' scale
    for step in range(10):
        rvq.train()(z[torch.randperm(len(z), generator=torch.Generator().manual_seed(step))])
    _, indices, _ = rvq.eval()(z)
    partial = rvq.partial_reconstructions(indices)  # (N, 6, 16)
    # mean squared norm of the residual left after 0, 1, ..., 6 layers
    left = [z.pow(2).sum(-1).mean().item()] + \
        [(z - partial[:, depth]).pow(2).sum(-1).mean().item() for depth in range(6)]
    assert all(after <= before for before, after in zip(left, left[1:], strict=False)), left
    assert left[-1] < 0.8 * left[1]  # and the later layers do real work


# ---------------------------------------------------------------- decode


CONFIGS = [
    dict(),
    dict(shared_codebook=True),
    dict(decay=None),
    dict(codebook_dim=3),
    dict(rotation_trick=True, kmeans_init=True),
    dict(shared_codebook=True, stochastic_sample_codes=True, sample_codebook_temp=0.5),
]


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_decode_equals_quantized_in_eval(kwargs):
    torch.manual_seed(4)
    rvq = ResidualVQ(8, 20, 4, **kwargs)
    rvq.train()(torch.randn(64, 8))
    rvq.eval()
    x = torch.randn(3, 11, 8)
    quantized, indices, _ = rvq(x)
    assert torch.equal(rvq.decode(indices), quantized)
    assert torch.equal(rvq.get_output_from_indices(indices), quantized)
    partial = rvq.partial_reconstructions(indices)
    assert partial.shape == (3, 11, 4, 8)
    assert torch.equal(partial[..., -1, :], quantized)
    for depth in range(4):
        assert torch.equal(partial[..., depth, :], rvq.decode(indices[..., :depth + 1]))
    codes = rvq.layer_codes(indices)
    assert codes.shape == (3, 11, 4, rvq.codebook_dim)
    for depth in range(4):
        assert torch.equal(codes[..., depth, :], rvq.codebooks[depth][indices[..., depth]])


def test_grouped_decode_equals_quantized_in_eval():
    torch.manual_seed(5)
    grvq = GroupedResidualVQ(8, 20, 3, groups=2, kmeans_init=True)
    grvq.train()(torch.randn(64, 8))
    x = torch.randn(5, 7, 8)
    quantized, indices, _ = grvq.eval()(x)
    assert indices.shape == (2, 5, 7, 3)  # (groups, ..., num_quantizers), as the library
    assert torch.equal(grvq.decode(indices), quantized)
    assert torch.equal(grvq.partial_reconstructions(indices)[..., -1, :], quantized)
    assert grvq.layer_codes(indices).shape == (2, 5, 7, 3, 4)


# ---------------------------------------------------------------- shared codebook (RQ-VAE)


def numpy_ema(codebook, cluster_size, counts, sums, decay, eps):
    k = codebook.shape[0]

    def smoothed(c):
        n = c.sum()
        return (c + eps) / (n + k * eps) * n

    embed_sum = codebook * smoothed(cluster_size)[:, None]
    embed_sum = decay * embed_sum + (1 - decay) * sums
    cluster_size = decay * cluster_size + (1 - decay) * counts
    return embed_sum / smoothed(cluster_size)[:, None], cluster_size


def test_shared_codebook_is_one_tensor_updated_once_from_all_depths():
    torch.manual_seed(6)
    k, d, depths, decay, eps = 16, 4, 3, 0.7, 1e-5
    rvq = ResidualVQ(d, k, depths, shared_codebook=True, decay=decay, eps=eps).double()
    pointers = {layer.codebook.data_ptr() for layer in rvq.layers}
    assert len(pointers) == 1
    # every layer holds the one codebook, under its own keys (the library's layout)
    assert [key for key in rvq.state_dict() if key.endswith("embed")] == \
        [f"layers.{depth}._codebook.embed" for depth in range(depths)]

    codebook = rvq.codebooks[0].numpy().copy()
    cluster_size = rvq.layers[0].cluster_size.numpy().copy()
    x = torch.randn(200, d, dtype=torch.float64)
    rvq.train()(x)

    # every depth searches the codebook as it was before the call ...
    indices, _, residuals, _ = numpy_residual(x.numpy(), [codebook] * depths)
    counts = sum(np.bincount(indices[:, depth], minlength=k) for depth in range(depths))
    sums = sum(np.eye(k)[indices[:, depth]].T @ residuals[depth] for depth in range(depths))
    # ... and, as the library, the statistics take one EMA step per depth (the codes, the
    # smoothed ratio of the EMA sums and sizes, come out the same as recomputed per step)
    expected, expected_size = codebook, cluster_size
    for depth in range(depths):
        one_hot = np.eye(k)[indices[:, depth]]
        expected, expected_size = numpy_ema(expected, expected_size, one_hot.sum(0),
                                            one_hot.T @ residuals[depth], decay, eps)
    np.testing.assert_allclose(rvq.layers[0].cluster_size.numpy(), expected_size, rtol=1e-12)
    np.testing.assert_allclose(rvq.codebooks[0].numpy(), expected, rtol=1e-10, atol=1e-12)
    # one step from the statistics of all depths together would have given something else
    summed, _ = numpy_ema(codebook, cluster_size, counts, sums, decay, eps)
    assert not np.allclose(summed, expected)
    assert {layer.codebook.data_ptr() for layer in rvq.layers} == pointers  # still shared


def test_shared_codebook_dead_codes_restart_from_every_depth():
    torch.manual_seed(7)
    rvq = ResidualVQ(4, 8, 2, shared_codebook=True, threshold_ema_dead_code=1.0)
    with torch.no_grad():
        rvq.layers[0].codebook[3] += 100.0  # far away: no vector picks it
        rvq.layers[0].cluster_size.fill_(50.0)
        rvq.layers[0].cluster_size[3] = 0.5
    x = torch.randn(300, 4)
    before = rvq.codebooks[0].clone()
    _, indices, _ = rvq.train()(x)
    # the replacement is one of the residuals some depth quantized
    residuals = torch.cat([x, x - F.embedding(indices[:, 0], before)])
    distance = (residuals - rvq.codebooks[0][3]).norm(dim=-1).min()
    assert distance < 1e-5


# ---------------------------------------------------------------- stochastic sampling


def test_stochastic_sampling_at_zero_temperature_is_the_nearest_code():
    torch.manual_seed(8)
    x = torch.randn(500, 8)
    nearest = ResidualVQ(8, 32, 3, shared_codebook=True).eval()
    nearest_indices = nearest(x).indices
    for temperature in (0.0, 1e-6):
        rvq = copy.deepcopy(nearest)
        for layer in rvq.layers:
            layer.stochastic_sample_codes = True
            layer.sample_codebook_temp = temperature
        indices = rvq.train()(x).indices
        if temperature == 0.0:
            assert torch.equal(indices, nearest_indices)
            continue
        # Gumbel noise is at most ~21·T in size: rows whose best two distances (at every
        # depth) differ by more than 1e-4 must take the nearest code
        codebook = nearest.codebooks[0].double()
        residual, clear = x.double(), torch.ones(len(x), dtype=torch.bool)
        for depth in range(3):
            d = torch.cdist(residual, codebook).sort(dim=-1).values
            clear &= (d[:, 1] - d[:, 0]) > 1e-4
            residual = residual - codebook[nearest_indices[:, depth]]
        assert clear.sum() > 450
        assert torch.equal(indices[clear], nearest_indices[clear])


def chi_square_sf_df4(statistic: float) -> float:
    """P(X > statistic) for a chi-square variable with 4 degrees of freedom (exact)."""
    return math.exp(-statistic / 2) * (1 + statistic / 2)


def test_stochastic_sampling_frequencies_match_softmax_of_minus_distance():
    """One vector repeated n times, 5 shared codes, temperature 1, two depths.

    Depth 1 must follow softmax(-||x - c||); given depth 1 took code k, depth 2 must follow
    softmax(-||x - c_k - c||). Each is a chi-square goodness-of-fit test (4 degrees of freedom)
    that fails when its p-value is below 1e-6: for a correct sampler, the test (both parts)
    fails for at most 2 in a million seeds.
    """
    codes = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.5], [-1.0, -1.0], [2.0, 2.0]],
                         dtype=torch.float64)
    x = torch.tensor([0.3, 0.2], dtype=torch.float64)
    n = 40_000
    rvq = ResidualVQ(2, 5, 2, shared_codebook=True, stochastic_sample_codes=True,
                     sample_codebook_temp=1.0).double()
    with torch.no_grad():
        rvq.layers[0].codebook.copy_(codes)
    torch.manual_seed(9)
    indices = rvq.train()(x.expand(n, 2).clone()).indices

    def p_value(observed: torch.Tensor, point: torch.Tensor) -> float:
        p = torch.softmax(-(point - codes).norm(dim=-1), dim=0)
        counts = torch.bincount(observed, minlength=5).double()
        expected = p * len(observed)
        assert expected.min() > 50  # the chi-square approximation holds
        return chi_square_sf_df4(float(((counts - expected) ** 2 / expected).sum()))

    assert p_value(indices[:, 0], x) > 1e-6
    first = int(torch.bincount(indices[:, 0]).argmax())
    given = indices[indices[:, 0] == first, 1]
    assert p_value(given, x - codes[first]) > 1e-6
    # and the test has power: nearest-code frequencies would be rejected
    assert p_value(torch.zeros(n, dtype=torch.long), x) < 1e-6


# ---------------------------------------------------------------- grouped


@pytest.mark.parametrize("training", [True, False])
def test_grouped_equals_concatenated_residual_vqs(training):
    torch.manual_seed(10)
    options = dict(kmeans_init=True, threshold_ema_dead_code=1.0, commitment_weight=0.5)
    grvq = GroupedResidualVQ(12, 16, 3, groups=3, **options).train(training)
    singles = []
    for g in range(3):
        rvq = ResidualVQ(4, 16, 3, **options).train(training)
        rvq.load_state_dict(grvq.rvqs[g].state_dict())
        singles.append(rvq)
    x = torch.randn(2, 50, 12)
    torch.manual_seed(11)
    quantized, indices, loss = grvq(x)
    torch.manual_seed(11)  # the same random draws (k-means++ seeds), in the same order
    outs = [rvq(x[..., 4 * g:4 * (g + 1)]) for g, rvq in enumerate(singles)]
    assert torch.equal(quantized, torch.cat([o.quantized for o in outs], dim=-1))
    assert torch.equal(indices, torch.stack([o.indices for o in outs]))  # (groups, ..., L)
    torch.testing.assert_close(loss, torch.stack([o.loss for o in outs]))  # (groups, L)
    for g, rvq in enumerate(singles):
        assert_state_equal(state(grvq.rvqs[g]), state(rvq))


# ---------------------------------------------------------------- quantize dropout


@pytest.mark.parametrize("min_layers", [1, 3])
def test_quantize_dropout_uses_between_min_and_all_layers(min_layers):
    torch.manual_seed(12)
    rvq = ResidualVQ(6, 16, 5, quantize_dropout=True, quantize_dropout_min_layers=min_layers,
                     decay=None)
    x = torch.randn(40, 6)
    used = []
    for _ in range(60):
        quantized, indices, loss = rvq.train()(x)
        active = (indices >= 0).all(dim=0)  # (5,) depths this call used
        n = int(active.sum())
        assert torch.equal(active, torch.arange(5) < n)  # the first n, never a gap
        assert torch.all(indices[:, n:] == -1)
        assert torch.equal(rvq.decode(indices), quantized.detach())  # -1 adds nothing
        # one loss per depth, zero for those skipped (commitment + codebook term: 2 · mse);
        # layer l's mse is that of the residual it leaves, x - (q_1 + ... + q_l)
        partial = rvq.partial_reconstructions(indices[:, :n]).detach()  # (40, n, 6)
        mses = (x[:, None] - partial).pow(2).mean(dim=(0, 2))  # (n,)
        torch.testing.assert_close(loss[:n], 2 * mses, rtol=1e-5, atol=1e-7)
        assert not loss[n:].any()
        used.append(n)
    assert min(used) == min_layers and max(used) == 5
    assert set(used) == set(range(min_layers, 6))
    assert (rvq.eval()(x).indices >= 0).all()  # eval uses every layer


def test_quantize_dropout_leaves_dropped_layers_untouched_and_groups_agree():
    torch.manual_seed(13)
    grvq = GroupedResidualVQ(8, 16, 4, groups=2, quantize_dropout=True)
    x = torch.randn(100, 8)
    for _ in range(20):
        before = state(grvq)
        _, indices, _ = grvq.train()(x)
        counts = (indices >= 0).all(dim=1).sum(-1)  # (groups,) layers used per group
        assert counts[0] == counts[1] >= 1
        n = int(counts[0])
        after = state(grvq)
        for g in range(2):
            for depth in range(4):
                key = f"rvqs.{g}.layers.{depth}._codebook.embed"
                assert torch.equal(before[key], after[key]) == (depth >= n), key


# ---------------------------------------------------------------- state and robustness


@pytest.mark.parametrize("kwargs", [dict(kmeans_init=True, threshold_ema_dead_code=2),
                                    dict(shared_codebook=True, kmeans_init=True,
                                         stochastic_sample_codes=True,
                                         threshold_ema_dead_code=2),
                                    dict(decay=None, kmeans_init=True),
                                    dict(quantize_dropout=True)])
def test_eval_leaves_state_bit_identical_and_training_changes_it(kwargs):
    torch.manual_seed(14)
    for module in (ResidualVQ(8, 32, 3, **kwargs), GroupedResidualVQ(8, 32, 3, groups=2,
                                                                     **kwargs)):
        x = torch.randn(4, 50, 8)
        before = state(module)
        module.eval()
        for _ in range(3):
            module(x)
        assert_state_equal(before, state(module))
        module.train()(x)
        after = state(module)
        assert any(not torch.equal(before[k], after[k]) for k in before if "codebook" in k)


@pytest.mark.parametrize("build", [
    lambda: ResidualVQ(6, 8, 3, kmeans_init=True),
    lambda: ResidualVQ(6, 8, 3, shared_codebook=True, threshold_ema_dead_code=5),
    lambda: ResidualVQ(6, 8, 3, decay=None),
    lambda: GroupedResidualVQ(6, 8, 3, groups=2),
])
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_non_finite_batch_never_reaches_the_codebook(build, bad_value):
    torch.manual_seed(15)
    module = build().train()
    before = state(module)
    x = torch.randn(4, 10, 6)
    x[2, 3, 5] = bad_value  # in the last group of the grouped quantizer
    with pytest.raises(QuantizerInputError, match="non-finite"):
        module(x)
    assert_state_equal(before, state(module))
    module(torch.randn(4, 10, 6))  # a good batch still trains
    assert all(torch.isfinite(v).all() for v in module.state_dict().values())


def test_state_dict_round_trip_and_layouts_do_not_mix():
    torch.manual_seed(16)
    rvq = ResidualVQ(4, 16, 3, kmeans_init=True)
    rvq(torch.randn(100, 4))
    clone = ResidualVQ(4, 16, 3, kmeans_init=True)
    clone.load_state_dict(rvq.state_dict())
    x = torch.randn(20, 4)
    assert torch.equal(clone.eval()(x).indices, rvq.eval()(x).indices)
    with pytest.raises(RuntimeError):  # nor does another depth
        ResidualVQ(4, 16, 2, kmeans_init=True).load_state_dict(rvq.state_dict())


@pytest.mark.parametrize("shape", [(0, 6), (2, 0, 6)])
def test_empty_batch_gives_empty_outputs(shape):
    for module, code_shape in ((ResidualVQ(6, 4, 3, kmeans_init=True), shape[:-1] + (3,)),
                               (GroupedResidualVQ(6, 4, 3, groups=3), (3,) + shape[:-1] + (3,))):
        before = state(module)
        quantized, indices, loss = module(torch.randn(shape))
        assert quantized.shape == shape and indices.shape == code_shape
        assert indices.dtype == torch.int64 and not loss.any()
        assert_state_equal(before, state(module))


def test_low_precision_input_searches_in_float32():
    torch.manual_seed(17)
    rvq = ResidualVQ(16, 64, 2).eval()
    x = torch.randn(300, 16).to(torch.bfloat16)
    quantized, indices, loss = rvq(x)
    assert quantized.dtype == torch.bfloat16 and loss.dtype == torch.float32
    expected, _, _, _ = numpy_residual(x.double().numpy(),
                                       [c.double().numpy() for c in rvq.codebooks])
    np.testing.assert_array_equal(indices.numpy(), expected)


@pytest.mark.parametrize("bad,match", [
    (torch.randn(3, 5), "last dimension"),
    (torch.ones(3, 6, dtype=torch.int64), "floating-point"),
    (torch.tensor(1.0), "at least one dimension"),
    (np.zeros((3, 6), dtype=np.float32), "torch.Tensor"),
])
def test_bad_input_is_refused_with_a_clear_error(bad, match):
    for module in (ResidualVQ(6, 4, 2), GroupedResidualVQ(6, 4, 2, groups=2)):
        with pytest.raises(QuantizerInputError, match=match):
            module(bad)


def test_decode_refuses_bad_indices():
    rvq = ResidualVQ(6, 4, 2)
    with pytest.raises(QuantizerInputError, match=r"\[0, 4\)"):
        rvq.decode(torch.tensor([[0, 4]]))
    with pytest.raises(QuantizerInputError, match=r"\[0, 4\)"):
        rvq.decode(torch.tensor([[0, -2]]))
    with pytest.raises(QuantizerInputError, match="integer"):
        rvq.decode(torch.tensor([[0.0, 1.0]]))
    with pytest.raises(QuantizerInputError, match="last axis"):
        rvq.decode(torch.zeros(5, 3, dtype=torch.long))
    grvq = GroupedResidualVQ(6, 4, 2, groups=3)
    with pytest.raises(QuantizerInputError, match="groups=3"):
        grvq.decode(torch.zeros(5, 2, 2, dtype=torch.long))


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_quantizers=0), "num_quantizers"),
    (dict(quantize_dropout=True, quantize_dropout_min_layers=4), "quantize_dropout_min_layers"),
    (dict(quantize_dropout_min_layers=0), "quantize_dropout_min_layers"),
    (dict(heads=2), "heads"),
    (dict(eval_beam_size=4), "eval_beam_size"),
    (dict(decay=1.5), "decay"),
])
def test_bad_options_are_refused(kwargs, match):
    options = dict(dim=4, codebook_size=8, num_quantizers=3) | kwargs
    with pytest.raises(ValueError, match=match):
        ResidualVQ(**options)


def test_bad_groups_are_refused():
    with pytest.raises(ValueError, match="multiple of groups"):
        GroupedResidualVQ(10, 8, 2, groups=3)
    with pytest.raises(ValueError, match="groups"):
        GroupedResidualVQ(10, 8, 2, groups=0)


# ---------------------------------------------------------------- library-layout options


def textbook_per_depth(x, codebooks, weights, frac, once):
    """Per-depth losses and output with autograd on the textbook expressions: each layer
    straight-through on its residual (``once``: the whole sum straight-through from ``x``)."""
    residual, total, losses = x, 0.0, []
    for codebook, w in zip(codebooks, weights, strict=True):
        q = codebook[torch.cdist(residual.detach(), codebook).argmin(-1)]
        losses.append(w * F.mse_loss(residual, q))
        out = residual + (q - residual).detach()
        total = total + (q if once else out)
        residual = residual - (frac * out + (1 - frac) * out.detach())
    if once:
        total = x + (total - x).detach()
    return total, torch.stack(losses)


@pytest.mark.parametrize("once,frac", [(True, 0.0), (False, 0.0), (False, 0.3)])
def test_per_depth_loss_gradients_match_textbook_autograd(once, frac):
    """Each depth's loss has its own gradient (weighted differently here) to the input."""
    torch.manual_seed(20)
    rvq = ResidualVQ(5, 12, 3, commitment_weight=0.4, straight_through_sum=once,
                     quant_grad_frac=frac).double()
    x = torch.randn(30, 5, dtype=torch.float64, requires_grad=True)
    g = torch.randn(30, 5, dtype=torch.float64)
    depth_weights = torch.tensor([0.5, 2.0, -1.0], dtype=torch.float64)
    quantized, _, losses = rvq(x, freeze_codebook=True)
    ((quantized * g).sum() + (losses.double() * depth_weights).sum()).backward()
    x_ref = x.detach().clone().requires_grad_(True)
    out, ref_losses = textbook_per_depth(x_ref, list(rvq.codebooks), [0.4] * 3, frac, once)
    ((out * g).sum() + (ref_losses * depth_weights).sum()).backward()
    torch.testing.assert_close(losses.double(), ref_losses.detach(), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-12)


def test_beam_search_in_training_updates_each_depth_from_its_chosen_codes():
    """Training with a beam: the EMA of each depth takes the codes of the best path, and the
    residuals along it; an eval call changes nothing."""
    torch.manual_seed(21)
    decay, k, d = 0.5, 4, 3
    rvq = ResidualVQ(d, k, 2, beam_size=4, decay=decay)
    x = torch.randn(40, d)
    before = state(rvq)
    rvq.eval()(x)
    assert_state_equal(before, state(rvq))
    books = [c.clone().double() for c in rvq.codebooks]
    _, indices, _ = rvq.train()(x)
    residual = x.double()
    for depth in range(2):
        pick = indices[:, depth]
        counts = torch.bincount(pick, minlength=k).double()
        sums = torch.zeros(k, d, dtype=torch.float64).index_add_(0, pick, residual)
        expected, _ = numpy_ema(books[depth].numpy(), np.ones(k), counts.numpy(), sums.numpy(),
                                decay, 1e-5)
        np.testing.assert_allclose(rvq.codebooks[depth].double().numpy(), expected, rtol=1e-5,
                                   atol=1e-6)
        residual = residual - books[depth][pick]


def test_masked_positions_leave_the_codebook_statistics():
    torch.manual_seed(22)
    x = torch.randn(2, 6, 4)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 2:] = False
    masked = ResidualVQ(4, 8, 2)
    kept = ResidualVQ(4, 8, 2)
    kept.load_state_dict(masked.state_dict())
    masked(x, mask=mask)
    kept(x[mask].unsqueeze(0))  # only the unmasked vectors
    assert_state_equal(state(masked), state(kept))


@pytest.mark.parametrize("training", [True, False])
def test_layer_forward_path_equals_the_codebook_path(training):
    """With layer options the stack does not apply itself, each depth calls its layer's
    forward; for options both paths know, they give the same codes, output, losses,
    gradient and EMA state."""
    torch.manual_seed(23)
    fast = ResidualVQ(4, 8, 3, commitment_weight=0.3).train(training)
    layered = ResidualVQ(4, 8, 3, commitment_weight=0.3).train(training)
    layered.load_state_dict(fast.state_dict())
    layered.layer_forward = True
    x = torch.randn(5, 7, 4)
    results = []
    for module in (fast, layered):
        xi = x.clone().requires_grad_(True)
        quantized, indices, losses = module(xi)
        (quantized.square().sum() + losses.sum()).backward()
        results.append((quantized.detach(), indices, losses.detach(), xi.grad))
    for ours, other in zip(*results, strict=True):
        torch.testing.assert_close(ours, other, rtol=1e-5, atol=1e-6)
    assert_state_equal(state(fast), state(layered))
    assert results[0][2].any() == training  # zero losses in eval


def test_unknown_layer_options_reach_the_layers():
    with pytest.raises(TypeError, match="no_such_option"):
        ResidualVQ(4, 8, 2, no_such_option=1)


def test_beam_search_kmeans_runs_on_each_depths_residuals():
    torch.manual_seed(24)
    x = torch.randn(200, 3) * 4.0
    beam = ResidualVQ(3, 4, 2, beam_size=2, kmeans_init=True, kmeans_iters=1)
    torch.manual_seed(25)
    beam(x)
    greedy = ResidualVQ(3, 4, 2, kmeans_init=True, kmeans_iters=1)
    torch.manual_seed(25)
    greedy(x)
    # the same k-means draws on the same residuals: the same starting codebooks
    for depth in range(2):
        assert torch.equal(beam.layers[depth].book.initialized, torch.tensor(True))
    torch.testing.assert_close(beam.codebooks[0].norm(dim=-1).mean(),
                               greedy.codebooks[0].norm(dim=-1).mean(), rtol=0.2, atol=0.0)
    # the second depth starts at the scale of the first depth's residuals, not of x
    assert beam.codebooks[1].norm(dim=-1).mean() < 0.7 * beam.codebooks[0].norm(dim=-1).mean()
