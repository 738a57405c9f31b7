"""Export: a quantized PyTorch model -> the op list and integer tensors of an .lqz file.

The network is captured with torch.fx (quantized conv/linear layers are leaves), so any
model built from the supported ops exports without per-model code. Two transformations
make the network run on integers:

* Input normalization is folded into the first layer, so pixels enter as integers. The
  engine subtracts ``offset = round(255 * mean)`` per channel (integers in -255..255; the
  zero padding of the normalized image is zero padding here too), and the first layer's
  float weights are scaled by ``1 / (255 * std)`` before they are quantized. The rounding
  of the mean, ``delta = (offset / 255 - mean) / std`` (< 0.002 / std), is folded into the
  bias, exactly except at padded border taps, where it is off by ``delta`` times the
  weights of the padded taps. The exported network is defined with this folding; the
  float64 simulation (:mod:`logquant.simulate`) and the engine both compute it exactly.
* Biases are rounded (half up) to the accumulator's grid 2^(lsb_input + lsb_weight).
"""

from __future__ import annotations

import copy
import math
import operator
from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from logquant.config import QuantConfig
from logquant.convert import PreparedModel, check_finite
from logquant.fold import fold_batchnorm
from logquant.lqz import MAGIC, VERSION, LqzError, LqzModel
from logquant.nn import QuantizedLayer, float_class

_FLATTEN_METHODS = ("flatten", "view", "reshape")
ENGINE_LAYERS = {nn.Conv2d: "conv", nn.Linear: "linear"}  # exactly these classes
_IDENTITY_MODULES = (nn.Dropout, nn.Identity)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, QuantizedLayer) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module, sample: torch.Tensor) -> fx.GraphModule:
    """The model's fx graph with every node's output shape (``node.meta['tensor_meta']``)."""
    from torch.fx.passes.shape_prop import ShapeProp

    try:
        graph = _Tracer().trace(model)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise LqzError(f"export: torch.fx cannot trace the model ({first})") from None
    module = fx.GraphModule(model, graph)
    with torch.no_grad():
        ShapeProp(module).propagate(sample)
    return module


def _pair(value) -> list[int]:
    return [int(v) for v in value] if isinstance(value, (tuple, list)) else [int(value)] * 2


def _shape(node: fx.Node) -> list[int]:
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        raise LqzError(f"export: {node.name} does not produce one tensor")
    return list(meta.shape)[1:]


def _first_layer(gm: fx.GraphModule) -> tuple[str, bool]:
    """(name, through_flatten) of the conv/linear that reads the network input."""
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target),
                                                   (nn.Conv2d, nn.Linear)):
            source = node.args[0]
            if source is placeholder:
                return node.target, False
            if _as_op(gm, source)[0] == "flatten" and source.args[0] is placeholder:
                return node.target, True
    raise LqzError("export: no conv/linear layer reads the network input directly; the "
                   "engine folds the input normalization into that layer")


def fold_normalization(model: nn.Module, sample: torch.Tensor, mean, std) -> list[int]:
    """Fold (x/255 - mean)/std into the first layer of ``model`` (in place): afterwards it
    takes ``pixels - offset``. Returns the integer offsets."""
    name, flattened = _first_layer(trace(model, sample))
    layer = model.get_submodule(name)
    channels = sample.shape[1]
    offset = [round(255 * float(m)) for m in mean]
    scale = torch.tensor([1.0 / (255.0 * float(s)) for s in std], dtype=torch.float64)
    delta = torch.tensor([(o / 255.0 - float(m)) / float(s) for o, m, s in zip(offset, mean, std)],
                         dtype=torch.float64)
    with torch.no_grad():
        w = layer.weight.double()
        if flattened:  # feature f of the flattened image belongs to channel f // (H W)
            per = torch.arange(w.shape[1]) * channels // w.shape[1]
            shift = (w * delta[per]).sum(1)
            w = w * scale[per]
        else:
            if w.shape[1] * layer.groups != channels:
                raise LqzError(f"export: first layer {name} has {w.shape[1]} input channels, "
                               f"the data {channels}")
            per = torch.arange(channels).view(layer.groups, -1)  # channels seen by each group
            out_group = torch.arange(w.shape[0]) // (w.shape[0] // layer.groups)
            chan = per[out_group]  # (out, in_per_group): the input channel of each weight
            shift = (w * delta[chan][:, :, None, None]).sum((1, 2, 3))
            w = w * scale[chan][:, :, None, None]
        layer.weight.copy_(w.to(layer.weight.dtype))
        if layer.bias is None:
            layer.bias = nn.Parameter(shift.to(layer.weight.dtype))
        else:
            layer.bias.add_(shift.to(layer.bias.dtype))
    return offset


