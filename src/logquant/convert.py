"""Model conversion: finding every conv/linear layer, calibration, applying formats.

``quantize_model(model, config, calibration_data)`` is the one post-training entry point. It
works on any nn.Module whose conv/linear layers are modules: every instance of Conv1d/2d/3d,
ConvTranspose1d/2d/3d or Linear, subclasses and parametrized layers included, is quantized
in place in a copy (see :mod:`logquant.nn`); a layer that cannot be quantized faithfully
raises an error naming it, or (``unsupported="float"``) stays float and is listed by
``describe``. The model given is never modified.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch
from torch import nn

from logquant.batches import input_batches
from logquant.calibrate import TensorStats, choose_fsr, stats_of
from logquant.config import ConfigError, QuantConfig, layer_matches
from logquant.coverage import FLOAT_REASONS_ATTR, describe  # noqa: F401 (re-export)
from logquant.errors import LogquantError, QuantizationWarning
from logquant.fold import fold_batchnorm
from logquant.formats import FSR_MIN, Format
from logquant.nn import (
    QuantizedLayer,
    Quantizer,
    UnsupportedLayerError,
    layer_kind,
    quantize_layer_,
    restore_float_,
)


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """A conv/linear layer of a model: its kind ("conv"/"fc") and class names (MRO)."""

    name: str
    kind: str
    types: tuple[str, ...]


def find_layers(model: nn.Module) -> dict[str, LayerInfo]:
    """Every conv/linear layer (subclasses included), in module order."""
    found = {}
    for name, module in model.named_modules():
        kind = layer_kind(module)
        if kind is not None:
            classes = type(module).__mro__[2:] if isinstance(module, QuantizedLayer) \
                else type(module).__mro__
            found[name] = LayerInfo(name, kind, tuple(c.__name__ for c in classes
                                                      if issubclass(c, nn.Module)))
    return found


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantizedLayer) for m in model.modules())


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
    count = int(torch.count_nonzero(nonzero))
    if count == 0:
        return
    share = int(torch.count_nonzero((quantized == 0) & nonzero)) / count  # no masked copy
    if share >= VANISHING_SHARE:
        peak = float(weight.abs().max())
        levels = fmt.with_fsr(FSR_MIN).levels().abs()
        cause = ("they lie below the smallest level any FSR reaches" if peak < float(
            levels[levels > 0].min()) else "an outlier may set the range: try weight FSR "
            "method 'mse' or a fixed FSR")
        warnings.warn(f"{name}: {100 * share:.1f} % of the weights quantize to zero with "
                      f"{fmt.name} (max |w| = {peak:.3g}); {cause}", QuantizationWarning,
                      stacklevel=3)


def _probe_input(module: nn.Module) -> torch.Tensor:
    """The smallest input a conv/linear layer accepts (all zeros, its dtype and device)."""
    weight = next(module.parameters())
    if isinstance(module, nn.Linear):
        shape: tuple[int, ...] = (1, module.in_features)
    else:
        transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
        padding = module.padding if isinstance(module.padding, tuple) else \
            (0,) * len(module.kernel_size)
        shape = (1, module.in_channels, *(
            1 if transposed else d * (k - 1) + 1 + 2 * p
            for k, d, p in zip(module.kernel_size, module.dilation, padding)))
    return torch.zeros(shape, dtype=weight.dtype, device=weight.device)


@torch.no_grad()
def _probe_weight(layer: QuantizedLayer) -> torch.Tensor:
    """The weight ``layer`` computes with (after any transform in its forward), found by
    running the layer alone on a zero input; raises UnsupportedLayerError if it cannot."""
    seen: list[torch.Tensor] = []
    stored = layer._parameters.get("weight")

    def observe(x: torch.Tensor, weight: torch.Tensor) -> None:
        layer.uses_stored_weight = weight is stored and stored is not None
        seen.append(weight.detach().clone())

    layer.logquant_observer = observe
    try:
        layer(_probe_input(layer))
    except UnsupportedLayerError:
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UnsupportedLayerError(f"{layer.logquant_name}: cannot run the layer alone to "
                                    f"find the weight it uses ({first})") from None
    finally:
        layer.logquant_observer = None
    return seen[0]


def attach_quantizers(model: nn.Module, unsupported: str = "error"
                      ) -> tuple[dict[str, QuantizedLayer], dict[str, torch.Tensor]]:
    """Make every conv/linear layer of ``model`` quantized in place (identity quantizers).

    Returns the layers and the float weight each computes with. A layer that cannot be
    quantized faithfully raises UnsupportedLayerError, or with ``unsupported="float"``
    keeps its class and is recorded with the reason in the model's float-layer list.
    """
    found = find_layers(model)
    reasons: dict[str, str] = getattr(model, FLOAT_REASONS_ATTR, {})
    layers: dict[str, QuantizedLayer] = {}
    weights: dict[str, torch.Tensor] = {}
    for name in found:
        module = model.get_submodule(name)
        inner = [n for n, m in module.named_modules() if n and layer_kind(m) is not None]
        try:
            if inner:
                raise UnsupportedLayerError(
                    f"{name}: contains other conv/linear layers ({inner[0]}); they are "
                    "quantized, the outer layer's own op is not")
            layer = quantize_layer_(module, name)
            try:
                weights[name] = _probe_weight(layer)
            except UnsupportedLayerError:
                restore_float_(layer)
                raise
        except UnsupportedLayerError as exc:
            if unsupported != "float":
                raise
            reasons[name] = str(exc).partition(": ")[2]
            continue
        layers[name] = layer
    if not layers and not found:
        raise LogquantError("the model has no conv or linear layers to quantize")
    setattr(model, FLOAT_REASONS_ATTR, reasons)
    return layers, weights


@torch.no_grad()
def collect_input_stats(model: nn.Module, data: Any, layers: dict[str, QuantizedLayer],
                        num_batches: int | None = None, input_key: str | None = None
                        ) -> tuple[dict[str, TensorStats], list[str]]:
    """Run ``data`` through ``model``; per-layer input statistics and the call order."""
    stats = {name: TensorStats(seed=i) for i, name in enumerate(layers)}
    order: list[str] = []

    def observer(name: str):
        def observe(x: torch.Tensor, weight: torch.Tensor) -> None:
            if name not in order:
                order.append(name)
            stats[name].update(x)
        return observe

    for name, layer in layers.items():
        layer.logquant_observer = observer(name)
    device = next(model.parameters()).device
    seen = 0
    try:
        for inputs in input_batches(data, num_batches, input_key):
            model(inputs.to(device))
            seen += 1
    finally:
        for layer in layers.values():
            layer.logquant_observer = None
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


def check_layer_names(config: QuantConfig, layers: dict[str, LayerInfo]) -> None:
    """Every skip/override pattern of ``config`` must select at least one layer."""
    for pattern in config.layer_patterns():
        if not any(layer_matches(pattern, info.name, info.types) for info in layers.values()):
            available = ", ".join(list(layers)[:12]) + (" ..." if len(layers) > 12 else "")
            raise ConfigError(f"layer pattern {pattern!r} selects no layer; the model's "
                              f"conv/linear layers are: {available}")


class PreparedModel:
    """A BN-folded copy of a float model, every conv/linear quantizable, plus calibration.

    ``apply(config)`` sets the formats of every layer and returns the model; it can be
    called again with another configuration (sweeps do, hundreds of times), reusing the
    calibration statistics, the calibrated FSRs and (with ``cache_weights``) the quantized
    weights instead of recomputing them. Without ``calibration_data`` only configurations
    whose activation formats are float or have fixed FSRs can be applied.
    """

    def __init__(self, model: nn.Module, calibration_data: Any = None, *,
                 num_batches: int | None = None, cache_weights: bool = False,
                 input_key: str | None = None, unsupported: str = "error"):
        if is_quantized(model):
            raise LogquantError("the model is already quantized (trained quantization-aware?):"
                                " evaluate it without format flags")
        check_finite(model)
        self.model = fold_batchnorm(model)
        self.infos = find_layers(self.model)
        self.unsupported = unsupported
        self.layers, self.float_weights = attach_quantizers(self.model, unsupported)
        self.calibrated = calibration_data is not None
        self.act_stats: dict[str, TensorStats] = {}
        self.order = list(self.layers)  # module order until data shows the call order
        if self.calibrated:
            self.act_stats, self.order = collect_input_stats(
                self.model, calibration_data, self.layers, num_batches, input_key)
        self.kinds = {name: self.infos[name].kind for name in self.layers}
        self.cache_weights = cache_weights
        self._weight_stats: dict[str, TensorStats] = {}
        self._fsrs: dict[tuple, int] = {}
        self._weights: dict[tuple[str, str], torch.Tensor] = {}

    def coverage(self) -> str:
        """"quantized N of M conv/linear layers", the float ones named with their reason."""
        reasons = getattr(self.model, FLOAT_REASONS_ATTR, {})
        text = f"quantized {len(self.layers)} of {len(self.infos)} conv/linear layers"
        return text + "".join(f"; {n} float: {r}" for n, r in reasons.items())

    @property
    def first_layer(self) -> str | None:
        return self.order[0] if self.order else None

    def _calibrated(self, fmt: Format | None, stats: TensorStats | None, method: str,
                    percentile: float, what: str) -> Format | None:
        """``fmt`` with its sign (from the data) and FSR (fixed, or calibrated; memoized)."""
        if fmt is None:
            return None
        if stats is None:  # no data: only fixed formats, taken as given
            if fmt.fsr is None:
                raise LogquantError(f"{what}: {fmt.name} takes its FSR from data; pass "
                                    "calibration_data or give a fixed FSR (e.g. "
                                    f"{fmt.name}@fsr0)")
            return fmt
        fmt = _signed_for(fmt, stats.has_negative, what)
        if fmt.fsr is not None:
            return fmt
        key = (what, fmt.name, method, percentile if method == "percentile" else None)
        if key not in self._fsrs:
            self._fsrs[key] = choose_fsr(stats, fmt, method, percentile)
        return fmt.with_fsr(self._fsrs[key])

    def _never_ran(self, name: str) -> bool:
        """Did calibration data miss this layer (its input range is unknown)?"""
        if not self.calibrated or name in self.order:
            return False
        if self.unsupported != "float":
            raise UnsupportedLayerError(
                f"{name}: its forward never ran on the calibration data (its weight may be "
                "used by its parent, as nn.MultiheadAttention does with out_proj), so its "
                "input cannot be quantized; leave it float (unsupported='float')")
        return True

    def resolve(self, config: QuantConfig) -> dict[str, tuple[Format | None, Format | None]]:
        """Per layer: the complete (weight format, input format) that ``config`` gives."""
        check_layer_names(config, self.infos)
        resolved = {}
        for name, kind in self.kinds.items():
            types = self.infos[name].types
            if name not in self._weight_stats:
                self._weight_stats[name] = stats_of(self.float_weights[name])
            weight_fmt = self._calibrated(config.weight_format(name, kind, types),
                                          self._weight_stats[name], config.weight_fsr,
                                          config.percentile, f"{name}.weight")
            act_fmt = config.act_format(name, types)
            if name == self.first_layer and not config.quantize_first_input:
                act_fmt = None
            if act_fmt is not None and self._never_ran(name):  # input quantizer unused
                weight_fmt = act_fmt = None
            if act_fmt is not None:
                act_fmt = self._calibrated(act_fmt, self.act_stats.get(name), config.act_fsr,
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

    def _float_reasons(self, config: QuantConfig) -> dict[str, str]:
        reasons = dict(getattr(self.model, FLOAT_REASONS_ATTR, {}))
        for name in self.layers:
            pattern = config.skipped_by(name, self.infos[name].types)
            if pattern is not None:
                reasons[name] = f"skipped by pattern {pattern!r}"
            elif self.calibrated and name not in self.order:
                reasons[name] = "never ran on the calibration data"
            else:
                reasons.pop(name, None)
        return reasons

    @torch.no_grad()
    def apply(self, config: QuantConfig) -> nn.Module:
        """Give every layer its formats under ``config``; returns the (same) model."""
        for name, (weight_fmt, act_fmt) in self.resolve(config).items():
            layer = self.layers[name]
            layer.weight_quant = Quantizer(weight_fmt)
            layer.input_quant = Quantizer(act_fmt)
            quantized = self._quantized_weight(name, weight_fmt)
            stored = layer.stored_weight
            if stored is not None:  # quantized once; a computed weight is at each call
                stored.copy_(quantized)
                layer.weight_frozen = True
        self.model.logquant_config = config
        setattr(self.model, FLOAT_REASONS_ATTR, self._float_reasons(config))
        return self.model.eval()


def quantize_model(model: nn.Module, config: QuantConfig, calibration_data: Any = None, *,
                   num_batches: int | None = None, input_key: str | None = None) -> nn.Module:
    """A copy of ``model`` simulating ``config``'s formats in float (post-training).

    BatchNorm is folded first; weights are quantized once with per-layer FSRs; each
    conv/linear input except the first layer's passes an activation quantizer whose sign
    and FSR come from ``calibration_data`` (a tensor, an iterable of tensors, of
    (input, target) pairs or of dicts with ``input_key``, or a DataLoader). Weight-only
    configurations, and activation formats with fixed FSRs, need no data. The model passed
    in is never modified. ``describe(result)`` lists every conv/linear layer.
    """
    check_layer_names(config, find_layers(model))  # fail before calibrating
    if calibration_data is None and config.needs_act_calibration:
        raise LogquantError("the configuration quantizes activations with FSRs taken from "
                            "data: pass calibration_data (a few batches of inputs), or fix "
                            "the FSR (e.g. acts='log4@fsr2')")
    prepared = PreparedModel(model, calibration_data, num_batches=num_batches,
                             input_key=input_key, unsupported=config.unsupported)
    return prepared.apply(config)
