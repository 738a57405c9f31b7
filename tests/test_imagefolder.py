"""Image folders streamed from disk: the standard evaluation transform against an
independent one (torchvision's), workers giving the same batches as the main process, and
a bad file in a worker reaching the caller as one line."""

import numpy as np
import pytest
import torch
from PIL import Image

from logquant.errors import DataError
from logquant.imagefolder import ImageFolder, resize_for


def _folder(root, sizes=((40, 50), (64, 48), (33, 90), (120, 120)), classes=("a", "b", "c")):
    rng = np.random.default_rng(0)
    for cls in classes:
        (root / cls).mkdir(parents=True)
        for i, (h, w) in enumerate(sizes):
            pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
            suffix = ".png" if i % 2 == 0 else ".jpg"
            Image.fromarray(pixels).save(root / cls / f"{i}{suffix}")
    return root


def test_transform_is_resize_then_center_crop_as_torchvision(tmp_path):
    from conftest import require

    transforms = require("torchvision.transforms")
    root = _folder(tmp_path / "f")
    folder = ImageFolder.scan(root, 24)
    assert folder.resize == resize_for(24) == 27 and len(folder) == 12
    reference = transforms.Compose([transforms.Resize(27),
                                    transforms.CenterCrop(24), transforms.PILToTensor()])
    for i, path in enumerate(folder.files):
        image, label, error = folder[i]
        assert error == "" and label == folder.labels[i]
        with Image.open(path) as img:
            expected = reference(img.convert("RGB"))
        assert image.shape == (3, 24, 24) and torch.equal(image, expected), path.name


def test_workers_give_the_same_batches_in_order(tmp_path):
    folder = ImageFolder.scan(_folder(tmp_path / "f"), 16, mean=(0.5,) * 3, std=(0.25,) * 3)
    serial = list(folder.batches(5))
    parallel = list(ImageFolder.scan(tmp_path / "f", 16, mean=(0.5,) * 3, std=(0.25,) * 3,
                                     workers=2).batches(5))
    assert [len(b[0]) for b in serial] == [5, 5, 2]
    for (x, y), (x2, y2) in zip(serial, parallel):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    memory = folder.load()
    assert torch.equal(torch.cat([b[0] for b in serial]), memory.normalize(memory.images))
    assert memory.classes == ("a", "b", "c") and memory.labels.tolist() == [0] * 4 + [1] * 4 \
        + [2] * 4
    sub = folder.subset([11, 0])
    assert sub.labels.tolist() == [2, 0] and sub.files == [folder.files[11], folder.files[0]]
    assert sub.fingerprint() != folder.fingerprint() == ImageFolder.scan(
        tmp_path / "f", 16, mean=(0.5,) * 3, std=(0.25,) * 3).fingerprint()


@pytest.mark.parametrize("workers", [0, 2])
def test_a_bad_file_is_one_line_from_any_worker(tmp_path, workers):
    root = _folder(tmp_path / "f")
    (root / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    folder = ImageFolder.scan(root, 16, workers=workers)
    with pytest.raises(DataError, match="broken.png: not a readable image") as info:
        list(folder.batches(4))
    assert "\n" not in str(info.value) and "Traceback" not in str(info.value)


def test_bad_arguments_are_refused(tmp_path):
    root = _folder(tmp_path / "f")
    with pytest.raises(DataError, match="crop"):
        ImageFolder.scan(root, 64, resize=32)
    with pytest.raises(DataError, match="3 values"):
        ImageFolder.scan(root, 16, mean=(0.5,))
    with pytest.raises(DataError, match="one subfolder per class"):
        ImageFolder.scan(tmp_path / "missing", 16)