def pixel_batches(images: torch.Tensor, offset: list[int], batch_size: int = 256):
    """uint8 images (N, C, H, W) -> float batches of ``pixels - offset`` (exact integers)."""
    shift = torch.tensor(offset, dtype=torch.float32).view(1, -1, 1, 1)
    for start in range(0, len(images), batch_size):
        yield images[start:start + batch_size].float() - shift


# ----------------------------------------------------------------------------------------
# The quantized model in the pixel domain


def quantize_for_export(model: nn.Module, config: QuantConfig | None, images: torch.Tensor,
                        mean, std, num_batches: int | None = 8) -> tuple[nn.Module, list[int]]:
    """The model the .lqz file describes, as a float32 PyTorch model on ``pixels - offset``.

    A float model is folded (BatchNorm, then normalization) and quantized post-training
    with ``config``, calibrated on ``images``; a model trained quantization-aware keeps its
    formats and FSRs except the first layer's weight FSR, which follows the training rule
    (smallest FSR covering max |w|) on the normalization-folded weights.
    """
    check_finite(model)
    sample = images[:1].float()
    quantized = any(isinstance(m, QuantizedLayer) for m in model.modules())
    if not quantized:
        if config is None or config.is_float:
            raise LqzError("export needs formats: pass --weights and --acts (or --config)")
        if config.quantize_first_input:
            raise LqzError("export: the first layer reads integer pixels; drop "
                           "quantize_first_input (--quantize-input)")
        model = fold_batchnorm(model)
        offset = fold_normalization(model, sample, mean, std)
        prepared = PreparedModel(model, pixel_batches(images, offset), num_batches=num_batches)
        return prepared.apply(config), offset
    if config is not None and not config.is_float:
        raise LqzError("the model was trained quantization-aware: it carries its formats; "
                       "export it without format flags")
    from logquant.calibrate import choose_fsr, stats_of

    model = copy.deepcopy(model).eval()
    offset = fold_normalization(model, sample, mean, std)
    for module in model.modules():
        if isinstance(module, QuantizedLayer) and not module.weight_frozen:
            quantizer = module.weight_quant
            if quantizer.spec is not None and quantizer.rule != "fixed":  # training's rule
                quantizer.set_fsr(choose_fsr(stats_of(module.weight.detach()), quantizer.spec,
                                             "max"))
            if module.weight_quant.spec is not None:
                module.freeze_weight()
    return model, offset


# ----------------------------------------------------------------------------------------
# fx graph -> op list


