"""The residual quantizers in the workflow: config, model, code layouts, metrics, files, CLI."""

import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from vqvae.cli import main
from vqvae.models import VQVAE, ModelConfig
from vqvae.quantizers.metrics import code_counts_per_codebook, usage_from_counts
from vqvae.workflow import load_codes, random_codes, save_codes

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
RESIDUAL = [("rvq", {}), ("rqvae", {}), ("grvq", {"groups": 2}),
            ("lucidrains-rvq", {}), ("lucidrains-grvq", {"groups": 2})]


def residual_config(name: str, extra: dict, num_quantizers: int = 3,
                    codebook_size: int = 512) -> ModelConfig:
    return ModelConfig(quantizer=name, num_quantizers=num_quantizers,
                       codebook_size=codebook_size, **extra)


@pytest.mark.parametrize("name,extra", RESIDUAL)
def test_code_shape_and_bits(name, extra):
    config = residual_config(name, extra)
    groups = extra.get("groups")
    expected = (16, groups, 3) if groups else (16, 3)
    assert config.code_shape == expected
    assert config.codebooks_per_position == (groups or 1) * 3
    assert config.bits_per_image == pytest.approx(np.prod(expected) * 9)
    assert ModelConfig().code_shape == (16,) and ModelConfig().bits_per_image == 144


@pytest.mark.parametrize("kwargs,match", [
    (dict(quantizer="ours", num_quantizers=2), "does not take num_quantizers"),
    (dict(quantizer="rvq", groups=2), "does not take groups"),
    (dict(quantizer="grvq", groups=3), "multiple of groups"),
    (dict(quantizer="rvq", quantizer_options={"num_quantizers": 4}), "model setting"),
    (dict(quantizer="rvq", num_quantizers=0), "positive integer"),
])
def test_config_refuses_mismatched_code_axes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kwargs)


@pytest.mark.parametrize("name,extra", RESIDUAL)
def test_model_encode_decode_round_trip(name, extra):
    torch.manual_seed(0)
    config = residual_config(name, extra, codebook_size=32)
    model = VQVAE(config)
    images = torch.rand(12, 1, 28, 28)
    model.train()(images)  # k-means initialisation of every depth
    model.eval()
    codes = model.encode(images)
    assert codes.shape == (12, *config.code_shape) and codes.dtype == torch.int64
    assert (codes >= 0).all() and (codes < 32).all()
    expected = model(images).reconstruction
    decoded = model.decode(codes)
    if name.startswith("lucidrains"):  # the library sums codes in its own order
        torch.testing.assert_close(decoded, expected, rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(decoded, expected)
    assert model.decode(random_codes(config, 5)).shape == (5, 1, 28, 28)
    with pytest.raises(ValueError, match="codes must have shape"):
        model.decode(codes[..., :1])


@pytest.mark.parametrize("name", ["lucidrains", "naive"])
def test_encode_reads_codes_of_layers_that_return_plain_tuples(name):
    torch.manual_seed(0)
    model = VQVAE(ModelConfig(quantizer=name, codebook_size=32)).eval()
    images = torch.rand(4, 1, 28, 28)
    codes = model.encode(images)
    assert codes.shape == (4, *model.config.code_shape) and codes.dtype == torch.int64
    # (q - x).detach() + x rounds, so the forward pass is the decoded codes to within rounding.
    torch.testing.assert_close(model.decode(codes), model(images).reconstruction,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,extra", [("lucidrains-rvq", {}),
                                        ("lucidrains-grvq", {"groups": 2})])
def test_library_adapter_reduces_losses_and_lays_out_codes_like_ours(name, extra):
    torch.manual_seed(1)
    adapter = VQVAE(residual_config(name, extra, codebook_size=32)).quantizer.train()
    raw = copy.deepcopy(adapter.module)
    z = torch.randn(4, 16, 16)
    torch.manual_seed(2)
    _, indices, loss = adapter(z)
    torch.manual_seed(2)
    _, raw_indices, raw_losses = raw(z)
    assert raw_losses.shape == ((2, 3) if extra else (3,))  # one loss per (group and) depth
    # the library puts the group axis first; ours puts it before the depth axis
    assert torch.equal(indices, raw_indices.movedim(0, -2) if extra else raw_indices)
    assert loss.item() == pytest.approx(raw_losses.mean().item(), rel=1e-6)
    assert indices.shape == (4, *residual_config(name, extra).code_shape)


