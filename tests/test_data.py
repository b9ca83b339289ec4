"""The IDX loader: parsing, verification, lookup order and download failures."""

import dataclasses
import gzip
import hashlib
import struct

import numpy as np
import pytest
import torch
from conftest import requires_mnist

from vqvae.data import (
    DATASETS,
    DatasetError,
    DatasetSpec,
    check_dataset_name,
    load_dataset,
    parse_idx,
)


def idx_bytes(array: np.ndarray) -> bytes:
    codes = {np.uint8: 0x08, np.int32: 0x0C}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim])
    header += struct.pack(f">{array.ndim}I", *array.shape)
    data = array.astype(array.dtype.newbyteorder(">")).tobytes()
    return header + data


def write_split(directory, prefix, images, labels, gz=True):
    files = {}
    for kind, array in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
        raw = idx_bytes(array)
        stem = f"{prefix}-{kind}"
        path = directory / (stem + (".gz" if gz else ""))
        path.write_bytes(gzip.compress(raw) if gz else raw)
        files[stem] = hashlib.sha256(raw).hexdigest()
    return files


@pytest.fixture
def tiny(tmp_path):
    """A tiny MNIST-format dataset written by the test, and its spec."""
    rng = np.random.default_rng(0)
    sums = {}
    sums |= write_split(tmp_path, "train", rng.integers(0, 256, (6, 28, 28), dtype=np.uint8),
                        np.arange(6, dtype=np.uint8))
    sums |= write_split(tmp_path, "t10k", rng.integers(0, 256, (4, 28, 28), dtype=np.uint8),
                        np.arange(4, dtype=np.uint8), gz=False)
    spec = DatasetSpec(name="tiny", mirrors=("http://127.0.0.1:9/",), sha256=sums,
                       classes=tuple("abcdef"))
    return tmp_path, spec


def test_parse_idx_round_trip():
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(parse_idx(idx_bytes(array)), array)
    wide = np.array([[1, -2], [300000, 4]], dtype=np.int32)
    assert np.array_equal(parse_idx(idx_bytes(wide)), wide)


def test_loads_good_files_gzipped_or_not(tiny, monkeypatch):
    directory, spec = tiny
    monkeypatch.delenv("VQVAE_DATA_DIR", raising=False)
    train = load_dataset(spec, "train", data_dir=directory)
    test = load_dataset(spec, "test", data_dir=directory)  # written uncompressed
    assert train.images.shape == (6, 1, 28, 28) and train.labels.tolist() == [0, 1, 2, 3, 4, 5]
    assert test.images.shape == (4, 1, 28, 28)
    assert (train.channels, train.image_size, train.num_classes) == (1, 28, 6)
    assert train.classes == tuple("abcdef")
    raw = gzip.decompress((directory / "train-images-idx3-ubyte.gz").read_bytes())
    pixels = np.frombuffer(raw, np.uint8, offset=16).reshape(6, 28, 28)
    assert torch.equal(train.as_batch(), torch.from_numpy(pixels / 255.0).float().unsqueeze(1))
    assert torch.equal(train.as_float(), train.as_batch()[:, 0])


def test_labels_outside_the_classes_are_refused(tiny):
    directory, spec = tiny
    with pytest.raises(DatasetError, match="outside the 3 classes"):
        load_dataset(dataclasses.replace(spec, classes=("a", "b", "c")), "train",
                     data_dir=directory)
    with pytest.raises(DatasetError, match="names no classes"):
        load_dataset(dataclasses.replace(spec, classes=()), "train", data_dir=directory)


def test_channels_are_converted_on_request(tiny):
    directory, spec = tiny
    gray = load_dataset(spec, "train", data_dir=directory)
    rgb = load_dataset(spec, "train", data_dir=directory, channels=3)
    assert rgb.images.shape == (6, 3, 28, 28)
    assert all(torch.equal(rgb.images[:, c], gray.images[:, 0]) for c in range(3))
    with pytest.raises(DatasetError, match="has 3 channels"):
        rgb.as_float()
    with pytest.raises(DatasetError, match="image_size=32 is not offered"):
        load_dataset(spec, "train", data_dir=directory, image_size=32)
    with pytest.raises(DatasetError, match="channels must be 1, 3"):
        load_dataset(spec, "train", data_dir=directory, channels=2)


