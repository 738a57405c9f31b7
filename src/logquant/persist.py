"""Saving a quantized model and restoring it without calibration data.

``save_quantized(qmodel, path)`` writes one safetensors file: the quantized model's
state_dict (quantized weights, quantizer buffers) and, in its string metadata, the
configuration, every layer's class and formats (with FSRs) and the layers left float.
``load_quantized(model, path)`` rebuilds the same quantized model from a float model of the
same architecture: outputs are bit-identical to the saved model's. A file that does not fit
the architecture, or whose tensors disagree with its metadata (edited, damaged), is refused
with a ``LogquantError`` naming the difference. Nothing in the file is executed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from logquant.config import QuantConfig
from logquant.convert import attach_quantizers, check_finite, is_quantized
from logquant.coverage import FLOAT_REASONS_ATTR
from logquant.errors import LogquantError
from logquant.fold import fold_batchnorm
from logquant.formats import Format, parse_format
from logquant.io import JsonError, atomic_path, parse_json
from logquant.nn import QuantizedLayer, Quantizer, float_class

KIND = "logquant-quantized-model"
VERSION = 1


class QuantizedFileError(LogquantError):
    """A quantized-model file that is damaged or does not fit the model it is loaded into."""


def _layers_of(model: nn.Module) -> dict[str, QuantizedLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLayer)}


def _name(quantizer: Quantizer) -> str:
    return "float" if quantizer.format is None else quantizer.format.name


def _digest(metadata: dict[str, str], state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the metadata (without the digest) and every tensor's name, dtype,
    shape and bytes: any edit of the file after saving changes it."""
    h = hashlib.sha256(json.dumps(metadata, sort_keys=True).encode())
    for key in sorted(state):
        t = state[key].detach().contiguous().cpu()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_quantized(qmodel: nn.Module, path: str | os.PathLike) -> None:
    """Write ``qmodel`` (from ``quantize_model``) to ``path`` (.safetensors), atomically."""
    from safetensors.torch import save_file

    config = getattr(qmodel, "logquant_config", None)
    layers = _layers_of(qmodel)
    if config is None or not layers:
        raise LogquantError("save_quantized takes a model returned by quantize_model")
    if any(m.error_quant.spec is not None or any(
            q.spec is not None and q.rule != "fixed" for q in (m.weight_quant, m.input_quant))
            for m in layers.values()):
        raise LogquantError("save_quantized takes a post-training quantized model; a model "
                            "trained quantization-aware is saved by training (save_weights)")
    path = Path(path)
    if path.suffix != ".safetensors":
        raise LogquantError(f"{path}: the file name must end in .safetensors")
    state = {k: v.detach().clone().contiguous().cpu() for k, v in qmodel.state_dict().items()}
    metadata = {
        "kind": KIND,
        "version": str(VERSION),
        "config": json.dumps(config.to_dict(), sort_keys=True),
        "layers": json.dumps({n: {"type": float_class(m).__name__,
                                  "weights": _name(m.weight_quant),
                                  "input": _name(m.input_quant),
                                  "weight_frozen": m.weight_frozen}
                              for n, m in layers.items()}),
        "float_layers": json.dumps(getattr(qmodel, FLOAT_REASONS_ATTR, {}), sort_keys=True),
    }
    metadata["sha256"] = _digest(metadata, state)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)


