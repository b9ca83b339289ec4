"""Folders of one's own images (images:DIR): decoding, labels, split, cache and refused files."""

import hashlib
import os
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from vqvae import image_folder
from vqvae.data import DatasetError, load_dataset
from vqvae.image_folder import ImageFolderWarning, in_test_split, load_image_folder


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "vqvae" / "images"


def save(path, array, mode=None, **options):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8), mode).save(path, **options)
    return path


def solid(colour, size=(12, 10)):
    """An RGB image of one colour, ``size`` = (width, height)."""
    return np.broadcast_to(np.array(colour, np.uint8), (size[1], size[0], 3))


def load(root, split="train", **options):
    options.setdefault("image_size", 8)
    options.setdefault("progress", False)
    return load_image_folder(root, split, **options)


def both(root, **options):
    train, test = load(root, "train", **options), load(root, "test", **options)
    return train, test


def test_class_folders_give_sorted_labels(tmp_path):
    colours = {"cat": (200, 0, 0), "ant": (0, 200, 0), "bee": (0, 0, 200)}
    for name, colour in colours.items():
        for i in range(4):
            save(tmp_path / name / f"{i}.png", solid(colour))
    save(tmp_path / "bee" / "deeper" / "x.jpg", solid(colours["bee"]), quality=100)
    train, test = both(tmp_path)
    assert train.classes == test.classes == ("ant", "bee", "cat")
    assert train.num_classes == 3 and train.channels == 3 and train.image_size == 8
    assert len(train) + len(test) == 13 and len(test) >= 1
    for dataset in (train, test):
        assert dataset.images.shape == (len(dataset), 3, 8, 8)
        assert dataset.images.dtype == torch.uint8
        for image, label in zip(dataset.images, dataset.labels, strict=True):
            expected = torch.tensor(colours[dataset.classes[label]], dtype=torch.int32)
            # one colour in, the same colour out (JPEG within a few levels)
            assert (image.int() - expected.view(3, 1, 1)).abs().max() <= 3
    assert sorted(train.labels.tolist() + test.labels.tolist()) == [0] * 4 + [1] * 5 + [2] * 4


def test_split_follows_the_hash_of_each_path(tmp_path):
    names = [f"img{i:03d}.png" for i in range(60)]
    for i, name in enumerate(names):
        save(tmp_path / name, np.full((6, 6), i, np.uint8))
    train, test = both(tmp_path, image_size=4)
    assert train.labels is None and train.classes == () and train.num_classes == 0
    assert train.channels == 1  # every file grayscale

    # independent statement of the rule: first 8 bytes of SHA-256 of the path, below 10%
    def key(name):
        return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")

    expected_test = [n for n in names if key(n) < 0.1 * 2**64]
    assert 0 < len(expected_test) < 20
    # pixel value i tells which file an image came from
    assert sorted(test.images[:, 0, 0, 0].tolist()) == [names.index(n) for n in expected_test]
    assert len(train) == 60 - len(expected_test)

    # new files never move old ones
    for i in range(60, 90):
        save(tmp_path / f"img{i:03d}.png", np.full((6, 6), i, np.uint8))
    test_after = load(tmp_path, "test", image_size=4)
    old = {v for v in test_after.images[:, 0, 0, 0].tolist() if v < 60}
    assert old == {names.index(n) for n in expected_test}


def test_tiny_folders_still_have_both_splits():
    for n in range(2, 6):
        paths = [f"{i}.png" for i in range(n)]
        mask = in_test_split(paths)
        assert 0 < int(mask.sum()) < n
    assert not in_test_split(["only.png"]).any()


def test_one_image_cannot_be_split(tmp_path):
    save(tmp_path / "a.png", solid((1, 2, 3)))
    assert len(load(tmp_path, "train")) == 1
    with pytest.raises(DatasetError, match="test split is empty"):
        load(tmp_path, "test")


def test_shorter_side_resized_then_centre_cropped(tmp_path):
    # 40×20: red | green | blue. The shorter side becomes 8 (16×8) and the centre 8×8 crop is
    # columns 10-30 of the original; with the bicubic filter's reach (5 source pixels at this
    # scale) columns 5-35 count, all green. A crop off centre by two pixels or more would
    # show red or blue.
    strip = np.zeros((20, 40, 3), np.uint8)
    strip[:, :4, 0] = 255
    strip[:, 4:36, 1] = 255
    strip[:, 36:, 2] = 255
    save(tmp_path / "wide.png", strip)
    save(tmp_path / "tall.png", strip.transpose(1, 0, 2))
    images = torch.cat(both(tmp_path)[0].images.split(1) + both(tmp_path)[1].images.split(1))
    assert images.shape == (2, 3, 8, 8)
    assert torch.equal(images[:, 1], torch.full((2, 8, 8), 255, dtype=torch.uint8))
    assert images[:, 0].max() == 0 and images[:, 2].max() == 0


