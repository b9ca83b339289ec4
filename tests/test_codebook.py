"""Codebook on its own: search, statistics, EMA update, k-means, guards; and checkpoints.

Each operation is checked against an independent computation (float64 ``torch.cdist``, NumPy),
and the estimators' backward against autograd on the textbook expressions in float64.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_state_equal, state

from vqvae import Codebook, GroupedResidualVQ, QuantizerInputError, ResidualVQ, VectorQuantize
from vqvae.quantizers import cpu_kernel, kmeans
from vqvae.quantizers.estimators import quantize
from vqvae.quantizers.search import code_distances, search_settings

BACKENDS = ["torch", pytest.param("c", marks=pytest.mark.skipif(
    not cpu_kernel.available(), reason="C kernels not built"))]


def numpy_distances(x, codes):
    return ((x[:, None, :] - codes[None, :, :]) ** 2).sum(-1)


# ---------------------------------------------------------------------------- search


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("n", "k", "d"), [(257, 7, 3), (300, 130, 16), (64, 200, 40)])
def test_search_matches_float64_cdist(backend, n, k, d):
    torch.manual_seed(n + k)
    book = Codebook(k, d)
    x = torch.randn(n, d)
    if backend == "c" and not cpu_kernel.supports(x, book.codebook):
        pytest.skip("beyond the C kernel's dimensions")
    with search_settings(backend=backend):
        indices = book.search(x)
    expected = torch.cdist(x.double(), book.codebook.double()).argmin(-1)
    distances = numpy_distances(x.double().numpy(), book.codebook.double().numpy())
    rows = np.arange(n)
    # equal, or a float32 near-tie: the chosen code is as close as the best in float64
    np.testing.assert_allclose(distances[rows, indices.numpy()],
                               distances[rows, expected.numpy()], rtol=1e-6)
    assert (indices == expected).float().mean() > 0.99
    assert indices.dtype == torch.int64 and indices.shape == (n,)


def test_code_distances_are_the_squared_distances_less_what_is_asked():
    torch.manual_seed(15)
    x, codes = torch.randn(9, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    x_sq, code_sq = x.pow(2).sum(-1), codes.pow(2).sum(-1)
    expected = numpy_distances(x.numpy(), codes.numpy())
    full = code_distances(x, codes, x_sq[:, None] + code_sq)
    np.testing.assert_allclose(full.numpy(), expected, rtol=1e-12, atol=1e-12)
    partial = code_distances(x, codes, code_sq)  # argmin's form: without the row constant
    np.testing.assert_allclose(partial.numpy(), expected - x_sq.numpy()[:, None], atol=1e-12)


def test_search_with_zero_temperature_is_nearest_and_sampling_follows_distance():
    torch.manual_seed(0)
    book = Codebook(5, 2)
    with torch.no_grad():
        book.codebook.copy_(torch.tensor([[0.0, 0], [10, 0], [0, 10], [-10, 0], [0, -10]]))
    x = torch.randn(2000, 2) * 0.1
    assert torch.equal(book.search(x, temperature=0.0), book.search(x))
    # at a low temperature almost every sample is the nearest code, at a high one they spread
    cold = book.search(x, temperature=0.5)
    hot = book.search(x, temperature=1e4)
    assert (cold == 0).float().mean() > 0.99
    assert 0.1 < (hot == 0).float().mean() < 0.3


def test_distances_and_lookup_match_numpy():
    torch.manual_seed(1)
    book = Codebook(9, 4, decay=None)
    x = torch.randn(30, 4, dtype=torch.float64)
    indices = torch.randint(0, 9, (30,))
    codes = book.codebook.detach().double().numpy()
    expected = ((x.numpy() - codes[indices.numpy()]) ** 2).sum(-1)
    np.testing.assert_allclose(book.distances(x, indices).numpy(), expected, rtol=1e-12)
    looked_up = book.lookup(indices.view(3, 10))
    assert looked_up.shape == (3, 10, 4)
    assert torch.equal(looked_up.detach().reshape(30, 4), book.codebook.detach()[indices])
    looked_up.sum().backward()  # a learnable codebook gets the gradient of its codes
    np.testing.assert_array_equal(book.embed.grad[0].sum(-1).numpy(),
                                  4 * np.bincount(indices.numpy(), minlength=9))


def test_prepare_makes_half_precision_float32_and_cosine_rows_unit():
    x = torch.randn(6, 3, dtype=torch.bfloat16)
    assert Codebook(4, 3).prepare(x).dtype == torch.float32
    unit = Codebook(4, 3, use_cosine_sim=True).prepare(torch.randn(6, 3) * 5)
    torch.testing.assert_close(unit.norm(dim=-1), torch.ones(6))
    same = torch.randn(6, 3)
    assert Codebook(4, 3).prepare(same) is same


# ---------------------------------------------------------------------------- statistics, EMA


@pytest.mark.parametrize("backend", BACKENDS)
def test_statistics_match_numpy(backend, monkeypatch):
    if backend == "torch":
        monkeypatch.setattr(cpu_kernel, "available", lambda: False)
    torch.manual_seed(2)
    book = Codebook(11, 5)
    x = torch.randn(200, 5)
    indices = torch.randint(0, 11, (200,))
    counts, sums = book.statistics(x, indices)
    expected_sums = np.zeros((11, 5))
    np.add.at(expected_sums, indices.numpy(), x.double().numpy())
    np.testing.assert_array_equal(counts.numpy(), np.bincount(indices.numpy(), minlength=11))
    np.testing.assert_allclose(sums.numpy(), expected_sums, rtol=1e-5, atol=1e-5)


def test_weighted_statistics_match_numpy_and_zero_weight_masks_rows():
    torch.manual_seed(3)
    book = Codebook(6, 3)
    x = torch.randn(50, 3, dtype=torch.float64)
    indices = torch.randint(0, 6, (50,))
    weight = torch.rand(50, dtype=torch.float64)
    counts, sums = book.statistics(x, indices, weight)
    expected_counts = np.bincount(indices.numpy(), weights=weight.numpy(), minlength=6)
    expected_sums = np.zeros((6, 3))
    np.add.at(expected_sums, indices.numpy(), x.numpy() * weight.numpy()[:, None])
    np.testing.assert_allclose(counts.numpy(), expected_counts, rtol=1e-12)
    np.testing.assert_allclose(sums.numpy(), expected_sums, rtol=1e-12, atol=1e-15)

    mask = torch.rand(50) < 0.5
    masked = book.statistics(x, indices, mask.double())
    kept = book.statistics(x[mask], indices[mask])
    torch.testing.assert_close(masked.counts, kept.counts, rtol=0, atol=1e-12)
    torch.testing.assert_close(masked.sums, kept.sums, rtol=1e-12, atol=1e-12)
    with pytest.raises(QuantizerInputError, match="one per row"):
        book.statistics(x, indices, weight[:10])


def numpy_ema(embed_sum, cluster_size, counts, sums, decay, eps):
    """Sonnet's VectorQuantizerEMA step: ``(codes, cluster sizes, running sums)``."""
    k = len(cluster_size)

    def smoothed(size):
        n = size.sum()
        return (size + eps) / (n + k * eps) * n

    embed_sum = decay * embed_sum + (1 - decay) * sums
    cluster_size = decay * cluster_size + (1 - decay) * counts
    return embed_sum / smoothed(cluster_size)[:, None], cluster_size, embed_sum


