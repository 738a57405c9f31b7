"""Model conversion: calibration, and swapping conv/linear for quantized ones.

``quantize_model(model, config, calibration_data)`` is the one post-training entry point; it
works on any nn.Module whose conv/linear layers are modules (functional relu, residual adds,
grouped and depthwise convs included) and never modifies the model it is given.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from logquant.calibrate import TensorStats, choose_fsr, stats_of
from logquant.config import ConfigError, QuantConfig
from logquant.data import ImageDataset
from logquant.errors import LogquantError, QuantizationWarning
from logquant.fold import fold_batchnorm
from logquant.formats import FSR_MIN, Format
from logquant.nn import QUANTIZED_TYPES, Quantizer, _QuantizedLayer


def quantizable_layers(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Name -> (module, kind) for every conv/linear the quantizer knows, in module order."""
    return {name: (m, QUANTIZED_TYPES[type(m)][1]) for name, m in model.named_modules()
            if type(m) in QUANTIZED_TYPES}


def check_finite(model: nn.Module) -> None:
    """Refuse a model with NaN or infinite parameters or buffers, naming the first: its
    outputs would be NaN (or saturate silently once quantized), not a number to report."""
    tensors = list(model.named_parameters()) + [
        (name, b) for name, b in model.named_buffers() if b.is_floating_point()]
    for name, tensor in tensors:
        finite = torch.isfinite(tensor.detach())
        if not bool(finite.all()):
            nan = int(torch.isnan(tensor.detach()).sum())
            raise LogquantError(f"{name} holds {nan} NaN and {int((~finite).sum()) - nan} "
                                "infinite values: the model cannot be quantized or evaluated "
                                "meaningfully (diverged training or a damaged checkpoint?)")


VANISHING_SHARE = 0.9  # warn when quantization zeroes this share of a layer's weights


def warn_if_weights_vanish(name: str, weight: torch.Tensor, quantized: torch.Tensor,
                           fmt: Format) -> None:
    """Warn (QuantizationWarning) when almost every nonzero weight of a layer becomes zero:
    defined by the format, but usually an outlier that set the FSR far above the rest."""
    nonzero = weight != 0
    count = int(nonzero.sum())
    if count == 0:
        return
    share = int((quantized[nonzero] == 0).sum()) / count
    if share >= VANISHING_SHARE:
        peak = float(weight.abs().max())
        levels = fmt.with_fsr(FSR_MIN).levels().abs()
        cause = ("they lie below the smallest level any FSR reaches" if peak < float(
            levels[levels > 0].min()) else "an outlier may set the range: try weight FSR "
            "method 'mse' or a fixed FSR")
        warnings.warn(f"{name}: {100 * share:.1f} % of the weights quantize to zero with "
                      f"{fmt.name} (max |w| = {peak:.3g}); {cause}", QuantizationWarning,
                      stacklevel=3)


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


def check_layer_names(config: QuantConfig, layers: dict) -> None:
    unknown = sorted(config.layer_names() - set(layers))
    if unknown:
        available = ", ".join(list(layers)[:12]) + (" ..." if len(layers) > 12 else "")
        raise ConfigError(f"unknown layer name {unknown[0]!r}; the model's conv/linear "
                          f"layers are: {available}")


