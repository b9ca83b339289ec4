"""--config FILE: a run's settings from JSON in config.json's layout, flags overriding it."""

import dataclasses
import json

import pytest
from conftest import requires_mnist

import vqvae.train
import vqvae.workflow
from vqvae.cli import main
from vqvae.models import ModelConfig
from vqvae.rundir import read_config, save_config
from vqvae.train import TrainConfig


class _Stop(Exception):
    pass


@pytest.fixture
def captured(monkeypatch):
    """What ``vqvae train`` / ``compare`` would train, without training."""
    seen = {}

    def fake_train(train_config, model_config, **kwargs):
        seen["train"], seen["model"] = train_config, model_config
        raise _Stop

    def fake_compare(names, train_config, model_config, out_dir, *args, **kwargs):
        seen["train"], seen["model"], seen["names"] = train_config, model_config, names
        raise _Stop

    monkeypatch.setattr(vqvae.train, "train", fake_train)
    monkeypatch.setattr(vqvae.workflow, "compare", fake_compare)
    return seen


def _run(argv, seen):
    with pytest.raises(_Stop):
        main(argv)
    return seen["train"], seen["model"]


def _write(path, train_config, model_config):
    path.mkdir(parents=True, exist_ok=True)
    save_config(path, train_config, model_config)
    return path / "config.json"


RUN_TRAIN = TrainConfig(epochs=3, batch_size=32, lr=0.002, lr_schedule="cosine",
                        warmup_fraction=0.1, seed=7, device="cpu", precision="fp32",
                        train_subset=300, test_subset=100, out_dir="unused", progress=False,
                        dist_timeout_seconds=60.0)
RUN_MODEL = ModelConfig(quantizer="rvq", num_quantizers=2, codebook_size=64, vector_dim=8,
                        hidden_dim=32, num_embeddings=8, quantizer_options={"decay": 0.9})


def test_a_runs_own_config_reproduces_it(tmp_path, captured):
    path = _write(tmp_path / "old", dataclasses.replace(RUN_TRAIN, out_dir=str(tmp_path / "x")),
                  RUN_MODEL)
    train_config, model_config = _run(["train", "--config", str(path)], captured)
    # every field, out_dir included, is the file's
    assert (train_config, model_config) == read_config(tmp_path / "old")
    assert model_config.quantizer_options["decay"] == 0.9


def test_a_flag_overrides_one_field(tmp_path, captured):
    path = _write(tmp_path / "old", RUN_TRAIN, RUN_MODEL)
    out = tmp_path / "new"
    train_config, model_config = _run(["train", "--config", str(path), "--epochs", "5",
                                       "--out-dir", str(out), "-o", "decay=0.5"], captured)
    assert train_config == dataclasses.replace(RUN_TRAIN, epochs=5, out_dir=str(out))
    assert model_config == dataclasses.replace(RUN_MODEL, quantizer_options={"decay": 0.5})
    # --no-progress overrides the file's progress; without it the file's value stands
    path = _write(tmp_path / "loud", dataclasses.replace(RUN_TRAIN, progress=True), RUN_MODEL)
    train_config, _ = _run(["train", "--config", str(path), "--no-progress", "--out-dir",
                            str(out)], captured)
    assert train_config.progress is False


def test_another_quantizer_on_the_command_line_drops_the_files_options(tmp_path, captured):
    path = _write(tmp_path / "old", RUN_TRAIN, RUN_MODEL)
    _, model_config = _run(["train", "--config", str(path), "--quantizer", "grvq", "--groups",
                            "2", "--out-dir", str(tmp_path / "new")], captured)
    assert model_config.quantizer == "grvq" and model_config.groups == 2
    assert model_config.num_quantizers == 2 and model_config.codebook_size == 64
    assert model_config.quantizer_options == ModelConfig(
        quantizer="grvq", groups=2, num_quantizers=2, vector_dim=8).quantizer_options


def test_a_partial_file(tmp_path, captured):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"train": {"epochs": 2, "lr": 1}}))
    train_config, model_config = _run(["train", "--config", str(path), "--out-dir",
                                       str(tmp_path / "out")], captured)
    assert train_config == TrainConfig(epochs=2, lr=1.0, out_dir=str(tmp_path / "out"))
    assert isinstance(train_config.lr, float)
    assert model_config == ModelConfig()


