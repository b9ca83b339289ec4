"""ResidualVQ and GroupedResidualVQ as drop-ins for vector_quantize_pytorch's (1.32).

The library README's calls give the same return structure, shapes and dtypes; a state_dict
trained by the library loads into ours and gives the same results; and each option is checked
against an independent float64 computation (greedy residual search, exhaustive beam search, the
EMA formula, gradients of the defining formulas). ``VQVAE_DROPIN_IMPL=library`` runs the same
tests against the library itself.
"""

import itertools
import os
import random
from math import ceil

import numpy as np
import pytest
import torch
from dropin_support import f64, sq_dist

lib = pytest.importorskip("vector_quantize_pytorch")

IMPL = os.environ.get("VQVAE_DROPIN_IMPL", "vqvae")
if IMPL == "library":
    from vector_quantize_pytorch import GroupedResidualVQ, ResidualVQ
else:
    from vqvae import GroupedResidualVQ, ResidualVQ

D, K, L = 4, 5, 3


@pytest.fixture(autouse=True)
def _seed_one_thread(one_thread):
    """Seeded, and one thread (conftest.one_thread): the tensors are tiny."""
    torch.manual_seed(0)


def greedy(x, codebooks):
    """Greedy residual quantization, float64: indices (N, L) and the sum of the codes."""
    residual, total, picks = x.copy(), np.zeros_like(x), []
    for codes in codebooks:
        idx = sq_dist(residual, codes).argmin(-1)
        picks.append(idx)
        residual = residual - codes[idx]
        total = total + codes[idx]
    return np.stack(picks, -1), total


def make(**kwargs):
    kwargs.setdefault("dim", D)
    kwargs.setdefault("codebook_size", K)
    kwargs.setdefault("num_quantizers", L)
    return ResidualVQ(**kwargs)


def _shapes(out):
    return [(tuple(t.shape), t.dtype) for t in out]


# ---------------------------------------------------------------- (a) README examples

README_EXAMPLES = {
    "residual": (ResidualVQ, lib.ResidualVQ,
                 dict(dim=256, num_quantizers=8, codebook_size=1024), {}),
    "residual_all_codes": (ResidualVQ, lib.ResidualVQ,
                           dict(dim=256, num_quantizers=8, codebook_size=1024),
                           dict(return_all_codes=True)),
    "diveq": (ResidualVQ, lib.ResidualVQ,
              dict(dim=256, num_quantizers=8, codebook_size=1024, diveq=True), {}),
    "rq_vae": (ResidualVQ, lib.ResidualVQ,
               dict(dim=256, num_quantizers=8, codebook_size=1024, stochastic_sample_codes=True,
                    sample_codebook_temp=0.1, shared_codebook=True), {}),
    "grouped": (GroupedResidualVQ, lib.GroupedResidualVQ,
                dict(dim=256, num_quantizers=8, groups=2, codebook_size=1024), {}),
    "kmeans_init": (ResidualVQ, lib.ResidualVQ,
                    dict(dim=256, codebook_size=256, num_quantizers=4, kmeans_init=True,
                         kmeans_iters=10), {}),
}


@pytest.mark.parametrize("name", sorted(README_EXAMPLES))
def test_readme_example(name):
    """The README's calls, on 16 rather than 1024 vectors to keep the test fast."""
    ours_cls, lib_cls, kwargs, call = README_EXAMPLES[name]
    x = torch.randn(1, 16, 256)
    expected = lib_cls(**kwargs)(x, **call)
    got = ours_cls(**kwargs)(x, **call)
    assert len(got) == len(expected)
    assert _shapes(got) == _shapes(expected)
    if name == "residual_all_codes":
        assert got[3].shape == (8, 1, 16, 256)
    if name == "grouped":
        assert got[1].shape == (2, 1, 16, 8) and got[2].shape == (2, 8)
    elif name != "kmeans_init":
        assert got[1].shape == (1, 16, 8) and got[2].shape == (8,)


# ---------------------------------------------------------------- (b) checkpoints