def test_code_counts_per_codebook_against_a_loop():
    torch.manual_seed(3)
    indices = torch.randint(5, (7, 4, 2, 3))
    indices[0, 0, 1, 2] = -1  # a depth quantize dropout skipped
    counts = code_counts_per_codebook(indices, 5, codebook_dims=2)
    assert counts.shape == (6, 5)
    flat = indices.reshape(-1, 6)
    for c in range(6):
        column = flat[:, c]
        assert torch.equal(counts[c], torch.bincount(column[column >= 0], minlength=5))
    single = code_counts_per_codebook(indices[..., 0, 0], 5)
    assert torch.equal(single[0], torch.bincount(indices[..., 0, 0].reshape(-1), minlength=5))
    with pytest.raises(ValueError, match="lie in"):
        code_counts_per_codebook(torch.tensor([[5]]), 5, codebook_dims=1)


def test_usage_of_several_codebooks_is_the_mean_of_each():
    counts = torch.tensor([[4, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    usage = usage_from_counts(counts)  # the empty codebook is left out
    assert usage.perplexity == pytest.approx((1.0 + 4.0) / 2)
    assert usage.used_codes == pytest.approx((1 + 4) / 2)
    one = usage_from_counts(counts[1:2])
    assert one == (pytest.approx(4.0), 4) and isinstance(one.used_codes, int)


def test_codes_files_carry_the_code_shape(tmp_path):
    config = residual_config("grvq", {"groups": 2}, num_quantizers=2)
    codes = random_codes(config, 3)
    path = save_codes(tmp_path / "codes.json", codes, config, ["a", "b", "c"])
    assert json.loads(path.read_text())["code_shape"] == [16, 2, 2]
    loaded, sources = load_codes(path, config)
    assert torch.equal(loaded, codes) and sources == ["a", "b", "c"]
    np.save(tmp_path / "one.npy", codes[0].numpy())  # one image's codes
    assert torch.equal(load_codes(tmp_path / "one.npy", config)[0], codes[:1])
    with pytest.raises(ValueError, match=r"\(N, 16, 2, 3\) for this model, got \(3, 16, 2, 2\)"):
        load_codes(path, residual_config("grvq", {"groups": 2}, num_quantizers=3))


# ---------------------------------------------------------------- CLI on a subset of MNIST


def mnist_available() -> bool:
    from vqvae.data import DATASETS, find_dataset_dir

    if not os.environ.get("VQVAE_DATA_DIR") and SHARED_MNIST.is_dir():
        os.environ["VQVAE_DATA_DIR"] = str(SHARED_MNIST)
    return find_dataset_dir(DATASETS["mnist"]) is not None


requires_mnist = pytest.mark.skipif(
    not mnist_available(),
    reason="MNIST not found locally: set VQVAE_DATA_DIR (tests never download)")
QUICK = ["--epochs", "1", "--train-subset", "200", "--test-subset", "50", "--batch-size", "100",
         "--no-progress"]


@requires_mnist
@pytest.mark.slow
def test_cli_trains_encodes_and_decodes_a_residual_model(tmp_path, capsys):
    from vqvae.rundir import load_model

    run_dir = tmp_path / "rvq"
    assert main(["train", "--quantizer", "rvq", "--num-quantizers", "2", "--out-dir",
                 str(run_dir), *QUICK]) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["num_quantizers"] == 2 and metrics["bits_per_image"] == 288
    assert 1 <= metrics["used_codes"] <= 512
    codes_file = tmp_path / "codes.json"
    assert main(["encode", str(run_dir), "--indices", "0-3", "--out", str(codes_file)]) == 0
    model = load_model(run_dir)
    codes, _ = load_codes(codes_file, model.config)
    assert codes.shape == (4, 16, 2)
    assert main(["decode", str(run_dir), str(codes_file), "--out", str(tmp_path / "png")]) == 0
    assert len(list((tmp_path / "png").glob("*.png"))) == 4
    assert main(["sample", str(run_dir), "--num", "4", "--out", str(tmp_path / "s.npy")]) == 0
    assert np.load(tmp_path / "s.npy").shape == (4, 28, 28)


@requires_mnist
@pytest.mark.slow
def test_cli_compare_residual_ours_and_library(tmp_path, capsys):
    out = tmp_path / "compare"
    assert main(["compare", "--quantizers", "rvq,lucidrains-rvq", "--num-quantizers", "2",
                 "--out-dir", str(out), *QUICK]) == 0
    rows = json.loads((out / "comparison.json").read_text())
    assert [r["quantizer"] for r in rows] == ["rvq", "lucidrains-rvq"]
    assert all(r["num_quantizers"] == 2 and r["bits_per_image"] == 288 for r in rows)
    assert "| rvq | 288 |" in capsys.readouterr().out


@pytest.mark.parametrize("argv,match", [
    (["compare", "--quantizers", "ours,rvq", "--num-quantizers", "2"], "does not take"),
    (["train", "--quantizer", "grvq", "--groups", "3"], "multiple of groups"),
])
def test_cli_refuses_mismatched_code_axes(argv, match, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--out-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert match in capsys.readouterr().err