def test_ema_update_matches_numpy_float64():
    torch.manual_seed(4)
    decay, eps = 0.7, 1e-3
    book = Codebook(8, 3, decay=decay, eps=eps).double()
    embed_sum, cluster_size = book.embed_avg[0].numpy().copy(), book.cluster_size[0].numpy().copy()
    for step in range(1, 4):
        x = torch.randn(40, 3, dtype=torch.float64)
        indices = book.search(x)
        counts = np.bincount(indices.numpy(), minlength=8).astype(float)
        sums = np.zeros((8, 3))
        np.add.at(sums, indices.numpy(), x.numpy())
        book.update(book.statistics(x, indices), x)
        codebook, cluster_size, embed_sum = numpy_ema(embed_sum, cluster_size, counts, sums,
                                                      decay, eps)
        np.testing.assert_allclose(book.cluster_size[0].numpy(), cluster_size, rtol=1e-13)
        np.testing.assert_allclose(book.codebook.numpy(), codebook, rtol=1e-11, atol=1e-13)
        assert int(book.steps) == step


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_ema_update_matches_numpy(backend, monkeypatch):
    if backend == "torch":
        monkeypatch.setattr(cpu_kernel, "available", lambda: False)
    torch.manual_seed(5)
    book = Codebook(16, 4, decay=0.9)
    embed_sum = book.embed_avg[0].double().numpy().copy()
    cluster_size = book.cluster_size[0].double().numpy().copy()
    x = torch.randn(120, 4)
    indices = torch.randint(0, 16, (120,))
    counts = np.bincount(indices.numpy(), minlength=16).astype(float)
    sums = np.zeros((16, 4))
    np.add.at(sums, indices.numpy(), x.double().numpy())
    book.update(book.statistics(x, indices), x)
    codebook, cluster_size, _ = numpy_ema(embed_sum, cluster_size, counts, sums, 0.9, 1e-5)
    np.testing.assert_allclose(book.cluster_size[0].numpy(), cluster_size, rtol=1e-6)
    np.testing.assert_allclose(book.codebook.numpy(), codebook, rtol=1e-5, atol=1e-6)


