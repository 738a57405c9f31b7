"""A float64 simulation of an .lqz network: the independent check of the integer engine.

It shares no arithmetic with the engine: codes are decoded to float64 values by the formats,
layers are PyTorch float64 convolutions, activations are re-quantized by the formats' exact
float64 kernels. Products of log values are exact in float64 and sums stay exact while a
layer's values span fewer than 53 bits, which holds for the formats and fan-ins exported
here (see tests/test_engine.py); the float32 simulation (the PyTorch model) rounds its sums
at 24 bits instead.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from logquant.formats import parse_format
from logquant.lqz import LqzModel


@dataclasses.dataclass
class SimulationResult:
    logits: torch.Tensor  # float64
    codes: dict[str, torch.Tensor]  # quantize op output -> codes


@torch.no_grad()
def simulate(model: LqzModel, images: torch.Tensor) -> SimulationResult:
    """Run ``model`` on uint8 ``images`` in float64."""
    env: dict[str, torch.Tensor] = {}
    formats: dict[str, object] = {}  # value name -> format of the codes it came from
    codes: dict[str, torch.Tensor] = {}
    logits = None
    for op in model.ops:
        kind, out = op["op"], op["out"]
        if kind == "input":
            offset = torch.tensor(op["offset"], dtype=torch.float64).view(1, -1, 1, 1)
            env[out] = images.double() - offset
            continue
        if kind == "add":
            a, b = (env[name] for name in op["in"])
            env[out] = a + b
            continue
        x = env[op["in"]]
        if kind in ("conv", "linear"):
            w_fmt = parse_format(op["weight_format"])
            weight = w_fmt.decode(model.weights[op["weight"]], torch.float64)
            x_fmt = formats.get(op["in"])
            bias = None
            if op["bias"] is not None:
                exponent = w_fmt.lsb + (0 if x_fmt is None else x_fmt.lsb)
                bias = model.biases[op["bias"]].double() * 2.0**exponent
            if kind == "linear":
                env[out] = F.linear(x, weight, bias)
            else:
                env[out] = F.conv2d(x, weight, bias, op["stride"], op["padding"],
                                    op["dilation"], op["groups"])
        elif kind == "quantize":
            fmt = parse_format(op["format"])
            codes[out] = fmt.encode(x, name=out)
            env[out] = fmt.decode(codes[out], torch.float64)
            formats[out] = fmt
        elif kind == "relu":
            env[out] = F.relu(x)
        elif kind == "relu6":
            env[out] = x.clamp(0.0, 6.0)
        elif kind == "flatten":
            env[out] = x.flatten(1)
        elif kind == "maxpool":
            env[out] = F.max_pool2d(x, op["kernel"], op["stride"], op["padding"],
                                    op["dilation"], op["ceil_mode"])
        elif kind == "avgpool":
            env[out] = F.avg_pool2d(x, op["kernel"], op["stride"], op["padding"],
                                    op["ceil_mode"], op["count_include_pad"])
        elif kind == "global_avgpool":
            env[out] = x.mean((2, 3), keepdim=True)
        elif kind == "output":
            logits = x
        if kind in ("relu", "flatten", "maxpool") and op["in"] in formats:
            formats[out] = formats[op["in"]]  # still codes of that format
    return SimulationResult(logits, codes)


def mismatches(model: LqzModel, images: torch.Tensor, result) -> dict[str, int]:
    """How many activation codes and logits of an engine ``result`` (run on ``images``
    with ``trace=True``) differ from this simulation's."""
    sim = simulate(model, images)
    return {"codes": sum(int((result.codes[k].long() != sim.codes[k].long()).sum())
                         for k in sim.codes),
            "logits": int((result.values() != sim.logits).sum())}
