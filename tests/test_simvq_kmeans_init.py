"""SimVQ's ``kmeans_init``: the codes start at the k-means centroids of the first training batch
(checked against the NumPy means of well-separated blobs), once, never from a refused batch,
and checkpoints with or without the flag load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from vqvae import QuantizerInputError, ResidualSimVQ, SimVQ, raise_deferred
from vqvae.models import VQVAE, ModelConfig
from vqvae.quantizers import guard

BLOBS = 8


def blobs(seed: int = 0, per_blob: int = 64, dim: int = 6, spread: float = 0.01):
    """(BLOBS * per_blob, dim) rows around BLOBS far-apart centres, the blob of each row, and
    the NumPy float64 mean of each blob."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(BLOBS, dim)) * 3.0 + 0.5
    labels = np.repeat(np.arange(BLOBS), per_blob)
    rows = centres[labels] + rng.normal(size=(labels.size, dim)) * spread
    means = np.stack([rows[labels == b].mean(0) for b in range(BLOBS)])
    order = rng.permutation(labels.size)
    return torch.tensor(rows[order], dtype=torch.float32), labels[order], means


def assert_codes_are_the_blob_means(codes: torch.Tensor, means: np.ndarray, atol=1e-4):
    codes = codes.detach().double().numpy()
    # each blob's mean is a code, and each code is a blob's mean
    gaps = np.linalg.norm(codes[:, None, :] - means[None, :, :], axis=-1)  # (K, BLOBS)
    assert gaps.min(0).max() < atol
    assert gaps.min(1).max() < atol


@pytest.mark.parametrize("kwargs", [
    {},
    {"codebook_transform": nn.Linear(6, 6, bias=True)},
    {"frozen_codebook_dim": 10},
], ids=["default", "bias", "wider-frozen"])
def test_first_training_call_makes_the_codes_the_centroids(kwargs):
    torch.manual_seed(0)
    x, labels, means = blobs()
    vq = SimVQ(dim=6, codebook_size=BLOBS, kmeans_init=True, kmeans_iters=20, **kwargs).train()
    assert not vq.initted
    _, indices, _ = vq(x.unsqueeze(0))
    assert vq.initted
    assert_codes_are_the_blob_means(vq.codebook, means)
    # every row goes to its blob's code: one code per blob
    pairs = set(zip(labels.tolist(), indices[0].tolist(), strict=True))
    assert len(pairs) == BLOBS and len({code for _, code in pairs}) == BLOBS


def test_without_the_option_the_codes_are_the_library_gaussian_start():
    torch.manual_seed(0)
    x, _, means = blobs()
    vq = SimVQ(dim=6, codebook_size=BLOBS).train()
    frozen = vq.frozen_codebook.clone()
    vq(x.unsqueeze(0))
    assert torch.equal(vq.frozen_codebook, frozen) and not hasattr(vq, "initted")
    assert "initted" not in vq.state_dict()


def test_initialises_once_and_not_in_eval():
    torch.manual_seed(1)
    x, _, _ = blobs(seed=1)
    vq = SimVQ(dim=6, codebook_size=BLOBS, kmeans_init=True)
    frozen = vq.frozen_codebook.clone()
    vq.eval()(x.unsqueeze(0))
    assert torch.equal(vq.frozen_codebook, frozen) and not vq.initted
    vq.train()(x.unsqueeze(0))
    after_first = vq.frozen_codebook.clone()
    assert not torch.equal(after_first, frozen)
    x2, _, _ = blobs(seed=2)
    vq(x2.unsqueeze(0))
    assert torch.equal(vq.frozen_codebook, after_first)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_first_batch_raises_and_initialises_nothing(bad):
    torch.manual_seed(2)
    x, _, means = blobs(seed=2)
    vq = SimVQ(dim=6, codebook_size=BLOBS, kmeans_init=True, kmeans_iters=20).train()
    state = {k: v.clone() for k, v in vq.state_dict().items()}
    broken = x.clone()
    broken[5, 2] = bad
    with pytest.raises(QuantizerInputError):
        vq(broken.unsqueeze(0))
    assert all(torch.equal(state[k], v) for k, v in vq.state_dict().items())
    vq(x.unsqueeze(0))  # the next finite batch initialises
    assert vq.initted
    assert_codes_are_the_blob_means(vq.codebook, means)


