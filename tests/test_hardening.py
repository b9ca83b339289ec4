"""Faults and user mistakes on the command line: each gives one line on stderr and exit status
2 (a usage error) or 1 (a fault), never a traceback, and nothing is left half-written."""

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import requires_mnist
from safetensors.torch import load_file, save_file

from vqvae.cli import main
from vqvae.models import VQVAE, ModelConfig
from vqvae.quantizers import QuantizerInputError
from vqvae.rundir import CHECKPOINT, CONFIG, load_checkpoint, save_config
from vqvae.train import TrainConfig, train, train_step

QUICK = dict(train_subset=200, test_subset=50, batch_size=100, progress=False)


def cli(argv, capsys):
    """Exit status and stderr of ``vqvae ARGV``; an exception escaping main() fails the test."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    return code, err


def one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train(TrainConfig(epochs=1, out_dir=str(out), **QUICK), ModelConfig(codebook_size=64))
    return out


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(tiny_run, target)
    return target


# ---------------------------------------------------------------------------- damaged files


def _damage(path: Path, how: str, tmp_path: Path) -> None:
    raw = path.read_bytes()
    if how == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif how == "foreign":
        torch.save({"epoch": 3, "net": {"w": torch.zeros(2)}}, path)
    elif how == "state_dict":
        torch.save(VQVAE(ModelConfig(codebook_size=64)).state_dict(), path)


@requires_mnist
@pytest.mark.parametrize("how", ["truncated", "empty", "random", "foreign", "state_dict"])
def test_resume_from_a_damaged_checkpoint_is_a_one_line_fault(run_copy, tmp_path, capsys, how):
    _damage(run_copy / CHECKPOINT, how, tmp_path)
    before = (run_copy / CHECKPOINT).read_bytes()
    code, err = cli(["train", "--resume", run_copy, "--no-progress"], capsys)
    line = one_line(err)
    assert code == 1 and "checkpoint.pt" in line, line
    assert (run_copy / CHECKPOINT).read_bytes() == before  # left for the user to look at
    # Commands that need only the weights read model.safetensors; a run written before that
    # file existed reads them from checkpoint.pt.
    (run_copy / "model.safetensors").unlink()
    code, err = cli(["reconstruct", run_copy], capsys)
    assert code == 1 and "checkpoint.pt" in one_line(err)


@requires_mnist
@pytest.mark.parametrize("how", ["truncated", "empty", "random"])
def test_damaged_weights_file_is_a_one_line_fault(run_copy, capsys, how):
    path = run_copy / "model.safetensors"
    raw = path.read_bytes()
    damaged = {"truncated": raw[: len(raw) // 2], "empty": b"",
               "random": np.random.default_rng(0).bytes(4096)}[how]
    path.write_bytes(damaged)
    code, err = cli(["reconstruct", run_copy], capsys)
    assert code == 1 and "model.safetensors" in one_line(err), err


@pytest.mark.parametrize("config, words", [
    ('{"train": {"epochs": "ten"}, "model": {}}', "train.epochs should be of type int"),
    ('{"train": {"no_such_key": 1}, "model": {}}', "unknown key train.no_such_key"),
    ('{"train": {}}', "'model'"),
    ('[1, 2]', "'train'"),
    ('{"train": {}, "model": {"codebook_size": "big"}}', "model.codebook_size"),
    ('{"train": ', "JSON"),
])
def test_resume_with_a_bad_config_names_the_file(tmp_path, capsys, config, words):
    (tmp_path / CONFIG).write_text(config)
    code, err = cli(["train", "--resume", tmp_path, "--no-progress"], capsys)
    line = one_line(err)
    assert code == 1 and "config.json" in line and words in line, line


@requires_mnist
def test_truncated_prior_file_is_named(run_copy, capsys):
    (run_copy / "prior.pt").write_bytes(b"PK\x03\x04 not the whole file")
    code, err = cli(["sample", run_copy, "--prior", "--num", "2"], capsys)
    line = one_line(err)
    assert code == 1 and "prior.pt" in line and "vqvae prior" in line, line


@requires_mnist
def test_truncated_prior_codes_cache_is_rebuilt(run_copy):
    from vqvae.workflow.prior_run import PRIOR_CODES, run_codes

    (run_copy / PRIOR_CODES).write_bytes(b"PK\x03\x04 truncated")
    codes = run_codes(run_copy, progress=False)
    assert codes["train_codes"].shape[1:] == (16,)
    assert torch.load(run_copy / PRIOR_CODES, weights_only=True)["checkpoint_sha256"]


# ---------------------------------------------------------------------------- images to encode


def _bad_image(kind: str, tmp_path: Path) -> Path:
    from PIL import Image

    path = tmp_path / f"{kind}.png"
    if kind == "text":
        path.write_text("not an image\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)).save(path)
        path.write_bytes(path.read_bytes()[:100])
    elif kind == "missing":
        pass
    elif kind == "directory":
        path.mkdir()
    elif kind == "bomb":
        # 100 million pixels in a file of a few kilobytes: refused from its header
        Image.new("1", (10_000, 10_000)).save(path)
        assert path.stat().st_size < 200_000
    return path


@requires_mnist
@pytest.mark.parametrize("kind", ["text", "empty", "truncated", "missing", "directory", "bomb"])
def test_encode_refuses_a_bad_image(run_copy, tmp_path, capsys, kind):
    path = _bad_image(kind, tmp_path)
    out = tmp_path / "codes.json"
    code, err = cli(["encode", run_copy, "--images", path, "--out", out], capsys)
    line = one_line(err)
    assert code == 2 and str(path) in line, line
    assert not out.exists()
    if kind == "bomb":
        assert "pixels" in line


# ---------------------------------------------------------------------------- options


@requires_mnist
@pytest.mark.parametrize("device", ["cuda", "cuda:7", "mps", "banana", "cpu:x"])
def test_a_device_this_machine_lacks_is_a_usage_error(run_copy, capsys, device):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has the device")
    code, err = cli(["reconstruct", run_copy, "--device", device], capsys)
    line = one_line(err)
    assert code == 2 and device in line, line


def _no_data(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the data was loaded before the options were checked")

    monkeypatch.setattr("vqvae.train.load_dataset", refuse)


@pytest.mark.parametrize("argv, words", [
    (["--codebook-size", "1e12"], "positive integer"),
    (["--codebook-size", str(10**12)], "memory"),
    (["--vector-dim", "100000", "--batch-size", "100000"], "memory"),
    (["--seed", str(2**64)], "seed"),
    (["--seed", "-1"], "seed"),
    (["--lr", "inf"], "lr"),
    (["--lr", "nan"], "lr"),
    (["-o", "decay=NaN"], "decay"),
    (["-o", "decay=fast"], "decay"),
    (["-o", "kmeans_init=3"], "kmeans_init"),
    (["--device", "banana"], "banana"),
    (["--device", "mps"], "mps"),
])
def test_bad_training_options_are_refused_up_front(tmp_path, capsys, monkeypatch, argv, words):
    _no_data(monkeypatch)
    code, err = cli(["train", "--out-dir", tmp_path / "run", *argv], capsys)
    line = one_line(err)
    assert code == 2 and words in line, line
    assert not (tmp_path / "run" / CONFIG).exists()


def test_decay_given_as_text_names_the_type_expected(tmp_path, capsys, monkeypatch):
    _no_data(monkeypatch)
    code, err = cli(["train", "--out-dir", tmp_path / "run", "-o", "decay=fast"], capsys)
    line = one_line(err)
    assert "float" in line and "'fast'" in line and "'<='" not in line, line


def test_memory_estimate_passes_the_defaults_and_scales(monkeypatch):
    from vqvae.cli.checks import estimate_training_bytes

    small = estimate_training_bytes(ModelConfig(), TrainConfig())
    big = estimate_training_bytes(ModelConfig(codebook_size=512 * 1024), TrainConfig())
    # the codebook alone: 4 bytes × K × D, at least once
    assert big - small >= 4 * (512 * 1024 - 512) * 64
    assert small < 2 * 1024**3


def test_memory_check_compares_with_what_is_available(tmp_path, capsys, monkeypatch):
    _no_data(monkeypatch)
    monkeypatch.setattr("vqvae.cli.checks.available_memory_bytes", lambda device: 1024**2)
    code, err = cli(["train", "--out-dir", tmp_path / "run"], capsys)
    line = one_line(err)
    assert code == 2 and "memory" in line and "MiB" in line, line


@pytest.mark.parametrize("argv, words", [
    (["prior", "RUN", "--dropout", "nan"], "dropout"),
    (["prior", "RUN", "--dropout", "inf"], "dropout"),
    (["sample", "RUN", "--seed", str(2**64)], "seed"),
    (["judge", "--images", "x.npy", "--seed", str(-(2**70))], "seed"),
])
def test_non_finite_and_out_of_range_numbers_are_usage_errors(tmp_path, capsys, argv, words):
    argv = [str(tmp_path) if a == "RUN" else a for a in argv]
    code, err = cli(argv, capsys)
    line = one_line(err)
    assert code == 2 and words in line, line


# ---------------------------------------------------------------------------- output


@pytest.mark.parametrize("where", ["file", "under_file", "read_only"])
def test_an_out_dir_that_cannot_be_written_is_refused_before_the_data(tmp_path, capsys,
                                                                      monkeypatch, where):
    _no_data(monkeypatch)
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    out = {"file": blocker, "under_file": blocker / "run",
           "read_only": tmp_path / "ro" / "run"}[where]
    if where == "read_only":
        (tmp_path / "ro").mkdir()
        real_access = os.access
        monkeypatch.setattr("os.access", lambda p, mode, **kw: False if
                            Path(p) == tmp_path / "ro" else real_access(p, mode, **kw))
    code, err = cli(["train", "--out-dir", out], capsys)
    line = one_line(err)
    assert code == 2 and str(out.parent if where != "file" else out) in line, line


@requires_mnist
def test_a_full_disk_keeps_the_old_checkpoint_and_says_so(run_copy, capsys, monkeypatch):
    config = json.loads((run_copy / CONFIG).read_text())
    config["train"]["epochs"] = 2
    (run_copy / CONFIG).write_text(json.dumps(config))
    before = (run_copy / CHECKPOINT).read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("vqvae.rundir.os.fsync", full)
    code, err = cli(["train", "--resume", run_copy, "--no-progress"], capsys)
    line = one_line(err)
    assert code == 1 and "disk full" in line, line
    assert (run_copy / CHECKPOINT).read_bytes() == before
    assert not [p for p in run_copy.iterdir() if ".tmp" in p.name]


def test_judge_checks_its_images_before_training_the_judge(tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the judge was loaded before the inputs were checked")

    monkeypatch.setattr("vqvae.judge.load_or_train_judge", refuse)
    code, err = cli(["judge", "--images", tmp_path / "missing.npy"], capsys)
    line = one_line(err)
    assert code == 2 and "missing.npy" in line, line
    (tmp_path / "blocker").write_text("x")
    np.save(tmp_path / "ok.npy", np.zeros((2, 28, 28), np.float32))
    code, err = cli(["judge", "--images", tmp_path / "ok.npy", "--out",
                     tmp_path / "blocker" / "j.json"], capsys)
    assert code == 2 and "blocker" in one_line(err)


@requires_mnist
def test_sample_writes_the_format_its_suffix_names(run_copy, tmp_path, capsys):
    out = tmp_path / "s.jpg"
    code, _ = cli(["sample", run_copy, "--num", "4", "--out", out], capsys)
    assert code == 0 and out.read_bytes()[:3] == b"\xff\xd8\xff"  # a JPEG, not PNG bytes
    code, err = cli(["sample", run_copy, "--num", "4", "--out", tmp_path / "s.xyz"], capsys)
    line = one_line(err)
    assert code == 2 and ".xyz" in line, line


# ---------------------------------------------------------------------------- run directories


@requires_mnist
def test_a_run_that_died_before_its_first_checkpoint_can_be_resumed(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_config(run_dir, TrainConfig(epochs=1, out_dir=str(run_dir), **QUICK),
                ModelConfig(codebook_size=64))
    code, err = cli(["train", "--out-dir", run_dir, "--no-progress"], capsys)
    assert code == 2 and "--resume" in one_line(err)
    code = main(["train", "--resume", str(run_dir), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0 and "no checkpoint yet" in captured.out + captured.err
    assert load_checkpoint(run_dir)["model_config"]["codebook_size"] == 64


def test_two_trainings_on_one_out_dir_one_wins(tmp_path, capsys, monkeypatch):
    _no_data(monkeypatch)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).parents[1] / 'src')!r})
        from vqvae.rundir import lock_run_dir
        with lock_run_dir({str(run_dir)!r}):
            print("locked", flush=True)
            time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, err = cli(["train", "--out-dir", run_dir, "--no-progress"], capsys)
        line = one_line(err)
        assert code == 1 and str(holder.pid) in line, line
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    from vqvae.rundir import lock_run_dir

    with lock_run_dir(run_dir):  # released when its holder died
        pass


# ---------------------------------------------------------------------------- codes


@requires_mnist
@pytest.mark.parametrize("value", [1.7, True, 2.0])
def test_decode_refuses_codes_that_are_not_integers(run_copy, tmp_path, capsys, value):
    codes = [[value] * 16]
    path = tmp_path / "codes.json"
    path.write_text(json.dumps({"format": "vqvae-codes/1", "codebook_size": 64,
                                "codes": codes, "sources": ["x"]}))
    code, err = cli(["decode", run_copy, path, "--out", tmp_path / "o.png"], capsys)
    line = one_line(err)
    assert code == 2 and "integer" in line, line
    npy = tmp_path / "codes.npy"
    np.save(npy, np.array(codes))
    code, err = cli(["decode", run_copy, npy, "--out", tmp_path / "o.png"], capsys)
    assert code == 2 and "integer" in one_line(err)


def test_train_step_refuses_a_non_finite_loss_and_changes_nothing():
    from conftest import assert_state_equal, state

    torch.manual_seed(0)
    model = VQVAE(ModelConfig(codebook_size=16))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch = torch.rand(4, 1, 28, 28)
    train_step(model, optimizer, batch)  # a normal step first: Adam has state
    before, opt_before = state(model), {k: v.clone() for k, v in
                                         optimizer.state_dict()["state"][0].items()}
    # the quantizer refuses values too large to square before anything is updated; a loss
    # that is not finite for another reason is refused by the step
    with pytest.raises((FloatingPointError, QuantizerInputError), match="non-finite|too large"):
        train_step(model, optimizer, torch.full((4, 1, 28, 28), 1e30))
    assert_state_equal(state(model), before)
    for key, value in optimizer.state_dict()["state"][0].items():
        assert torch.equal(value, opt_before[key])


@requires_mnist
@pytest.mark.parametrize("command", ["encode", "sample", "reconstruct"])
def test_a_non_finite_weight_in_a_checkpoint_is_refused(run_copy, tmp_path, capsys, command):
    checkpoint = torch.load(run_copy / CHECKPOINT, weights_only=True)
    key = next(k for k in checkpoint["model"] if k.endswith(".embed"))  # codes (C, K, D)
    checkpoint["model"][key][..., 3, 0] = float("nan")
    torch.save(checkpoint, run_copy / CHECKPOINT)
    weights = load_file(run_copy / "model.safetensors")
    weights[key][..., 3, 0] = float("nan")
    save_file(weights, run_copy / "model.safetensors")
    extra = {"encode": ["--out", tmp_path / "c.json"], "sample": ["--num", "2"],
             "reconstruct": []}[command]
    code, err = cli([command, run_copy, *extra], capsys)
    line = one_line(err)
    assert code == 1 and "non-finite" in line and key in line, line


# ---------------------------------------------------------------------------- messages


@pytest.mark.parametrize("command", ["prior", "reconstruct", "sample"])
def test_a_run_directory_that_does_not_exist_is_named_so(tmp_path, capsys, command):
    code, err = cli([command, tmp_path / "nope"], capsys)
    line = one_line(err)
    assert code == 2 and "does not exist" in line and "epoch" not in line, line


@requires_mnist
def test_a_prior_for_another_codebook_names_the_mismatch(run_copy, capsys):
    from vqvae.prior import CodePrior, PriorConfig

    config = PriorConfig(vocab_size=32, code_shape=(16,), num_classes=10)
    torch.save({"prior": CodePrior(config).state_dict(), "prior_config": config.to_dict()},
               run_copy / "prior.pt")
    code, err = cli(["sample", run_copy, "--prior", "--num", "2"], capsys)
    line = one_line(err)
    assert code == 2 and "32" in line and "64" in line and "lie in" not in line, line


def test_an_explicit_data_dir_that_does_not_exist_is_an_error(tmp_path, capsys, monkeypatch):
    _no_data(monkeypatch)
    code, err = cli(["train", "--out-dir", tmp_path / "run", "--data-dir",
                     tmp_path / "typo"], capsys)
    line = one_line(err)
    assert code == 2 and "typo" in line, line


@pytest.mark.parametrize("kind", ["directory", "dangling", "fifo"])
def test_something_else_where_an_idx_file_should_be_is_named(tmp_path, monkeypatch, kind):
    from vqvae import data

    monkeypatch.delenv("VQVAE_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "download", lambda *a, **k: (_ for _ in ()).throw(
        AssertionError("tried to download")))
    where = tmp_path / "train-images-idx3-ubyte.gz"
    if kind == "directory":
        where.mkdir()
    elif kind == "dangling":
        where.symlink_to(tmp_path / "gone")
    else:
        os.mkfifo(where)
    with pytest.raises(data.DatasetError) as caught:
        data.load_dataset("mnist", "train", tmp_path, progress=False)
    message = str(caught.value)
    assert str(where) in message and "could not download" not in message
    assert {"directory": "directory", "dangling": "link", "fifo": "FIFO"}[kind] in message