def test_statistics_of_micro_batches_add_up_to_one_update():
    torch.manual_seed(6)
    one = Codebook(10, 3).double()
    split = Codebook(10, 3).double()
    split.load_state_dict(one.state_dict())
    x = torch.randn(90, 3, dtype=torch.float64)
    indices = one.search(x)
    one.update(one.statistics(x, indices), x)
    total = None
    for part, part_indices in zip(x.split(30), indices.split(30), strict=True):
        stats = split.statistics(part, part_indices)
        total = stats if total is None else total.add_(stats)
    split.update(total, x)
    torch.testing.assert_close(split.codebook, one.codebook, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(split.cluster_size, one.cluster_size, rtol=1e-13, atol=0)
    assert int(split.steps) == int(one.steps) == 1


def test_learnable_update_only_counts_the_step():
    book = Codebook(5, 2, decay=None)
    before = state(book)
    book.update(None, torch.randn(3, 2))
    assert int(book.steps) == 1  # counted (not saved: the reference layout has no steps)
    assert_state_equal(before, state(book))


def test_reading_operations_leave_every_buffer_bit_identical():
    torch.manual_seed(7)
    book = Codebook(12, 3, kmeans_init=True, threshold_ema_dead_code=2.0).eval()
    before = state(book)
    x = torch.randn(64, 3)
    indices = book.search(x)
    book.search(x, temperature=1.0)
    book.lookup(indices)
    book.distances(x, indices)
    book.statistics(x, indices, torch.rand(64))
    book.prepare(x)
    assert_state_equal(before, state(book))


def test_restart_moves_only_dead_codes_onto_rows():
    torch.manual_seed(8)
    book = Codebook(6, 2, threshold_ema_dead_code=1.0)
    with torch.no_grad():
        book.cluster_size.copy_(torch.tensor([5.0, 0.5, 5.0, 0.2, 5.0, 5.0]))
    before = book.codebook.clone()
    rows = torch.randn(20, 2) + 100
    book.restart_dead_codes(rows)
    dead = torch.tensor([False, True, False, True, False, False])
    assert torch.equal(book.codebook[~dead], before[~dead])
    for code in book.codebook[dead]:
        assert (rows == code).all(-1).any()  # each restarted code is one of the rows
    assert book.cluster_size[0][dead].tolist() == [1.0, 1.0]
    assert torch.equal(book.embed_avg[0][dead], book.codebook[dead])  # row · threshold 1


# ---------------------------------------------------------------------------- guards


def test_non_finite_input_changes_nothing():
    torch.manual_seed(9)
    book = Codebook(6, 3, kmeans_init=True)
    before = state(book)
    x = torch.randn(20, 3)
    x[4, 1] = float("nan")
    with pytest.raises(QuantizerInputError, match="non-finite"):
        book.initialize(x)
    with pytest.raises(QuantizerInputError, match="1 non-finite"):
        book.check_finite(x)
    assert_state_equal(before, state(book))
    assert book.kmeans_pending
    x[4, 1] = float("inf")
    vq = VectorQuantize(3, 6, kmeans_init=True).train()
    vq_before = state(vq)
    with pytest.raises(QuantizerInputError, match="non-finite"):
        vq(x)
    assert_state_equal(vq_before, state(vq))


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(decay=1.5), "decay"),
    (dict(eps=0.0), "eps"),
    (dict(kmeans_iters=0), "kmeans_iters"),
    (dict(init="uniform"), "init"),
    (dict(dead_code_warmup_steps=-1), "dead_code_warmup_steps"),
])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Codebook(4, 2, **kwargs)