def _read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise QuantizedFileError(f"{path}: file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            state = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise QuantizedFileError(f"{path}: not a valid safetensors file ({exc})") from None
    if metadata.get("kind") != KIND:
        raise QuantizedFileError(f"{path}: not a logquant quantized model (written by "
                                 "save_quantized); for float weights use --checkpoint")
    if metadata.get("version") != str(VERSION):
        raise QuantizedFileError(f"{path}: version {metadata.get('version')!r} of the "
                                 f"quantized-model file; this logquant reads version {VERSION}")
    digest = metadata.pop("sha256", None)
    if digest != _digest(metadata, state):
        raise QuantizedFileError(f"{path}: checksum mismatch: the file was changed after it "
                                 "was saved")
    return metadata, state


def _json_field(metadata: dict[str, str], key: str, path: Path) -> Any:
    if key not in metadata:
        raise QuantizedFileError(f"{path}: metadata field {key!r} is missing")
    try:
        return parse_json(metadata[key], f"metadata field {key!r}")
    except JsonError as exc:
        raise QuantizedFileError(f"{path}: {exc}") from None


def _format(text: Any, where: str, path: Path) -> Format | None:
    try:
        fmt = parse_format(text)
    except LogquantError as exc:
        raise QuantizedFileError(f"{path}: {where}: {exc}") from None
    if fmt is not None and fmt.fsr is None:
        raise QuantizedFileError(f"{path}: {where}: {fmt.name} has no FSR")
    return fmt


def load_quantized(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """The quantized model stored in ``path``, rebuilt on (a copy of) the float ``model`` of
    the same architecture, with no calibration; ``model`` itself is not modified."""
    path = Path(path)
    metadata, state = _read(path)
    config = QuantConfig.from_dict(_json_field(metadata, "config", path))
    recorded = _json_field(metadata, "layers", path)
    float_layers = _json_field(metadata, "float_layers", path)
    if not isinstance(recorded, dict) or not isinstance(float_layers, dict):
        raise QuantizedFileError(f"{path}: metadata 'layers' and 'float_layers' must be "
                                 "JSON objects")
    if is_quantized(model):
        raise LogquantError("load_quantized takes the float model (the architecture); this "
                            "one is already quantized")
    check_finite(model)
    qmodel = fold_batchnorm(model)
    layers, _ = attach_quantizers(qmodel, config.unsupported)
    extra = sorted(set(layers) - set(recorded))
    missing = sorted(set(recorded) - set(layers))
    if extra or missing:
        what = f"the model has layer {extra[0]!r}" if extra else f"the file has {missing[0]!r}"
        raise QuantizedFileError(f"{path}: another architecture: {what} that the other "
                                 "does not")
    for name, layer in layers.items():
        entry = recorded[name]
        if not isinstance(entry, dict):
            raise QuantizedFileError(f"{path}: metadata of layer {name} is not an object")
        if float_class(layer).__name__ != entry.get("type"):
            raise QuantizedFileError(f"{path}: layer {name} is a {float_class(layer).__name__} "
                                     f"in the model, a {entry.get('type')} in the file")
        layer.weight_quant = Quantizer(_format(entry.get("weights"), f"{name} weights", path))
        layer.input_quant = Quantizer(_format(entry.get("input"), f"{name} input", path))
        layer.weight_frozen = entry.get("weight_frozen") is True
    _load_state(qmodel, state, path)
    for name, layer in layers.items():
        _check_layer(name, layer, recorded[name], path)
    qmodel.logquant_config = config
    setattr(qmodel, FLOAT_REASONS_ATTR, {str(k): str(v) for k, v in float_layers.items()})
    return qmodel.eval()


def _load_state(qmodel: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    own = qmodel.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise QuantizedFileError(f"{path}: does not fit the model ({what})")
    for key, value in state.items():
        if value.shape != own[key].shape or value.dtype != own[key].dtype:
            raise QuantizedFileError(f"{path}: {key} is {value.dtype} {tuple(value.shape)}, "
                                     f"the model has {own[key].dtype} {tuple(own[key].shape)}")
    qmodel.load_state_dict(state)


def _check_layer(name: str, layer: QuantizedLayer, entry: dict, path: Path) -> None:
    """The tensors must say what the metadata says: formats, and weights on their grid."""
    for field, quantizer in (("weights", layer.weight_quant), ("input", layer.input_quant)):
        if _name(quantizer) != _format_text(entry.get(field)):
            raise QuantizedFileError(f"{path}: layer {name} {field}: the metadata says "
                                     f"{entry.get(field)}, the tensors {_name(quantizer)}")
    fmt = layer.weight_quant.format
    weight = layer.stored_weight
    if layer.weight_frozen and fmt is not None and weight is not None and not torch.equal(
            fmt.quantize(weight.detach()), weight.detach()):
        raise QuantizedFileError(f"{path}: layer {name}: stored weights are not {fmt.name} "
                                 "values")


def _format_text(text: Any) -> str:
    fmt = parse_format(text)
    return "float" if fmt is None else fmt.name
