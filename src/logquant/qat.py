"""Quantization-aware training: ``prepare_qat(model, config)`` for any CNN.

Uses the same configuration object and the same Quantizer modules as post-training
quantization. Float master weights stay in the model; each forward quantizes the weights
(FSR from the current max|w|), the input of every conv/linear layer but the first (FSR from
a running max), and, with ``config.grads``, the errors flowing back into each layer's output
(FSR from the current max per step). Gradients pass the quantizers straight through
(``clip_ste``: zero where the input saturated).
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from logquant.config import QuantConfig
from logquant.convert import (
    _signed_for,
    attach_quantizers,
    check_finite,
    check_layer_names,
    collect_input_stats,
    find_layers,
)
from logquant.fold import fold_batchnorm
from logquant.nn import ErrorQuantizer, Quantizer


def prepare_qat(model: nn.Module, config: QuantConfig, calibration_data: Any = None, *,
                fold_bn: bool = False, clip_ste: bool = False,
                num_batches: int | None = 4, input_key: str | None = None) -> nn.Module:
    """A copy of ``model`` ready for quantization-aware training under ``config``.

    ``fold_bn`` folds BatchNorm into the convs first (fine-tuning a trained model for
    deployment); otherwise BatchNorm layers train in float after the quantized convs.
    ``calibration_data`` (optional) finds the first layer in execution order and starts the
    activation FSRs from the data; without it, module order decides and the first training
    step sets them. Every conv/linear layer is covered as in ``quantize_model``.
    """
    check_finite(model)
    model = fold_batchnorm(model) if fold_bn else copy.deepcopy(model)
    infos = find_layers(model)
    check_layer_names(config, infos)
    layers, weights = attach_quantizers(model, config.unsupported)
    stats, order = {}, list(layers)
    if calibration_data is not None:
        stats, order = collect_input_stats(model.eval(), calibration_data, layers, num_batches,
                                           input_key)
    first, last = (order[0], order[-1]) if order else (None, None)
    for name, layer in layers.items():
        kind, types = infos[name].kind, infos[name].types
        weight_fmt = config.weight_format(name, kind, types)
        if weight_fmt is not None:  # a fixed FSR keeps its rule, but never loses the sign
            weight_fmt = _signed_for(weight_fmt, bool((weights[name] < 0).any()),
                                     f"{name}.weight")
        act_fmt = None if name == first and not config.quantize_first_input else \
            config.act_format(name, types)
        if act_fmt is not None and name in stats:
            act_fmt = _signed_for(act_fmt, stats[name].has_negative, f"{name} input")
        layer.weight_quant = _dynamic(weight_fmt, "current_max", clip_ste)
        layer.input_quant = _dynamic(act_fmt, "running_max", clip_ste)
        # the error at the logits is the loss gradient itself, not a back-propagated one; it
        # stays in float like the logits (quantizing it breaks its zero sum over classes)
        layer.error_quant = ErrorQuantizer(None if name == last else config.grads)
        if act_fmt is not None and act_fmt.fsr is None and name in stats:
            layer.input_quant.start_from(stats[name].max_abs, stats[name].has_negative)
    model.logquant_config = config
    return model.train()


def _dynamic(fmt, rule: str, clip_ste: bool) -> Quantizer:
    """A quantizer whose FSR is fixed when the format names one, else follows ``rule``."""
    if fmt is None:
        return Quantizer(None)
    return Quantizer(fmt, clip_ste=clip_ste, rule="fixed" if fmt.fsr is not None else rule)