def test_initialize_runs_kmeans_and_marks_the_codebook():
    torch.manual_seed(10)
    centres = torch.tensor([[5.0, 5.0], [-5.0, 5.0], [0.0, -5.0]])
    x = (centres[torch.arange(90) % 3] + 0.01 * torch.randn(90, 2))
    book = Codebook(3, 2, kmeans_init=True)
    assert book.kmeans_pending
    book.initialize(x)
    assert not book.kmeans_pending and bool(book.initialized)
    assert torch.cdist(centres, book.codebook).min(dim=1).values.max() < 0.05
    assert book.cluster_size.tolist() == [[30.0, 30.0, 30.0]]


# ---------------------------------------------------------------------------- kmeans options


def numpy_lloyd(x, centroids, iters):
    for _ in range(iters):
        assignment = numpy_distances(x, centroids).argmin(-1)
        counts = np.bincount(assignment, minlength=len(centroids))
        sums = np.zeros_like(centroids)
        np.add.at(sums, assignment, x)
        means = sums / np.maximum(counts, 1)[:, None]
        centroids = np.where((counts > 0)[:, None], means, centroids)
    return centroids, counts


def test_kmeans_from_given_centroids_matches_numpy_lloyd():
    torch.manual_seed(11)
    x = torch.randn(200, 3, dtype=torch.float64)
    init = x[:5].clone()
    result = kmeans(x, 5, 7, init=init)
    centroids, counts = numpy_lloyd(x.numpy(), init.numpy(), 7)
    np.testing.assert_allclose(result.centroids.numpy(), centroids, rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(result.counts.numpy(), counts)
    with pytest.raises(ValueError, match="init must have shape"):
        kmeans(x, 4, init=init)
    with pytest.raises(ValueError, match="init must be"):
        kmeans(x, 4, init="furthest")


@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_kmeans_seeding_is_reproducible_and_picks_rows(init):
    x = torch.randn(100, 2, dtype=torch.float64)
    first = kmeans(x, 6, 0, init=init, generator=torch.Generator().manual_seed(3))
    again = kmeans(x, 6, 0, init=init, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first.centroids, again.centroids)
    # no Lloyd step: the centroids are the seeds, which are rows of x
    for centroid in first.centroids:
        assert (x == centroid).all(-1).any()


def test_kmeans_all_reduce_sums_statistics_across_processes():
    # Two processes holding the same rows: the summed statistics give the same centroids and
    # twice the counts. The fake all_reduce doubles in place, as a sum over two copies would.
    torch.manual_seed(12)
    x = torch.randn(80, 2, dtype=torch.float64)
    init = x[:4].clone()
    alone = kmeans(x, 4, 5, init=init)
    calls = []

    def doubling(tensor):
        calls.append(tensor.shape)
        tensor.mul_(2)

    paired = kmeans(x, 4, 5, init=init, all_reduce=doubling)
    torch.testing.assert_close(paired.centroids, alone.centroids, rtol=1e-14, atol=1e-15)
    assert torch.equal(paired.counts, 2 * alone.counts)
    assert calls == [(4,), (4, 2)] * 5


def test_kmeans_with_cosine_similarity_gives_unit_centroids():
    x = torch.randn(60, 3, dtype=torch.float64) * 4
    result = kmeans(x, 4, 3, use_cosine_sim=True)
    torch.testing.assert_close(result.centroids.norm(dim=-1), torch.ones(4, dtype=torch.float64))


# ---------------------------------------------------------------------------- estimators


def textbook(x, codes, indices, commitment_weight, codebook_weight):
    """The seed's expressions: straight-through output, commitment and codebook MSE."""
    q = codes[indices]
    out = (q - x).detach() + x
    loss = commitment_weight * F.mse_loss(x, q.detach())
    if codebook_weight:
        loss = loss + codebook_weight * F.mse_loss(x.detach(), q)
    return out, loss


@pytest.mark.parametrize("decay", [0.8, None])
@pytest.mark.parametrize(("commitment_weight", "codebook_weight"), [(1.0, 1.0), (0.25, 3.0)])
def test_estimator_backward_equals_autograd_on_the_textbook_expression(
        decay, commitment_weight, codebook_weight):
    torch.manual_seed(13)
    vq = VectorQuantize(5, 7, decay=decay, commitment_weight=commitment_weight,
                        codebook_weight=codebook_weight, rotation_trick=False).double()
    x = torch.randn(4, 6, 5, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(4, 6, 5, dtype=torch.float64)
    grad_loss = 0.75  # exact in float32: the layer returns its loss as float32
    # a training call (eval returns no loss) that leaves an EMA codebook as it was
    quantized, indices, loss = vq(x, freeze_codebook=decay is not None)
    (quantized * grad_out).sum().add(loss * grad_loss).backward()
    ours_x = x.grad.clone()
    grad = vq._codebook.embed.grad
    ours_codes = None if grad is None else grad[0].clone()

    x.grad = None
    codes = vq.codebook.detach().clone().requires_grad_(decay is None)
    out, ref_loss = textbook(x, codes, indices, commitment_weight,
                             codebook_weight if decay is None else 0.0)
    (out * grad_out).sum().add(ref_loss * grad_loss).backward()
    # the output is exactly the codes; the textbook's sum rounds in the last bits
    assert torch.equal(quantized, codes.detach()[indices])
    torch.testing.assert_close(quantized, out.detach(), rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(ours_x, x.grad, rtol=1e-13, atol=1e-15)
    if decay is None:
        torch.testing.assert_close(ours_codes, codes.grad, rtol=1e-13, atol=1e-15)
    else:
        assert ours_codes is None and not vq._codebook.embed.requires_grad


def test_quantize_backward_equals_textbook_for_both_inputs():
    torch.manual_seed(14)
    x = torch.randn(10, 3, dtype=torch.float64, requires_grad=True)
    q = torch.randn(10, 3, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(10, 3, dtype=torch.float64)
    out, loss = quantize(x, q, commitment_weight=0.3, codebook_weight=1.7)
    ours = torch.autograd.grad((out * grad_out).sum() + 2.0 * loss, (x, q))
    ref_out = (q - x).detach() + x
    ref_loss = 0.3 * F.mse_loss(x, q.detach()) + 1.7 * F.mse_loss(x.detach(), q)
    ref = torch.autograd.grad((ref_out * grad_out).sum() + 2.0 * ref_loss, (x, q))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-14, atol=0)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


# ---------------------------------------------------------------------------- composition


def test_residual_layers_use_their_codebooks_and_quantize_takes_a_depth():
    torch.manual_seed(16)
    rvq = ResidualVQ(4, 8, 3).eval()
    assert all(isinstance(rvq.layer_at(d).book, Codebook) for d in range(3))
    x = torch.randn(10, 4)
    quantized, indices, _ = rvq.quantize(x, 2)
    assert (indices[:, 2] == -1).all()
    # depth by depth with the codebooks alone: search the residual, subtract its code
    residual, total = x, torch.zeros_like(x)
    for depth in range(2):
        book = rvq.layer_at(depth).book
        index = book.search(residual)
        assert torch.equal(index, indices[:, depth])
        code = book.lookup(index).detach()
        total, residual = total + code, residual - code
    torch.testing.assert_close(quantized, total, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="active must be"):
        rvq.quantize(x, 4)


# ---------------------------------------------------------------------------- checkpoints


def tensor(entry):
    dtype, shape, values = entry
    return torch.tensor(values, dtype=getattr(torch, dtype)).reshape(shape)


CHECKPOINT_MODULES = {
    "vq_ema_projected": lambda: VectorQuantize(4, 3, codebook_dim=2, kmeans_init=True,
                                               threshold_ema_dead_code=0.5),
    "vq_learnable": lambda: VectorQuantize(3, 4, decay=None),
    "rvq": lambda: ResidualVQ(4, 3, 2, kmeans_init=True),
    "grvq_shared": lambda: GroupedResidualVQ(4, 3, 2, groups=2, shared_codebook=True),
}


@pytest.mark.parametrize("name", list(CHECKPOINT_MODULES))
def test_checkpoints_of_the_flat_layout_load_and_decode_the_same(name):
    """State dicts written before the codebook was a module of its own (its buffers directly
    on each VectorQuantize; SAVED below, from two training steps after ``manual_seed(0)``)
    load strictly, save back in the current layout (``_codebook.embed`` (1, K, D) ...) with
    the same values, and give the recorded eval outputs bit for bit."""
    saved = SAVED[name]
    torch.manual_seed(1)  # other starting values, so that loading must overwrite them all
    module = CHECKPOINT_MODULES[name]()
    old = {key: tensor(entry) for key, entry in saved["state"].items()}
    module.load_state_dict(dict(old))
    written = module.state_dict()
    if name == "grvq_shared":
        # a shared codebook is written under every depth's keys (the library's layout), each
        # an alias of the first depth's
        for key in list(written):
            if ".layers." in key and ".layers.0." not in key:
                prefix, rest = key.split(".layers.")
                first = f"{prefix}.layers.0.{rest.split('.', 1)[1]}"
                assert torch.equal(written.pop(key), written[first]), key
    expected = {}
    for key, value in old.items():
        prefix, _, leaf = key.rpartition(".")
        prefix = prefix + "." if prefix else ""
        if leaf == "steps":  # not saved any more
            continue
        if leaf == "codebook":
            expected[f"{prefix}_codebook.embed"] = value[None]
            size = old[f"{prefix}cluster_size"].double()
            n = size.sum()
            smoothed = (size + 1e-5) / (n + len(size) * 1e-5) * n
            # the running sums the old EMA kept implicitly: codes · smoothed sizes
            expected[f"{prefix}_codebook.embed_avg"] = (value.double() * smoothed[:, None])[None]
        elif leaf == "cluster_size":
            expected[f"{prefix}_codebook.cluster_size"] = value[None]
        elif leaf == "initialized":
            expected[f"{prefix}_codebook.initted"] = value
        else:
            expected[key] = value
    assert sorted(written) == sorted(expected)
    for key, value in expected.items():
        if key.endswith("embed_avg"):
            torch.testing.assert_close(written[key].double(), value, rtol=1e-6, atol=0)
        else:
            assert torch.equal(written[key], value), key
    with torch.no_grad():
        quantized, indices, _ = module.eval()(tensor(saved["x"]))
    if name.startswith("grvq"):
        indices = indices.movedim(0, -2)  # grouped codes are now (groups, ..., L)
    assert torch.equal(indices, tensor(saved["indices"]))
    assert torch.equal(quantized, tensor(saved["quantized"]))


SAVED = {
    "vq_ema_projected": {
        "state": {
            "codebook": ("float32", (3, 2), [
                -0.22489790618419647, 0.2884362041950226, 0.5994279384613037,
                -0.08307888358831406, -1.0031477212905884, 0.7736107707023621]),
            "cluster_size": ("float32", (3,), [
                2.200000047683716, 3.0, 0.800000011920929]),
            "initialized": ("bool", (), [
                True]),
            "steps": ("int64", (), [
                2]),
            "project_in.weight": ("float32", (2, 4), [
                -0.006002169102430344, 0.22309690713882446, -0.41825494170188904,
                -0.379997193813324, -0.17863361537456512, 0.11680319905281067,
                -0.009757235646247864, 0.38671162724494934]),
            "project_in.bias": ("float32", (2,), [
                -0.02233796752989292, 0.1422373503446579]),
            "project_out.weight": ("float32", (4, 2), [
                -0.2136969119310379, -0.13899271190166473, -0.6755334138870239,
                -0.4683041572570801, -0.2914857566356659, 0.026193760335445404,
                0.2795442044734955, 0.42428016662597656]),
            "project_out.bias": ("float32", (4,), [
                -0.47937673330307007, -0.3079187273979187, 0.2568332850933075,
                0.5871729254722595]),
        },
        "x": ("float32", (5, 4), [
            -1.8453190326690674, -0.025019939988851547, 1.3693809509277344,
            2.6570231914520264, -0.3172946274280548, 0.9671456813812256,
            -0.9910827279090881, 0.3016054332256317, -0.10731692612171173,
            0.998456597328186, -0.49871477484703064, 0.7611109018325806,
            -0.7777346968650818, 0.31404855847358704, 0.21333299577236176,
            -0.1200508326292038, 0.36045971512794495, -0.31403499841690063,
            -1.0787080526351929, 0.24081051349639893]),
        "indices": ("int64", (5,), [
            2, 1, 0, 0, 1]),
        "quantized": ("float32", (5, 4), [
            -0.3725334405899048, 0.007455945014953613, 0.5695003271102905,
            0.6349765062332153, -0.5959252715110779, -0.6739461421966553,
            0.07993242144584656, 0.7194908261299133, -0.4714072644710541,
            -0.29106855392456055, 0.32994306087493896, 0.6466817855834961,
            -0.4714072644710541, -0.29106855392456055, 0.32994306087493896,
            0.6466817855834961, -0.5959252715110779, -0.6739461421966553,
            0.07993242144584656, 0.7194908261299133]),
    },
    "vq_learnable": {
        "state": {
            "codebook": ("float32", (4, 3), [
                1.5409960746765137, -0.293428897857666, -2.1787893772125244,
                0.5632114410400391, -1.079049825668335, -1.382556438446045,
                0.4044979214668274, 0.8193405866622925, -0.7143803834915161,
                -0.35163721442222595, -0.6040072441101074, 0.1873163878917694]),
            "cluster_size": ("float32", (4,), [
                1.0, 1.0, 1.0, 1.0]),
            "initialized": ("bool", (), [
                True]),
            "steps": ("int64", (), [
                2]),
        },
        "x": ("float32", (5, 3), [
            0.18942345678806305, -0.21902281045913696, 2.057591199874878,
            -0.03542188182473183, 0.06271883100271225, -0.7663062810897827,
            1.0992505550384521, 2.7565383911132812, 0.17528332769870758,
            -0.9315211176872253, -1.505489706993103, -0.6609825491905212,
            1.3232016563415527, 0.037114303559064865, -0.28490930795669556]),
        "indices": ("int64", (5,), [
            3, 2, 2, 3, 2]),
        "quantized": ("float32", (5, 3), [
            -0.35163721442222595, -0.6040072441101074, 0.1873163878917694,
            0.4044979214668274, 0.8193405866622925, -0.7143803834915161,
            0.4044979214668274, 0.8193405866622925, -0.7143803834915161,
            -0.35163721442222595, -0.6040072441101074, 0.1873163878917694,
            0.4044979214668274, 0.8193405866622925, -0.7143803834915161]),
    },
    "rvq": {
        "state": {
            "layers.0.codebook": ("float32", (3, 4), [
                -0.33949586749076843, 0.1338222622871399, 0.5861098170280457,
                0.0639372169971466, 1.7386983633041382, 1.8625855445861816,
                1.3134398460388184, 1.9279594421386719, -0.2735724449157715,
                -0.6840152144432068, -1.199023962020874, 0.1225055381655693]),
            "layers.0.cluster_size": ("float32", (3,), [
                3.200000047683716, 1.0, 1.7999999523162842]),
            "layers.0.initialized": ("bool", (), [
                True]),
            "layers.0.steps": ("int64", (), [
                2]),
            "layers.1.codebook": ("float32", (3, 4), [
                -0.2828044295310974, 0.2908412218093872, 0.18957793712615967,
                -0.004762000869959593, 0.7039676308631897, -0.5114158987998962,
                -0.3504646420478821, -0.2868111729621887, -0.19914205372333527,
                -0.03675349801778793, -0.11879140138626099, 0.49789056181907654]),
            "layers.1.cluster_size": ("float32", (3,), [
                2.4000000953674316, 2.799999952316284, 0.800000011920929]),
            "layers.1.initialized": ("bool", (), [
                True]),
            "layers.1.steps": ("int64", (), [
                2]),
        },
        "x": ("float32", (5, 4), [
            -1.5615617036819458, -0.3546432852745056, 1.0810725688934326,
            0.13147805631160736, -0.28708741068840027, 1.0216400623321533,
            -0.5110737681388855, -1.7137278318405151, -0.5100647807121277,
            -0.47489312291145325, -0.6334037780761719, -1.4677202701568604,
            0.6074396967887878, -0.547156810760498, -1.1004796028137207,
            -0.720127522945404, 0.01193050667643547, 0.33977290987968445,
            -0.26345232129096985, 1.280466079711914]),
        "indices": ("int64", (5, 2), [
            0, 0, 0, 1, 2, 0, 2, 1, 0, 2]),
        "quantized": ("float32", (5, 4), [
            -0.6223002672195435, 0.4246634840965271, 0.7756877541542053,
            0.059175215661525726, 0.36447176337242126, -0.37759363651275635,
            0.23564517498016357, -0.22287395596504211, -0.5563768744468689,
            -0.3931739926338196, -1.0094460248947144, 0.11774353682994843,
            0.4303951859474182, -1.195431113243103, -1.5494885444641113,
            -0.16430562734603882, -0.5386379361152649, 0.09706876426935196,
            0.46731841564178467, 0.5618277788162231]),
    },
    "grvq_shared": {
        "state": {
            "rvqs.0.layers.0.codebook": ("float32", (3, 2), [
                1.1354957818984985, 0.22476854920387268, -1.1938449144363403,
                0.9765145182609558, -0.8303744792938232, -0.9179304242134094]),
            "rvqs.0.layers.0.cluster_size": ("float32", (3,), [
                2.43999981880188, 2.0799999237060547, 1.71999990940094]),
            "rvqs.0.layers.0.initialized": ("bool", (), [
                True]),
            "rvqs.0.layers.0.steps": ("int64", (), [
                2]),
            "rvqs.1.layers.0.codebook": ("float32", (3, 2), [
                0.8106691241264343, 0.7428144812583923, -0.035589415580034256,
                -0.6083664894104004, -0.2861960232257843, 0.2181430160999298]),
            "rvqs.1.layers.0.cluster_size": ("float32", (3,), [
                3.119999885559082, 1.5199999809265137, 1.5999999046325684]),
            "rvqs.1.layers.0.initialized": ("bool", (), [
                True]),
            "rvqs.1.layers.0.steps": ("int64", (), [
                2]),
        },
        "x": ("float32", (5, 4), [
            0.0732460469007492, 1.1133184432983398, 0.2822672426700592,
            0.4342256486415863, 0.0929502323269844, -0.6660997271537781,
            0.6080471873283386, -0.7300198674201965, -0.8833757638931274,
            -0.41891348361968994, -0.8048264980316162, 0.5656096339225769,
            0.18036697804927826, 0.10833186656236649, -0.7548232674598694,
            0.24431852996349335, -0.07732575386762619, 0.1163986474275589,
            -0.5939908027648926, -1.2439281940460205]),
        "indices": ("int64", (5, 2, 2), [
            1, 0, 2, 0, 2, 0, 1, 1, 2, 0, 2, 2, 0, 2, 2, 2, 0, 2, 1, 1]),
        "quantized": ("float32", (5, 4), [
            -0.0583491325378418, 1.2012830972671509, 0.5244730710983276,
            0.9609575271606445, 0.3051213026046753, -0.6931618452072144,
            -0.07117883116006851, -1.2167329788208008, 0.3051213026046753,
            -0.6931618452072144, -0.5723920464515686, 0.4362860321998596,
            0.3051213026046753, -0.6931618452072144, -0.5723920464515686,
            0.4362860321998596, 0.3051213026046753, -0.6931618452072144,
            -0.07117883116006851, -1.2167329788208008]),
    },
}