CHECKPOINT_CONFIGS = {
    "plain": (ResidualVQ, lib.ResidualVQ, dict()),
    "projection": (ResidualVQ, lib.ResidualVQ, dict(dim=8, codebook_dim=3)),
    "shared": (ResidualVQ, lib.ResidualVQ, dict(shared_codebook=True)),
    "sizes_per_depth": (ResidualVQ, lib.ResidualVQ,
                        dict(codebook_size=(7, 5, 3), num_quantizers=None)),
    "implicit_neural": (ResidualVQ, lib.ResidualVQ,
                        dict(implicit_neural_codebook=True, mlp_kwargs=dict(depth=2),
                             rotation_trick=False)),
    "cosine": (ResidualVQ, lib.ResidualVQ, dict(use_cosine_sim=True)),
    "dropout_dead_codes": (ResidualVQ, lib.ResidualVQ,
                           dict(quantize_dropout=True, threshold_ema_dead_code=1)),
    "grouped": (GroupedResidualVQ, lib.GroupedResidualVQ, dict(dim=8, groups=2)),
}


def checkpoint_config(name: str):
    """A case's two classes (ours, the library's) and the constructor arguments both take."""
    ours_cls, lib_cls, extra = CHECKPOINT_CONFIGS[name]
    cfg = {"dim": D, "codebook_size": K, "num_quantizers": L, **extra}
    if cfg["num_quantizers"] is None:
        del cfg["num_quantizers"]
    return ours_cls, lib_cls, cfg


@pytest.mark.parametrize("name", sorted(CHECKPOINT_CONFIGS))
def test_library_checkpoint_loads(name):
    ours_cls, lib_cls, cfg = checkpoint_config(name)
    torch.manual_seed(1)
    ref = lib_cls(**cfg)
    params = list(ref.parameters())
    opt = torch.optim.SGD(params, lr=0.05) if params else None
    for _ in range(3):
        x = torch.randn(3, 8, cfg["dim"], requires_grad=True)
        q, _, losses = ref(x)
        if opt is not None:
            opt.zero_grad()
            (q.square().mean() + losses.sum()).backward()
            opt.step()
    sd = ref.state_dict()
    ours = ours_cls(**cfg)
    ours.load_state_dict(sd)
    assert ours.state_dict().keys() == sd.keys()
    ref.eval()
    ours.eval()
    x = torch.randn(2, 6, cfg["dim"])
    with torch.no_grad():
        q_ref, i_ref, l_ref = ref(x)
        q, i, losses = ours(x)
    assert torch.equal(i, i_ref)
    torch.testing.assert_close(q, q_ref, rtol=1e-5, atol=1e-5)
    assert losses.shape == l_ref.shape and not losses.any()


@pytest.mark.parametrize("name", ["plain", "projection", "shared", "sizes_per_depth", "cosine",
                                  "grouped"])
