"""Training on one's own images: a folder of colour images of any size through load_data, the
CLI's data options, PSNR/SSIM in the metrics, colour figures, the prior's classes and the
judge's refusal; one slow test runs the commands end to end."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vqvae.cli import main
from vqvae.data import DatasetError
from vqvae.models import VQVAE, ModelConfig
from vqvae.train import TrainConfig, evaluate, load_data
from vqvae.workflow.judge_run import unjudgeable


def write_folder(root, classes=("disc", "square"), per_class=12, size=20, seed=0):
    """Coloured squares and discs on coloured backgrounds, one subfolder per class (``classes``
    empty: images straight in the folder, no labels)."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes or ("",)):
        folder = root / name if name else root
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = np.empty((size, size, 3), np.uint8)
            image[:] = rng.integers(0, 120, 3)
            lo, hi = sorted(rng.integers(2, size - 2, 2))
            if c == 0:
                yy, xx = np.mgrid[:size, :size]
                image[(yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (hi - lo + 3) ** 2 / 4] = \
                    rng.integers(130, 256, 3)
            else:
                image[lo:hi + 1, lo:hi + 1] = rng.integers(130, 256, 3)
            Image.fromarray(image).save(folder / f"{c}-{i:03d}.png")
    return root


@pytest.fixture
def folder(tmp_path):
    return write_folder(tmp_path / "shapes")


def _conv(**kwargs):
    return ModelConfig(**{"model": "conv", "image_size": 16, "channels_in": 3, "channels": 8,
                          "vector_dim": 8, "codebook_size": 16, **kwargs})


def test_load_data_reads_a_colour_folder(folder):
    data = load_data(TrainConfig(dataset=f"images:{folder}", progress=False), torch.device("cpu"),
                     _conv())
    total = data.train.shape[0] + data.test.shape[0]
    assert total == 24
    assert data.train.shape[1:] == (3, 16, 16) and data.test.shape[1:] == (3, 16, 16)
    assert data.train.dtype == torch.float32
    assert 0.0 <= float(data.train.min()) and float(data.train.max()) <= 1.0
    assert data.num_classes == 2
    assert data.test_labels is not None and data.test_labels.shape == (data.test.shape[0],)


def test_load_data_without_labels(tmp_path):
    root = write_folder(tmp_path / "flat", classes=(), per_class=20)
    data = load_data(TrainConfig(dataset=f"images:{root}", progress=False), torch.device("cpu"),
                     _conv())
    assert data.test_labels is None and data.num_classes == 0
    assert data.train.shape[0] + data.test.shape[0] == 20


def test_channel_mismatch_is_a_clear_error(folder):
    with pytest.raises(DatasetError, match=r"3-channel images.*channels_in=1.*--channels-in 3"):
        load_data(TrainConfig(dataset=f"images:{folder}", progress=False),
                  torch.device("cpu"), _conv(channels_in=1))


def test_evaluate_reports_psnr_and_ssim(one_thread):
    """PSNR is the mean over images of 10·log10(1 / that image's MSE), worked here in NumPy;
    SSIM is averaged over the first ``ssim_images`` only."""
    from vqvae.image_metrics import ssim

    torch.manual_seed(0)
    model = VQVAE(_conv())
    images = torch.rand(7, 3, 16, 16)
    metrics = evaluate(model, images, batch_size=3, ssim_images=4)
    with torch.no_grad():
        reconstruction = model(images).reconstruction
    x, y = reconstruction.double().numpy(), images.double().numpy()
    per_image = ((x - y) ** 2).reshape(7, -1).mean(axis=1)
    assert metrics["test_psnr"] == pytest.approx(np.mean(10 * np.log10(1 / per_image)),
                                                 rel=1e-9)
    assert metrics["test_mse"] == pytest.approx(per_image.mean(), rel=1e-6)  # float32 sums
    assert metrics["test_ssim"] == pytest.approx(
        float(ssim(reconstruction[:4], images[:4]).mean()), rel=1e-9)
    assert metrics["test_ssim"] != pytest.approx(float(ssim(reconstruction, images).mean()),
                                                 rel=1e-6)


def _usage_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_cli_dataset_errors(folder, tmp_path, capsys):
    err = _usage_error(["train", "--dataset", "nonsense", "--out-dir", str(tmp_path / "r")],
                       capsys)
    assert "unknown dataset 'nonsense'" in err and "images:DIR" in err
    err = _usage_error(["train", "--model", "conv", "--dataset", f"images:{folder}",
                        "--out-dir", str(tmp_path / "r")], capsys)
    assert "needs --image-size" in err
    err = _usage_error(["train", "--model", "conv", "--dataset", f"images:{folder}",
                        "--image-size", "16", "--channels-in", "1",
                        "--out-dir", str(tmp_path / "r")], capsys)
    assert "--channels-in 1" in err and "3-channel" in err
    err = _usage_error(["train", "--dataset", f"images:{folder}", "--image-size", "16",
                        "--out-dir", str(tmp_path / "r")], capsys)
    assert "--model conv" in err
    assert not (tmp_path / "r").exists()


def test_colour_figures(tmp_path):
    from vqvae import plots

    images = torch.zeros(4, 3, 8, 8)
    images[:, 0] = 1.0  # pure red
    path = plots.image_grid(images, tmp_path / "grid.png", columns=2)
    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3).astype(int)
    red = (pixels[:, 0] > 200) & (pixels[:, 1] < 60) & (pixels[:, 2] < 60)
    assert red.sum() > 100  # drawn in colour, not as the first channel in gray
    gray = plots.image_rows([torch.rand(3, 1, 8, 8)], ["x"], tmp_path / "rows.png")
    assert gray.is_file()
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        plots.image_grid(torch.rand(2, 2, 8, 8), tmp_path / "bad.png")


