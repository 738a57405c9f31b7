"""Datasets: Fashion-MNIST from its IDX files, a generic image folder, and fixed splits.

Everything is loaded into memory as uint8 tensors (Fashion-MNIST is 55 MB), so batches are
plain tensor slices: no worker processes, no per-image Python on the hot path.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import numpy as np
import torch

from logquant.errors import DataError
from logquant.imagefolder import ImageFolder, normalize

DEFAULT_FASHION_DIR = "/usr/share/datasets/fashion-mnist"
DATA_DIR_ENV = "LOGQUANT_DATA_DIR"
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot")
# Per-channel statistics of the Fashion-MNIST training images (pixel values in [0, 1]).
FASHION_MEAN, FASHION_STD = (0.2860,), (0.3530,)
VALIDATION_SIZE = 5000
SPLIT_SEED = 20160303  # the paper's arXiv month; fixed so every command sees the same split


@dataclasses.dataclass
class ImageDataset:
    """Images (N, C, H, W) uint8 with integer labels, plus the normalization to apply."""

    images: torch.Tensor
    labels: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> ImageDataset:
        return dataclasses.replace(self, images=self.images[index], labels=self.labels[index])

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) -> normalized float32, as the models expect."""
        return normalize(images, self.mean, self.std)

    def batches(self, batch_size: int, device: str | torch.device = "cpu"):
        """Yield normalized (inputs, labels) batches in order."""
        for start in range(0, len(self), batch_size):
            stop = start + batch_size
            yield (self.normalize(self.images[start:stop].to(device)),
                   self.labels[start:stop].to(device))


# ----------------------------------------------------------------------------------------
# IDX files


IDX_MAX_BYTES = 4 << 30  # larger IDX data is refused before it is read or inflated
IDX_MAX_DIMS = 4  # Fashion-MNIST uses 1 (labels) and 3 (images)


