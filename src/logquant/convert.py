"""Model conversion: BatchNorm folding, calibration, and swapping conv/linear for quantized ones.

``quantize_model(model, config, calibration_data)`` is the one post-training entry point; it
works on any nn.Module whose conv/linear layers are modules (functional relu, residual adds,
grouped and depthwise convs included) and never modifies the model it is given.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from logquant.calibrate import TensorStats, choose_fsr, stats_of
from logquant.config import ConfigError, QuantConfig
from logquant.data import ImageDataset
from logquant.errors import LogquantError
from logquant.formats import Format
from logquant.nn import QUANTIZED_TYPES, Quantizer, _QuantizedLayer


def _fold_sequential_pairs(model: nn.Module) -> int:
    """Fold Conv2d -> BatchNorm2d pairs that follow each other inside nn.Sequential."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = 0
    for module in list(model.modules()):
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for first, second in zip(names, names[1:]):
            conv, bn = module._modules[first], module._modules[second]
            if type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d:
                module._modules[first] = fuse_conv_bn_eval(conv, bn)
                module._modules[second] = nn.Identity()
                folded += 1
    return folded


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode) with each BatchNorm folded into the conv before it.

    Adjacent pairs inside nn.Sequential are folded in place (the module tree, and its
    speed, stay as they were); any BatchNorm left (ResNet's, MobileNet's) is found on the
    torch.fx graph. Models fx cannot trace keep those BatchNorms in float, with a warning.
    """
    model = copy.deepcopy(model).eval()
    _fold_sequential_pairs(model)
    if not _has_batchnorm(model):
        return model
    try:
        from torch.fx.experimental.optimization import fuse

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fuse(model, inplace=True)
    except Exception:  # untraceable control flow
        warnings.warn("logquant: some BatchNorm layers could not be folded (model not "
                      "traceable by torch.fx); they stay in float", stacklevel=2)
        return model


def quantizable_layers(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Name -> (module, kind) for every conv/linear the quantizer knows, in module order."""
    return {name: (m, QUANTIZED_TYPES[type(m)][1]) for name, m in model.named_modules()
            if type(m) in QUANTIZED_TYPES}


def _batches(data: Any, limit: int | None):
    """Accept a tensor, an iterable of tensors or (inputs, labels), or an ImageDataset."""
    if isinstance(data, ImageDataset):
        data = data.batches(256)
    elif isinstance(data, torch.Tensor):
        data = [data]
    for i, batch in enumerate(data):
        if limit is not None and i >= limit:
            return
        yield batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def collect_input_stats(model: nn.Module, data: Iterable, layers: dict[str, tuple],
                        num_batches: int | None = None,
                        device: torch.device | str | None = None) -> tuple[dict, list[str]]:
    """Run ``data`` through ``model``; return per-layer input statistics and the call order."""
    stats = {name: TensorStats(seed=i) for i, name in enumerate(layers)}
    order: list[str] = []
    handles = []
    for name, (module, _) in layers.items():
        def hook(mod, inputs, name=name):
            if name not in order:
                order.append(name)
            stats[name].update(inputs[0])
        handles.append(module.register_forward_pre_hook(hook))
    device = device or next(model.parameters()).device
    seen = 0
    try:
        for inputs in _batches(data, num_batches):
            model(inputs.to(device))
            seen += 1
    finally:
        for handle in handles:
            handle.remove()
    if seen == 0:
        raise LogquantError("calibration data is empty: pass at least one batch of inputs")
    return stats, order


def _signed_for(fmt: Format, needs_sign: bool, what: str) -> Format:
    if needs_sign and not fmt.signed:
        if fmt.bits < 2:
            raise ConfigError(f"{what}: {fmt.name} has 1 bit and cannot hold negative values; "
                              "use at least 2 bits")
        return fmt.with_signed(True)
    return fmt


def _resolve(fmt: Format | None, stats: TensorStats, method: str, percentile: float,
             what: str) -> Format | None:
    """Give ``fmt`` its sign (from the data) and FSR (fixed, or calibrated by ``method``)."""
    if fmt is None:
        return None
    fmt = _signed_for(fmt, stats.has_negative, what)
    if fmt.fsr is not None:
        return fmt
    return fmt.with_fsr(choose_fsr(stats, fmt, method, percentile))


def check_layer_names(config: QuantConfig, layers: dict) -> None:
    unknown = sorted(config.layer_names() - set(layers))
    if unknown:
        available = ", ".join(list(layers)[:12]) + (" ..." if len(layers) > 12 else "")
        raise ConfigError(f"unknown layer name {unknown[0]!r}; the model's conv/linear "
                          f"layers are: {available}")


def quantize_model(model: nn.Module, config: QuantConfig, calibration_data: Any = None, *,
                   num_batches: int | None = None) -> nn.Module:
    """A copy of ``model`` simulating ``config``'s formats in float (post-training).

    BatchNorm is folded first; weights are quantized once with per-layer FSRs; each
    conv/linear input except the first layer's passes an activation quantizer whose sign
    and FSR come from ``calibration_data`` (needed unless every activation FSR is fixed).
    """
    folded = fold_batchnorm(model)
    layers = quantizable_layers(folded)
    if not layers:
        raise LogquantError("the model has no Conv2d or Linear layers to quantize")
    check_layer_names(config, layers)
    if calibration_data is None:
        raise LogquantError("quantize_model needs calibration_data (a few batches of inputs)")
    act_stats, order = collect_input_stats(folded, calibration_data, layers, num_batches)
    first = order[0] if order else None

    for name, (module, kind) in layers.items():
        weight_fmt = _resolve(config.weight_format(name, kind), stats_of(module.weight),
                              config.weight_fsr, config.percentile, f"{name}.weight")
        act_fmt = config.act_format(name)
        if name == first and not config.quantize_first_input:
            act_fmt = None
        act_fmt = _resolve(act_fmt, act_stats[name], config.act_fsr, config.percentile,
                           f"{name} input")
        qtype = QUANTIZED_TYPES[type(module)][0]
        qmodule = qtype.from_float(module, weight_format=weight_fmt, act_format=act_fmt)
        qmodule.freeze_weight()
        _replace(folded, name, qmodule)
    folded.logquant_config = config
    return folded.eval()


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def describe(model: nn.Module) -> list[dict[str, Any]]:
    """Per quantized layer: name, kind, weight format and input format (with FSRs)."""
    rows = []
    for name, module in model.named_modules():
        if isinstance(module, _QuantizedLayer):
            rows.append({
                "layer": name,
                "type": type(module).__name__,
                "weights": _name(module.weight_quant),
                "input": _name(module.input_quant),
            })
    return rows


def _name(q: Quantizer) -> str:
    return "float" if q.format is None else q.format.name
