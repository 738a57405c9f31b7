"""Static analysis of an .lqz network: what every value is, its grid and its largest size.

Before any data flows, each value of the op list is classified as *codes* (of a format) or
an *accumulator* (integers a meaning a * 2^exponent / denominator, with a proven bound on
|a|). From the bounds follow the accumulator width each layer needs for exactness and the
exact decision thresholds of every quantize op. Anything the engine cannot compute
exactly is refused here, naming the op, so it surfaces at export time.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

import torch

from logquant.engine.arith import CodeTable, code_table, is_sqrt2, thresholds
from logquant.formats import Format, parse_format
from logquant.lqz import LqzError, LqzModel

MAX_ACC_BITS = 62  # accumulators live in int64 (one bit of headroom for the sign)
SQRT2_COMBINE_BITS = 40  # at most this many fraction bits for sqrt2 * odd sums
POOL_HEADROOM = 12  # bits left above combined sqrt2 sums for average pools and adds


@dataclasses.dataclass
class Value:
    """A value flowing between ops (batch dimension excluded from ``shape``)."""

    shape: list[int]
    fmt: Format | None = None  # codes of this format, or None for an accumulator
    exponent: int = 0
    denominator: int = 1
    bound: int = 0  # max |a| for accumulators; max |integer| for codes

    @property
    def is_codes(self) -> bool:
        return self.fmt is not None


@dataclasses.dataclass
class LayerPlan:
    """A conv/linear layer: operand tables, accumulator grid, widths and bounds."""

    op: dict
    weight_format: Format
    weight_table: CodeTable
    x_table: CodeTable | None  # None: the input is integers (pixels) on grid 2^0
    x_bound: int
    exponent: int  # grid of the sums: 2^(lsb_x + lsb_w)
    fan_in: int
    bound_even: int  # max |A| (the whole sum unless sqrt2 is involved), bias included
    bound_odd: int  # max |B|: the sqrt2 * B part (0 unless a sqrt2 format is involved)
    combine_bits: int  # P: A + B sqrt2 is computed as (A << P) + B * round(sqrt2 << P)

    @property
    def sqrt2(self) -> bool:
        return is_sqrt2(self.weight_format) or (self.x_table is not None
                                                and is_sqrt2(self.x_table.fmt))

    @property
    def acc_bits(self) -> int:
        """Accumulator width (sign included) that no input can overflow."""
        return max(self.bound_even, self.bound_odd).bit_length() + 1

    @property
    def shift_adds(self) -> bool:
        """Whether every product is a shift (at least one operand in a log format)."""
        x_log = self.x_table is not None and self.x_table.fmt.is_log
        return self.weight_format.is_log or x_log


def _window_count(size: int, kernel: int, stride: int, padding: int, dilation: int,
                  ceil_mode: bool) -> int:
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    if out < 1:
        raise LqzError(f"pooling window larger than its {size}-pixel input")
    return out


@dataclasses.dataclass
class Plan:
    values: dict[str, Value]
    layers: dict[str, LayerPlan]  # by op output name
    quantizers: dict[str, torch.Tensor]  # quantize op output -> int64 thresholds
    output: Value
    bytes_per_image: int = 0  # planned peak working memory of one image (an upper estimate)


# The engine's working memory for one image: the largest value (a padded conv input
# included) in 8-byte integers, times the copies a layer holds at once (input, padded
# input, digit planes, output). A file whose network needs more is refused when planned,
# before any run allocates it: a few-KB file must not ask for gigabytes.
WORKING_COPIES = 4
MAX_BYTES_PER_IMAGE = 1 << 30


def plan(model: LqzModel) -> Plan:
    """Classify every value and check the network is computable exactly."""
    values: dict[str, Value] = {}
    layers: dict[str, LayerPlan] = {}
    quantizers: dict[str, torch.Tensor] = {}
    output = None
    for op in model.ops:
        kind = op["op"]
        where = f"{kind} {op.get('name', op['out'])!r}"
        try:
            if kind == "input":
                largest = max(max(o, 255 - o) for o in op["offset"])
                values[op["out"]] = Value(list(op["shape"]), None, 0, 1, largest)
                continue
            if kind == "add":
                values[op["out"]] = _add(*(values[name] for name in op["in"]))
                continue
            x = values[op["in"]]
            if kind in ("conv", "linear"):
                _check_memory(_padded_input_size(op, x) if kind == "conv" else 0)
                layer = _layer(op, x, model)
                layers[op["out"]] = layer
                values[op["out"]] = _layer_output(op, x, layer)
            elif kind == "quantize":
                fmt = parse_format(op["format"])
                if x.is_codes:
                    raise LqzError("input is already codes")
                if x.bound >= 1 << MAX_ACC_BITS:
                    raise LqzError("accumulator too wide")
                quantizers[op["out"]] = torch.tensor(
                    thresholds(fmt, x.exponent, x.denominator), dtype=torch.int64)
                values[op["out"]] = Value(x.shape, fmt, bound=code_table(fmt).max_int)
            elif kind in ("relu", "relu6", "flatten"):
                if kind == "flatten":
                    shape = [math.prod(x.shape)]
                else:
                    shape = x.shape
                    if x.is_codes and kind == "relu6":
                        x = to_accumulator(x)
                values[op["out"]] = dataclasses.replace(x, shape=shape)
            elif kind == "maxpool":
                values[op["out"]] = dataclasses.replace(x, shape=_pooled(x.shape, op))
            elif kind == "avgpool":
                x = to_accumulator(x)
                if any(op["padding"]) and not op["count_include_pad"] or op["ceil_mode"]:
                    raise LqzError("average pooling with a varying divisor (padding without "
                                   "count_include_pad, or ceil_mode) is not supported")
                count = op["kernel"][0] * op["kernel"][1]
                values[op["out"]] = Value(_pooled(x.shape, {**op, "dilation": [1, 1]}), None,
                                          x.exponent, x.denominator * count, x.bound * count)
            elif kind == "global_avgpool":
                x = to_accumulator(x)
                if len(x.shape) != 3:
                    raise LqzError(f"needs a (C, H, W) input, got {x.shape}")
                count = x.shape[1] * x.shape[2]
                values[op["out"]] = Value([x.shape[0], 1, 1], None, x.exponent,
                                          x.denominator * count, x.bound * count)
            elif kind == "output":
                if x.is_codes or x.denominator != 1 or len(x.shape) != 1:
                    raise LqzError("the output must be the last linear layer's accumulator "
                                   "(integer logits)")
                output = values[op["out"]] = x
            _check_memory(math.prod(values[op["out"]].shape))
        except LqzError as exc:
            raise LqzError(f"{where}: {exc}") from None
    largest = max(math.prod(v.shape) for v in values.values())
    for name, value in values.items():
        if not value.is_codes and value.bound >= 1 << MAX_ACC_BITS:
            raise LqzError(f"{name}: needs a {value.bound.bit_length() + 1}-bit accumulator; "
                           f"the engine holds {MAX_ACC_BITS + 1} bits (use fewer bits or "
                           "levels)")
    return Plan(values, layers, quantizers, output, 8 * WORKING_COPIES * largest)


def _check_memory(numbers: int) -> None:
    """Refuse a value of ``numbers`` integers per image beyond the working-memory limit."""
    needed = 8 * WORKING_COPIES * numbers
    if needed > MAX_BYTES_PER_IMAGE:
        raise LqzError(f"needs about {needed / 2**30:.1f} GiB of working memory per image "
                       f"({numbers:,} numbers in one value); the engine's limit is "
                       f"{MAX_BYTES_PER_IMAGE / 2**30:.0f} GiB")


def _padded_input_size(op: dict, x: Value) -> int:
    c, *spatial = x.shape
    return c * math.prod(size + 2 * pad for size, pad in zip(spatial, op["padding"]))


def to_accumulator(x: Value) -> Value:
    """Codes as integers on their grid (for ops that add or average them)."""
    if not x.is_codes:
        return x
    if is_sqrt2(x.fmt):
        raise LqzError(f"{x.fmt.name} codes cannot be added or averaged as integers")
    table = code_table(x.fmt)
    return Value(x.shape, None, table.lsb, 1, table.max_int)


def _add(a: Value, b: Value) -> Value:
    a, b = to_accumulator(a), to_accumulator(b)
    if a.denominator != b.denominator:
        raise LqzError("adding averages with different divisors is not supported")
    if a.shape != b.shape:
        raise LqzError(f"shapes {a.shape} and {b.shape} differ")
    exponent = min(a.exponent, b.exponent)
    bound = (a.bound << (a.exponent - exponent)) + (b.bound << (b.exponent - exponent))
    return Value(a.shape, None, exponent, a.denominator, bound)


def _pooled(shape: list[int], op: dict) -> list[int]:
    if len(shape) != 3:
        raise LqzError(f"needs a (C, H, W) input, got {shape}")
    c, h, w = shape
    return [c] + [_window_count(size, op["kernel"][i], op["stride"][i], op["padding"][i],
                                op["dilation"][i], op["ceil_mode"])
                  for i, size in enumerate((h, w))]


def _layer(op: dict, x: Value, model: LqzModel) -> LayerPlan:
    w_fmt = parse_format(op["weight_format"])
    w_table = code_table(w_fmt)
    shape = op["shape"]
    if x.is_codes:
        x_table = code_table(x.fmt)
        x_bound, x_lsb = x_table.max_int, x_table.lsb
    elif x.denominator == 1:
        x_table, x_bound, x_lsb = None, x.bound, x.exponent
    else:
        raise LqzError("reads an average; quantize it first")
    if op["op"] == "conv":
        if len(x.shape) != 3 or x.shape[0] != shape[1] * op["groups"]:
            raise LqzError(f"expects {shape[1] * op['groups']} input channels, gets {x.shape}")
        fan_in = shape[1] * shape[2] * shape[3]
    else:
        if x.shape != [shape[1]]:
            raise LqzError(f"expects {shape[1]} input features, gets {x.shape}")
        fan_in = shape[1]
    bias = model.biases.get(op["bias"]) if op["bias"] is not None else None
    bias_bound = int(bias.abs().max()) if bias is not None and bias.numel() else 0
    odd_involved = is_sqrt2(w_fmt) or (x_table is not None and is_sqrt2(x_table.fmt))
    bound_even, bound_odd = sum_bounds(w_table, x_bound, odd_involved, fan_in, bias_bound)
    combine = 0
    if odd_involved:
        combine = min(SQRT2_COMBINE_BITS, MAX_ACC_BITS - 1 - POOL_HEADROOM
                      - (bound_even + 2 * bound_odd).bit_length())
        if combine < 8:
            raise LqzError("sums too wide to combine the sqrt2 parts with 8 fraction bits")
    return LayerPlan(op, w_fmt, w_table, x_table, x_bound, x_lsb + w_table.lsb, fan_in,
                     bound_even, bound_odd, combine)


def sum_bounds(w_table: CodeTable, x_bound: int, odd_involved: bool, fan_in: int,
               bias_bound: int = 0) -> tuple[int, int]:
    """Largest |A| (bias included) and |B| of a layer's sums A + B sqrt2."""
    product = x_bound * w_table.max_int
    if not odd_involved:
        return fan_in * product + bias_bound, 0
    return 2 * fan_in * product + bias_bound, fan_in * product


