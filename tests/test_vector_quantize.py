"""VectorQuantize against the seed's worked example and independent NumPy / float64 computations."""

import copy

import numpy as np
import pytest
import torch
from conftest import assert_state_equal, state

from vqvae import QuantizerInputError, VectorQuantize, codebook_usage, nearest_code
from vqvae.quantizers.search import blockwise_argmin

SEED_CODEBOOK = torch.tensor([
    [0.15801739, 0.71236613, 0.34401087, 0.31100241, 0.19731029, 0.75124264],
    [0.17008199, 0.76689422, 0.82562077, 0.17558232, 0.82136028, 0.84026041],
    [0.89155776, 0.92834241, 0.56760302, 0.72009988, 0.43676168, 0.94838489],
    [0.38546037, 0.75875292, 0.90014871, 0.17816013, 0.06095272, 0.69844905],
])
SEED_VECTORS = torch.tensor([
    [[0.16, 0.75, 0.81, 0.12, 0.81, 0.90],
     [0.41, 0.76, 0.82, 0.17, 0.01, 0.72],
     [0.15, 0.70, 0.33, 0.30, 0.21, 0.76]],
    [[0.50, 0.72, 0.35, 0.13, 0.98, 0.52],
     [0.61, 0.54, 0.73, 0.28, 0.76, 0.57],
     [0.67, 0.12, 0.36, 0.55, 0.73, 0.71]],
])


def make_vq(codebook: torch.Tensor, **kwargs) -> VectorQuantize:
    vq = VectorQuantize(dim=codebook.shape[1], codebook_size=codebook.shape[0], **kwargs)
    vq.codebook = codebook  # the setter keeps the EMA sums in step with the codes
    return vq


def pairwise_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact pairwise distances (torch.cdist's matmul path rounds near zero)."""
    return (a[:, None, :].double() - b[None, :, :].double()).norm(dim=-1)


@pytest.mark.parametrize("decay", [0.8, None])
@pytest.mark.parametrize("training", [True, False])
def test_seed_worked_example(decay, training):
    vq = make_vq(SEED_CODEBOOK, decay=decay, rotation_trick=False).train(training)
    x = SEED_VECTORS.clone().requires_grad_(True)
    quantized, indices, loss = vq(x)
    assert indices.tolist() == [[1, 3, 0], [1, 1, 2]]
    assert indices.dtype == torch.int64
    # quantized is the codebook rows as they were before this call's EMA update
    assert torch.equal(quantized.detach(), SEED_CODEBOOK[indices])
    quantized.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # straight-through
    expected_mse = ((SEED_VECTORS - SEED_CODEBOOK[indices]) ** 2).mean()
    # the commitment term in training (a learnable codebook's one term trains both sides);
    # an eval call returns no loss, as the reference library's
    expected_loss = expected_mse if training else torch.zeros(())
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-6)


def test_returns_named_tuple_of_three():
    vq = VectorQuantize(dim=6, codebook_size=4)
    out = vq(SEED_VECTORS)
    assert out._fields == ("quantized", "indices", "loss")
    assert out.quantized.shape == SEED_VECTORS.shape
    assert out.indices.shape == SEED_VECTORS.shape[:-1]
    assert out.loss.ndim == 0


@pytest.mark.parametrize("shape,codebook_size,block_bytes", [
    ((7, 5), 3, None),
    ((4, 33, 16), 512, None),
    ((2, 3, 5, 8), 64, None),
    ((1000, 32), 300, 300 * 8 * 7),  # 7 rows per block: 143 blocks, the last one partial
])
def test_codes_match_cdist_float64(shape, codebook_size, block_bytes):
    torch.manual_seed(0)
    kwargs = {} if block_bytes is None else {"max_search_bytes": block_bytes}
    vq = VectorQuantize(dim=shape[-1], codebook_size=codebook_size, **kwargs).double().eval()
    x = torch.randn(shape, dtype=torch.float64)
    _, indices, _ = vq(x)
    expected = torch.cdist(x.reshape(-1, shape[-1]), vq.codebook).argmin(-1).reshape(shape[:-1])
    assert torch.equal(indices, expected)