class PreparedModel:
    """A BN-folded copy of a float model, every conv/linear wrapped, plus its calibration.

    ``apply(config)`` sets the formats of every layer and returns the model; it can be
    called again with another configuration (sweeps do, hundreds of times), reusing the
    calibration statistics, the calibrated FSRs and (with ``cache_weights``) the quantized
    weights instead of recomputing them.
    """

    def __init__(self, model: nn.Module, calibration_data: Any, *,
                 num_batches: int | None = None, cache_weights: bool = False):
        if calibration_data is None:
            raise LogquantError("quantization needs calibration_data (a few batches of inputs)")
        if any(isinstance(m, _QuantizedLayer) for m in model.modules()):
            raise LogquantError("the model is already quantized (trained quantization-aware?):"
                                " evaluate it without format flags")
        check_finite(model)
        self.model = fold_batchnorm(model)
        found = quantizable_layers(self.model)
        if not found:
            raise LogquantError("the model has no Conv2d or Linear layers to quantize")
        self.act_stats, self.order = collect_input_stats(self.model, calibration_data, found,
                                                         num_batches)
        self.kinds = {name: kind for name, (_, kind) in found.items()}
        self.layers: dict[str, _QuantizedLayer] = {}
        self.float_weights: dict[str, torch.Tensor] = {}
        for name, (module, _) in found.items():
            qmodule = QUANTIZED_TYPES[type(module)][0].from_float(module)
            replace_module(self.model, name, qmodule)
            self.layers[name] = qmodule
            self.float_weights[name] = module.weight.detach().clone()
        self.cache_weights = cache_weights
        self._weight_stats: dict[str, TensorStats] = {}
        self._fsrs: dict[tuple, int] = {}
        self._weights: dict[tuple[str, str], torch.Tensor] = {}

    @property
    def first_layer(self) -> str | None:
        return self.order[0] if self.order else None

    def _calibrated(self, fmt: Format | None, stats: TensorStats, method: str,
                    percentile: float, what: str) -> Format | None:
        """``fmt`` with its sign (from the data) and FSR (fixed, or calibrated; memoized)."""
        if fmt is None:
            return None
        fmt = _signed_for(fmt, stats.has_negative, what)
        if fmt.fsr is not None:
            return fmt
        key = (what, fmt.name, method, percentile if method == "percentile" else None)
        if key not in self._fsrs:
            self._fsrs[key] = choose_fsr(stats, fmt, method, percentile)
        return fmt.with_fsr(self._fsrs[key])

    def resolve(self, config: QuantConfig) -> dict[str, tuple[Format | None, Format | None]]:
        """Per layer: the complete (weight format, input format) that ``config`` gives."""
        check_layer_names(config, self.layers)
        resolved = {}
        for name, kind in self.kinds.items():
            if name not in self._weight_stats:
                self._weight_stats[name] = stats_of(self.float_weights[name])
            weight_fmt = self._calibrated(config.weight_format(name, kind),
                                          self._weight_stats[name], config.weight_fsr,
                                          config.percentile, f"{name}.weight")
            act_fmt = config.act_format(name)
            if name == self.first_layer and not config.quantize_first_input:
                act_fmt = None
            act_fmt = self._calibrated(act_fmt, self.act_stats[name], config.act_fsr,
                                       config.percentile, f"{name} input")
            resolved[name] = (weight_fmt, act_fmt)
        return resolved

    def _quantized_weight(self, name: str, fmt: Format | None) -> torch.Tensor:
        if fmt is None:
            return self.float_weights[name]
        key = (name, fmt.name)
        cached = self._weights.get(key)
        if cached is None:
            cached = fmt.quantize(self.float_weights[name])
            warn_if_weights_vanish(name, self.float_weights[name], cached, fmt)
            if self.cache_weights:
                self._weights[key] = cached
        return cached

    @torch.no_grad()
    def apply(self, config: QuantConfig) -> nn.Module:
        """Give every layer its formats under ``config``; returns the (same) model."""
        for name, (weight_fmt, act_fmt) in self.resolve(config).items():
            layer = self.layers[name]
            layer.weight_quant = Quantizer(weight_fmt)
            layer.input_quant = Quantizer(act_fmt)
            layer.weight.copy_(self._quantized_weight(name, weight_fmt))
            layer.weight_frozen.fill_(True)
        self.model.logquant_config = config
        return self.model.eval()


def quantize_model(model: nn.Module, config: QuantConfig, calibration_data: Any = None, *,
                   num_batches: int | None = None) -> nn.Module:
    """A copy of ``model`` simulating ``config``'s formats in float (post-training).

    BatchNorm is folded first; weights are quantized once with per-layer FSRs; each
    conv/linear input except the first layer's passes an activation quantizer whose sign
    and FSR come from ``calibration_data``. The model passed in is never modified.
    """
    check_layer_names(config, quantizable_layers(model))  # fail before calibrating
    return PreparedModel(model, calibration_data, num_batches=num_batches).apply(config)


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule called ``name`` is."""
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
