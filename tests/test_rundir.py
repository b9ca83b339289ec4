"""Run-directory helpers, the shared training step and the learning-rate schedule."""

import copy
import hashlib
import math
import os

import pytest
import torch
import torch.nn.functional as F

from vqvae import rundir
from vqvae.models import VQVAE, ModelConfig
from vqvae.schedule import warmup_cosine
from vqvae.train import TrainConfig, lr_factor, make_optimizer, train_step


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "a.json"
    rundir.atomic_write_json(path, {"x": 1})
    assert path.read_text() == '{\n  "x": 1\n}\n'

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(rundir.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        rundir.atomic_write_text(path, "new")
    assert path.read_text() == '{\n  "x": 1\n}\n'  # the old content, whole
    assert os.listdir(path.parent) == ["a.json"]  # no temporary file left behind


def test_sha256_file_matches_hashlib_over_the_bytes(tmp_path):
    payload = os.urandom(3 * (1 << 20) + 17)  # more than one 1 MiB piece
    path = tmp_path / "blob"
    path.write_bytes(payload)
    assert rundir.sha256_file(path) == hashlib.sha256(payload).hexdigest()
    assert rundir.sha256_bytes(b"abc") == \
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert rundir.user_cache_dir("judge") == tmp_path / "vqvae" / "judge"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert rundir.user_cache_dir("mnist") == tmp_path / "home" / ".cache" / "vqvae" / "mnist"


def test_reading_a_directory_that_is_not_a_run_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a run directory"):
        rundir.read_config(tmp_path)
    with pytest.raises(FileNotFoundError, match="is not a run directory"):
        rundir.load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        rundir.load_model(tmp_path / "missing")
    rundir.save_config(tmp_path, TrainConfig(), ModelConfig())
    with pytest.raises(FileNotFoundError, match="has not finished an epoch"):
        rundir.load_model(tmp_path)


def test_save_and_read_config_round_trip(tmp_path):
    train_config = TrainConfig(epochs=3, lr=5e-4)
    model_config = ModelConfig(quantizer="rvq", num_quantizers=2)
    rundir.save_config(tmp_path, train_config, model_config)
    assert rundir.read_config(tmp_path) == (train_config, model_config)


def test_warmup_cosine_by_hand():
    # 100 steps, 10 of warm-up: (s + 1) / 10, then 0.5 (1 + cos(pi (s - 10) / 90))
    assert warmup_cosine(0, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 0.1) == pytest.approx(0.5)
    assert warmup_cosine(99, 100, 0.1) == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert warmup_cosine(0, 10, 0.0) == 1.0  # at least one warm-up step
    constant = TrainConfig(lr_schedule="constant")
    assert lr_factor(constant, 50, 100) == 1.0
    cosine = TrainConfig(lr_schedule="cosine", warmup_fraction=0.1)
    assert lr_factor(cosine, 55, 100) == warmup_cosine(55, 100, 0.1)


def test_train_step_is_one_adam_step_on_mse_plus_vq_loss():
    """train_step against the step written out: same loss, same parameters after."""
    torch.manual_seed(0)
    model = VQVAE(ModelConfig(hidden_dim=16, codebook_size=8))
    twin = copy.deepcopy(model)
    images = torch.rand(5, 1, 28, 28)
    device = torch.device("cpu")
    optimizer, twin_optimizer = (make_optimizer(m, TrainConfig(), device) for m in (model, twin))
    out = train_step(model, optimizer, images)
    reconstruction, indices, vq_loss = twin(images)
    recon = F.mse_loss(reconstruction, images)
    (recon + vq_loss).backward()
    twin_optimizer.step()
    assert float(out.recon_mse) == pytest.approx(recon.item(), rel=1e-6)
    assert float(out.loss) == pytest.approx((recon + vq_loss).item(), rel=1e-6)
    assert torch.equal(out.indices, indices)
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values(), strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), name
