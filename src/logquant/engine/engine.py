"""The integer inference engine: runs an .lqz network on uint8 images with integer adds,
shifts and comparisons only, and returns integer logits.

The fast path computes each layer's exact integer sums with float64 convolutions: every
operand is an integer (a shift of 1, or a pixel), so each float64 sum is exact whenever the
proven bound fan_in * max|x| * max|w| stays below 2^53; where it would not, the inputs are
split into digits whose sums do, and recombined with shifts in int64. The result is
bit-identical to the literal path (``literal=True``), which does one shift-add per product.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from logquant.compiled import fused
from logquant.engine import literal as lit
from logquant.engine.arith import CodeTable, code_table, encode_accumulator
from logquant.engine.plan import (
    LayerPlan,
    Value,
    plan,
    relu6_limit,
    sqrt2_constant,
    to_accumulator,
)
from logquant.formats import parse_format
from logquant.lqz import LqzError, LqzModel

FLOAT32_EXACT, FLOAT64_EXACT = 1 << 24, 1 << 53


@dataclasses.dataclass
class EngineResult:
    """Integer logits (value = logits * 2^exponent), and what ``trace`` asked for."""

    logits: torch.Tensor  # int64 (N, classes)
    exponent: int
    codes: dict[str, torch.Tensor]  # quantize op output -> uint8 codes (trace only)
    sums: dict[str, torch.Tensor]  # layer output -> int64 accumulators (trace only)
    inputs: dict[str, torch.Tensor]  # layer output -> the codes (or pixels) it read (trace)
    overflows: dict[str, int]  # layer -> outputs saturated by a narrow accumulator

    def values(self) -> torch.Tensor:
        """The logits as float64 (exact while |logits| < 2^53)."""
        return self.logits.double() * 2.0**self.exponent


def _f64(table: CodeTable, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Codes as float64 integers: (even part, sqrt2 part or None)."""
    ints = torch.tensor(table.ints, dtype=torch.float64)[codes.long()]
    if not any(table.odd):
        return ints, None
    odd = torch.tensor(table.odd)[codes.long()]
    return ints.masked_fill(odd, 0.0), ints.masked_fill(~odd, 0.0)