def test_deferred_calls_refuse_a_bad_batch_and_initialise_from_a_good_one():
    torch.manual_seed(3)
    x, _, means = blobs(seed=3)
    vq = SimVQ(dim=6, codebook_size=BLOBS, kmeans_init=True, kmeans_iters=20).train()
    state = {k: v.clone() for k, v in vq.state_dict().items()}
    broken = x.clone()
    broken[0, 0] = float("nan")
    with guard.input_checks("deferred"):
        vq(broken.unsqueeze(0))
    assert all(torch.equal(state[k], v) for k, v in vq.state_dict().items())
    with pytest.raises(QuantizerInputError, match="non-finite"):
        raise_deferred(vq)
    # the host's flag counted the codebook as initialised (as VectorQuantize's does); a fresh
    # module shows the deferred k-means itself
    vq = SimVQ(dim=6, codebook_size=BLOBS, kmeans_init=True, kmeans_iters=20).train()
    with guard.input_checks("deferred"):
        vq(x.unsqueeze(0))
    assert vq.initted
    assert_codes_are_the_blob_means(vq.codebook, means)


def test_checkpoints_load_both_ways():
    lib = pytest.importorskip("vector_quantize_pytorch")
    torch.manual_seed(4)
    x, _, _ = blobs(seed=4)
    theirs = lib.SimVQ(dim=6, codebook_size=BLOBS)
    ours = SimVQ(dim=6, codebook_size=BLOBS, kmeans_init=True)
    ours.load_state_dict(theirs.state_dict())  # no flag: a chosen codebook, kept
    assert ours.initted
    ours.train()(x.unsqueeze(0))
    assert torch.equal(ours.frozen_codebook, theirs.frozen_codebook)
    # ours with the flag into ours without it, and back
    plain = SimVQ(dim=6, codebook_size=BLOBS)
    plain.load_state_dict(ours.state_dict())
    fresh = SimVQ(dim=6, codebook_size=BLOBS, kmeans_init=True)
    fresh.load_state_dict(ours.state_dict())
    assert fresh.initted and not fresh.kmeans_pending


def test_bad_settings_are_refused_clearly():
    mlp = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6))
    with pytest.raises(ValueError, match="needs codebook_transform to be an nn.Linear"):
        SimVQ(dim=6, codebook_size=8, kmeans_init=True, codebook_transform=mlp)
    with pytest.raises(ValueError, match="frozen_codebook_dim >= dim"):
        SimVQ(dim=6, codebook_size=8, kmeans_init=True, frozen_codebook_dim=4)
    with pytest.raises(ValueError, match="kmeans_iters"):
        SimVQ(dim=6, codebook_size=8, kmeans_init=True, kmeans_iters=-1)


def test_residual_layers_each_start_at_the_centroids_of_their_input():
    torch.manual_seed(5)
    x, _, means = blobs(seed=5)
    rvq = ResidualSimVQ(dim=6, codebook_size=BLOBS, num_quantizers=2, kmeans_init=True,
                        kmeans_iters=20).train()
    rvq(x.unsqueeze(0))
    assert all(layer.initted for layer in rvq.layers)
    assert_codes_are_the_blob_means(rvq.layers[0].codebook, means)
    # the second layer clustered what the first left: residuals of the blobs' spread
    assert rvq.layers[1].codebook.detach().abs().max() < 0.1


def test_registry_presets():
    ours = VQVAE(ModelConfig(quantizer="simvq")).quantizer
    assert any(isinstance(m, SimVQ) and m.kmeans_init for m in ours.modules())
    pytest.importorskip("vector_quantize_pytorch")
    VQVAE(ModelConfig(quantizer="lucidrains-simvq"))  # the shared options only
    with pytest.raises(ValueError, match="kmeans_init is an option of our SimVQ only"):
        VQVAE(ModelConfig(quantizer="lucidrains-simvq",
                          quantizer_options={"kmeans_init": True}))


@pytest.mark.parametrize("frozen_dim", [6, 9])
def test_the_map_keeps_its_directions_with_every_singular_value_the_scale(frozen_dim):
    torch.manual_seed(6)
    x, _, _ = blobs(seed=6)
    vq = SimVQ(dim=6, codebook_size=BLOBS, kmeans_init=True, kmeans_map_scale=0.05,
               frozen_codebook_dim=frozen_dim).train()
    before = vq.code_transform.weight.detach().double().numpy().copy()
    vq(x.unsqueeze(0))
    after = vq.code_transform.weight.detach().double().numpy()
    np.testing.assert_allclose(np.linalg.svd(after, compute_uv=False), 0.05, rtol=1e-5)
    # the nearest matrix with orthonormal rows to the initial map (its polar factor), scaled
    u, _, vh = np.linalg.svd(before, full_matrices=False)
    np.testing.assert_allclose(after, 0.05 * u @ vh, atol=1e-6)
    with pytest.raises(ValueError, match="kmeans_map_scale"):
        SimVQ(dim=6, codebook_size=8, kmeans_init=True, kmeans_map_scale=0.0)
