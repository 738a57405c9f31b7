"""Reference CNNs and how the CLI finds a model by name (registry, torchvision, user code)."""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from logquant.errors import LogquantError


class ModelError(LogquantError):
    """An unknown model name, a bad factory path or a checkpoint that does not fit."""


class RefCNN(nn.Module):
    """VGG-style CNN for 28x28 grey images: five 3x3 convs with BN, then two FC layers.

    Both conv and fully connected layers are present because the paper studies both.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32):
        super().__init__()
        w = width

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                    nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(in_channels, w), *block(w, w), nn.MaxPool2d(2),  # (B, w, 14, 14)
            *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2),  # (B, 2w, 7, 7)
            *block(2 * w, 4 * w), nn.MaxPool2d(2),  # (B, 4w, 3, 3)
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(4 * w * 9, 256), nn.ReLU(inplace=True), nn.Dropout(0.3),
            nn.Linear(256, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


MODELS: dict[str, Callable[..., nn.Module]] = {"refcnn": RefCNN}
REFERENCE_MODEL = "refcnn"
BUNDLED_WEIGHTS = Path(__file__).parent / "weights" / "refcnn_fashion.safetensors"


_FACTORY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*", re.ASCII)


def create_model(name: str, num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """A model by registry name, torchvision architecture name, or ``package.module:factory``."""
    if name in MODELS:
        return MODELS[name](num_classes=num_classes, in_channels=in_channels)
    if ":" in name:
        if not _FACTORY.fullmatch(name):
            raise ModelError(f"--model {name!r}: expected package.module:factory (Python "
                             "names, e.g. mypkg.nets:make_net)")
        module_name, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ModelError(f"--model {name}: cannot import factory ({exc})") from None
        if not callable(factory):
            raise ModelError(f"--model {name}: {attr} is not callable")
        model = factory()
        if not isinstance(model, nn.Module):
            raise ModelError(f"--model {name}: factory returned {type(model).__name__}, "
                             "not an nn.Module")
        return model
    try:
        import torchvision.models as tvm
    except ImportError:
        tvm = None
    if tvm is not None and name in tvm.list_models(module=tvm):
        return tvm.get_model(name, weights=None, num_classes=num_classes)
    known = ", ".join(sorted(MODELS))
    hint = "a torchvision architecture name" if tvm else "torchvision (not installed)"
    raise ModelError(f"unknown model {name!r}: use {known}, {hint}, or package.module:factory")


def load_model(name: str, checkpoint: str | Path | None = None, num_classes: int = 10,
               in_channels: int = 1) -> nn.Module:
    """A model with its weights: the bundled reference weights, or ``checkpoint``.

    Nothing is downloaded: torchvision architectures need a local checkpoint file.
    """
    from logquant.io import load_weights

    model = create_model(name, num_classes=num_classes, in_channels=in_channels)
    if checkpoint is None:
        if name == REFERENCE_MODEL:
            if not BUNDLED_WEIGHTS.is_file():
                raise ModelError(f"bundled weights {BUNDLED_WEIGHTS} are missing; train them "
                                 "with 'logquant train' and pass --checkpoint")
            checkpoint = BUNDLED_WEIGHTS
        elif ":" not in name:
            raise ModelError(f"--model {name}: pass --checkpoint FILE (no weights are "
                             "downloaded)")
        else:
            return model.eval()
    qat = _qat_config(checkpoint)
    if qat is not None:  # trained quantization-aware: rebuild the same quantizers
        from logquant.qat import prepare_qat

        config, fold_bn = qat
        model = prepare_qat(model, config, fold_bn=fold_bn)
    return load_weights(model, checkpoint).eval()


def load_checked_model(name: str, checkpoint: str | Path | None, splits,
                       device: torch.device) -> nn.Module:
    """The model with its weights (:func:`load_model`) sized for ``splits`` (a
    :class:`~logquant.data.Splits`), after one tiny forward pass proves it fits the data."""
    from logquant.convert import check_finite

    model = load_model(name, checkpoint, len(splits.train.classes),
                       splits.train.images.shape[1]).to(device)
    check_finite(model)
    probe = splits.val.normalize(splits.val.images[:2].to(device))
    try:
        with torch.no_grad():
            out = model(probe)
    except Exception as exc:  # any shape/dtype mismatch between model and data
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(f"--model {name} cannot run on this data (inputs of shape "
                         f"{tuple(probe.shape)}): {first}") from None
    if out.ndim != 2 or out.shape[1] < len(splits.train.classes):
        raise ModelError(f"--model {name} returns shape {tuple(out.shape)}; expected "
                         f"(batch, {len(splits.train.classes)}) logits")
    return model


def _qat_config(checkpoint: str | Path):
    """(QuantConfig, fold_bn) recorded by quantization-aware training, if any."""
    from logquant.config import QuantConfig
    from logquant.io import parse_json, read_metadata

    if Path(checkpoint).suffix != ".safetensors":
        return None
    try:
        metadata = read_metadata(checkpoint)
    except Exception:
        return None  # load_weights reports unreadable files
    if "logquant_qat" not in metadata:
        return None
    where = f"{checkpoint}: quantization-aware training record (metadata logquant_qat)"
    return (QuantConfig.from_dict(parse_json(metadata["logquant_qat"], where)),
            metadata.get("fold_bn") == "1")
