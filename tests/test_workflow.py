"""End to end on a subset of real MNIST: training artefacts, resume, encode/decode, the CLI."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import requires_mnist

from vqvae.cli import main
from vqvae.models import VQVAE, ModelConfig
from vqvae.rundir import load_checkpoint, load_model
from vqvae.train import TrainConfig, train
from vqvae.workflow import load_codes, reconstruct, write_run_figures

pytestmark = requires_mnist

QUICK = dict(train_subset=1500, test_subset=300, batch_size=100, progress=False)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    run = train(TrainConfig(epochs=2, out_dir=str(out), **QUICK), ModelConfig())
    write_run_figures(run)
    return run


def test_training_writes_every_artefact(tiny_run):
    run_dir = tiny_run.run_dir
    for name in ("config.json", "metrics.json", "checkpoint.pt", "reconstructions.png",
                 "samples_random.png", "curves.png"):
        assert (run_dir / name).is_file(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("test_mse", "perplexity", "used_codes", "seconds_per_epoch", "epochs"):
        assert key in metrics
    assert len(metrics["epochs"]) == 2
    assert 0 < metrics["test_mse"] < 0.2
    assert 1 <= metrics["used_codes"] <= 512
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"]["quantizer"] == "ours" and config["train"]["epochs"] == 2
    # the checkpoint loads without executing code, and carries its config
    checkpoint = load_checkpoint(run_dir)
    assert checkpoint["model_config"]["codebook_size"] == 512


def test_training_learns(tiny_run):
    epochs = tiny_run.metrics["epochs"]
    assert epochs[-1]["train_recon_mse"] < epochs[0]["train_recon_mse"]
    # reported test MSE is the MSE of the saved model on the test subset, recomputed here
    model = load_model(tiny_run.run_dir)
    images = tiny_run.data.test
    mse = ((reconstruct(model, images) - images) ** 2).mean().item()
    assert mse == pytest.approx(tiny_run.metrics["test_mse"], rel=1e-5)


def test_figures_are_real_images(tiny_run):
    from PIL import Image

    with Image.open(tiny_run.run_dir / "reconstructions.png") as image:
        width, height = image.size
    assert width > 2 * height  # a wide figure of two rows of ten digits, not squashed


@pytest.mark.slow
def test_compiled_training_matches_eager_and_saves_plain_weights(tmp_path, tiny_run):
    # --compile: the whole model compiled (or, for a quantizer that cannot be traced, the
    # encoder and decoder), same seed and data order as tiny_run
    config = TrainConfig(epochs=2, out_dir=str(tmp_path / "compiled"), compile=True, **QUICK)
    run = train(config, ModelConfig())
    forward = run.model.forward
    if forward.mode == "whole":
        assert hasattr(forward.compiled, "_torchdynamo_orig_callable")  # really compiled
    else:
        for network in (run.model.encoder, run.model.decoder):
            assert hasattr(network.forward, "_torchdynamo_orig_callable")
    assert run.metrics["test_mse"] == pytest.approx(tiny_run.metrics["test_mse"], rel=0.1)
    # the checkpoint has the eager model's parameter names and loads into a plain model
    plain = load_model(run.run_dir)
    assert set(plain.state_dict()) == set(load_model(tiny_run.run_dir).state_dict())
    assert json.loads((run.run_dir / "config.json").read_text())["train"]["compile"] is True


def _run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path):
    """A run SIGKILLed right after epoch 1's checkpoint, then resumed, ends bit-identical.

    One process trains the uninterrupted run, then starts the same run in another directory
    and dies after its first epoch; a fresh process resumes it. The resumed run shares no
    process with the uninterrupted one, and a process start (importing torch) is most of what
    each of these small runs costs."""
    args = "train --epochs 3 --train-subset 1200 --test-subset 200 --batch-size 100 --no-progress"
    killed = _run_python(f"""
        import os, signal, sys
        from vqvae.cli import main
        from vqvae import train as t
        if main({(args + f' --out-dir {tmp_path / "full"}').split()!r}) != 0:
            sys.exit("the uninterrupted run failed")
        original = t.atomic_write_json
        def write_then_die(path, value):
            original(path, value)
            if path.name == "metrics.json" and value["epochs_done"] == 1:
                os.kill(os.getpid(), signal.SIGKILL)
        t.atomic_write_json = write_then_die
        main({(args + f' --out-dir {tmp_path / "killed"}').split()!r})
    """, tmp_path)
    assert killed.returncode == -9, killed.stderr
    assert json.loads((tmp_path / "full" / "metrics.json").read_text())["epochs_done"] == 3
    assert json.loads((tmp_path / "killed" / "metrics.json").read_text())["epochs_done"] == 1
    resumed = _run_python(f"""
        import sys
        from vqvae.cli import main
        sys.exit(main(["train", "--resume", {str(tmp_path / "killed")!r}, "--no-progress"]))
    """, tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    a = load_checkpoint(tmp_path / "full")["model"]
    b = load_checkpoint(tmp_path / "killed")["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    metrics = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    assert metrics["epochs_done"] == 3


def test_encode_then_decode_reproduces_reconstruct(tiny_run, tmp_path):
    run_dir = str(tiny_run.run_dir)
    codes_file = tmp_path / "codes.json"
    assert main(["encode", run_dir, "--indices", "0-7", "--out", str(codes_file)]) == 0
    model = load_model(run_dir)
    codes, sources = load_codes(codes_file, model.config)
    assert codes.shape == (8, 16) and sources[0] == "mnist-test[0]"
    images = tiny_run.data.test[:8]
    assert torch.equal(model.decode(codes), reconstruct(model, images))
    # and through the CLI, as PNG files (8-bit rounding of the same images)
    assert main(["decode", run_dir, str(codes_file), "--out", str(tmp_path / "png")]) == 0
    from PIL import Image

    first = np.asarray(Image.open(tmp_path / "png" / "00000.png"), dtype=np.float32) / 255
    assert np.abs(first - reconstruct(model, images)[0, 0].numpy()).max() <= 0.5 / 255 + 1e-6


def test_encode_reads_png_files(tiny_run, tmp_path):
    from PIL import Image

    digit = (tiny_run.data.test[0, 0].numpy() * 255).round().astype(np.uint8)
    Image.fromarray(digit, mode="L").save(tmp_path / "digit.png")
    codes_file = tmp_path / "codes.json"
    assert main(["encode", str(tiny_run.run_dir), "--images", str(tmp_path / "digit.png"),
                 "--out", str(codes_file)]) == 0
    model = load_model(tiny_run.run_dir)
    codes, _ = load_codes(codes_file, model.config)
    assert torch.equal(codes, model.encode(tiny_run.data.test[:1]))


def test_sample_and_reconstruct_commands(tiny_run, tmp_path):
    run_dir = str(tiny_run.run_dir)
    assert main(["sample", run_dir, "--num", "5", "--out", str(tmp_path / "s.npy")]) == 0
    samples = np.load(tmp_path / "s.npy")
    assert samples.shape == (5, 28, 28) and samples.min() >= 0 and samples.max() <= 1
    assert main(["reconstruct", run_dir, "--indices", "1,2", "--out",
                 str(tmp_path / "r.png")]) == 0
    assert (tmp_path / "r.png").stat().st_size > 1000


@pytest.mark.parametrize("argv,message", [
    (["train", "--epochs", "0"], "positive integer"),
    (["train", "--lr", "abc"], "positive number"),
    (["train", "--quantizer", "magic"], "invalid choice"),
    (["train", "--dataset", "cifar"], "unknown dataset"),
    (["compare", "--quantizers", "ours,magic"], "unknown quantizer"),
    (["sample", "/nonexistent/run"], "not found"),
    (["encode", "/nonexistent/run", "--out", "x.json"], "not found"),
    (["train", "-o", "decay"], "KEY=VALUE"),
    (["train", "-o", "decay=2.0", "--epochs", "1"], "decay"),
    (["train", "--resume", "/nonexistent/run"], "not found"),
    (["frobnicate"], "invalid choice"),
    ([], "usage"),
])
def test_cli_misuse_exits_2_with_a_message(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        code = main(argv)
        raise SystemExit(code)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err


def test_resume_refuses_new_settings(tiny_run, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--resume", str(tiny_run.run_dir), "--lr", "0.1"])
    assert exit_info.value.code == 2
    assert "--lr" in capsys.readouterr().err


def test_train_refuses_to_overwrite_a_run(tiny_run, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--out-dir", str(tiny_run.run_dir)])
    assert exit_info.value.code == 2
    assert "already holds a run" in capsys.readouterr().err


def test_help_and_version(capsys):
    for argv in (["--help"], ["train", "--help"], ["compare", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0
    assert "--quantizer" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--version"])
    assert "vqvae" in capsys.readouterr().out


@pytest.mark.parametrize("command,options", [
    ("train", ["--quantizer", "--num-quantizers", "--resume", "--out-dir", "--precision"]),
    ("compare", ["--quantizers", "--epochs", "--out-dir"]),
    ("reconstruct", ["RUN_DIR", "--indices", "--images", "--invert"]),
    ("sample", ["--prior", "--digit", "--guidance", "--threads"]),
    ("prior", ["--epochs", "--unconditional", "--precision", "--threads"]),
    ("encode", ["--indices", "--out"]),
    ("decode", ["CODES", "--out"]),
    ("judge", ["--judge-path", "--retrain-judge", "--guidance", "--images"]),
    ("demo", ["--dim", "--codebook-size", "--steps"]),
])
def test_every_command_explains_its_options(command, options, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: vqvae {command}")
    for option in options:
        assert option in text, option
    main_help = _main_help(capsys)
    assert command in main_help


def _main_help(capsys) -> str:
    with pytest.raises(SystemExit):
        main(["--help"])
    return capsys.readouterr().out


def test_model_config_round_trips_and_rejects_unknown_keys():
    config = ModelConfig(quantizer_options={"decay": 0.9})
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert config.quantizer_options["decay"] == 0.9  # given options replace defaults
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({"colour": "red"})
    with pytest.raises(ValueError, match="unknown quantizer"):
        ModelConfig(quantizer="magic")


def test_model_shapes_and_decode_checks():
    model = VQVAE(ModelConfig()).eval()
    images = torch.rand(3, 1, 28, 28)
    out = model(images)
    assert out.reconstruction.shape == (3, 1, 28, 28) and out.indices.shape == (3, 16)
    assert torch.equal(model.decode(model.encode(images)), out.reconstruction)
    with pytest.raises(ValueError, match="shape"):
        model.decode(torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="lie in"):
        model.decode(torch.full((1, 16), 512))


def test_compare_trains_in_turns_to_the_models_of_one_run_after_another(tmp_path, monkeypatch):
    """Epochs alternate between the quantizers, and each ends where an uninterrupted run
    ends, bit for bit."""
    from vqvae import train as train_module
    from vqvae.workflow import compare, runs

    order = []
    epoch = train_module.train_epoch

    def recorded(model, optimizer, data, config, number, *args, **kwargs):
        order.append((Path(config.out_dir).name, number))
        return epoch(model, optimizer, data, config, number, *args, **kwargs)

    monkeypatch.setattr(train_module, "train_epoch", recorded)
    monkeypatch.setattr(runs, "write_run_figures", lambda run: {})  # (figures: tested above)
    monkeypatch.setattr(runs.plots, "image_rows", lambda *args, **kwargs: None)
    settings = TrainConfig(epochs=2, train_subset=300, test_subset=100, batch_size=100,
                           progress=False)
    names = ["ours", "fsq"]
    turns = compare(names, settings, ModelConfig(), tmp_path / "turns")
    assert order == [(name, e) for e in range(2) for name in names]
    order.clear()
    monkeypatch.setattr(runs, "in_turns", lambda config: False)
    after = compare(names, settings, ModelConfig(), tmp_path / "after")
    assert order == [(name, e) for name in names for e in range(2)]
    for a, b in zip(turns, after, strict=True):
        assert a["test_mse"] == b["test_mse"] and a["used_codes"] == b["used_codes"]
    for name in names:
        one, other = (load_checkpoint(tmp_path / d / name) for d in ("turns", "after"))
        assert json.loads(one["history"])[-1]["epoch"] == 2
        for key, value in one["model"].items():
            assert torch.equal(value, other["model"][key]), key
