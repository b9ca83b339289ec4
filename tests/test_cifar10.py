"""CIFAR-10's python form: restricted unpickling, layout, verification, lookup and download.

The batches are written here byte for byte as Python 2's cPickle wrote the official files
(protocol 2, str keys and data, ``numpy.core.multiarray._reconstruct``), tiny, with their own
checksums in a copy of the dataset's spec.
"""

import dataclasses
import functools
import hashlib
import http.server
import io
import pickle
import struct
import tarfile
import threading

import numpy as np
import pytest
import torch

from vqvae import cifar10
from vqvae.cifar10 import CIFAR10, load_cifar10, unpickle_batch
from vqvae.data import DatasetError, load_dataset

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck"]


# ---------------------------------------------------------------------------- Python 2 pickles


def _str(text: str | bytes) -> bytes:
    raw = text.encode("latin1") if isinstance(text, str) else text
    if len(raw) < 256:
        return b"U" + bytes([len(raw)]) + raw  # SHORT_BINSTRING
    return b"T" + struct.pack("<i", len(raw)) + raw  # BINSTRING


def _int(value: int) -> bytes:
    if 0 <= value < 256:
        return b"K" + bytes([value])
    if 0 <= value < 65536:
        return b"M" + struct.pack("<H", value)
    return b"J" + struct.pack("<i", value)


def _uint8_array(array: np.ndarray) -> bytes:
    dtype = (b"cnumpy\ndtype\n" + _str("u1") + _int(0) + _int(1) + b"\x87R"
             + b"(" + _int(3) + _str("|") + b"NNN" + _int(-1) + _int(-1) + _int(0) + b"tb")
    shape = b"(" + b"".join(_int(d) for d in array.shape) + b"t"
    return (b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n"
            + _int(0) + b"\x85" + _str("b") + b"\x87R"
            + b"(" + _int(1) + shape + dtype + b"\x89" + _str(array.tobytes()) + b"tb")


def _value(value) -> bytes:
    if isinstance(value, np.ndarray):
        return _uint8_array(value)
    if isinstance(value, str):
        return _str(value)
    if isinstance(value, int):
        return _int(value)
    if isinstance(value, list):
        return b"](" + b"".join(_value(v) for v in value) + b"e"
    raise TypeError(type(value))


def python2_pickle(mapping: dict) -> bytes:
    """``mapping`` pickled as Python 2's cPickle did at protocol 2 (without the memo)."""
    items = b"".join(_str(k) + _value(v) for k, v in mapping.items())
    return b"\x80\x02}(" + items + b"u."


# ---------------------------------------------------------------------------- a tiny CIFAR


def make_batches(rng, sizes=(2, 2, 2, 2, 2, 3)):
    """Images ``(N, 32, 32, 3)`` and labels per batch, and the pickled files."""
    names = [*CIFAR10.train, *CIFAR10.test]
    images, labels, files = {}, {}, {}
    for name, n in zip(names, sizes, strict=True):
        images[name] = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        labels[name] = rng.integers(0, 10, n).tolist()
        # a row is the red plane, then green, then blue, each row-major
        rows = images[name].transpose(0, 3, 1, 2).reshape(n, 3072)
        files[name] = python2_pickle({"batch_label": f"{name} of 6", "labels": labels[name],
                                      "data": rows, "filenames": [f"{i}.png" for i in range(n)]})
    files["batches.meta"] = python2_pickle({"num_cases_per_batch": 10000,
                                            "label_names": CLASSES, "num_vis": 3072})
    return images, labels, files