def _idx_shape(head: bytes, path: Path) -> tuple[int, ...]:
    """The shape an IDX header declares, validated (magic, type, dimensions, size)."""
    if len(head) < 4 or head[0] != 0 or head[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    if head[2] != 0x08:
        raise DataError(f"{path}: IDX element type 0x{head[2]:02x} is not unsigned byte (0x08)")
    ndim = head[3]
    if not 1 <= ndim <= IDX_MAX_DIMS:
        raise DataError(f"{path}: IDX file of {ndim} dimensions (1..{IDX_MAX_DIMS} expected)")
    if len(head) < 4 + 4 * ndim:
        raise DataError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(head[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if math.prod(shape) > IDX_MAX_BYTES:  # exact: numpy's product wraps at 2^64
        raise DataError(f"{path}: IDX header declares {shape} = {math.prod(shape):,} bytes, "
                        f"more than the {IDX_MAX_BYTES:,}-byte limit")
    return shape


def _read_idx_bytes(path: Path) -> tuple[tuple[int, ...], bytes]:
    """(shape, data) of an IDX file, gzipped or not. A gzip stream is inflated only up to
    the size its IDX header declares: a decompression bomb stops there, with an error."""
    import zlib

    try:
        if path.stat().st_size > IDX_MAX_BYTES + 4 + 4 * IDX_MAX_DIMS:
            raise DataError(f"{path}: larger than the {IDX_MAX_BYTES:,}-byte IDX limit")
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    if raw[:2] != b"\x1f\x8b":
        shape = _idx_shape(raw[:4 + 4 * IDX_MAX_DIMS], path)
        return shape, raw[4 + 4 * len(shape):]
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip framing
    try:
        head = inflater.decompress(raw, 4)
        head += inflater.decompress(inflater.unconsumed_tail, 4 * head[3] if len(head) == 4
                                    else 0)
        shape = _idx_shape(head, path)
        expected = math.prod(shape)
        data = inflater.decompress(inflater.unconsumed_tail, expected + 1)
        if len(data) > expected:
            raise DataError(f"{path}: the gzip stream holds more data than the IDX header "
                            f"declares ({shape} = {expected:,} bytes)")
        if not inflater.eof:
            raise DataError(f"{path}: corrupt gzip data (truncated stream)")
    except zlib.error as exc:
        raise DataError(f"{path}: corrupt gzip data ({exc})") from None
    return shape, data


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) of unsigned bytes, validating header and size
    before any large allocation."""
    path = Path(path)
    shape, data = _read_idx_bytes(path)
    expected = math.prod(shape)
    if len(data) != expected:
        raise DataError(f"{path}: IDX header says {shape} = {expected} bytes of data, "
                        f"file has {len(data)}")
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


def _find(directory: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    raise DataError(f"{directory / stem}[.gz]: file not found (install the Debian package "
                    f"dataset-fashion-mnist, or point --data-dir / {DATA_DIR_ENV} at the IDX "
                    "files)")


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    return Path(data_dir or os.environ.get(DATA_DIR_ENV) or DEFAULT_FASHION_DIR)


def load_fashion_mnist(part: str, data_dir: str | os.PathLike | None = None) -> ImageDataset:
    """The Fashion-MNIST ``train`` (60,000) or ``test`` (10,000) images from IDX files."""
    directory = resolve_data_dir(data_dir)
    if not directory.is_dir():
        raise DataError(f"{directory}: data directory not found (install the Debian package "
                        f"dataset-fashion-mnist, or pass --data-dir / set {DATA_DIR_ENV})")
    image_stem, label_stem = FASHION_FILES[part]
    image_path, label_path = _find(directory, image_stem), _find(directory, label_stem)
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3:
        raise DataError(f"{image_path}: expected a 3-D IDX array (N, H, W), got {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{label_path}: expected {len(images)} labels, got shape "
                        f"{labels.shape}")
    if labels.size and labels.max() >= len(FASHION_CLASSES):
        raise DataError(f"{label_path}: label {labels.max()} out of range 0..9")
    return ImageDataset(torch.from_numpy(images.copy()).unsqueeze(1),
                        torch.from_numpy(labels.astype(np.int64)),
                        FASHION_MEAN, FASHION_STD, FASHION_CLASSES)


def train_val_split(train: ImageDataset, val_size: int = VALIDATION_SIZE,
                    seed: int = SPLIT_SEED) -> tuple[ImageDataset, ImageDataset]:
    """Deterministic split of the training set: (train minus validation, validation).

    The validation part is used for calibration and FSR selection, never for training.
    """
    if not 0 < val_size < len(train):
        raise DataError(f"validation size must be in 1..{len(train) - 1}, got {val_size}")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    val_index = order[:val_size].sort().values
    return train.subset(order[val_size:].sort().values), train.subset(val_index)


# ----------------------------------------------------------------------------------------
# Image folders (ImageNet style: root/<class>/<image>)

def load_image_folder(root: str | os.PathLike, size: int, channels: int = 3,
                      mean: tuple[float, ...] | None = None,
                      std: tuple[float, ...] | None = None) -> ImageDataset:
    """Images under ``root/<class>/`` decoded into memory: short side resized to ``size``,
    then center-cropped to ``size``. ``mean``/``std`` default to the folder's own."""
    folder = ImageFolder.scan(root, size, resize=size, channels=channels,
                              mean=mean or (0.0,) * channels, std=std or (1.0,) * channels)
    dataset = folder.load()
    if mean is None or std is None:  # statistics of the folder itself
        flat = dataset.images.float().div(255).transpose(0, 1).reshape(channels, -1)
        dataset.mean = tuple(flat.mean(1).tolist())
        dataset.std = tuple(flat.std(1).clamp_min(1e-6).tolist())
    return dataset


@dataclasses.dataclass
class Splits:
    """The three splits every command uses: train (minus validation), validation, test."""

    train: ImageDataset
    val: ImageDataset
    test: ImageDataset

    def fingerprint(self) -> str:
        """SHA-256 of every image, label and class name of the three splits: what a
        resumed run compares, so that rows or epochs of two datasets never mix."""
        import hashlib

        h = hashlib.sha256()
        for part in (self.train, self.val, self.test):
            h.update(repr((part.classes, tuple(part.images.shape))).encode())
            h.update(part.images.contiguous().numpy().tobytes())
            h.update(part.labels.contiguous().numpy().tobytes())
        return h.hexdigest()


def is_image_folder(directory: Path) -> bool:
    """Whether ``directory`` is an image folder (train/ or test/ of classes), not IDX files."""
    return (directory / "train").is_dir() or (directory / "test").is_dir()


def load_splits(data_dir: str | os.PathLike | None = None, image_size: int = 224,
                val_size: int = VALIDATION_SIZE) -> Splits:
    """Fashion-MNIST IDX files, or an image folder with ``train/`` and ``test/`` (``val/``
    optional) of class subfolders. Validation is carved from train: ``val_size`` images, or
    a tenth of train when that is smaller."""
    directory = resolve_data_dir(data_dir)
    if is_image_folder(directory):
        missing = [p for p in ("train", "test") if not (directory / p).is_dir()]
        if missing:
            raise DataError(f"{directory}: image folder lacks {', '.join(missing)}/")
        train = load_image_folder(directory / "train", image_size)
        kwargs = {"mean": train.mean, "std": train.std}
        test = load_image_folder(directory / "test", image_size, train.images.shape[1], **kwargs)
        if (directory / "val").is_dir():
            val = load_image_folder(directory / "val", image_size, train.images.shape[1],
                                    **kwargs)
        else:
            train, val = train_val_split(train, min(val_size, max(1, len(train) // 10)))
        for name, part in (("test", test), ("val", val)):
            if part.classes != train.classes:  # labels are class indices: the lists must agree
                extra = sorted(set(part.classes) ^ set(train.classes))
                raise DataError(f"{directory}: {name}/ has other classes than train/ "
                                f"({', '.join(extra[:5]) or 'another order'}); the labels "
                                "would not mean the same classes")
        return Splits(train, val, test)
    full = load_fashion_mnist("train", directory)
    train, val = train_val_split(full, min(val_size, max(1, len(full) // 10)))
    test = load_fashion_mnist("test", directory)
    if test.images.shape[1:] != full.images.shape[1:]:
        raise DataError(f"{directory}: test images are {_shape_text(test)}, training images "
                        f"{_shape_text(full)}; a model takes one size")
    return Splits(train, val, test)


def _shape_text(dataset: ImageDataset) -> str:
    return " x ".join(str(n) for n in dataset.images.shape[1:])