def test_rgb_to_gray_is_pillows_luma():
    from PIL import Image

    from vqvae.data import to_channels

    rgb = np.random.default_rng(1).integers(0, 256, (2, 3, 17, 19), dtype=np.uint8)
    rgb[0, :, 0, :3] = [[255, 0, 0], [0, 255, 0], [0, 0, 255]]  # pure primaries
    ours = to_channels(torch.from_numpy(rgb), 1)
    for i in range(2):
        pillow = np.asarray(Image.fromarray(rgb[i].transpose(1, 2, 0), "RGB").convert("L"))
        assert np.array_equal(ours[i, 0].numpy(), pillow)
    # 299/1000 of 255 for red, 587/1000 green, 114/1000 blue, rounded
    assert ours[0, 0, 0, :3].tolist() == [76, 150, 29]


def test_truncated_file_is_refused(tiny):
    directory, spec = tiny
    raw = gzip.decompress((directory / "train-images-idx3-ubyte.gz").read_bytes())
    truncated = raw[:-100]
    (directory / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(truncated))
    # with the true checksum the truncation is caught by verification...
    with pytest.raises(DatasetError, match="failed verification"):
        load_dataset(spec, "train", data_dir=directory)
    # ...and by the parser when the checksum happens to match the truncated content
    spec.sha256["train-images-idx3-ubyte"] = hashlib.sha256(truncated).hexdigest()
    with pytest.raises(DatasetError, match="truncated"):
        load_dataset(spec, "train", data_dir=directory)


def test_wrong_checksum_names_the_file_and_the_fix(tiny):
    directory, spec = tiny
    spec.sha256["train-labels-idx1-ubyte"] = "0" * 64
    with pytest.raises(DatasetError) as error:
        load_dataset(spec, "train", data_dir=directory)
    message = str(error.value)
    assert "train-labels-idx1-ubyte" in message and "0" * 64 in message
    assert "Delete it" in message


def test_wrong_magic_is_refused(tiny):
    directory, spec = tiny
    bad = b"\x12\x34\x08\x03" + b"\x00" * 100
    (directory / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(bad))
    spec.sha256["train-images-idx3-ubyte"] = hashlib.sha256(bad).hexdigest()
    with pytest.raises(DatasetError, match="not an IDX file"):
        load_dataset(spec, "train", data_dir=directory)


def test_corrupt_gzip_is_refused(tiny):
    directory, spec = tiny
    path = directory / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(DatasetError, match="cannot be read"):
        load_dataset(spec, "train", data_dir=directory)


def test_offline_download_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("VQVAE_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    spec = DatasetSpec(name="absent", mirrors=("http://127.0.0.1:9/",),
                       sha256={"train-images-idx3-ubyte": "0" * 64,
                               "train-labels-idx1-ubyte": "0" * 64,
                               "t10k-images-idx3-ubyte": "0" * 64,
                               "t10k-labels-idx1-ubyte": "0" * 64},
                       classes=("a", "b"))
    target = tmp_path / "data"
    with pytest.raises(DatasetError) as error:
        load_dataset(spec, "train", data_dir=target, progress=False)
    message = str(error.value)
    assert "looked in" in message and str(target) in message
    assert "127.0.0.1" in message and "--data-dir" in message
    # nothing half-written is left behind
    assert not list(target.glob("*.part")) and not list(target.glob("*-ubyte*"))


def test_lookup_order_prefers_data_dir_over_environment(tiny, tmp_path, monkeypatch):
    directory, spec = tiny
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    monkeypatch.setenv("VQVAE_DATA_DIR", str(empty))
    assert load_dataset(spec, "train", data_dir=directory).source == directory
    monkeypatch.setenv("VQVAE_DATA_DIR", str(directory))
    assert load_dataset(spec, "train", data_dir=None).source == directory


def test_unknown_dataset_and_split():
    with pytest.raises(DatasetError, match="unknown dataset") as error:
        load_dataset("cifar")
    assert "cifar10" in str(error.value) and "images:DIR" in str(error.value)
    with pytest.raises(DatasetError, match="unknown split"):
        load_dataset("mnist", "validation")
    with pytest.raises(DatasetError, match="needs a folder"):
        check_dataset_name("images:")
    assert check_dataset_name("images:photos") == "images:photos"
    assert check_dataset_name("cifar10") == "cifar10"


@requires_mnist
def test_real_mnist_matches_published_facts():
    test = load_dataset("mnist", "test")
    assert test.images.shape == (10000, 1, 28, 28)
    assert test.num_classes == 10 and test.as_float().shape == (10000, 28, 28)
    assert test.labels.bincount().tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028,
                                               974, 1009]
    assert set(DATASETS) == {"mnist", "fashion-mnist"}