def test_judge_is_for_mnist_like_data_only():
    assert unjudgeable("mnist", ModelConfig(model="conv")) is None
    assert unjudgeable("fashion-mnist", ModelConfig()) is None
    reason = unjudgeable("images:/x", _conv())
    assert "28×28 single-channel" in reason and "3×16×16" in reason
    assert unjudgeable("mnist", ModelConfig(model="conv", image_size=32)) is not None


@pytest.mark.slow
def test_own_images_end_to_end(tmp_path, capsys, one_thread):
    """train → reconstruct → sample → prior (conditioned on the folder's 2 classes) → sample
    from the prior, and the judge declines; then a folder without labels trains an
    unconditional prior."""
    folder = write_folder(tmp_path / "shapes", per_class=16)
    run = tmp_path / "run"
    common = ["--model", "conv", "--image-size", "16", "--channels", "8", "--vector-dim", "8",
              "--codebook-size", "32", "--epochs", "2", "--batch-size", "8", "--no-progress"]
    assert main(["train", "--dataset", f"images:{folder}", *common, "--out-dir", str(run)]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs_done"] == 2
    assert np.isfinite(metrics["test_mse"]) and metrics["test_psnr"] > 0
    assert -1 <= metrics["test_ssim"] <= 1
    config = json.loads((run / "config.json").read_text())
    model_config = config.get("model", config)
    assert model_config["channels_in"] == 3 and model_config["image_size"] == 16
    for name in ("reconstructions.png", "samples_random.png", "curves.png"):
        assert (run / name).is_file()
    assert main(["reconstruct", str(run), "--indices", "0-1"]) == 0
    assert main(["sample", str(run), "--num", "4", "--out", str(tmp_path / "s.png")]) == 0
    assert main(["prior", str(run), "--epochs", "1", "--dim", "32", "--depth", "1",
                 "--no-progress"]) == 0
    prior_metrics = json.loads((run / "prior_metrics.json").read_text())
    from vqvae.workflow import load_run_prior

    assert load_run_prior(run).config.num_classes == 2
    from vqvae.workflow.prior_run import class_names

    assert class_names(run, 2) == ["disc", "square"]  # the subfolders label the figure's rows
    assert np.isfinite(prior_metrics["val_nll"])
    assert main(["sample", str(run), "--prior", "--num", "4",
                 "--out", str(tmp_path / "p.png")]) == 0
    capsys.readouterr()
    err = _usage_error(["judge", str(run)], capsys)
    assert "28×28 single-channel" in err

    flat = write_folder(tmp_path / "flat", classes=(), per_class=24)
    run2 = tmp_path / "run2"
    assert main(["train", "--dataset", f"images:{flat}", *common, "--epochs", "1",
                 "--out-dir", str(run2)]) == 0
    assert main(["prior", str(run2), "--epochs", "1", "--dim", "32", "--depth", "1",
                 "--no-progress"]) == 0
    assert load_run_prior(run2).config.num_classes == 0
    assert (run2 / "samples_prior.png").is_file()


def test_comparison_table_has_psnr_and_ssim():
    from vqvae.workflow import comparison_table

    row = {"quantizer": "ours", "bits_per_image": 441.0, "test_mse": 0.00296, "test_psnr": 25.87,
           "test_ssim": 0.96751, "perplexity": 378.2, "used_codes": 512, "codebook_size": 512,
           "seconds_per_epoch": 13.5}
    table = comparison_table([row, {**row, "quantizer": "old", "test_psnr": None,
                                    "test_ssim": None}])
    lines = table.splitlines()
    assert "PSNR (dB)" in lines[0] and "SSIM" in lines[0]
    assert "| ours | 441 | 0.00296 | 25.87 | 0.9675 | 378.2 | 512 / 512 | 13.50 |" in lines
    assert "| old | 441 | 0.00296 |  |  | 378.2 | 512 / 512 | 13.50 |" in lines  # older runs


def test_colour_images_are_written_in_colour(tmp_path):
    """decode/sample outputs of an RGB run keep their channels: PNG files in RGB and .npy arrays
    channels last; grayscale stays (N, H, W) as MNIST is stored."""
    from vqvae.workflow import save_images, write_png_images

    images = torch.rand(2, 3, 8, 12, generator=torch.Generator().manual_seed(0))
    paths = write_png_images(images, tmp_path / "png", ["a.png", "b.png"])
    with Image.open(paths[1]) as image:
        assert image.mode == "RGB" and image.size == (12, 8)
        pixels = np.asarray(image)
    expected = (images[1].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    assert np.array_equal(pixels, expected)
    array = np.load(save_images(images, tmp_path / "x.npy"))
    assert array.shape == (2, 8, 12, 3)
    assert np.allclose(array[0, 2, 5], images[0, :, 2, 5].numpy())
    gray = np.load(save_images(images[:, :1], tmp_path / "g.npy"))
    assert gray.shape == (2, 8, 12)
    with pytest.raises(ValueError, match="1 or 3"):
        write_png_images(torch.rand(1, 2, 4, 4), tmp_path / "bad", ["c.png"])
