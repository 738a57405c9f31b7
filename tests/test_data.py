"""Fashion-MNIST IDX reading, splits, malformed files and image folders."""

import gzip

import numpy as np
import pytest
import torch

from conftest import write_idx
from logquant.data import DataError, load_fashion_mnist, load_splits, read_idx


def test_real_fashion_mnist_splits(fashion):
    assert fashion.train.images.shape == (55_000, 1, 28, 28)
    assert fashion.val.images.shape == (5_000, 1, 28, 28)
    assert fashion.test.images.shape == (10_000, 1, 28, 28)
    assert fashion.test.images.dtype == torch.uint8
    assert set(fashion.test.labels.unique().tolist()) == set(range(10))
    # the validation split is carved from train, disjoint from what remains, deterministic
    again = load_splits()
    assert torch.equal(again.val.images, fashion.val.images)
    train_rows = {row.numpy().tobytes() for row in fashion.train.images[:20_000]}
    assert not any(row.numpy().tobytes() in train_rows for row in fashion.val.images[:500])


def test_normalized_batches(fashion):
    inputs, labels = next(fashion.test.batches(64))
    assert inputs.shape == (64, 1, 28, 28) and inputs.dtype == torch.float32
    assert labels.shape == (64,)
    # normalization uses the training statistics: the training images come out near N(0, 1)
    train_inputs = fashion.train.normalize(fashion.train.images[:5000])
    assert abs(float(train_inputs.mean())) < 0.05 and abs(float(train_inputs.std()) - 1) < 0.05


def test_environment_variable_points_at_the_data(small_fashion_dir, monkeypatch):
    monkeypatch.setenv("LOGQUANT_DATA_DIR", str(small_fashion_dir))
    splits = load_splits()
    assert (len(splits.train), len(splits.val), len(splits.test)) == (1800, 200, 500)


@pytest.mark.parametrize("corruption, message", [
    (lambda raw: raw[:-10], "header says"),
    (lambda raw: b"\x01\x02" + raw[2:], "bad magic"),
    (lambda raw: raw[:2] + b"\x0d" + raw[3:], "not unsigned byte"),
    (lambda raw: raw[:6], "truncated IDX header"),
])
def test_malformed_idx_files_name_the_file(tmp_path, corruption, message):
    good = tmp_path / "good-idx3-ubyte"
    write_idx(good, np.zeros((3, 4, 4), np.uint8))
    raw = gzip.decompress(good.read_bytes())
    bad = tmp_path / "bad-idx3-ubyte"
    bad.write_bytes(corruption(raw))
    with pytest.raises(DataError, match=message) as info:
        read_idx(bad)
    assert str(bad) in str(info.value)


def test_corrupt_gzip_and_missing_files(tmp_path):
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b" + b"junk" * 10)
    with pytest.raises(DataError, match="corrupt gzip"):
        read_idx(tmp_path / "train-images-idx3-ubyte.gz")
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.*not found"):
        load_fashion_mnist("train", tmp_path)
    with pytest.raises(DataError, match="data directory not found"):
        load_fashion_mnist("test", tmp_path / "nowhere")


def test_label_count_must_match_images(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((5, 28, 28), np.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros((4,), np.uint8))
    with pytest.raises(DataError, match="expected 5 labels"):
        load_fashion_mnist("test", tmp_path)


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for part, count in (("train", 20), ("test", 4)):
        for cls in ("cat", "dog"):
            folder = tmp_path / part / cls
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    splits = load_splits(tmp_path, image_size=32)
    assert splits.train.classes == ("cat", "dog")
    assert splits.train.images.shape[1:] == (3, 32, 32)
    assert len(splits.train) + len(splits.val) == 40 and len(splits.test) == 8
    (tmp_path / "train" / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png"):
        load_splits(tmp_path, image_size=32)


def test_hostile_idx_files_are_refused_in_bounded_memory(tmp_path):
    import gzip
    import tracemalloc
    import zlib

    from logquant.data import DataError, read_idx

    header = bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in (100, 28, 28))
    good = gzip.compress(header + bytes(100 * 28 * 28))
    deflate = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    bomb = deflate.compress(header) + b"".join(deflate.compress(bytes(1 << 20))
                                               for _ in range(512)) + deflate.flush()
    flipped = bytearray(good)
    flipped[30] ^= 0xFF
    cases = {
        "bomb.gz": (bomb, "more data than the IDX header declares"),
        "flipped.gz": (bytes(flipped), "corrupt gzip data"),
        "truncated.gz": (good[:-6], "corrupt gzip data"),
        "dims": (bytes([0, 0, 8, 100]) + bytes(400), "100 dimensions"),
        "huge": (bytes([0, 0, 8, 2]) + (1 << 31).to_bytes(4, "big") * 2, "byte limit"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        tracemalloc.start()
        with pytest.raises(DataError, match=message):
            read_idx(tmp_path / name)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 32 << 20, f"{name}: {peak:,} bytes allocated before the refusal"
    (tmp_path / "good.gz").write_bytes(good)
    assert read_idx(tmp_path / "good.gz").shape == (100, 28, 28)


def _png(width: int, height: int, data: bytes) -> bytes:
    """A PNG file built by hand: any declared size, any pixel data (valid or not)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body)))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(data)) + chunk(b"IEND", b""))


def _flip(content: bytes, at: int) -> bytes:
    return content[:at] + bytes([content[at] ^ 0xFF]) + content[at + 1:]


def test_hostile_images_are_one_data_error_before_decoding(tmp_path):
    """A decompression bomb (huge declared size) is refused from its header; truncated,
    corrupt or mislabelled files are one DataError naming the file, whatever Pillow raises."""
    import time

    from PIL import Image

    from logquant.data import load_image_folder
    from logquant.imagefolder import IMAGE_PIXELS_MAX

    good = tmp_path / "good.png"
    noise = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(noise).save(good)
    row = b"\x00" + bytes(8 * 3)
    side = int(IMAGE_PIXELS_MAX ** 0.5) + 1
    cases = {
        "bomb.png": (_png(side, side, row), "pixel limit"),
        "wide.png": (_png(2**31 - 1, 1, row), "pixel limit"),
        "truncated.png": (good.read_bytes()[:len(good.read_bytes()) // 2], "not a readable image"),
        "text.jpg": (b"GIF89a" + bytes(10), "not a readable image"),
        "flipped.png": (_flip(good.read_bytes(), 100), "not a readable image"),
        "bad_header.png": (_flip(good.read_bytes(), 20), "not a readable image"),
    }
    for name, (content, message) in cases.items():
        folder = tmp_path / name / "cls"
        folder.mkdir(parents=True)
        (folder / name).write_bytes(content)
        start = time.perf_counter()
        with pytest.raises(DataError, match=f"{name}.*{message}") as info:
            load_image_folder(tmp_path / name, size=8)
        assert "\n" not in str(info.value)
        assert time.perf_counter() - start < 10, f"{name}: decoded before refusing"
