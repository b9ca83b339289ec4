"""--tensorboard: event files TensorBoard's own reader opens, holding metrics.json's numbers,
the test set's code histogram and the reconstructions."""

import io
import json

import numpy as np
import pytest
import torch
from conftest import requires_mnist

import vqvae.workflow.runs
from vqvae.cli import main
from vqvae.rundir import load_model

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import (  # noqa: E402
    EventAccumulator,
)

from vqvae.tensorboard_log import SCALAR_TAGS  # noqa: E402

pytestmark = requires_mnist

TINY = ["--hidden-dim", "16", "--num-embeddings", "4", "--codebook-size", "8",
        "--train-subset", "256", "--test-subset", "64", "--batch-size", "64", "--device", "cpu",
        "--precision", "fp32", "--no-progress"]


def _events(log_dir):
    accumulator = EventAccumulator(str(log_dir), size_guidance={"images": 0, "histograms": 0,
                                                                "scalars": 0})
    accumulator.Reload()
    return accumulator


@pytest.mark.slow
def test_train_writes_what_metrics_json_says(tmp_path, monkeypatch):
    monkeypatch.setattr(vqvae.workflow.runs, "SAMPLE_COUNT", 8)
    run_dir = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "2", "--out-dir", str(run_dir),
                 "--tensorboard"]) == 0
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    events = _events(run_dir / "tb")
    history = json.loads((run_dir / "metrics.json").read_text())["epochs"]
    tags = events.Tags()
    for key, tag in SCALAR_TAGS.items():
        assert tag in tags["scalars"], tag
        logged = events.Scalars(tag)
        assert [e.step for e in logged] == [1, 2]
        # event files hold float32: the JSON value rounded to float32, exactly
        assert [e.value for e in logged] == [float(np.float32(h[key])) for h in history], tag

    # the histogram: one bucket per code, counting the codes of the last model on the test set
    model = load_model(run_dir)
    from vqvae.data import load_dataset

    test = load_dataset("mnist", "test", progress=False).as_float()[:64].unsqueeze(1)
    with torch.no_grad():
        codes = model.encode(test).reshape(-1)
    expected = torch.bincount(codes, minlength=8)
    histograms = events.Histograms("test/code_usage")
    assert [h.step for h in histograms] == [1, 2]
    last = histograms[-1].histogram_value
    assert last.num == codes.numel() == 64 * 4
    assert last.min == codes.min().item() and last.max == codes.max().item()
    assert last.sum == pytest.approx(codes.double().sum().item())
    counts = {round(limit - 0.5): int(count) for limit, count in
              zip(last.bucket_limit, last.bucket, strict=True) if count}
    assert counts == {k: int(v) for k, v in enumerate(expected.tolist()) if v}

    # the images: 8 test images above their reconstructions, as the final model draws them
    from PIL import Image

    images = events.Images("test/reconstructions")
    assert [i.step for i in images] == [1, 2]
    assert (images[-1].width, images[-1].height) == (8 * 28, 2 * 28)
    picture = np.asarray(Image.open(io.BytesIO(images[-1].encoded_image_string)).convert("L"),
                         dtype=np.float64) / 255
    with torch.no_grad():
        reconstruction = model(test[:8]).reconstruction.clamp(0, 1)
    top = torch.cat(list(test[:8, 0]), dim=-1).numpy()
    bottom = torch.cat(list(reconstruction[:, 0]), dim=-1).numpy()
    assert np.abs(picture[:28] - top).max() <= 1 / 255 + 1e-6
    assert np.abs(picture[28:] - bottom).max() <= 1 / 255 + 1e-6


@pytest.mark.slow
def test_logging_changes_nothing_in_training(tmp_path, monkeypatch):
    """Drawing the histogram and images runs the model: it must not touch the weights, the
    codebook's statistics or the random state the next epoch draws from."""
    monkeypatch.setattr(vqvae.workflow.runs, "SAMPLE_COUNT", 8)
    for name, extra in (("plain", []), ("logged", ["--tensorboard"])):
        assert main(["train", *TINY, "--epochs", "2", "--quantizer", "lucidrains",
                     "--out-dir", str(tmp_path / name), *extra]) == 0
    plain, logged = load_model(tmp_path / "plain"), load_model(tmp_path / "logged")
    for key, value in plain.state_dict().items():
        assert torch.equal(logged.state_dict()[key], value), key
    assert not (tmp_path / "plain" / "tb").exists()


@pytest.mark.slow
def test_prior_writes_its_nll(tmp_path, monkeypatch):
    monkeypatch.setattr(vqvae.workflow.runs, "SAMPLE_COUNT", 8)
    run_dir = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--out-dir", str(run_dir)]) == 0
    assert main(["prior", str(run_dir), "--epochs", "2", "--dim", "16", "--heads", "2",
                 "--depth", "1", "--train-subset", "200", "--no-progress",
                 "--tensorboard"]) == 0
    events = _events(run_dir / "tb" / "prior")
    history = json.loads((run_dir / "prior_metrics.json").read_text())["history"]
    logged = events.Scalars("prior/train_nll")
    assert [e.step for e in logged] == [1, 2]
    assert [e.value for e in logged] == [float(np.float32(h["train_nll"])) for h in history]
    assert [e.value for e in events.Scalars("prior/val_nll")] == \
        [float(np.float32(history[-1]["val_nll"]))]


def test_missing_package_is_one_clear_error_before_training(tmp_path, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name == "tensorboard" or name.startswith("tensorboard.") \
                or name == "torch.utils.tensorboard":
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *TINY, "--epochs", "1", "--out-dir", str(tmp_path / "run"),
              "--tensorboard"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--tensorboard needs the tensorboard package" in err
    assert "pip install 'vqvae[tensorboard]'" in err
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written
