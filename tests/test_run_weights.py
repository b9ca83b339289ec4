"""A run directory's model.safetensors (and the prior's prior.safetensors): written by training,
read by every command that needs only the weights, with checkpoint.pt gone and pickle refused."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import forbid_pickle, requires_mnist
from safetensors.torch import load_file

import vqvae.workflow.runs
from vqvae.cli import main
from vqvae.models import VQVAE, ModelConfig
from vqvae.prior import CodePrior, PriorConfig, load_prior
from vqvae.rundir import load_checkpoint, load_model
from vqvae.train import TrainConfig, train
from vqvae.workflow import load_codes, load_run_prior

pytestmark = requires_mnist

MODEL = ModelConfig(hidden_dim=16, num_embeddings=4, codebook_size=8)
QUICK = dict(train_subset=256, test_subset=64, batch_size=64, progress=False, device="cpu",
             precision="fp32")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("weights") / "run"
    seen = []

    def after_epoch(epoch, metrics):
        # each epoch's weights file holds that epoch's weights: the checkpoint's, just written
        tensors = load_file(out / "model.safetensors")
        checkpoint = load_checkpoint(out)["model"]
        seen.append(all(torch.equal(tensors[k], v) for k, v in checkpoint.items())
                    and tensors.keys() == checkpoint.keys())

    run = train(TrainConfig(epochs=2, out_dir=str(out), **QUICK), MODEL, on_epoch_end=after_epoch)
    assert seen == [True, True]
    return run


def test_weights_file_is_plain_safetensors_of_the_trained_model(tiny_run):
    tensors = load_file(tiny_run.run_dir / "model.safetensors")  # safetensors alone
    state = tiny_run.model.state_dict()
    assert tensors.keys() == state.keys()
    for key, value in state.items():
        assert tensors[key].dtype == value.dtype and torch.equal(tensors[key], value), key
    # a fresh model differs, so the equality above says something
    assert not all(torch.equal(v, state[k]) for k, v in VQVAE(MODEL).state_dict().items())


def test_from_pretrained_equals_the_checkpoint(tiny_run, monkeypatch):
    checkpoint = load_checkpoint(tiny_run.run_dir)
    forbid_pickle(monkeypatch)
    for model in (VQVAE.from_pretrained(tiny_run.run_dir), load_model(tiny_run.run_dir)):
        assert model.config == ModelConfig.from_dict(checkpoint["model_config"])
        assert model.state_dict().keys() == checkpoint["model"].keys()
        for key, value in checkpoint["model"].items():
            assert torch.equal(model.state_dict()[key], value), key


def test_an_older_run_without_the_weights_file_loads_from_its_checkpoint(tiny_run, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(tiny_run.run_dir, old)
    (old / "model.safetensors").unlink()
    model = load_model(old)
    for key, value in tiny_run.model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


@pytest.mark.slow
def test_commands_run_without_checkpoint_and_without_pickle(tiny_run, tmp_path, monkeypatch,
                                                            capsys):
    monkeypatch.setattr(vqvae.workflow.runs, "SAMPLE_COUNT", 8)
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run.run_dir, run_dir)
    (run_dir / "checkpoint.pt").unlink()
    forbid_pickle(monkeypatch)

    codes_file = tmp_path / "codes.json"
    assert main(["encode", str(run_dir), "--indices", "0-3", "--out", str(codes_file)]) == 0
    codes, _ = load_codes(codes_file, MODEL)
    assert torch.equal(codes, tiny_run.model.encode(tiny_run.data.test[:4]))
    assert main(["decode", str(run_dir), str(codes_file), "--out", str(tmp_path / "png")]) == 0
    assert len(list((tmp_path / "png").glob("*.png"))) == 4
    assert main(["reconstruct", str(run_dir), "--indices", "0,1", "--out",
                 str(tmp_path / "r.png")]) == 0
    assert main(["sample", str(run_dir), "--num", "3", "--out", str(tmp_path / "s.npy")]) == 0
    # the prior: trained over codes the safetensors weights give, saved as prior.safetensors
    assert main(["prior", str(run_dir), "--epochs", "1", "--dim", "16", "--heads", "2",
                 "--depth", "1", "--train-subset", "200", "--no-progress"]) == 0
    assert (run_dir / "prior.safetensors").is_file()
    assert (run_dir / "prior_config.json").is_file()
    out = tmp_path / "prior_samples.npy"
    assert main(["sample", str(run_dir), "--prior", "--digit", "3", "--num", "4",
                 "--out", str(out)]) == 0
    assert np.load(out).shape == (4, 28, 28)
    monkeypatch.undo()

    # the judge's own network is a torch file: only checkpoint.pt stays deleted here
    from vqvae.judge import JudgeNet, save_judge

    judge_path = tmp_path / "judge.pt"
    save_judge(JudgeNet(width=4), {"version": 1, "dataset": "mnist", "test_accuracy": 0.1,
                                   "config": {"width": 4}}, judge_path)
    monkeypatch.setattr(vqvae.workflow.runs, "SAMPLE_COUNT", 8)
    assert main(["judge", str(run_dir), "--num", "16", "--judge-path", str(judge_path),
                 "--no-progress"]) == 0
    assert json.loads((run_dir / "judge.json").read_text())["count"] == 16

    # resuming needs the checkpoint, and says so
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--resume", str(run_dir), "--no-progress"])
    assert exit_info.value.code == 2
    assert "checkpoint.pt not found" in capsys.readouterr().err


@pytest.mark.slow
def test_prior_weights_round_trip_and_match_prior_pt(tiny_run, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run.run_dir, run_dir)
    monkeypatch.setattr(vqvae.workflow.runs, "SAMPLE_COUNT", 8)
    assert main(["prior", str(run_dir), "--epochs", "1", "--dim", "16", "--heads", "2",
                 "--depth", "1", "--train-subset", "200", "--no-progress"]) == 0
    from_pt = load_prior(run_dir / "prior.pt")
    tensors = load_file(run_dir / "prior.safetensors")
    assert tensors.keys() == from_pt.state_dict().keys()
    for key, value in from_pt.state_dict().items():
        assert torch.equal(tensors[key], value), key
    assert json.loads((run_dir / "prior_config.json").read_text()) == \
        {"model": from_pt.config.to_dict()}
    # the run's own config.json is the VQ-VAE's, untouched by the prior
    assert json.loads((run_dir / "config.json").read_text())["model"] == MODEL.to_dict()
    forbid_pickle(monkeypatch)
    loaded = load_run_prior(run_dir)
    assert loaded.config == from_pt.config and not loaded.training
    tokens = torch.randint(0, 8, (5, 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(tokens, torch.arange(5)), from_pt(tokens, torch.arange(5)))


def test_a_run_prior_without_safetensors_loads_from_prior_pt(tmp_path):
    torch.manual_seed(0)
    prior = CodePrior(PriorConfig(vocab_size=8, code_shape=(2, 2), dim=16, heads=2, depth=1))
    from vqvae.rundir import atomic_torch_save

    atomic_torch_save(tmp_path / "prior.pt", {"prior": prior.state_dict(),
                                              "prior_config": prior.config.to_dict()})
    loaded = load_run_prior(tmp_path)
    for key, value in prior.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    # and prior.safetensors wins once it is there
    torch.manual_seed(1)
    other = CodePrior(prior.config)
    other.save_pretrained(tmp_path)
    loaded = load_run_prior(tmp_path)
    for key, value in other.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_prior_config_from_dict_names_unknown_keys():
    values = PriorConfig(vocab_size=8, code_shape=(4,)).to_dict()
    assert PriorConfig.from_dict(values) == PriorConfig(vocab_size=8, code_shape=(4,))
    with pytest.raises(ValueError, match="unknown prior config keys: \\['width'\\]"):
        PriorConfig.from_dict({**values, "width": 3})


def test_a_run_recorded_before_an_option_default_existed_still_takes_its_weights(tmp_path):
    """config.json without an option the quantizer now defaults: the same model once read back,
    so the weights are saved beside it and the file stays as the run wrote it."""
    from vqvae.rundir import atomic_write_json

    values = {"model": MODEL.to_dict(), "train": {"epochs": 1}}
    dropped = sorted(values["model"]["quantizer_options"])[0]
    del values["model"]["quantizer_options"][dropped]
    atomic_write_json(tmp_path / "config.json", values)
    before = (tmp_path / "config.json").read_bytes()
    torch.manual_seed(0)
    model = VQVAE(MODEL)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").read_bytes() == before
    loaded = load_model(tmp_path)
    assert loaded.config == MODEL
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    # a config that rebuilds another model is still refused
    values["model"]["codebook_size"] = 16
    atomic_write_json(tmp_path / "config.json", values)
    with pytest.raises(ValueError, match="describes another model"):
        model.save_pretrained(tmp_path)