def test_matches_resize_then_crop_on_a_smooth_image(tmp_path):
    y, x = np.mgrid[0:32, 0:64]
    gradient = (x * 3 + y * 2).astype(np.uint8)
    save(tmp_path / "a.png", gradient)
    save(tmp_path / "b.png", gradient[::-1])
    ours = load(tmp_path, "train", image_size=16).images[0, 0].numpy().astype(int)
    # Pillow's resize of the whole image to 32×16, then the middle 16 columns
    which = "a.png" if not in_test_split(["a.png", "b.png"])[0] else "b.png"
    source = gradient if which == "a.png" else gradient[::-1]
    reference = np.asarray(Image.fromarray(source).resize((32, 16), Image.Resampling.BICUBIC))
    assert np.abs(ours - reference[:, 8:24].astype(int)).max() <= 1


def test_grayscale_only_when_every_file_is(tmp_path):
    save(tmp_path / "g1.png", np.full((8, 8), 100, np.uint8))
    save(tmp_path / "g2.png", np.full((8, 8), 50, np.uint8))
    palette = Image.new("P", (8, 8))
    palette.putpalette([v for i in range(256) for v in (i, i, i)])
    palette.save(tmp_path / "g3.png")  # a palette of grays is grayscale
    assert load(tmp_path).channels == 1
    save(tmp_path / "rgba.png", np.dstack([solid((10, 20, 30), (8, 8)),
                                           np.full((8, 8), 128, np.uint8)]), "RGBA")
    train, test = both(tmp_path)
    assert train.channels == test.channels == 3
    every = torch.cat([train.images, test.images])
    grays = every[(every[:, 0] == every[:, 1]).all(-1).all(-1)]
    assert len(grays) == 3  # gray files repeated over the three channels
    assert sorted(every[:, 2, 0, 0].tolist()) == [0, 30, 50, 100]
    forced = torch.cat([load(tmp_path, s, channels=1).images for s in ("train", "test")])
    # RGB → L is Pillow's luma: (10·299 + 20·587 + 30·114) / 1000 = 18.16
    assert forced.shape[1] == 1 and sorted(forced[:, 0, 0, 0].tolist()) == [0, 18, 50, 100]


def test_sixteen_bit_grays_are_scaled(tmp_path):
    deep = np.full((8, 8), 65535 // 2, np.uint16)
    Image.fromarray(deep).save(tmp_path / "a.png")
    Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(tmp_path / "b.png")
    every = torch.cat([d.images for d in both(tmp_path)])
    assert every.shape[1] == 1
    values = sorted(every[:, 0, 0, 0].tolist())
    assert values == [127, 255]  # 32767 / 257 = 127.5 → 127 (to even), 65535 / 257 = 255


def test_exif_orientation_is_applied(tmp_path):
    # stored: left half white, right half black; orientation 6 = shown turned 90° clockwise,
    # so the white half ends up on top
    stored = np.zeros((16, 16), np.uint8)
    stored[:, :8] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "a.jpg", exif=exif, quality=95)
    save(tmp_path / "b.png", np.full((16, 16), 7, np.uint8))
    every = torch.cat([d.images for d in both(tmp_path)])
    turned = every[every[:, 0, 0, 0] != 7][0, 0].int()
    assert turned[:3].min() > 240 and turned[-3:].max() < 15


def test_large_jpeg_is_read_at_reduced_scale(tmp_path):
    big = np.zeros((400, 800, 3), np.uint8)
    big[:, 100:700] = (30, 160, 220)  # covers the centre crop, columns 200-600
    save(tmp_path / "big.jpg", big, quality=95)
    save(tmp_path / "small.png", solid((0, 0, 0)))
    every = torch.cat([d.images for d in both(tmp_path, image_size=10)])
    photo = every[every.flatten(1).max(1).values > 0][0]
    assert (photo.int() - torch.tensor([30, 160, 220]).view(3, 1, 1)).abs().max() <= 4