def _as_op(gm: fx.GraphModule, node: fx.Node) -> tuple[str, dict[str, Any]]:
    """(op kind, attributes) of one fx node; kind "identity" for no-ops, "" if unknown."""
    target, args, kwargs = node.target, node.args, node.kwargs
    if node.op == "call_module":
        m = gm.get_submodule(target)
        if isinstance(m, QuantizedLayer):
            kind = ENGINE_LAYERS.get(float_class(m))
            if kind is None or m.stored_weight is None:
                what = "parametrized " if m.stored_weight is None else ""
                return "", {"what": f"{what}{type(m).__name__} (the engine runs plain Conv2d "
                            "and Linear layers)"}
            return kind, {}
        if isinstance(m, _IDENTITY_MODULES):
            return "identity", {}
        if isinstance(m, nn.ReLU):
            return "relu", {}
        if isinstance(m, nn.ReLU6) or (isinstance(m, nn.Hardtanh) and (m.min_val, m.max_val)
                                       == (0.0, 6.0)):
            return "relu6", {}
        if isinstance(m, nn.MaxPool2d) and not m.return_indices:
            return "maxpool", _pool(m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
        if isinstance(m, nn.AvgPool2d) and m.divisor_override is None:
            return "avgpool", {**_pool(m.kernel_size, m.stride, m.padding, 1, m.ceil_mode),
                               "count_include_pad": bool(m.count_include_pad)}
        if isinstance(m, nn.AdaptiveAvgPool2d) and _pair(m.output_size) == [1, 1]:
            return "global_avgpool", {}
        if isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1:
            return "flatten", {}
        return "", {"what": type(m).__name__}
    if node.op == "call_function":
        if target in (F.relu, torch.relu):
            return "relu", {}
        if target is F.relu6:
            return "relu6", {}
        if target in (F.dropout,):
            return "identity", {}
        if (target in (operator.add, operator.iadd, torch.add) and len(args) == 2
                and not kwargs and all(isinstance(a, fx.Node) for a in args)):
            return "add", {}
        if target is torch.flatten and tuple(args[1:]) in ((1,), (1, -1)):
            return "flatten", {}
        if target is F.max_pool2d:
            k = args[1] if len(args) > 1 else kwargs["kernel_size"]
            s = kwargs.get("stride", args[2] if len(args) > 2 else None) or k
            return "maxpool", _pool(k, s, kwargs.get("padding", 0), kwargs.get("dilation", 1),
                                    kwargs.get("ceil_mode", False))
        if target is F.adaptive_avg_pool2d and _pair(args[1]) == [1, 1]:
            return "global_avgpool", {}
        return "", {"what": getattr(target, "__name__", str(target))}
    if node.op == "call_method":
        if target == "relu":
            return "relu", {}
        if target in _FLATTEN_METHODS:
            shape = _shape(node)
            if len(shape) == 1 and math.prod(_shape(args[0])) == shape[0]:
                return "flatten", {}
        if target == "add" and len(args) == 2 and isinstance(args[1], fx.Node):
            return "add", {}
        if target == "contiguous":
            return "identity", {}
        return "", {"what": f"Tensor.{target}"}
    return "", {"what": node.op}


def _pool(kernel, stride, padding, dilation, ceil_mode) -> dict[str, Any]:
    return {"kernel": _pair(kernel), "stride": _pair(stride if stride else kernel),
            "padding": _pair(padding), "dilation": _pair(dilation),
            "ceil_mode": bool(ceil_mode)}


def _bias_on_grid(bias: torch.Tensor, exponent: int, name: str) -> torch.Tensor:
    """round(b / 2^exponent), halves up, in exact rational arithmetic."""
    unit = Fraction(2) ** exponent
    ints = [math.floor(Fraction(float(b)) / unit + Fraction(1, 2)) for b in bias.double().tolist()
            if math.isfinite(b)]
    if len(ints) != bias.numel():
        raise LqzError(f"export: layer {name} has a non-finite bias")
    widest = max((abs(v).bit_length() for v in ints), default=0) + 1
    if widest > 62:
        raise LqzError(f"export: layer {name}'s bias needs {widest} bits on the accumulator "
                       f"grid 2^{exponent}; the engine's accumulators hold 63 (use formats "
                       "with fewer levels)")
    return torch.tensor(ints, dtype=torch.int64)


def build_lqz(qmodel: nn.Module, offset: list[int], input_shape: list[int],
              meta: dict[str, Any] | None = None) -> LqzModel:
    """The .lqz description of a quantized pixel-domain model (see quantize_for_export).

    Also puts the grid-rounded biases into ``qmodel``, so that it stays the float32
    simulation of exactly the exported network.
    """
    sample = torch.zeros(1, *input_shape)
    gm = trace(qmodel, sample)
    ops: list[dict[str, Any]] = []
    weights: dict[str, torch.Tensor] = {}
    biases: dict[str, torch.Tensor] = {}
    alias: dict[str, str] = {}

    def source(arg) -> str:
        return alias.get(arg.name, arg.name)

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            ops.append({"op": "input", "out": node.name, "shape": list(input_shape),
                        "offset": list(offset)})
            continue
        if node.op == "output":
            result = node.args[0]
            if not isinstance(result, fx.Node):
                raise LqzError("export: the model must return one tensor of logits")
            ops.append({"op": "output", "in": source(result), "out": "logits"})
            continue
        kind, attrs = _as_op(gm, node)
        if kind == "":
            raise LqzError(f"export: {node.name} ({attrs['what']}) is not an op the engine can "
                           "run; it runs conv, linear, relu, relu6, max/avg-pool, global "
                           "average pool, add and flatten")
        if kind == "identity":
            alias[node.name] = source(node.args[0])
            continue
        if kind in ("conv", "linear"):
            layer = gm.get_submodule(node.target)
            ops.extend(_layer_ops(node, layer, source(node.args[0]), ops[0]["out"], weights,
                                  biases, kind))
            continue
        inputs = [source(a) for a in node.args[:2]] if kind == "add" else source(node.args[0])
        ops.append({"op": kind, "in": inputs, "out": node.name, **attrs})
    header = {"format": MAGIC, "version": VERSION, "ops": hoist_quantizers(ops),
              **(meta or {})}
    return LqzModel(header, weights, biases)


def _layer_ops(node: fx.Node, layer: nn.Module, src: str, network_input: str,
               weights: dict, biases: dict, kind: str) -> list[dict[str, Any]]:
    name = node.target
    w_fmt = layer.weight_quant.format
    x_fmt = layer.input_quant.format
    if w_fmt is None:
        raise LqzError(f"export: layer {name} has float weights; the engine needs a weight "
                       "format (is it skipped or overridden to float?)")
    if x_fmt is None and src != network_input:
        raise LqzError(f"export: layer {name} reads float activations; the engine needs "
                       "every conv/linear input after the first in a format (--acts)")
    ops = []
    if x_fmt is not None and src != network_input:
        ops.append({"op": "quantize", "in": src, "out": f"{node.name}_q",
                    "format": x_fmt.name})
        src = f"{node.name}_q"
    exponent = (0 if x_fmt is None else x_fmt.lsb) + w_fmt.lsb
    weights[f"{name}.weight"] = w_fmt.encode(layer.quantized_weight().detach(),
                                             name=f"{name}.weight")
    op = {"op": kind, "in": src, "out": node.name, "name": name,
          "weight": f"{name}.weight", "weight_format": w_fmt.name,
          "shape": list(layer.weight.shape), "bias": None, "weight_encoding": "packed"}
    if layer.bias is not None:
        op["bias"] = f"{name}.bias"
        biases[op["bias"]] = _bias_on_grid(layer.bias.detach(), exponent, name)
        with torch.no_grad():  # keep the float32 model the simulation of this very network
            layer.bias.copy_(biases[op["bias"]].double() * 2.0**exponent)
    if kind == "conv":
        op.update(stride=list(layer.stride), padding=_pair(layer.padding),
                  dilation=list(layer.dilation), groups=layer.groups)
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str) and (
                layer.padding != "valid"):
            raise LqzError(f"export: {name} uses padding {layer.padding!r}/"
                           f"{layer.padding_mode}; the engine supports explicit zero padding")
    return ops + [op]


