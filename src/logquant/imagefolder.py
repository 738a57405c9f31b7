"""Image folders (ImageNet layout: ``root/<class>/<image>``) streamed from disk.

:class:`ImageFolder` is a ``torch.utils.data.Dataset`` that decodes one image at a time
(resize the short side, center crop: the standard evaluation transform), so memory does not
grow with the number of images, and batches come from a ``DataLoader`` with worker
processes. ``load()`` gives the in-memory :class:`~logquant.data.ImageDataset` for small
folders. A file that cannot be decoded is one ``DataError`` naming it, from any worker.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from logquant.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
IMAGE_PIXELS_MAX = 64_000_000  # per image, read from its header before decoding: no bombs
CROP_RATIO = 0.875  # evaluation: resize the short side to crop / 0.875, then center crop


def resize_for(crop: int) -> int:
    """The short side images are resized to before a center crop of ``crop`` pixels."""
    return round(crop / CROP_RATIO)


def decode_image(path: Path, crop: int, resize: int, channels: int) -> np.ndarray:
    """``path`` as a (crop, crop, channels) uint8 array: short side resized to ``resize``
    (bilinear, as torchvision's evaluation transforms), then the center ``crop`` square."""
    from PIL import Image

    mode = {1: "L", 3: "RGB"}[channels]
    try:
        with Image.open(path) as img:
            if img.width * img.height > IMAGE_PIXELS_MAX:
                raise DataError(f"{path}: {img.width} x {img.height} pixels exceeds the "
                                 f"{IMAGE_PIXELS_MAX:,}-pixel limit per image")
            img = img.convert(mode)
            # sizes and offsets computed as torchvision's Resize and CenterCrop do, so that
            # a model sees the pixels it was evaluated with there
            short, long = sorted(img.size)
            new_long = int(resize * long / short)
            size = (resize, new_long) if img.width <= img.height else (new_long, resize)
            img = img.resize(size, Image.BILINEAR)
            left = int(round((img.width - crop) / 2.0))
            top = int(round((img.height - crop) / 2.0))
            img = img.crop((left, top, left + crop, top + crop))
            return np.asarray(img, dtype=np.uint8).reshape(crop, crop, channels)
    except DataError:
        raise
    except Image.DecompressionBombError:  # Pillow's own check, at open
        raise DataError(f"{path}: its declared size exceeds the {IMAGE_PIXELS_MAX:,}-pixel "
                         "limit per image") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure on untrusted bytes
        # (Pillow raises OSError, SyntaxError, ValueError, struct.error...)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: not a readable image ({reason})") from None


def scan_classes(root: Path) -> tuple[tuple[str, ...], list[Path], list[int]]:
    """(class names, image files, labels) of ``root/<class>/<image>``, sorted by name."""
    classes = tuple(sorted(p.name for p in root.iterdir() if p.is_dir())) \
        if root.is_dir() else ()
    if not classes:
        raise DataError(f"{root}: expected an image folder with one subfolder per class")
    files, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                files.append(path)
                labels.append(label)
    if not files:
        raise DataError(f"{root}: no images found (suffixes {sorted(IMAGE_SUFFIXES)})")
    return classes, files, labels


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]
              ) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 (x / 255 - mean) / std, per channel."""
    mean_t = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255.0 - mean_t) / std_t


@dataclasses.dataclass
class ImageFolder(torch.utils.data.Dataset):
    """The images of a folder, decoded on demand: item i is (uint8 (C, crop, crop) tensor,
    label, error text or ""). Errors travel as text so that a worker's failure reaches the
    caller as one line (``batches`` raises it), not as a worker traceback."""

    files: list[Path]
    labels: torch.Tensor
    classes: tuple[str, ...]
    crop: int
    resize: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    workers: int = 0

    @classmethod
    def scan(cls, root: str | Path, crop: int, *, resize: int | None = None,
             channels: int = 3, mean: Sequence[float] = (0.485, 0.456, 0.406),
             std: Sequence[float] = (0.229, 0.224, 0.225), workers: int = 0) -> ImageFolder:
        """The folder's file list (no image is decoded); ``mean``/``std`` default to
        ImageNet's, the statistics torchvision and timm models are trained with."""
        if channels not in (1, 3):
            raise DataError(f"image folder: channels must be 1 or 3, got {channels}")
        if len(mean) != channels or len(std) != channels:
            raise DataError(f"image folder: mean and std need {channels} values each")
        resize = resize_for(crop) if resize is None else resize
        if not 0 < crop <= resize:
            raise DataError(f"image folder: the crop ({crop}) must be positive and at most "
                             f"the resized short side ({resize})")
        classes, files, labels = scan_classes(Path(root))
        return cls(files, torch.tensor(labels), classes, crop, resize, channels,
                   tuple(float(m) for m in mean), tuple(float(s) for s in std), workers)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        try:
            array = decode_image(self.files[i], self.crop, self.resize, self.channels)
        except DataError as exc:
            return torch.zeros(self.channels, self.crop, self.crop, dtype=torch.uint8), -1, \
                str(exc)
        return torch.from_numpy(array.copy()).permute(2, 0, 1), int(self.labels[i]), ""

    def subset(self, index: torch.Tensor | Sequence[int]) -> ImageFolder:
        index = torch.as_tensor(index, dtype=torch.int64)
        return dataclasses.replace(self, files=[self.files[i] for i in index.tolist()],
                                   labels=self.labels[index])

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return normalize(images, self.mean, self.std)

    def raw_batches(self, batch_size: int, device: str | torch.device = "cpu"
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(uint8 images, labels) in order, decoded by ``workers`` processes."""
        device = torch.device(device)
        loader = torch.utils.data.DataLoader(
            self, batch_size=batch_size, shuffle=False, num_workers=self.workers,
            pin_memory=device.type == "cuda", persistent_workers=False)
        for images, labels, errors in loader:
            failed = next((e for e in errors if e), None)
            if failed is not None:
                raise DataError(failed)
            yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)

    def batches(self, batch_size: int, device: str | torch.device = "cpu"
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Normalized (inputs, labels) batches in order, like ``ImageDataset.batches``."""
        for images, labels in self.raw_batches(batch_size, device):
            yield self.normalize(images), labels

    def load(self, batch_size: int = 256):
        """Every image decoded into memory: an ``ImageDataset`` (small folders only)."""
        from logquant.data import ImageDataset

        parts = list(self.raw_batches(batch_size))
        images = torch.cat([p[0] for p in parts])
        return ImageDataset(images, self.labels.clone(), self.mean, self.std, self.classes)

    def fingerprint(self) -> str:
        """SHA-256 of the class names, file names (relative to their class folder), sizes
        and the transform: what identifies a folder too large to hash image by image."""
        h = hashlib.sha256(repr((self.classes, self.crop, self.resize, self.channels,
                                 self.mean, self.std)).encode())
        for path, label in zip(self.files, self.labels.tolist()):
            h.update(f"{label}/{path.name}/{path.stat().st_size}\n".encode())
        return h.hexdigest()