def png_header_only(width, height):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def test_unreadable_and_oversized_files_are_named_and_skipped(tmp_path, monkeypatch):
    save(tmp_path / "good1.png", solid((9, 9, 9)))
    save(tmp_path / "good2.png", solid((8, 8, 8)))
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    whole = (tmp_path / "good1.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(whole[: len(whole) // 2])
    # 10⁸ pixels: over Pillow's 89-million limit, under its hard one (which raises in open)
    (tmp_path / "bomb.png").write_bytes(png_header_only(10_000, 10_000))
    (tmp_path / "notes.txt").write_text("ignored: not an image extension")
    decoded = []
    real = image_folder.read_image
    monkeypatch.setattr(image_folder, "read_image",
                        lambda path, *a: decoded.append(path.name) or real(path, *a))
    with pytest.warns(ImageFolderWarning) as record:
        train, test = both(tmp_path)
    message = str(record[0].message)
    assert "skipped 3 of 5" in message
    for name in ("garbage.png", "truncated.png", "bomb.png"):
        assert name in message
    assert "10000×10000 pixels, more than the" in message and "good1" not in message
    assert len(train) + len(test) == 2
    # a lower limit refuses the small ones too, before decoding any
    with pytest.warns(ImageFolderWarning), pytest.raises(DatasetError) as error:
        load(tmp_path, max_pixels=100)
    assert "none of the 5 image files could be read" in str(error.value)
    assert "12×10 pixels, more than the 100 allowed" in str(error.value)


def test_bomb_is_refused_without_decoding(tmp_path, monkeypatch):
    (tmp_path / "bomb.png").write_bytes(png_header_only(10_000, 10_000))
    save(tmp_path / "ok.png", solid((1, 1, 1)))

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded")

    monkeypatch.setattr(Image.Image, "load", no_decoding)
    with pytest.warns(Image.DecompressionBombWarning), \
            pytest.raises(image_folder.UnreadableImage, match="decompression bomb"):
        image_folder.read_image(tmp_path / "bomb.png", 8, None, Image.MAX_IMAGE_PIXELS)


def test_files_beside_class_folders_are_skipped_with_a_warning(tmp_path):
    save(tmp_path / "a" / "1.png", solid((1, 1, 1)))
    save(tmp_path / "a" / "2.png", solid((2, 2, 2)))
    save(tmp_path / "b" / "1.png", solid((3, 3, 3)))
    save(tmp_path / "loose.png", solid((4, 4, 4)))
    with pytest.warns(ImageFolderWarning, match="loose.png: lies beside the class folders"):
        train = load(tmp_path)
    with pytest.warns(ImageFolderWarning):
        test = load(tmp_path, "test")
    assert len(train) + len(test) == 3 and 4 not in torch.cat([train.images, test.images])


def test_cache_is_used_then_rebuilt_when_files_change(tmp_path, private_cache, monkeypatch):
    root = tmp_path / "pics"
    for i in range(5):
        save(root / f"{i}.png", solid((i, i, i)))
    first = load(root)
    (cached,) = private_cache.glob("*.pt")
    value = torch.load(cached, weights_only=True)  # plain tensors and lists only
    assert value["paths"] == [f"{i}.png" for i in range(5)] and value["labels"] is None

    def refuse(*args):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(image_folder, "read_image", refuse)
    again = load(root)
    assert torch.equal(again.images, first.images)
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(private_cache.parents[1]))

    # a file changed (new mtime and content): rebuilt, the old cache removed
    save(root / "0.png", solid((200, 200, 200)))
    stat = (root / "0.png").stat()
    os.utime(root / "0.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    every = torch.cat([d.images for d in both(root)])
    assert 200 in every[:, 0, 0, 0].tolist()
    assert len(list(private_cache.glob("*.pt"))) == 1
    assert not list(private_cache.glob("*.tmp"))
    # another image size is another cache, kept beside
    load(root, image_size=4)
    assert len(list(private_cache.glob("*.pt"))) == 2


def test_damaged_cache_is_rebuilt(tmp_path, private_cache):
    root = tmp_path / "pics"
    for i in range(3):
        save(root / f"{i}.png", solid((i, i, i)))
    first = load(root)
    (cached,) = private_cache.glob("*.pt")
    cached.write_bytes(b"garbage")
    with pytest.warns(ImageFolderWarning, match="unreadable cache"):
        again = load(root)
    assert torch.equal(again.images, first.images)


def test_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="not a directory"):
        load(tmp_path / "absent")
    with pytest.raises(DatasetError, match="no .png/.jpg/.jpeg files"):
        load(tmp_path)
    save(tmp_path / "a.png", solid((1, 1, 1)))
    with pytest.raises(DatasetError, match="needs an image size"):
        load_image_folder(tmp_path, "train")
    with pytest.raises(DatasetError, match="channels must be"):
        load(tmp_path, channels=4)


def test_load_dataset_reads_a_folder(tmp_path):
    for i in range(6):
        save(tmp_path / ("x" if i % 2 else "y") / f"{i}.png", solid((i, 0, 0), (30, 20)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train = load_dataset(f"images:{tmp_path}", "train", image_size=12, progress=False)
        test = load_dataset(f"images:{tmp_path}", "test", image_size=12, progress=False)
    assert train.name == f"images:{tmp_path}" and train.classes == ("x", "y")
    assert train.as_batch().shape == (len(train), 3, 12, 12)
    assert len(train) + len(test) == 6
    with pytest.raises(DatasetError, match="needs an image size"):
        load_dataset(f"images:{tmp_path}", "train")