def hoist_quantizers(ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Move each quantize op above the max-pools and flattens that feed it alone.

    Quantization is monotone and keeps zero, so it commutes with max-pooling and
    flattening; after the move, activations travel between layers as codes and the
    max-pool compares codes, as the hardware would.
    """
    ops = [dict(op) for op in ops]
    changed = True
    while changed:
        changed = False
        for i, op in enumerate(ops):
            if op["op"] != "quantize" or i == 0:
                continue
            j = next((k for k in range(i) if ops[k]["out"] == op["in"]), None)
            prev = ops[j] if j is not None else None
            if prev is None or prev["op"] not in ("maxpool", "flatten"):
                continue
            readers = [o for o in ops if prev["out"] in (o.get("in") if isinstance(
                o.get("in"), list) else [o.get("in")])]
            if len(readers) != 1:
                continue
            # prev: a -> b ; op: b -> c   becomes   op: a -> b' ; prev: b' -> c
            a, b, c = prev["in"], prev["out"], op["out"]
            op["in"], op["out"] = a, b + "_q"
            prev["in"], prev["out"] = b + "_q", c
            del ops[i]
            ops.insert(j, op)
            changed = True
            break
    return ops


def float32_size(qmodel: nn.Module) -> int:
    """Bytes of a float32 safetensors file of the quantized layers' weights and biases: the
    reference the .lqz file's size is compared with."""
    from safetensors.torch import save

    tensors = {}
    for name, module in qmodel.named_modules():
        if isinstance(module, QuantizedLayer):
            tensors[f"{name}.weight"] = module.weight.detach().float().contiguous()
            if module.bias is not None:
                tensors[f"{name}.bias"] = module.bias.detach().float().contiguous()
    return len(save(tensors))