class Engine:
    """Runs an :class:`~logquant.lqz.LqzModel`. ``acc_bits`` narrows every accumulator
    (saturating, overflows counted); ``literal`` selects the one-shift-at-a-time path."""

    def __init__(self, model: LqzModel, acc_bits: int | None = None, literal: bool = False):
        if acc_bits is not None and not 2 <= acc_bits <= 63:
            raise LqzError(f"accumulator width must be 2..63 bits, got {acc_bits}")
        self.model, self.acc_bits, self.literal = model, acc_bits, literal
        self.plan = plan(model)
        self._weights = {}
        for out, layer in self.plan.layers.items():
            codes = model.weights[layer.op["weight"]]
            bias = model.biases.get(layer.op["bias"]) if layer.op["bias"] else None
            self._weights[out] = (codes, _f64(layer.weight_table, codes), bias)
        self._tables: dict = {}
        readers: dict[str, list[dict]] = {}
        for op in model.ops:
            for name in (op["in"] if op["op"] == "add" else [op.get("in")]):
                readers.setdefault(name, []).append(op)
        # a ReLU read only by unsigned quantizers changes nothing: they map x <= 0 to zero
        self._implied_relus = {op["out"] for op in model.ops if op["op"] == "relu" and all(
            r["op"] == "quantize" and not parse_format(r["format"]).signed
            for r in readers.get(op["out"], [None]) if r is not None) and readers.get(
                op["out"])}
        self._fusions = {} if literal or acc_bits is not None else self._find_fusions(readers)

    def _find_fusions(self, readers: dict[str, list[dict]]) -> dict[str, tuple]:
        """Layers whose sums go (through an implied ReLU) to one quantizer only: the fast
        path forms their codes in the same pass that recombines the sums. Per layer:
        (ops it also computes, the quantize op, the format's exact kernel and params at
        the FSR shifted by the grid exponent)."""
        from logquant.formats import FSR_MAX, FSR_MIN

        fusions = {}
        for out, layer in self.plan.layers.items():
            if layer.sqrt2 or layer.bound_even >= FLOAT64_EXACT:
                continue
            chain, next_ops = [], readers.get(out, [])
            if len(next_ops) == 1 and next_ops[0]["out"] in self._implied_relus:
                chain.append(next_ops[0]["out"])
                next_ops = readers.get(next_ops[0]["out"], [])
            if len(next_ops) != 1 or next_ops[0]["op"] != "quantize":
                continue
            quantize = next_ops[0]
            fmt = self.plan.values[quantize["out"]].fmt
            shifted = fmt.fsr - self.plan.values[out].exponent
            if FSR_MIN <= shifted <= FSR_MAX:
                kernel, params = fmt.with_fsr(shifted).kernel(torch.float64)
                fusions[out] = (set(chain) | {quantize["out"]}, quantize["out"], kernel,
                                params, fmt.signed)
        return fusions

    @property
    def input_shape(self) -> list[int]:
        return self.model.ops[0]["shape"]

    def check_images(self, images: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or list(images.shape[1:]) != self.input_shape:
            raise LqzError(f"the engine takes uint8 images of shape (N, "
                           f"{', '.join(map(str, self.input_shape))}), got {images.dtype} "
                           f"{tuple(images.shape)}")

    @torch.no_grad()
    def run(self, images: torch.Tensor, trace: bool = False) -> EngineResult:
        """Integer logits of uint8 images (N, C, H, W)."""
        self.check_images(images)
        env: dict[str, torch.Tensor] = {}
        result = EngineResult(torch.empty(0), 0, {}, {}, {}, {})
        values = self.plan.values
        done: set[str] = set()
        for op in self.model.ops:
            kind, out = op["op"], op["out"]
            if out in done:
                continue
            if kind == "input":
                offset = torch.tensor(op["offset"], dtype=torch.int64).view(1, -1, 1, 1)
                env[out] = images.long() - offset
                continue
            if kind == "add":
                env[out] = self._add(op, env)
                continue
            x, xv = env[op["in"]], values[op["in"]]
            if kind in ("conv", "linear") and out in self._fusions:
                computed, q_out, kernel, params, signed = self._fusions[out]
                parts, scales, bias = self._fast_parts(self.plan.layers[out], x)
                env[q_out], acc = fused(_finisher(kernel, trace), parts, scales, bias, params,
                                        signed)
                done |= computed
                if trace:
                    result.codes[q_out] = env[q_out]
                    result.sums[out], result.inputs[out] = acc.to(torch.int64), x
            elif kind in ("conv", "linear"):
                env[out] = self._layer(out, x, result)
                if trace:
                    result.sums[out], result.inputs[out] = env[out].to(torch.int64), x
            elif kind == "quantize":
                fmt, table = values[out].fmt, self.plan.quantizers[out]
                if self.literal:
                    env[out] = lit.encode(x, fmt, xv.exponent, xv.denominator, table)
                else:
                    env[out] = _encode_fast(x, fmt, xv, table)
                if trace:
                    result.codes[out] = env[out]
            elif kind == "relu":
                env[out] = x if out in self._implied_relus and not self.literal else \
                    self._relu(x, xv)
            elif kind == "relu6":
                x = self._as_acc(x, xv)
                env[out] = x.clamp(0, relu6_limit(values[out]))
            elif kind == "flatten":
                env[out] = x.reshape(x.shape[0], -1)
            elif kind == "maxpool":
                env[out] = self._maxpool(x, xv, op, values[out].shape[1:])
            elif kind == "avgpool":
                env[out] = _window_reduce(_wide(self._as_acc(x, xv), values[out]), op, "sum",
                                          values[out].shape[1:])
            elif kind == "global_avgpool":
                env[out] = _wide(self._as_acc(x, xv), values[out]).sum((2, 3), keepdim=True)
            elif kind == "output":
                result.logits, result.exponent = x.to(torch.int64), xv.exponent
        return result

    # -- layers ---------------------------------------------------------------------------
    def _layer(self, out: str, x: torch.Tensor, result: EngineResult) -> torch.Tensor:
        layer = self.plan.layers[out]
        codes, (w_even, w_odd), bias = self._weights[out]
        narrow = self.acc_bits is not None and layer.acc_bits > self.acc_bits
        if self.literal:
            even, odd = lit.layer_sums(layer, x, codes)
        elif not layer.sqrt2 and not narrow and layer.bound_even < FLOAT64_EXACT:
            return self._fast_layer(layer, x)
        else:
            if layer.x_table is None:
                x_even, x_odd = x.double(), None
            else:
                x_even, x_odd = _f64(layer.x_table, x)
            even, odd = self._sums(layer, x_even, x_odd, w_even, w_odd)
        if bias is not None:
            even = even + (bias.view(1, -1, 1, 1) if even.dim() == 4 else bias)
        if narrow:
            lo, hi = -(1 << (self.acc_bits - 1)), (1 << (self.acc_bits - 1)) - 1
            over = ((even < lo) | (even > hi)).sum() + ((odd < lo) | (odd > hi)).sum()
            result.overflows[layer.op["name"]] = result.overflows.get(layer.op["name"], 0) + \
                int(over)
            even, odd = even.clamp(lo, hi), odd.clamp(lo, hi)
        if not layer.sqrt2:
            return even
        p = layer.combine_bits  # A + B sqrt2, once per output, with p fraction bits
        return torch.bitwise_left_shift(even, p) + odd * sqrt2_constant(p)

    def _fast_layer(self, layer: LayerPlan, x: torch.Tensor) -> torch.Tensor:
        """Base-2/linear layer whose sums stay below 2^53: the exact sums as float64, from
        float32 (or float64) digit convolutions, recombined in one fused pass."""
        return fused(_combine, *self._fast_parts(layer, x))

    def _fast_parts(self, layer: LayerPlan, x: torch.Tensor):
        """(digit sums (D, N, ...), 2^(k k') per digit, float64 bias) of a fast layer."""
        dtype, digit_bits, count = _digit_plan(layer)
        if x.dim() == 4:  # oneDNN convolves channels-last tensors without reordering
            x = x.contiguous(memory_format=torch.channels_last)
        if layer.x_table is not None:
            stacked = fused(_expand_codes, x, self._digit_tables(layer, dtype, digit_bits,
                                                                 count))
        else:
            stacked = _digits(x.to(dtype), digit_bits, count)
        out = layer.op["out"]
        cached = self._tables.get((out, "layer", dtype))
        if cached is None:
            _, (w_even, _), bias = self._weights[out]
            bias = torch.zeros(w_even.shape[0], dtype=torch.float64) if bias is None else \
                bias.double()
            scales = torch.tensor([float(1 << (k * digit_bits)) for k in range(count)],
                                  dtype=torch.float64)
            cached = self._tables[(out, "layer", dtype)] = (w_even.to(dtype), scales, bias)
        w, scales, bias = cached
        parts = _apply(layer, stacked, w)
        return parts.unflatten(0, (count, -1)), scales, bias

    def _digit_tables(self, layer: LayerPlan, dtype, digit_bits: int, count: int):
        key = (layer.op["out"], dtype)
        tables = self._tables.get(key)
        if tables is None:
            mask = (1 << digit_bits) - 1
            tables = self._tables[key] = torch.tensor(
                [[(abs(v) >> (k * digit_bits) & mask) * (1 if v >= 0 else -1)
                  for v in layer.x_table.ints] for k in range(count)], dtype=dtype)
        return tables

    def _sums(self, layer: LayerPlan, x_even, x_odd, w_even, w_odd):
        """(A, B) in int64 for the general case (sqrt2 parts, sums of 2^53 or more)."""
        def exact(x, w):
            dtype, digit_bits, count = _digit_plan(layer)
            parts = _apply(layer, _digits(x.to(dtype), digit_bits, count), w.to(dtype))
            parts = parts.view(count, -1, *parts.shape[1:]).to(torch.int64)
            return sum(torch.bitwise_left_shift(parts[k], k * digit_bits)
                       for k in range(count))

        zero = torch.zeros((), dtype=torch.int64)
        even = exact(x_even, w_even)
        odd = zero
        if x_odd is not None and w_odd is not None:
            even = even + 2 * exact(x_odd, w_odd)
        if w_odd is not None:
            odd = odd + exact(x_even, w_odd)
        if x_odd is not None:
            odd = odd + exact(x_odd, w_even)
        return even, odd

    # -- element-wise and pooling ---------------------------------------------------------
    def _as_acc(self, x: torch.Tensor, xv: Value) -> torch.Tensor:
        if not xv.is_codes:
            return x
        return torch.tensor(code_table(xv.fmt).ints, dtype=torch.int64)[x.long()]

    def _relu(self, x: torch.Tensor, xv: Value) -> torch.Tensor:
        if not xv.is_codes:
            return x.clamp_min(0)
        if not xv.fmt.signed:
            return x
        return torch.where(x >> xv.fmt.magnitude_bits == 1, torch.zeros_like(x), x)

    def _maxpool(self, x: torch.Tensor, xv: Value, op: dict, out_hw) -> torch.Tensor:
        if not xv.is_codes or not xv.fmt.signed:  # unsigned codes are ordered like values
            return _window_reduce(x, op, "max", out_hw)
        m = xv.fmt.magnitude_bits  # sign-magnitude codes: compare their order keys
        keys = torch.tensor(code_table(xv.fmt).keys, dtype=torch.int64)[x.long()]
        best = _window_reduce(keys, op, "max", out_hw)
        return torch.where(best < 0, (-best) | (1 << m), best).to(torch.uint8)

    def _add(self, op: dict, env: dict) -> torch.Tensor:
        values = self.plan.values
        out_exp = values[op["out"]].exponent
        total = None
        for name in op["in"]:
            x = self._as_acc(env[name], values[name])
            exponent = to_accumulator(values[name]).exponent
            x = _wide(x, values[op["out"]])
            x = torch.bitwise_left_shift(x, exponent - out_exp) if x.dtype == torch.int64 \
                else x * float(1 << (exponent - out_exp))
            total = x if total is None else total + x
        return total


def _digit_plan(layer: LayerPlan) -> tuple[torch.dtype, int, int]:
    """(dtype, k, digits): split x into base-2^k digits whose sums are exact in dtype.

    A float sum of integers is exact when every partial sum is below 2^24 (float32) or
    2^53 (float64) in magnitude, whatever the summation order; with fan_in * max|w|
    bounding the sum per unit of x, k follows. float32 (oneDNN's direct convolution;
    NNPACK, whose Winograd transforms round, is switched off) is used when it needs at most
    three digits, float64 otherwise.
    """
    per_x = layer.fan_in * max(layer.weight_table.max_int, 1)
    choices = {}
    for dtype, exact in ((torch.float32, FLOAT32_EXACT), (torch.float64, FLOAT64_EXACT)):
        digit_bits = (exact // per_x).bit_length() - 1
        if digit_bits >= 1:
            choices[dtype] = (digit_bits, -(-max(layer.x_bound, 1).bit_length() // digit_bits))
    if not choices:
        raise LqzError(f"{layer.op['name']}: fan-in too large for exact float64 sums")
    dtype = torch.float32 if choices.get(torch.float32, (0, 99))[1] <= 3 else torch.float64
    return (dtype, *choices[dtype])


def _digits(x: torch.Tensor, digit_bits: int, count: int) -> torch.Tensor:
    """Integer-valued x as ``count`` signed base-2^k digits, stacked on the batch axis."""
    if count == 1:
        return x
    magnitude, sign = x.abs(), x.sign()
    radix = float(1 << digit_bits)
    parts = []
    for _ in range(count):
        parts.append(sign * torch.remainder(magnitude, radix))
        magnitude = torch.floor(magnitude / radix)
    return torch.cat(parts)


def _expand_codes(codes: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """Codes -> their base-2^k digit values, stacked on the batch axis (one fused pass);
    4-D codes are channels-last and so is the result."""
    if codes.dim() == 4:
        nhwc = tables[:, codes.permute(0, 2, 3, 1).long()].flatten(0, 1)
        return nhwc.permute(0, 3, 1, 2)
    return tables[:, codes.long()].flatten(0, 1)


_finishers: dict = {}


def _finisher(kernel, keep: bool):
    """A function that recombines a layer's digit sums and encodes them with a format's
    exact kernel in one pass; with ``keep`` it also returns the sums (tracing). Each
    variant is its own function, so torch.compile specializes each once."""
    finish = _finishers.get((kernel, keep))
    if finish is None:
        if keep:
            def finish(parts, scales, bias, params, signed: bool):
                acc = _combine(parts, scales, bias)
                return kernel(acc, params, signed, True).to(torch.uint8), acc
        else:
            def finish(parts, scales, bias, params, signed: bool):
                acc = _combine(parts, scales, bias)
                return kernel(acc, params, signed, True).to(torch.uint8), None
        _finishers[(kernel, keep)] = finish
    return finish


def _combine(parts: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """sum_k parts[k] * 2^(k k') + bias, in float64 (exact: the plan bounds it by 2^53)."""
    shape = (-1,) + (1,) * (parts.dim() - 1)
    total = (parts.double() * scales.view(shape)).sum(0)
    return total + bias.view((1, -1) + (1,) * (total.dim() - 2))


def _apply(layer: LayerPlan, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    op = layer.op
    with torch.backends.nnpack.flags(enabled=False):
        if op["op"] == "linear":
            return F.linear(x, w)
        return F.conv2d(x, w, None, op["stride"], op["padding"], op["dilation"], op["groups"])


def _wide(x: torch.Tensor, result: Value) -> torch.Tensor:
    """x as int64 where the result's bound reaches 2^53 (float64 sums stop being exact)."""
    if x.is_floating_point() and result.bound >= FLOAT64_EXACT:
        return x.to(torch.int64)
    return x


def _encode_fast(x: torch.Tensor, fmt, xv: Value, thresholds: torch.Tensor) -> torch.Tensor:
    """Codes of accumulators. Exact float64 integers go through the format's own kernel at
    FSR shifted by the grid exponent (encode(a 2^L) at fsr F == encode(a) at fsr F - L):
    the float's exponent field is the leading-one position and the kernel's mantissa test
    the one integer comparison. Otherwise: the comparator bank (exact int64 thresholds)."""
    from logquant.formats import FSR_MAX, FSR_MIN

    if x.is_floating_point() and xv.denominator == 1 and FSR_MIN <= fmt.fsr - xv.exponent \
            <= FSR_MAX:
        return fmt.with_fsr(fmt.fsr - xv.exponent).encode(x).to(torch.uint8)
    return encode_accumulator(x.to(torch.int64), fmt, thresholds)


def _window_reduce(x: torch.Tensor, op: dict, how: str, out_hw: list[int]) -> torch.Tensor:
    """Exact max or sum over pooling windows (padding never wins a max and adds zero to a
    sum); ``out_hw`` is the pooled size the plan computed."""
    (kh, kw), (sh, sw), (ph, pw) = op["kernel"], op["stride"], op["padding"]
    dh, dw = op.get("dilation", [1, 1])
    n, c, h, w = x.shape
    ho, wo = out_hw
    lowest = -math.inf if x.is_floating_point() else torch.iinfo(x.dtype).min
    fill = lowest if how == "max" else 0
    hp = max(h + 2 * ph, (ho - 1) * sh + dh * (kh - 1) + 1)
    wp = max(w + 2 * pw, (wo - 1) * sw + dw * (kw - 1) + 1)
    if (hp, wp) == (h, w):
        xp = x
    else:
        xp = torch.full((n, c, hp, wp), fill, dtype=x.dtype)
        xp[:, :, ph:ph + h, pw:pw + w] = x
    result = None
    for i in range(kh):
        for j in range(kw):
            tap = xp[:, :, i * dh:i * dh + (ho - 1) * sh + 1:sh,
                     j * dw:j * dw + (wo - 1) * sw + 1:sw]
            if result is None:
                result = tap.clone()
            elif how == "max":
                torch.maximum(result, tap, out=result)
            else:
                result += tap
    return result
