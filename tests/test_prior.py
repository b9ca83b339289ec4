"""The code prior: layouts, KV cache, sampling, training against the frequency baseline, CLI."""

import itertools
import math

import pytest
import torch

from vqvae.cli import main
from vqvae.models import VQVAE, ModelConfig
from vqvae.prior import (
    CodePrior,
    FrequencyPrior,
    KVCache,
    PriorConfig,
    PriorTrainConfig,
    draw_labels,
    flatten_codes,
    sample,
    sample_images,
    train_prior,
    unflatten_codes,
)
from vqvae.workflow import random_codes


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """These tensors are tiny: one thread beats two (see conftest.one_thread)."""


def tiny_prior(code_shape=(6,), vocab_size=11, num_classes=10, seed=0) -> CodePrior:
    torch.manual_seed(seed)
    config = PriorConfig(vocab_size=vocab_size, code_shape=code_shape, num_classes=num_classes,
                         dim=32, depth=2, heads=4)
    return CodePrior(config).eval()


# ---------------------------------------------------------------------------- layouts

# one code per position; a grid; residual depths; groups × depths
LAYOUTS = [(16,), (7, 7), (4, 3), (3, 2, 2)]


@pytest.mark.parametrize("code_shape", LAYOUTS)
def test_flatten_is_row_major_and_unflatten_inverts_it(code_shape):
    codes = torch.randint(100, (5, *code_shape))
    tokens = flatten_codes(codes, code_shape)
    assert tokens.shape == (5, math.prod(code_shape))
    # row-major: the last axis (depth) varies fastest, so a position's depths are adjacent
    expected = [codes[2][index].item() for index in itertools.product(*map(range, code_shape))]
    assert tokens[2].tolist() == expected
    assert torch.equal(unflatten_codes(tokens, code_shape), codes)
    with pytest.raises(ValueError, match="codes must have shape"):
        flatten_codes(codes.reshape(5, -1, 1), code_shape)


@pytest.mark.parametrize("code_shape", LAYOUTS[1:])
def test_samples_have_the_layout_of_the_codes(code_shape):
    prior = tiny_prior(code_shape)
    codes = sample(prior, 3, seed=0)
    assert codes.shape == (3, *code_shape) and codes.dtype == torch.int64
    assert 0 <= int(codes.min()) and int(codes.max()) < 11


def test_conv_model_codes_are_a_grid_that_round_trips():
    config = ModelConfig(model="conv", channels=8, codebook_size=32)
    model = VQVAE(config).eval()
    images = torch.rand(3, 1, 28, 28)
    codes = model.encode(images)
    assert config.code_shape == (7, 7) and codes.shape == (3, 7, 7)
    assert model.decode(codes).shape == (3, 1, 28, 28)
    assert random_codes(config, 4).shape == (4, 7, 7)
    with pytest.raises(ValueError, match=r"codes must have shape \(B, 7, 7\)"):
        model.decode(codes.reshape(3, 49))


# ---------------------------------------------------------------------------- KV cache


def test_cached_steps_give_the_logits_of_the_full_forward():
    prior = tiny_prior((3, 2))
    tokens = torch.randint(11, (4, 6))
    labels = torch.tensor([0, 5, 10, 9])  # 10 is the null label
    with torch.no_grad():
        full = prior(tokens, labels)  # (4, 6, 11)
        cache = KVCache(prior.config, 4, "cpu")
        steps = [prior.step(None, labels, cache)]
        steps += [prior.step(tokens[:, i], labels, cache) for i in range(5)]
    torch.testing.assert_close(torch.stack(steps, 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options", [
    {},
    {"temperature": 0.7, "top_k": 4},
    {"labels": torch.arange(12) % 10},
    {"labels": torch.arange(12) % 10, "guidance_scale": 2.5, "temperature": 1.3},
])
def test_cached_sampling_draws_exactly_the_uncached_sequence(options):
    prior = tiny_prior((3, 4))
    kwargs = {"labels": None, **options}
    cached = sample(prior, 12, seed=7, use_cache=True, batch_size=5, **kwargs)
    uncached = sample(prior, 12, seed=7, use_cache=False, batch_size=5, **kwargs)
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, sample(prior, 12, seed=8, **kwargs))