def test_compare_reads_the_file_too(tmp_path, captured):
    path = _write(tmp_path / "old", RUN_TRAIN, RUN_MODEL)
    train_config, model_config = _run(["compare", "--quantizers", "rvq,lucidrains-rvq",
                                       "--config", str(path), "--seed", "3", "--out-dir",
                                       str(tmp_path / "cmp")], captured)
    assert captured["names"] == ["rvq", "lucidrains-rvq"]
    assert train_config == dataclasses.replace(RUN_TRAIN, seed=3, out_dir=str(tmp_path / "cmp"))
    assert (model_config.num_quantizers, model_config.codebook_size, model_config.hidden_dim) \
        == (2, 64, 32)


@pytest.mark.parametrize("content,message", [
    ({"train": {"epoch": 3}}, "unknown key train.epoch; train takes dataset,"),
    ({"model": {"codebooksize": 3}}, "unknown key model.codebooksize"),
    ({"train": {"epochs": "ten"}}, 'train.epochs must be an integer, got "ten" (str)'),
    ({"train": {"epochs": 2.5}}, "train.epochs must be an integer, got 2.5 (float)"),
    ({"train": {"epochs": True}}, "train.epochs must be an integer, got true (bool)"),
    ({"train": {"lr": "fast"}}, 'train.lr must be a number, got "fast" (str)'),
    ({"train": {"compile": 1}}, "train.compile must be true or false, got 1 (int)"),
    ({"train": {"train_subset": "all"}},
     'train.train_subset must be an integer or null, got "all" (str)'),
    ({"model": {"quantizer_options": [1]}},
     "model.quantizer_options must be a JSON object, got [1] (list)"),
    ({"train": [1]}, "'train' must be a JSON object of TrainConfig fields, got list"),
    ({"training": {}}, "unknown key 'training'"),
    ([1, 2], "expected a JSON object with 'train' and/or 'model', got list"),
    ({"train": {"epochs": 0}}, "epochs must be >= 1"),  # the config's own check, too
])
@pytest.mark.parametrize("command", ["train", "compare"])
def test_a_bad_file_is_a_usage_error_naming_the_key(tmp_path, captured, capsys, content,
                                                    message, command):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(content))
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--config", str(path), "--out-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert not captured  # nothing trained


def test_unreadable_files(tmp_path, capsys):
    for path, message in ((tmp_path / "missing.json", "no such file"),
                          (tmp_path / "broken.json", "is not valid JSON")):
        if path.name == "broken.json":
            path.write_text("{epochs: 3")
        with pytest.raises(SystemExit) as exit_info:
            main(["train", "--config", str(path)])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


def test_resume_takes_no_config(tmp_path, capsys):
    path = _write(tmp_path / "old", RUN_TRAIN, RUN_MODEL)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--resume", str(tmp_path / "old"), "--config", str(path)])
    assert exit_info.value.code == 2
    assert "remove --config" in capsys.readouterr().err


@requires_mnist
@pytest.mark.slow
def test_a_trained_runs_config_trains_the_same_run_again(tmp_path, monkeypatch):
    import vqvae.workflow.runs

    monkeypatch.setattr(vqvae.workflow.runs, "SAMPLE_COUNT", 8)
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["train", "--hidden-dim", "16", "--num-embeddings", "4", "--codebook-size", "8",
                 "--train-subset", "256", "--test-subset", "64", "--epochs", "1",
                 "--device", "cpu", "--precision", "fp32", "--no-progress",
                 "--out-dir", str(first)]) == 0
    assert main(["train", "--config", str(first / "config.json"), "--out-dir",
                 str(second)]) == 0
    a, b = (json.loads((d / "config.json").read_text()) for d in (first, second))
    assert a["train"].pop("out_dir") == str(first) and b["train"].pop("out_dir") == str(second)
    assert a == b
    metrics = [json.loads((d / "metrics.json").read_text()) for d in (first, second)]
    assert metrics[0]["test_mse"] == metrics[1]["test_mse"]