@pytest.mark.parametrize("num_codes", [128, 200, 512, 1000])
def test_blockwise_search_matches_cdist_and_argmin_ties(num_codes):
    # codebooks of >= 128 codes take the two-pass argmin (padded when K is not a multiple of
    # its block); it must pick argmin's code, including argmin's choice among exact ties
    torch.manual_seed(1)
    x = torch.randn(300, 8)
    codebook = torch.randn(num_codes, 8)
    expected = torch.cdist(x.double(), codebook.double()).argmin(-1)
    assert torch.equal(nearest_code(x, codebook), expected)
    assert torch.equal(nearest_code(x, codebook, max_block_bytes=num_codes * 4 * 7), expected)
    ties = torch.randint(0, 3, (257, num_codes - num_codes % 64)).float()  # many equal minima
    assert torch.equal(blockwise_argmin(ties), ties.argmin(-1))
    # a duplicated code: both copies are at the same distance, argmin takes the first
    codebook[num_codes - 1] = codebook[3]
    assert torch.equal(nearest_code(codebook[3:4], codebook), torch.tensor([3]))
    # a row of NaN (the quantizer refuses it afterwards) still gets an index in range
    bad = x.clone()
    bad[0] = float("nan")
    assert 0 <= int(nearest_code(bad, codebook)[0]) < num_codes


def numpy_ema_step(codebook, embed_sum, cluster_size, x, decay, eps):
    """The textbook EMA update (Sonnet's VectorQuantizerEMA), in float64."""
    k = codebook.shape[0]
    d2 = ((x[:, None, :] - codebook[None, :, :]) ** 2).sum(-1)
    idx = d2.argmin(1)
    onehot = np.eye(k)[idx]
    cluster_size = decay * cluster_size + (1 - decay) * onehot.sum(0)
    embed_sum = decay * embed_sum + (1 - decay) * onehot.T @ x
    n = cluster_size.sum()
    smoothed = (cluster_size + eps) / (n + k * eps) * n
    return embed_sum / smoothed[:, None], embed_sum, cluster_size