def tarball(files: dict) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, raw in files.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return buffer.getvalue()


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    monkeypatch.delenv("VQVAE_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    images, labels, files = make_batches(np.random.default_rng(0))
    archive = tarball(files)
    spec = dataclasses.replace(
        CIFAR10, urls=("http://127.0.0.1:9/cifar-10-python.tar.gz",),
        archive_sha256=hashlib.sha256(archive).hexdigest(),
        archive_md5=hashlib.md5(archive).hexdigest(),
        md5={name: hashlib.md5(raw).hexdigest() for name, raw in files.items()})
    return spec, images, labels, files, archive


def expected(images, labels, names):
    return (torch.from_numpy(np.concatenate([images[n] for n in names]).transpose(0, 3, 1, 2)),
            [label for n in names for label in labels[n]])


# ---------------------------------------------------------------------------- tests


def test_reads_python2_batches_without_their_globals_running():
    rows = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    batch = unpickle_batch(python2_pickle({"data": rows, "labels": [3, 7]}), "test")
    assert batch["labels"] == [3, 7]
    assert batch["data"].dtype == np.uint8 and np.array_equal(batch["data"], rows)
    # and what Python 3 and numpy 2 write, at every protocol
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        batch = unpickle_batch(pickle.dumps({"data": rows, "labels": [1]}, protocol), "test")
        assert np.array_equal(batch["data"], rows)


class Exploit:
    def __reduce__(self):
        import os

        return os.system, ("echo exploited > exploited.txt",)


def test_refuses_any_other_global(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = pickle.dumps({"data": Exploit()}, protocol=2)
    with pytest.raises(DatasetError, match=r"refused to unpickle (posix|os|nt)\.system"):
        unpickle_batch(raw, "evil")
    assert not (tmp_path / "exploited.txt").exists()
    # _codecs.encode is let through for latin-1 bytes only
    sneaky = b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R."
    with pytest.raises(DatasetError, match="not a readable pickle"):
        unpickle_batch(sneaky, "sneaky")
    with pytest.raises(DatasetError, match="expected a dict"):
        unpickle_batch(pickle.dumps([1, 2], protocol=2), "list")


def test_loads_the_extracted_folder(tiny, tmp_path):
    spec, images, labels, files, _ = tiny
    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, raw in files.items():
        (folder / name).write_bytes(raw)
    train = load_cifar10("train", tmp_path / "data", False, False, spec)
    test = load_cifar10("test", tmp_path / "data", False, False, spec)
    want_images, want_labels = expected(images, labels, CIFAR10.train)
    assert torch.equal(train.images, want_images) and train.labels.tolist() == want_labels
    want_images, want_labels = expected(images, labels, CIFAR10.test)
    assert torch.equal(test.images, want_images) and test.labels.tolist() == want_labels
    assert train.classes == tuple(CLASSES) and train.num_classes == 10
    assert (train.channels, train.image_size, len(train), len(test)) == (3, 32, 10, 3)
    assert train.source == folder

    # a damaged batch is named, with its expected checksum
    (folder / "data_batch_3").write_bytes(files["data_batch_3"][:-10])
    with pytest.raises(DatasetError, match="data_batch_3 failed verification") as error:
        load_cifar10("train", tmp_path / "data", False, False, spec)
    assert spec.md5["data_batch_3"] in str(error.value)


def test_loads_the_tarball_in_place_and_verifies_it(tiny, tmp_path):
    spec, images, labels, _, archive = tiny
    data = tmp_path / "data" / "cifar10"  # the dataset's subfolder is looked in too
    data.mkdir(parents=True)
    (data / spec.archive).write_bytes(archive)
    test = load_cifar10("test", tmp_path / "data", False, False, spec)
    want_images, want_labels = expected(images, labels, CIFAR10.test)
    assert torch.equal(test.images, want_images) and test.labels.tolist() == want_labels
    assert not (data / spec.folder).exists()  # read in place, never extracted

    (data / spec.archive).write_bytes(archive[:-1] + bytes([archive[-1] ^ 1]))
    with pytest.raises(DatasetError, match="failed verification") as error:
        load_cifar10("test", tmp_path / "data", False, False, spec)
    assert spec.archive_sha256 in str(error.value) and "Delete it" in str(error.value)


def test_official_checksums_are_the_published_ones():
    assert CIFAR10.archive_md5 == "c58f30108f718f92721af3b95e74349a"
    assert CIFAR10.md5["data_batch_1"] == "c99cafc152244af753f735de768cd75f"
    assert CIFAR10.md5["test_batch"] == "40351d587109b95175f43aff81a1287e"
    assert set(CIFAR10.md5) == {*CIFAR10.train, *CIFAR10.test, CIFAR10.meta}


@pytest.fixture
def server(tmp_path):
    """A local HTTP server for the files of ``tmp_path / "served"``."""
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


def test_downloads_verifies_then_loads(tiny, tmp_path, server):
    spec, images, labels, _, archive = tiny
    served, url = server
    (served / spec.archive).write_bytes(archive)
    spec = dataclasses.replace(spec, urls=(url + "missing.tar.gz", url + spec.archive))
    target = tmp_path / "downloaded"
    train = load_cifar10("train", target, True, False, spec)
    assert (target / spec.archive).read_bytes() == archive
    assert torch.equal(train.images, expected(images, labels, CIFAR10.train)[0])


def test_a_bad_download_leaves_nothing_behind(tiny, tmp_path, server):
    spec, _, _, _, archive = tiny
    served, url = server
    (served / spec.archive).write_bytes(archive[: len(archive) // 2])
    spec = dataclasses.replace(spec, urls=(url + spec.archive,))
    target = tmp_path / "downloaded"
    with pytest.raises(DatasetError) as error:
        load_cifar10("train", target, True, False, spec)
    message = str(error.value)
    assert "failed verification" in message and "looked in" in message
    assert not list(target.iterdir())


def test_offline_gives_a_clear_error(tiny, tmp_path):
    spec = tiny[0]
    with pytest.raises(DatasetError) as error:
        load_cifar10("train", tmp_path / "nowhere", True, False, spec)
    message = str(error.value)
    assert "127.0.0.1" in message and "--data-dir" in message and "looked in" in message
    with pytest.raises(DatasetError, match="not found"):
        load_cifar10("train", tmp_path / "nowhere", False, False, spec)


def test_load_dataset_dispatches_converts_and_refuses_resizing(tiny, tmp_path, monkeypatch):
    spec, images, labels, _, archive = tiny
    (tmp_path / spec.archive).write_bytes(archive)
    monkeypatch.setattr(cifar10, "load_cifar10",
                        functools.partial(cifar10.load_cifar10, spec=spec))
    rgb = load_dataset("cifar10", "test", tmp_path, progress=False)
    gray = load_dataset("cifar10", "test", tmp_path, progress=False, channels=1)
    assert rgb.images.shape == (3, 3, 32, 32) and gray.images.shape == (3, 1, 32, 32)
    luma = (rgb.images[:, 0].double() * 0.299 + rgb.images[:, 1].double() * 0.587
            + rgb.images[:, 2].double() * 0.114)
    assert (gray.images[:, 0].double() - luma).abs().max() <= 0.51
    assert gray.as_float().shape == (3, 32, 32)
    with pytest.raises(DatasetError, match="32×32; image_size=28 is not offered"):
        load_dataset("cifar10", "test", tmp_path, progress=False, image_size=28)


def test_labels_outside_the_classes_are_refused(tiny, tmp_path):
    spec, images, labels, files, _ = tiny
    rows = images["test_batch"].transpose(0, 3, 1, 2).reshape(-1, 3072)
    files = {**files, "test_batch": python2_pickle({"data": rows, "labels": [0, 10, 1]})}
    spec = dataclasses.replace(spec, md5={n: hashlib.md5(r).hexdigest()
                                          for n, r in files.items()})
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name, raw in files.items():
        (folder / name).write_bytes(raw)
    with pytest.raises(DatasetError, match="labels outside 0–9"):
        load_cifar10("test", tmp_path, False, False, spec)


@pytest.mark.skipif(cifar10.find_source(CIFAR10) is None,
                    reason="CIFAR-10 not found locally (tests never download)")
def test_real_cifar10_matches_published_facts():
    test = load_cifar10("test", download_missing=False, progress=False)
    train = load_cifar10("train", download_missing=False, progress=False)
    assert test.images.shape == (10000, 3, 32, 32) and len(train) == 50000
    assert train.labels.bincount().tolist() == [5000] * 10
    assert test.labels.bincount().tolist() == [1000] * 10
    assert train.labels[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