def accumulator_bits(w_fmt: Format, x_fmt: Format | None, fan_in: int,
                     x_bound: int = 255) -> int:
    """Accumulator width (sign included) that no input overflows, before the bias: from the
    formats and the fan-in alone (``x_fmt`` None: integers up to ``x_bound``, pixels)."""
    x_bound = x_bound if x_fmt is None else code_table(x_fmt).max_int
    odd = is_sqrt2(w_fmt) or is_sqrt2(x_fmt)
    return max(sum_bounds(code_table(w_fmt), x_bound, odd, fan_in)).bit_length() + 1


def sqrt2_constant(bits: int) -> int:
    """round(sqrt2 * 2^bits), exactly (half up: no tie is possible)."""
    return (math.isqrt(8 << (2 * bits)) + 1) // 2  # floor(y + 1/2) = (floor(2y) + 1) // 2


def _layer_output(op: dict, x: Value, layer: LayerPlan) -> Value:
    shape = op["shape"]
    if op["op"] == "conv":
        out = [shape[0]] + [_window_count(size, shape[2 + i], op["stride"][i], op["padding"][i],
                                          op["dilation"][i], False)
                            for i, size in enumerate(x.shape[1:])]
    else:
        out = [shape[0]]
    if not layer.sqrt2:
        return Value(out, None, layer.exponent, 1, layer.bound_even)
    p = layer.combine_bits
    bound = (layer.bound_even << p) + layer.bound_odd * sqrt2_constant(p)
    return Value(out, None, layer.exponent - p, 1, bound)


def relu6_limit(x: Value) -> int:
    """The largest accumulator whose value is <= 6."""
    return math.floor(Fraction(6 * x.denominator) / Fraction(2) ** x.exponent)