def test_ema_steps_match_numpy():
    torch.manual_seed(1)
    k, d, eps, decay = 16, 5, 1e-3, 0.7
    vq = VectorQuantize(dim=d, codebook_size=k, decay=decay, eps=eps).double().train()
    codebook = vq.codebook.numpy().copy()
    cluster_size = vq.cluster_size.numpy().copy()
    n = cluster_size.sum()
    embed_sum = codebook * ((cluster_size + eps) / (n + k * eps) * n)[:, None]
    for _ in range(3):
        x = torch.randn(64, d, dtype=torch.float64)
        vq(x)
        codebook, embed_sum, cluster_size = numpy_ema_step(
            codebook, embed_sum, cluster_size, x.numpy(), decay, eps)
        np.testing.assert_allclose(vq.cluster_size.numpy(), cluster_size, rtol=1e-12)
        np.testing.assert_allclose(vq.codebook.numpy(), codebook, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kernels", ["c", "torch"])
def test_float32_ema_steps_match_numpy(kernels, monkeypatch):
    # float32 CPU layers take the C search and EMA update (when a compiler is at hand); both
    # that and the torch operations must follow the float64 reference to float32 accuracy
    from vqvae.quantizers import cpu_kernel

    if kernels == "c" and not cpu_kernel.available():
        pytest.skip(f"C kernels not built: {cpu_kernel.unavailable_reason()}")
    if kernels == "torch":
        monkeypatch.setattr(cpu_kernel, "available", lambda: False)
    torch.manual_seed(2)
    k, d, eps, decay = 40, 6, 1e-5, 0.9
    vq = VectorQuantize(dim=d, codebook_size=k, decay=decay, eps=eps).train()
    codebook = vq.codebook.double().numpy().copy()
    cluster_size = vq.cluster_size.double().numpy().copy()
    n = cluster_size.sum()
    embed_sum = codebook * ((cluster_size + eps) / (n + k * eps) * n)[:, None]
    for _ in range(5):
        x = torch.randn(300, d)
        vq(x)
        codebook, embed_sum, cluster_size = numpy_ema_step(
            codebook, embed_sum, cluster_size, x.double().numpy(), decay, eps)
        np.testing.assert_allclose(vq.cluster_size.numpy(), cluster_size, rtol=1e-5)
        np.testing.assert_allclose(vq.codebook.numpy(), codebook, rtol=1e-4, atol=1e-5)


def test_c_code_statistics_match_bincount_and_index_add():
    from vqvae.quantizers import cpu_kernel

    if not cpu_kernel.available():
        pytest.skip(f"C kernels not built: {cpu_kernel.unavailable_reason()}")
    torch.manual_seed(0)
    h = torch.randn(1000, 7)
    indices = torch.randint(0, 50, (1000,))
    counts, sums = cpu_kernel.code_statistics(h, indices, 50)
    assert torch.equal(counts, torch.bincount(indices, minlength=50).float())
    torch.testing.assert_close(sums, torch.zeros(50, 7).index_add_(0, indices, h))
    with pytest.raises(ValueError, match=r"lie in \[0, 50\)"):
        cpu_kernel.code_statistics(h, torch.full((1000,), 50), 50)


@pytest.mark.parametrize("kwargs", [
    dict(decay=0.8, kmeans_init=True, threshold_ema_dead_code=2),
    dict(decay=None, kmeans_init=True),
    dict(decay=0.9, stochastic_sample_codes=True, use_cosine_sim=True, codebook_dim=4),
])
def test_eval_leaves_state_bit_identical_and_training_changes_it(kwargs):
    torch.manual_seed(2)
    vq = VectorQuantize(dim=8, codebook_size=32, **kwargs)
    x = torch.randn(4, 50, 8)
    before = state(vq)
    vq.eval()
    for _ in range(3):
        vq(x)
    assert_state_equal(before, state(vq))
    vq.train()
    vq(x)
    after = state(vq)
    if kwargs["decay"] is not None or kwargs.get("kmeans_init"):
        assert not torch.equal(before["_codebook.embed"], after["_codebook.embed"])


def test_kmeans_init_recovers_separated_centres():
    torch.manual_seed(3)
    centres = torch.randn(8, 4) * 10
    x = (centres[:, None] + 0.05 * torch.randn(8, 40, 4)).reshape(-1, 4)
    vq = VectorQuantize(dim=4, codebook_size=8, kmeans_init=True, kmeans_iters=10)
    assert not bool(vq.initialized)
    vq(x[torch.randperm(len(x))])
    assert bool(vq.initialized)
    # every true centre has a code within the noise level, and every code sits on a centre
    distance = pairwise_distance(centres, vq.codebook)
    assert distance.min(dim=1).values.max() < 0.1
    assert distance.min(dim=0).values.max() < 0.1


def test_kmeans_init_leaves_no_zero_code_when_codes_outnumber_points():
    torch.manual_seed(4)
    vq = VectorQuantize(dim=3, codebook_size=64, kmeans_init=True)
    x = torch.randn(10, 3) + 5.0  # 10 points for 64 codes
    vq(x)
    assert vq.codebook.norm(dim=-1).min() > 1.0
    # every code is one of the data points (up to the EMA step that follows in the same call)
    assert pairwise_distance(vq.codebook, x).min(dim=1).values.max() < 1e-3


def test_dead_code_restart_moves_only_dead_codes():
    torch.manual_seed(5)
    k, d = 32, 6
    dead = torch.zeros(k, dtype=torch.bool)
    dead[[3, 7, 20]] = True
    with_restart = VectorQuantize(dim=d, codebook_size=k, threshold_ema_dead_code=1.0)
    with torch.no_grad():
        with_restart.codebook[dead] += 100.0  # far from the data: they receive no vectors
        with_restart.cluster_size.fill_(50.0)
        with_restart.cluster_size[dead] = 0.5
    without_restart = copy.deepcopy(with_restart)
    without_restart.threshold_ema_dead_code = 0.0
    x = torch.randn(200, d)
    with_restart(x)
    without_restart(x)
    moved = (with_restart.codebook != without_restart.codebook).any(dim=-1)
    assert torch.equal(moved, dead)
    # restarted codes sit on vectors of the batch, with a fresh cluster size
    assert pairwise_distance(with_restart.codebook[dead], x).min(dim=1).values.max() < 1e-6
    assert torch.all(with_restart.cluster_size[dead] == 1.0)


@pytest.mark.parametrize("kwargs", [{}, dict(codebook_dim=3), dict(use_cosine_sim=True),
                                    dict(decay=None, rotation_trick=True)])
def test_decode_equals_quantized_in_eval(kwargs):
    torch.manual_seed(6)
    vq = VectorQuantize(dim=8, codebook_size=20, **kwargs).eval()
    x = torch.randn(3, 11, 8)
    quantized, indices, _ = vq(x)
    assert torch.equal(vq.decode(indices), quantized)
    assert torch.equal(vq.get_output_from_indices(indices), quantized)


def test_learnable_codebook_gets_gradient_and_ema_codebook_does_not():
    torch.manual_seed(7)
    x = torch.randn(40, 4)
    learnable = VectorQuantize(dim=4, codebook_size=8, decay=None)
    assert isinstance(learnable._codebook.embed, torch.nn.Parameter)
    _, indices, loss = learnable(x)
    loss.backward()
    used = torch.zeros(8, dtype=torch.bool)
    used[indices.unique()] = True
    assert learnable._codebook.embed.grad[0][used].abs().sum(-1).min() > 0
    assert torch.all(learnable._codebook.embed.grad[0][~used] == 0)

    ema = VectorQuantize(dim=4, codebook_size=8, decay=0.8)
    assert not ema.codebook.requires_grad
    assert not dict(ema.named_parameters())
    _, _, loss = ema(x.requires_grad_(True))
    loss.backward()
    assert ema.codebook.grad is None


def test_loss_weights():
    torch.manual_seed(8)
    x = torch.randn(30, 4)
    vq = VectorQuantize(dim=4, codebook_size=8, decay=None, commitment_weight=0.25,
                        codebook_weight=2.0)
    q, _, loss = vq(x)
    mse = ((x - q.detach()) ** 2).mean()
    assert loss.item() == pytest.approx((2.25 * mse).item(), rel=1e-6)
    # without codebook_weight, the library's single term: commitment_weight · mse
    single = VectorQuantize(dim=4, codebook_size=8, decay=None, commitment_weight=0.25)
    q, _, loss = single(x)
    assert loss.item() == pytest.approx((0.25 * ((x - q.detach()) ** 2).mean()).item(),
                                        rel=1e-6)
    assert float(single.eval()(x).loss) == 0.0


def test_rotation_trick_gradient_matches_explicit_rotation():
    torch.manual_seed(9)
    vq = VectorQuantize(dim=5, codebook_size=7, rotation_trick=True).double().eval()
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    g = torch.randn(6, 5, dtype=torch.float64)
    quantized, indices, _ = vq(x)
    (quantized * g).sum().backward()
    q = vq.decode(indices).detach().numpy()
    xs = x.detach().numpy()
    for i in range(6):
        u = xs[i] / np.linalg.norm(xs[i])
        v = q[i] / np.linalg.norm(q[i])
        r = (u + v) / np.linalg.norm(u + v)
        rot = np.eye(5) - 2 * np.outer(r, r) + 2 * np.outer(v, u)
        scale = np.linalg.norm(q[i]) / np.linalg.norm(xs[i])
        np.testing.assert_allclose(rot @ u, v, atol=1e-12)  # it is the rotation onto q̂
        np.testing.assert_allclose(scale * rot @ xs[i], q[i], atol=1e-12)
        np.testing.assert_allclose(x.grad[i].numpy(), scale * rot.T @ g[i].numpy(), atol=1e-12)


def test_rotation_trick_forward_is_exactly_the_code():
    torch.manual_seed(10)
    vq = VectorQuantize(dim=8, codebook_size=16, rotation_trick=True).train()
    x = torch.randn(50, 8, requires_grad=True)
    before = vq.codebook.clone()
    quantized, indices, _ = vq(x)
    assert torch.equal(quantized.detach(), before[indices])


def test_cosine_similarity_picks_largest_cosine_and_returns_unit_vectors():
    torch.manual_seed(11)
    vq = VectorQuantize(dim=6, codebook_size=10, use_cosine_sim=True).eval()
    x = torch.randn(100, 6) * 5
    quantized, indices, _ = vq(x)
    cos = torch.nn.functional.normalize(x, dim=-1) @ torch.nn.functional.normalize(
        vq.codebook, dim=-1).T
    assert torch.equal(indices, cos.argmax(-1))
    assert torch.allclose(quantized.norm(dim=-1), torch.ones(100), atol=1e-6)


def test_codebook_dim_projects_and_back():
    torch.manual_seed(12)
    vq = VectorQuantize(dim=16, codebook_size=12, codebook_dim=4)
    assert vq.codebook.shape == (12, 4)
    x = torch.randn(2, 9, 16, requires_grad=True)
    quantized, indices, loss = vq(x)
    assert quantized.shape == x.shape and indices.shape == (2, 9)
    loss.backward()
    assert vq.project_in.weight.grad is not None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_input_searches_in_float32(dtype):
    torch.manual_seed(13)
    vq = VectorQuantize(dim=32, codebook_size=256).eval()
    x = torch.randn(500, 32).to(dtype)
    quantized, indices, loss = vq(x)
    assert quantized.dtype == dtype and loss.dtype == torch.float32
    expected = torch.cdist(x.double(), vq.codebook.double()).argmin(-1)
    assert torch.equal(indices, expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, indices_autocast, _ = vq(x.float())
    assert torch.equal(indices_autocast, torch.cdist(x.double(), vq.codebook.double()).argmin(-1))


def test_state_dict_round_trip():
    torch.manual_seed(14)
    vq = VectorQuantize(dim=4, codebook_size=16, kmeans_init=True, threshold_ema_dead_code=1)
    vq(torch.randn(100, 4))
    clone = VectorQuantize(dim=4, codebook_size=16, kmeans_init=True, threshold_ema_dead_code=1)
    clone.load_state_dict(vq.state_dict())
    assert bool(clone.initialized)
    x = torch.randn(20, 4)
    assert torch.equal(clone.eval()(x).indices, vq.eval()(x).indices)


def test_stochastic_sampling_only_in_training():
    torch.manual_seed(15)
    vq = VectorQuantize(dim=4, codebook_size=16, stochastic_sample_codes=True,
                        sample_codebook_temp=10.0)
    x = torch.randn(500, 4)
    nearest = torch.cdist(x, vq.codebook).argmin(-1)
    assert torch.equal(vq.eval()(x).indices, nearest)
    assert not torch.equal(vq.train()(x).indices, nearest)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad,match", [
    (torch.randn(3, 5), "last dimension"),
    (torch.ones(3, 6, dtype=torch.int64), "floating-point"),
    (torch.ones(3, 6, dtype=torch.complex64), "floating-point"),
    (torch.ones(3, 6, dtype=torch.bool), "floating-point"),
    (torch.tensor(1.0), "at least one dimension"),
    (np.zeros((3, 6), dtype=np.float32), "torch.Tensor"),
])
def test_bad_input_is_refused_with_a_clear_error(bad, match):
    vq = VectorQuantize(dim=6, codebook_size=4)
    with pytest.raises(QuantizerInputError, match=match):
        vq(bad)
    assert issubclass(QuantizerInputError, ValueError)
    assert issubclass(QuantizerInputError, TypeError)