def test_training_steps_match_library(name):
    """From the same (library-made) state, deterministic training steps agree with the library."""
    ours_cls, lib_cls, cfg = checkpoint_config(name)
    torch.manual_seed(2)
    ref = lib_cls(**cfg)
    ours = ours_cls(**cfg)
    ours.load_state_dict(ref.state_dict())
    for _ in range(2):
        x = torch.randn(3, 8, cfg["dim"])
        q_ref, i_ref, l_ref = ref(x)
        q, i, losses = ours(x)
        assert torch.equal(i, i_ref)
        torch.testing.assert_close(q, q_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(losses, l_ref, rtol=1e-5, atol=1e-6)
    ours_sd = ours.state_dict()
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(ours_sd[key], value, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- (c) semantics per option


def test_eval_greedy_search_shapes_and_zero_losses():
    rvq = make().eval()
    x = torch.randn(2, 6, D)
    q, idx, losses = rvq(x)
    assert idx.shape == (2, 6, L) and idx.dtype == torch.int64
    assert losses.shape == (L,) and losses.dtype == torch.float32 and not losses.any()
    codebooks = f64(rvq.codebooks)
    assert codebooks.shape == (L, K, D)
    ref_idx, ref_q = greedy(f64(x).reshape(-1, D), codebooks)
    assert idx.reshape(-1, L).tolist() == ref_idx.tolist()
    np.testing.assert_allclose(f64(q).reshape(-1, D), ref_q, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rvq.get_output_from_indices(idx), q)


def test_training_losses_per_depth():
    rvq = make(rotation_trick=False, commitment_weight=0.5)
    x = torch.randn(2, 6, D)
    codebooks = f64(rvq.codebooks)
    _, idx, losses = rvq(x, freeze_codebook=True)
    residual = f64(x).reshape(-1, D)
    expected = []
    for depth in range(L):
        codes = codebooks[depth][idx[..., depth].reshape(-1).numpy()]
        expected.append(0.5 * ((residual - codes) ** 2).mean())
        residual = residual - codes
    np.testing.assert_allclose(f64(losses), expected, rtol=1e-5)


def test_codebook_sizes_per_depth():
    rvq = make(codebook_size=(7, 5, 3), num_quantizers=None).eval()
    assert rvq.num_quantizers == 3
    books = rvq.codebooks
    assert isinstance(books, tuple) and [tuple(b.shape) for b in books] == [(7, D), (5, D), (3, D)]
    x = torch.randn(2, 6, D)
    _, idx, _ = rvq(x)
    ref_idx, _ = greedy(f64(x).reshape(-1, D), [f64(b) for b in books])
    assert idx.reshape(-1, 3).tolist() == ref_idx.tolist()


def test_return_all_codes():
    rvq = make().eval()
    x = torch.randn(2, 6, D)
    q, idx, _, codes = rvq(x, return_all_codes=True)
    assert codes.shape == (L, 2, 6, D)
    for depth in range(L):
        torch.testing.assert_close(codes[depth], rvq.codebooks[depth][idx[..., depth]])
    torch.testing.assert_close(codes.sum(0), q)


@pytest.mark.parametrize("cutoff,multiple", [(0, 1), (1, 1), (1, 2)])
def test_quantize_dropout_with_fixed_seed(cutoff, multiple):
    rvq = make(num_quantizers=4, quantize_dropout=True, quantize_dropout_cutoff_index=cutoff,
               quantize_dropout_multiple_of=multiple, rotation_trick=False)
    x = torch.randn(2, 6, D)
    for seed in range(6):
        last = random.Random(seed).randrange(cutoff, 4)
        if multiple != 1:
            last = ceil((last + 1) / multiple) * multiple - 1
        _, idx, losses = rvq(x, freeze_codebook=True, rand_quantize_dropout_fixed_seed=seed)
        assert (idx[..., last + 1:] == -1).all() and (idx[..., :last + 1] >= 0).all()
        assert not losses[last + 1:].any() and losses[:last + 1].all()
    rvq.eval()
    _, coarse, _ = rvq(x)
    dropped = coarse.clone()
    dropped[..., 2:] = -1
    expected = rvq.codebooks[0][coarse[..., 0]] + rvq.codebooks[1][coarse[..., 1]]
    torch.testing.assert_close(rvq.get_output_from_indices(dropped), expected)
    torch.testing.assert_close(rvq.get_output_from_indices(coarse[..., :2]), expected)


@pytest.mark.parametrize("size,depth,beam,weights", [
    (4, 2, 4, None),            # beam = codebook size: every path of two layers survives
    (4, 2, 4, [0.3, 2.0]),
    (3, 3, 9, None),            # beam above the codebook size (the library crashes here)
    (3, 3, 9, [1.0, 0.2, 3.0]),
])
def test_beam_search_equals_exhaustive_search(size, depth, beam, weights):
    """Beam score: −Σ_l w_l · commitment_weight · mean((r_l − c_l)²); the best path wins."""
    kw = dict(codebook_size=size, num_quantizers=depth, beam_size=beam, commitment_weight=2.0)
    if weights is not None:
        kw["beam_score_quantizer_weights"] = weights
    rvq = make(**kw).eval()
    w = np.ones(depth) if weights is None else np.array(weights)
    codebooks = f64(rvq.codebooks)
    x = torch.randn(2, 4, D)
    q, idx, losses = rvq(x)
    assert idx.shape == (2, 4, depth) and losses.shape == (depth,)
    tokens = f64(x).reshape(-1, D)
    best_paths, best_terms = [], []
    for token in tokens:
        best = None
        for path in itertools.product(range(size), repeat=depth):
            residual, score, terms = token.copy(), 0.0, []
            for layer, code in enumerate(path):
                term = 2.0 * ((residual - codebooks[layer][code]) ** 2).mean()
                terms.append(term)
                score -= w[layer] * term
                residual = residual - codebooks[layer][code]
            if best is None or score > best[0]:
                best = (score, path, terms)
        best_paths.append(best[1])
        best_terms.append(best[2])
    assert idx.reshape(-1, depth).tolist() == [list(p) for p in best_paths]
    np.testing.assert_allclose(f64(losses), np.mean(best_terms, 0), rtol=1e-5)
    expected_q = sum(codebooks[d][np.array(best_paths)[:, d]] for d in range(depth))
    np.testing.assert_allclose(f64(q).reshape(-1, D), expected_q, rtol=1e-5, atol=1e-6)


def test_beam_size_one_is_greedy_and_eval_beam_size():
    rvq = make(beam_size=1).eval()
    x = torch.randn(2, 6, D)
    ref_idx, _ = greedy(f64(x).reshape(-1, D), f64(rvq.codebooks))
    assert rvq(x)[1].reshape(-1, L).tolist() == ref_idx.tolist()
    with pytest.raises((AssertionError, ValueError)):
        make(eval_beam_size=2)
    # eval_beam_size applies in eval only, the forward argument overrides both
    beam = make(codebook_size=4, num_quantizers=2, beam_size=4).eval()
    switch = make(codebook_size=4, num_quantizers=2, beam_size=1, eval_beam_size=4)
    plain = make(codebook_size=4, num_quantizers=2)
    switch.load_state_dict(beam.state_dict())
    plain.load_state_dict(beam.state_dict())
    x = torch.randn(3, 8, D)
    expected = beam(x)[1]
    assert torch.equal(switch.eval()(x)[1], expected)
    assert torch.equal(plain.eval()(x, beam_size=4)[1], expected)
    greedy_idx, _ = greedy(f64(x).reshape(-1, D), f64(beam.codebooks))
    assert plain(x)[1].reshape(-1, 2).tolist() == greedy_idx.tolist()


@pytest.mark.parametrize("frac", [0.0, 0.5, 1.0])
def test_quant_grad_frac_gradient(frac):
    rvq = make(quant_grad_frac=frac, rotation_trick=False)
    x = torch.randn(2, 3, D, requires_grad=True)
    q, _, _ = rvq(x, freeze_codebook=True)
    q.sum().backward()
    # d r_{l+1} / d r_l = 1 − frac (the first gradient-free when frac = 0 is the identity)
    per_layer = 1.0 if frac == 0.0 else 1.0 - frac
    expected = sum(per_layer ** depth for depth in range(L))
    torch.testing.assert_close(x.grad, torch.full_like(x, expected))


def test_diveq_value_and_gradients():
    rvq = make(diveq=True)
    x = torch.randn(5, 1, D, requires_grad=True)
    q, idx, losses = rvq(x)
    assert not losses.any()
    books = [layer._codebook.embed for layer in rvq.layers]
    assert all(isinstance(b, torch.nn.Parameter) for b in books)
    total = sum(books[d][0][idx[..., d]] for d in range(L)).detach()
    err = total - x.detach()
    torch.testing.assert_close((q - x).detach().norm(dim=-1), err.norm(dim=-1), rtol=1e-4,
                               atol=1e-5)
    # out = x + u·‖Q − x‖ with u the noised unit direction (no gradient): d out / d x = I − u eᵀ,
    # e the true error direction, so the gradient of sum(out) is 1 − e (u · 1)
    u = (q - x).detach() / err.norm(dim=-1, keepdim=True)
    e = err / err.norm(dim=-1, keepdim=True)
    q.sum().backward()
    ones = torch.ones(D)
    proj = e * (u @ ones)[..., None]
    torch.testing.assert_close(x.grad, ones - proj, rtol=1e-4, atol=1e-5)
    for d in range(L):
        expected = torch.zeros(K, D).index_add_(0, idx[..., d].reshape(-1), proj.reshape(-1, D))
        torch.testing.assert_close(books[d].grad[0], expected, rtol=1e-4, atol=1e-5)


def test_shared_codebook_ema_updates_once_after_all_layers():
    decay = 0.6
    rvq = make(shared_codebook=True, decay=decay)
    assert all(layer._codebook is rvq.layers[0]._codebook for layer in rvq.layers)
    codes = f64(rvq.codebooks[0])
    x = torch.randn(2, 6, D)
    _, idx, _ = rvq(x)
    tokens = f64(x).reshape(-1, D)
    ref_idx, _ = greedy(tokens, [codes] * L)
    assert idx.reshape(-1, L).tolist() == ref_idx.tolist()
    cs, ea, residual = np.ones(K), codes.copy(), tokens.copy()
    for depth in range(L):  # the statistics take one EMA step per layer ...
        pick = ref_idx[:, depth]
        counts = np.bincount(pick, minlength=K)
        sums = np.zeros((K, D))
        np.add.at(sums, pick, residual)
        cs = decay * cs + (1 - decay) * counts
        ea = decay * ea + (1 - decay) * sums
        residual = residual - codes[pick]
    n = cs.sum()
    embed = ea / ((cs + 1e-5) / (n + K * 1e-5) * n)[:, None]  # ... the codebook one at the end
    np.testing.assert_allclose(f64(rvq.codebooks[0]), embed, rtol=1e-4, atol=1e-5)
    for depth in range(1, L):
        assert torch.equal(rvq.codebooks[depth], rvq.codebooks[0])


@pytest.mark.parametrize("zeros", [True, False])
def test_mask(zeros):
    rvq = make(return_zeros_for_masked_padding=zeros).eval()
    x = torch.randn(2, 5, D)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    q, idx, _ = rvq(x, mask=mask)
    assert (idx[~mask] == -1).all()
    ref_idx, ref_q = greedy(f64(x)[mask.numpy()], f64(rvq.codebooks))
    assert idx[mask].tolist() == ref_idx.tolist()
    np.testing.assert_allclose(f64(q)[mask.numpy()], ref_q, rtol=1e-5, atol=1e-6)
    assert torch.equal(q[~mask], torch.zeros_like(x[~mask]) if zeros else x[~mask])


def test_cross_entropy_to_given_indices_first_layer():
    rvq = make(num_quantizers=1).eval()
    x = torch.randn(2, 5, D)
    target = torch.randint(0, K, (2, 5, 1))
    out = rvq(x, indices=target)
    assert len(out) == 2
    logits = -np.sqrt(sq_dist(f64(x).reshape(-1, D), f64(rvq.codebooks[0])))
    lse = np.log(np.exp(logits).sum(-1))
    ce = (lse - logits[np.arange(10), target.reshape(-1).numpy()]).mean()
    assert float(out[1]) == pytest.approx(ce, rel=1e-5)


def test_cross_entropy_to_given_indices_follows_their_residuals():
    """Layer l scores the residual left by the given codes of layers < l (the library scores x)."""
    rvq = make().eval()
    x = torch.randn(2, 5, D)
    target = torch.randint(0, K, (2, 5, L))
    q, ce = rvq(x, indices=target)
    books = f64(rvq.codebooks)
    residual, total, expected = f64(x).reshape(-1, D), 0.0, 0.0
    for depth in range(L):
        pick = target[..., depth].reshape(-1).numpy()
        logits = -np.sqrt(sq_dist(residual, books[depth]))
        lse = np.log(np.exp(logits).sum(-1))
        expected += (lse - logits[np.arange(10), pick]).mean()
        residual = residual - books[depth][pick]
        total = total + books[depth][pick]
    assert float(ce) == pytest.approx(expected, rel=1e-5)
    np.testing.assert_allclose(f64(q).reshape(-1, D), total, rtol=1e-5, atol=1e-6)


def test_implicit_neural_codebook():
    rvq = make(num_quantizers=2, implicit_neural_codebook=True, mlp_kwargs=dict(depth=2)).eval()
    sd = {k: f64(v) for k, v in rvq.state_dict().items()}
    assert "mlps.0.proj_in.weight" in sd and "mlps.0.layers.1.2.bias" in sd

    def linear(name, h):
        return h @ sd[name + ".weight"].T + sd[name + ".bias"]

    def mlp(codes, condition):  # codes (K, D), condition (N, D) -> (N, K, D)
        h = np.concatenate([np.broadcast_to(condition[:, None], (len(condition), K, D)),
                            np.broadcast_to(codes[None], (len(condition), K, D))], -1)
        h = linear("mlps.0.proj_in", h)
        for i in range(2):
            a = linear(f"mlps.0.layers.{i}.0", h)
            h = h + linear(f"mlps.0.layers.{i}.2", a / (1 + np.exp(-a)))
        return h

    x = torch.randn(2, 4, D)
    q, idx, _ = rvq(x)
    tokens = f64(x).reshape(-1, D)
    books = f64(rvq.codebooks)
    first = sq_dist(tokens, books[0]).argmin(-1)
    q0 = books[0][first]
    per_token = mlp(books[1], q0)
    second = (((tokens - q0)[:, None] - per_token) ** 2).sum(-1).argmin(-1)
    assert idx.reshape(-1, 2).tolist() == np.stack([first, second], -1).tolist()
    expected = q0 + per_token[np.arange(len(tokens)), second]
    np.testing.assert_allclose(f64(q).reshape(-1, D), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rvq.get_output_from_indices(idx), q, rtol=1e-4, atol=1e-5)


def test_cosine_similarity_residuals():
    rvq = make(use_cosine_sim=True).eval()
    x = torch.randn(2, 5, D)
    _, idx, _ = rvq(x)
    books = f64(rvq.codebooks)
    residual = f64(x).reshape(-1, D)
    for depth in range(L):
        unit = residual / np.linalg.norm(residual, axis=-1, keepdims=True)
        pick = (unit @ books[depth].T).argmax(-1)
        assert idx[..., depth].reshape(-1).tolist() == pick.tolist()
        residual = residual - books[depth][pick]


def test_image_feature_maps():
    rvq = make(accept_image_fmap=True).eval()
    x = torch.randn(2, D, 3, 4)
    q, idx, losses = rvq(x)
    assert q.shape == x.shape and idx.shape == (2, 3, 4, L) and losses.shape == (L,)
    ref_idx, ref_q = greedy(f64(x.movedim(1, -1)).reshape(-1, D), f64(rvq.codebooks))
    assert idx.reshape(-1, L).tolist() == ref_idx.tolist()
    np.testing.assert_allclose(f64(q.movedim(1, -1)).reshape(-1, D), ref_q, rtol=1e-5, atol=1e-6)


def test_heads_must_be_one():
    make(heads=1)
    with pytest.raises((AssertionError, ValueError)):
        make(heads=2)


def test_grouped_layout_and_search():
    groups = 2
    grvq = GroupedResidualVQ(dim=2 * D, codebook_size=K, num_quantizers=L, groups=groups).eval()
    assert GroupedResidualVQ(dim=D, codebook_size=K, num_quantizers=L).groups == 1
    assert grvq.codebooks.shape == (groups, L, K, D)
    x = torch.randn(2, 6, 2 * D)
    q, idx, losses = grvq(x)
    assert idx.shape == (groups, 2, 6, L) and losses.shape == (groups, L) and not losses.any()
    for g in range(groups):
        part = f64(x[..., g * D:(g + 1) * D]).reshape(-1, D)
        ref_idx, ref_q = greedy(part, f64(grvq.codebooks[g]))
        assert idx[g].reshape(-1, L).tolist() == ref_idx.tolist()
        np.testing.assert_allclose(f64(q[..., g * D:(g + 1) * D]).reshape(-1, D), ref_q,
                                   rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grvq.get_output_from_indices(idx), q)
    _, _, _, codes = grvq(x, return_all_codes=True)  # one (L, B, N, D) per group
    assert len(codes) == groups and all(c.shape == (L, 2, 6, D) for c in codes)


def test_grouped_training_losses_and_forward_options():
    grvq = GroupedResidualVQ(dim=2 * D, codebook_size=K, num_quantizers=L, groups=2,
                             rotation_trick=False)
    x = torch.randn(2, 6, 2 * D)
    before = {k: v.clone() for k, v in grvq.state_dict().items()}
    _, idx, losses = grvq(x, freeze_codebook=True, sample_codebook_temp=0.0)
    assert losses.shape == (2, L) and losses.all()
    for key, value in grvq.state_dict().items():
        assert torch.equal(value, before[key]), key
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 3:] = False
    _, idx, _ = grvq(x, mask=mask)
    assert (idx[:, ~mask] == -1).all() and (idx[:, mask] >= 0).all()
