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

import torch
import torch.nn.functional as F

from logquant.engine import literal as lit
from logquant.engine.arith import CodeTable, code_table, encode_accumulator
from logquant.engine.plan import (
    LayerPlan,
    Value,
    plan,
    relu6_limit,
    sqrt2_constant,
)
from logquant.lqz import LqzError, LqzModel

FLOAT64_EXACT = 1 << 53


@dataclasses.dataclass
class EngineResult:
    """Integer logits (value = logits * 2^exponent), and what ``trace`` asked for."""

    logits: torch.Tensor  # int64 (N, classes)
    exponent: int
    codes: dict[str, torch.Tensor]  # quantize op output -> uint8 codes (trace only)
    sums: dict[str, torch.Tensor]  # layer output -> int64 accumulators (trace only)
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
        self._keys = {}

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
        result = EngineResult(torch.empty(0), 0, {}, {}, {})
        values = self.plan.values
        for op in self.model.ops:
            kind, out = op["op"], op["out"]
            if kind == "input":
                offset = torch.tensor(op["offset"], dtype=torch.int64).view(1, -1, 1, 1)
                env[out] = images.long() - offset
                continue
            if kind == "add":
                env[out] = self._add(op, env)
                continue
            x, xv = env[op["in"]], values[op["in"]]
            if kind in ("conv", "linear"):
                env[out] = self._layer(out, x, result)
                if trace:
                    result.sums[out] = env[out]
            elif kind == "quantize":
                fmt, table = values[out].fmt, self.plan.quantizers[out]
                env[out] = (lit.encode(x, fmt, xv.exponent, xv.denominator, table)
                            if self.literal else encode_accumulator(x, fmt, table))
                if trace:
                    result.codes[out] = env[out]
            elif kind == "relu":
                env[out] = self._relu(x, xv)
            elif kind == "relu6":
                x = self._as_acc(x, xv)
                env[out] = x.clamp(0, relu6_limit(values[out]))
            elif kind == "flatten":
                env[out] = x.reshape(x.shape[0], -1)
            elif kind == "maxpool":
                env[out] = self._maxpool(x, xv, op, values[out].shape[1:])
            elif kind == "avgpool":
                env[out] = _window_reduce(self._as_acc(x, xv), op, "sum",
                                          values[out].shape[1:])
            elif kind == "global_avgpool":
                env[out] = self._as_acc(x, xv).sum((2, 3), keepdim=True)
            elif kind == "output":
                result.logits, result.exponent = x, xv.exponent
        return result

    # -- layers ---------------------------------------------------------------------------
    def _layer(self, out: str, x: torch.Tensor, result: EngineResult) -> torch.Tensor:
        layer = self.plan.layers[out]
        codes, (w_even, w_odd), bias = self._weights[out]
        if self.literal:
            even, odd = lit.layer_sums(layer, x, codes)
        else:
            if layer.x_table is None:
                x_even, x_odd = x.double(), None
            else:
                x_even, x_odd = _f64(layer.x_table, x)
            even, odd = self._sums(layer, x_even, x_odd, w_even, w_odd)
        if bias is not None:
            even = even + (bias.view(1, -1, 1, 1) if even.dim() == 4 else bias)
        if self.acc_bits is not None and layer.acc_bits > self.acc_bits:
            lo, hi = -(1 << (self.acc_bits - 1)), (1 << (self.acc_bits - 1)) - 1
            over = ((even < lo) | (even > hi)).sum() + ((odd < lo) | (odd > hi)).sum()
            result.overflows[layer.op["name"]] = result.overflows.get(layer.op["name"], 0) + \
                int(over)
            even, odd = even.clamp(lo, hi), odd.clamp(lo, hi)
        if not layer.sqrt2:
            return even
        p = layer.combine_bits  # A + B sqrt2, once per output, with p fraction bits
        return torch.bitwise_left_shift(even, p) + odd * sqrt2_constant(p)

    def _sums(self, layer: LayerPlan, x_even, x_odd, w_even, w_odd):
        def exact(x, w):
            return self._exact(layer, x, w)

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

    def _exact(self, layer: LayerPlan, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The exact integer sums of x * w: float64 while provably exact, else in digits."""
        op = layer.op

        def apply(inputs):
            if op["op"] == "linear":
                return F.linear(inputs, w).to(torch.int64)
            return F.conv2d(inputs, w, None, op["stride"], op["padding"], op["dilation"],
                            op["groups"]).to(torch.int64)

        per_x = layer.fan_in * max(layer.weight_table.max_int, 1)
        if per_x * layer.x_bound < FLOAT64_EXACT:
            return apply(x)
        digit_bits = (FLOAT64_EXACT // per_x).bit_length() - 1
        if digit_bits < 1:
            raise LqzError(f"{op['name']}: fan-in too large for exact float64 sums")
        magnitude, sign = x.abs(), x.sign()
        radix = float(1 << digit_bits)
        total, shift = None, 0
        while True:  # magnitude = sum_k digit_k * radix^k, each digit < radix
            digit = torch.remainder(magnitude, radix)
            part = torch.bitwise_left_shift(apply(sign * digit), shift)
            total = part if total is None else total + part
            magnitude = torch.floor(magnitude / radix)
            shift += digit_bits
            if not bool(magnitude.any()):
                return total

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
        if not xv.is_codes:
            return _window_reduce(x, op, "max", out_hw)
        m = xv.fmt.magnitude_bits  # max-pooling on codes: compare their order keys
        keys = torch.tensor(code_table(xv.fmt).keys, dtype=torch.int64)[x.long()]
        best = _window_reduce(keys, op, "max", out_hw)
        return torch.where(best < 0, (-best) | (1 << m), best).to(torch.uint8)

    def _add(self, op: dict, env: dict) -> torch.Tensor:
        values = self.plan.values
        out_exp = values[op["out"]].exponent
        total = None
        for name in op["in"]:
            x = self._as_acc(env[name], values[name])
            exponent = values[name].exponent if not values[name].is_codes else \
                code_table(values[name].fmt).lsb
            x = torch.bitwise_left_shift(x, exponent - out_exp)
            total = x if total is None else total + x
        return total


def _window_reduce(x: torch.Tensor, op: dict, how: str, out_hw: list[int]) -> torch.Tensor:
    """Exact max or sum over pooling windows of an int64 tensor (padding never wins a max
    and adds zero to a sum); ``out_hw`` is the pooled size the plan computed."""
    (kh, kw), (sh, sw), (ph, pw) = op["kernel"], op["stride"], op["padding"]
    dh, dw = op.get("dilation", [1, 1])
    n, c, h, w = x.shape
    ho, wo = out_hw
    fill = torch.iinfo(torch.int64).min if how == "max" else 0
    hp = max(h + 2 * ph, (ho - 1) * sh + dh * (kh - 1) + 1)
    wp = max(w + 2 * pw, (wo - 1) * sw + dw * (kw - 1) + 1)
    xp = torch.full((n, c, hp, wp), fill, dtype=torch.int64)
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