@pytest.mark.parametrize("shape", [(0, 6), (2, 0, 6)])
def test_empty_batch_gives_empty_outputs(shape):
    vq = VectorQuantize(dim=6, codebook_size=4, kmeans_init=True)
    before = state(vq)
    quantized, indices, loss = vq(torch.randn(shape))
    assert quantized.shape == shape and indices.shape == shape[:-1]
    assert indices.dtype == torch.int64 and loss.item() == 0.0
    assert_state_equal(before, state(vq))


@pytest.mark.parametrize("kwargs", [dict(decay=0.8), dict(decay=0.8, kmeans_init=True),
                                    dict(decay=0.8, threshold_ema_dead_code=5),
                                    dict(decay=None)])
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_non_finite_batch_never_reaches_the_codebook(kwargs, bad_value):
    torch.manual_seed(16)
    vq = VectorQuantize(dim=6, codebook_size=8, **kwargs).train()
    before = state(vq)
    x = torch.randn(4, 10, 6)
    x[2, 3, 1] = bad_value
    with pytest.raises(QuantizerInputError, match="non-finite"):
        vq(x)
    assert_state_equal(before, state(vq))
    vq(torch.randn(4, 10, 6))  # a good batch still trains
    assert torch.isfinite(vq.codebook).all()


def test_decode_refuses_bad_indices():
    vq = VectorQuantize(dim=6, codebook_size=4)
    with pytest.raises(QuantizerInputError, match=r"\[0, 4\)"):
        vq.decode(torch.tensor([0, 4]))
    with pytest.raises(QuantizerInputError, match="integer"):
        vq.decode(torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("kwargs,match", [
    (dict(decay=1.5), "decay"),
    (dict(codebook_size=0), "codebook_size"),
    (dict(decay=0.8, learnable_codebook=True, ema_update=True), "EMA"),
    (dict(sample_codebook_temp=-1), "sample_codebook_temp"),
])
def test_bad_options_are_refused(kwargs, match):
    options = dict(dim=4, codebook_size=8) | kwargs
    with pytest.raises(ValueError, match=match):
        VectorQuantize(**options)


def test_codebook_usage():
    assert codebook_usage(torch.tensor([0, 1, 2, 3]), 8) == (pytest.approx(4.0), 4)
    assert codebook_usage(torch.zeros(10, dtype=torch.long), 8) == (pytest.approx(1.0), 1)
    p = np.array([3, 1]) / 4
    assert codebook_usage(torch.tensor([5, 5, 5, 2]), 8).perplexity == pytest.approx(
        float(np.exp(-(p * np.log(p)).sum())))
    with pytest.raises(ValueError, match="lie in"):
        codebook_usage(torch.tensor([8]), 8)


def test_dead_codes_wait_for_the_warmup():
    torch.manual_seed(17)
    vq = VectorQuantize(dim=3, codebook_size=16, threshold_ema_dead_code=1.0,
                        dead_code_warmup_steps=3)
    codes = vq.codebook.clone()
    codes[8:] += 50.0  # never chosen by the data below
    vq.codebook = codes
    far = vq.codebook[8:].clone()
    for step in range(1, 5):
        vq(torch.randn(64, 3))
        assert int(vq.steps) == step
        moved = (vq.codebook[8:] - far).abs().amax(dim=-1) > 1.0
        assert moved.any() == (step > 3), step
    vq.eval()
    vq(torch.randn(64, 3))
    assert int(vq.steps) == 4  # eval calls do not count


def test_codebook_setter_keeps_written_codes_through_the_ema():
    """The EMA recomputes the codes from its running sums: the setter writes both, so written
    codes stay; writing the codes tensor alone lasts until the next recomputation."""
    torch.manual_seed(18)
    vq = VectorQuantize(dim=3, codebook_size=5, decay=0.8)
    codes = torch.randn(5, 3)
    vq.codebook = codes
    vq._codebook.update_ema()
    torch.testing.assert_close(vq.codebook, codes, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        vq.codebook.copy_(codes + 10.0)  # the codes only, not the sums
    vq._codebook.update_ema()
    torch.testing.assert_close(vq.codebook, codes, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("zeros", [True, False])
def test_masked_positions_with_a_projection(zeros):
    """Masked rows are dropped before the search; with a projection (whose bias would move a
    zero row) they still come back as zeros, or as the input."""
    torch.manual_seed(19)
    vq = VectorQuantize(dim=8, codebook_size=6, codebook_dim=3,
                        return_zeros_for_masked_padding=zeros)
    x = torch.randn(2, 5, 8, requires_grad=True)
    mask = torch.tensor([[True] * 5, [True, False, True, False, False]])
    # the kept rows are quantized as in an unmasked call of them alone
    vq.eval()
    q_eval, idx_eval, _ = vq(x, mask=mask)
    q_alone, idx_alone, _ = vq(x[mask][None])
    assert torch.equal(idx_alone[0], idx_eval[mask])
    torch.testing.assert_close(q_alone[0], q_eval[mask])
    vq.train()
    q, idx, loss = vq(x, mask=mask)
    expected = torch.zeros_like(x[~mask]) if zeros else x[~mask]
    assert torch.equal(q[~mask].detach(), expected.detach())
    assert (idx[~mask] == -1).all() and (idx[mask] >= 0).all()
    (q.sum() + loss).backward()
    if not zeros:
        assert torch.equal(x.grad[~mask], torch.ones_like(x.grad[~mask]))
