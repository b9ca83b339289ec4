"""The judge's metrics against independent computations, and its cache's checksum."""

import math

import numpy as np
import pytest
import torch

from vqvae.judge import (
    Judge,
    JudgeError,
    JudgeNet,
    JudgeTrainConfig,
    frechet_distance,
    gaussian_stats,
    inception_score,
    load_judge_net,
    report_table,
    save_judge,
    train_judge,
)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """These tensors are tiny: one thread beats two (see conftest.one_thread)."""


def random_covariance(rng, dim):
    a = rng.normal(size=(dim, dim))
    return a @ a.T / dim + 0.1 * np.eye(dim)


# ---------------------------------------------------------------------------- FD


def test_fd_one_dimensional_closed_form():
    # N(m1, v1) vs N(m2, v2): (m1 - m2)² + (√v1 - √v2)²
    fd = frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-2.0]), np.array([[9.0]]))
    assert fd == pytest.approx(3.0**2 + (2.0 - 3.0) ** 2, rel=1e-12)


def test_fd_commuting_covariances_closed_form():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    a, b = rng.uniform(0.1, 3.0, 5), rng.uniform(0.1, 3.0, 5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    fd = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert fd == pytest.approx(expected, rel=1e-10)


def test_fd_general_matches_eigenvalues_of_the_product():
    # tr((S1 S2)^½) = Σ √λ(S1 S2): the eigenvalues of a product of SPD matrices are real, > 0
    rng = np.random.default_rng(1)
    s1, s2 = random_covariance(rng, 6), random_covariance(rng, 6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    eigenvalues = np.linalg.eigvals(s1 @ s2).real
    expected = (np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
                - 2 * np.sqrt(eigenvalues).sum())
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-9)


def test_fd_of_identical_singular_gaussians_is_zero():
    # a rank-deficient covariance (fewer samples than dimensions) must not break the root
    features = np.random.default_rng(2).normal(size=(5, 20))
    mu, sigma = gaussian_stats(features)
    assert np.linalg.matrix_rank(sigma) < 20
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)


# ---------------------------------------------------------------------------- IS


def test_inception_score_hand_computed():
    probs = np.array([[1.0, 0.0], [0.5, 0.5]])
    marginal = np.array([0.75, 0.25])
    kl_first = math.log(1.0 / marginal[0])
    kl_second = 0.5 * math.log(0.5 / marginal[0]) + 0.5 * math.log(0.5 / marginal[1])
    assert inception_score(probs) == pytest.approx(math.exp((kl_first + kl_second) / 2))


def test_inception_score_of_one_class_is_one_and_of_even_confident_classes_is_c():
    one_class = np.tile([0.02, 0.9, 0.08], (50, 1))
    assert inception_score(one_class) == pytest.approx(1.0, abs=1e-12)
    assert inception_score(np.eye(10)[np.arange(100) % 10]) == pytest.approx(10.0)


# ---------------------------------------------------------------------------- the judge


def blobs(n, seed=0):
    """Images with a bright square at a random place: something with structure to judge."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.zeros(n, 1, 28, 28)
    corners = torch.randint(0, 20, (n, 2), generator=generator)
    for image, (y, x) in zip(images, corners.tolist(), strict=True):
        image[0, y:y + 8, x:x + 8] = 1.0
    return images


@pytest.fixture(scope="module")
def random_judge():
    torch.manual_seed(0)
    return Judge(JudgeNet(width=4).eval(), "mnist", batch_size=300)


def test_fd_of_a_set_against_itself_is_zero_and_grows_with_noise(random_judge):
    images = blobs(200)
    random_judge.set_reference(images)
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(images.shape, generator=generator)
    fds = [random_judge.score((images + level * noise).clamp(0, 1)).fd
           for level in (0.0, 0.1, 0.3, 0.6)]
    assert fds[0] == pytest.approx(0.0, abs=1e-6)
    assert all(a < b for a, b in zip(fds, fds[1:], strict=False)), fds


def test_score_of_one_image_repeated(random_judge):
    image = blobs(1)
    with torch.no_grad():  # the class the net predicts, computed apart from the judge
        predicted = int(random_judge.net(image).argmax())
    other = (predicted + 1) % 10
    labels = [predicted] * 15 + [other] * 5  # 15 of 20 are the class the judge will say
    report = random_judge.score(image.repeat(20, 1, 1, 1)[:, 0], labels=labels)
    assert report.inception_score == pytest.approx(1.0, abs=1e-9)
    assert report.count == 20
    assert report.class_histogram == [20 if c == predicted else 0 for c in range(10)]
    assert report.accuracy == pytest.approx(0.75)
    assert random_judge.score(image.repeat(2, 1, 1, 1), labels=[other] * 2).accuracy == 0.0
    assert "| a set | 20 | 1.00 |" in report_table({"a set": report})


def test_score_refuses_non_finite_images(random_judge):
    images = blobs(4)
    images[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        random_judge.score(images)


def test_training_learns_and_the_cache_is_verified(tmp_path):
    # Two separable classes (square on the left / right half) learned from 400 images
    images = blobs(600, seed=3)
    labels = (images[:, 0, :, 14:].sum((1, 2)) > images[:, 0, :, :14].sum((1, 2))).long()
    net, record = train_judge(images[:400], labels[:400], images[400:], labels[400:],
                              JudgeTrainConfig(epochs=3, batch_size=25, lr=5e-3,
                                                               max_shift=0, width=4))
    assert record["test_accuracy"] > 0.9
    path = tmp_path / "judge.pt"
    save_judge(net, {**record, "dataset": "toy"}, path)
    loaded, loaded_record = load_judge_net(path)
    assert loaded_record["test_accuracy"] == record["test_accuracy"]
    for key, value in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(JudgeError, match="failed verification"):
        load_judge_net(path)