def test_top_k_one_is_greedy_and_ignores_the_seed():
    prior = tiny_prior()
    greedy = sample(prior, 4, seed=0, top_k=1)
    assert torch.equal(greedy, sample(prior, 4, seed=1, top_k=1))
    with torch.no_grad():  # the first code is the argmax of the first step
        first = prior(torch.zeros(1, 1, dtype=torch.long))[0, 0].argmax()
    assert (greedy[:, 0] == first).all()
    with pytest.raises(ValueError, match="temperature"):
        sample(prior, 1, temperature=0.0)


# ---------------------------------------------------------------------------- learning


def chain_codes(n, length=6, vocab=8, seed=0):
    """Each code is (previous + label) mod vocab, 10% of codes replaced by noise: position
    frequencies are uniform, so only a model of the dependencies beats the baseline."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=generator)
    codes = torch.empty(n, length, dtype=torch.long)
    codes[:, 0] = torch.randint(vocab, (n,), generator=generator)
    for i in range(1, length):
        codes[:, i] = (codes[:, i - 1] + labels + 1) % vocab
    noisy = torch.rand(n, length, generator=generator) < 0.1
    codes[noisy] = torch.randint(vocab, (int(noisy.sum()),), generator=generator)
    return codes, labels


def test_frequency_baseline_nll_by_hand():
    codes = torch.tensor([[0, 1], [0, 2], [1, 2], [0, 2]])
    baseline = FrequencyPrior(codes, vocab_size=3, code_shape=(2,), alpha=0.5)
    # position 0: counts (3, 1, 0) + 0.5 -> (3.5, 1.5, 0.5) / 5.5; position 1: (0.5, 1.5, 3.5)
    p0 = torch.tensor([3.5, 1.5, 0.5]) / 5.5
    p1 = torch.tensor([0.5, 1.5, 3.5]) / 5.5
    held_out = torch.tensor([[2, 0]])
    assert baseline.nll(held_out) == pytest.approx(-(p0[2].log() + p1[0].log()).item() / 2)
    assert baseline.sample(5).shape == (5, 2)


def test_prior_beats_the_frequency_baseline_on_held_out_codes():
    codes, labels = chain_codes(1600)
    config = PriorConfig(vocab_size=8, code_shape=(6,), num_classes=3, dim=32, depth=1,
                         heads=2, dropout=0.0)
    run = train_prior(codes[:1200], labels[:1200], config,
                      PriorTrainConfig(epochs=6, batch_size=50, lr=1e-2, progress=False),
                      val_tokens=codes[1200:], val_labels=labels[1200:])
    baseline = run.metrics["val_nll_frequency_baseline"]
    assert baseline == pytest.approx(math.log(8), abs=0.05)
    assert run.metrics["val_nll"] < baseline - 0.4
    # the label tells the step size: knowing it must help
    assert run.metrics["val_nll_conditional"] < run.metrics["val_nll"] - 0.1
    # samples asked for label 2 follow its rule far more often than chance (1/8)
    samples = sample(run.prior, 200, torch.full((200,), 2), seed=0)
    follows = ((samples[:, 1:] - samples[:, :-1]) % 8 == 3).float().mean()
    assert follows > 0.6
    assert torch.equal(run.prior.label_counts, torch.bincount(labels[:1200]).float())


def test_drawn_labels_follow_the_training_label_frequencies():
    prior = tiny_prior(num_classes=3)
    prior.label_counts.copy_(torch.tensor([0.0, 3.0, 1.0]))
    labels = draw_labels(prior, 4000, seed=0)
    assert (labels != 0).all()
    assert (labels == 1).float().mean().item() == pytest.approx(0.75, abs=0.03)
    with pytest.raises(ValueError, match="without labels"):
        draw_labels(tiny_prior(num_classes=0), 5)


def test_sample_images_decodes_prior_codes_and_checks_the_digit():
    model = VQVAE(ModelConfig(model="conv", channels=8, codebook_size=32)).eval()
    conditional = tiny_prior((7, 7), vocab_size=32)
    conditional.label_counts.fill_(1.0)
    images = sample_images(model, conditional, 3, digit=4, guidance_scale=2.0)
    assert images.shape == (3, 1, 28, 28) and 0 <= images.min() and images.max() <= 1
    with pytest.raises(ValueError, match="digit must lie in 0-9"):
        sample_images(model, conditional, 1, digit=10)
    unconditional = tiny_prior((7, 7), vocab_size=32, num_classes=0)
    # guidance has nothing to guide toward: the default sampler falls back to the null label
    assert torch.equal(sample_images(model, unconditional, 2, guidance_scale=2.0),
                       sample_images(model, unconditional, 2, guidance_scale=1.0))
    with pytest.raises(ValueError, match="without labels"):
        sample_images(model, unconditional, 1, digit=3)


# ---------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("digit", ["11", "-1", "seven"])
def test_digit_outside_0_to_9_is_refused(digit, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", str(tmp_path), "--prior", "--digit", digit])
    assert exit_info.value.code == 2
    assert f"expected a digit from 0 to 9, got '{digit}'" in capsys.readouterr().err


def test_prior_options_without_prior_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", str(tmp_path), "--digit", "7"])
    assert exit_info.value.code == 2
    assert "need --prior" in capsys.readouterr().err


# ---------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_prior_sample_and_judge_commands_on_a_tiny_run(tmp_path, capsys, monkeypatch):
    """train → prior → sample --prior → judge through the CLI, all tiny (needs MNIST)."""
    import json

    import numpy as np

    import vqvae.workflow.runs
    from vqvae.data import DatasetError, load_dataset
    from vqvae.judge import JudgeNet, save_judge
    from vqvae.train import TrainConfig, train

    try:
        load_dataset("mnist", "test", download_missing=False, progress=False)
    except DatasetError:
        pytest.skip("MNIST is not available here (set VQVAE_DATA_DIR)")
    monkeypatch.setattr(vqvae.workflow.runs, "SAMPLE_COUNT", 8)  # figures are most of the time
    run_dir = tmp_path / "run"
    train(TrainConfig(epochs=1, train_subset=256, test_subset=64, out_dir=str(run_dir),
                      progress=False, device="cpu"),
          ModelConfig(hidden_dim=16, num_embeddings=4, codebook_size=8))
    assert main(["prior", str(run_dir), "--epochs", "1", "--dim", "16", "--heads", "2",
                 "--depth", "1", "--train-subset", "300", "--no-progress"]) == 0
    metrics = json.loads((run_dir / "prior_metrics.json").read_text())
    assert metrics["epochs"] == 1 and math.isfinite(metrics["val_nll"])
    for name in ("prior.pt", "samples_prior.png", "samples_random.png", "samples_by_digit.png"):
        assert (run_dir / name).is_file(), name

    out = tmp_path / "samples.npy"
    assert main(["sample", str(run_dir), "--prior", "--digit", "3", "--num", "5",
                 "--out", str(out)]) == 0
    images = np.load(out)
    assert images.shape == (5, 28, 28) and images.dtype == np.float32
    assert 0 <= images.min() and images.max() <= 1

    judge_path = tmp_path / "judge.pt"  # an untrained judge: this checks the plumbing only
    save_judge(JudgeNet(width=4), {"version": 1, "dataset": "mnist", "test_accuracy": 0.1,
                                   "config": {"width": 4}}, judge_path)
    assert main(["judge", str(run_dir), "--num", "40", "--judge-path", str(judge_path),
                 "--images", str(out), "--no-progress"]) == 0
    table = capsys.readouterr().out
    for row in ("real test set", "reconstructions", "random codes", "per-position frequencies",
                "prior, null label", "prior, class drawn, guidance 2",
                "prior, digit asked for, guidance 2", str(out)):
        assert f"| {row} |" in table, row
    result = json.loads((run_dir / "judge.json").read_text())
    assert result["count"] == 40 and result["reports"]["prior, null label"]["count"] == 40
    # the real set's accuracy, recomputed from the judge's own predictions
    from vqvae.judge import load_judge_net

    net, _ = load_judge_net(judge_path)
    test = load_dataset("mnist", "test", progress=False)
    with torch.no_grad():
        predicted = net(test.as_float()[:40].unsqueeze(1)).argmax(-1)
    expected = float((predicted == test.labels[:40]).float().mean())
    assert result["reports"]["real test set"]["accuracy"] == pytest.approx(expected)
