"""The literal reference path: every product is one shift (or, for two linear operands, one
multiply) added into the accumulator, tap by tap; every accumulator becomes a log code by
its leading-one position and one comparison. Slow, obviously correct; the fast path must
agree with it bit for bit (tests/test_engine.py)."""

from __future__ import annotations

import functools

import torch

from logquant.engine.arith import CodeTable, code_table, sqrt2_ceiling
from logquant.engine.plan import LayerPlan
from logquant.formats import Format


@functools.cache
def _fields(fmt: Format) -> tuple[torch.Tensor, ...]:
    """Per code of ``fmt``: (integer, sign, exponent of the magnitude, parity, zero)."""
    table = code_table(fmt)
    mags = [abs(v) for v in table.ints]
    return (torch.tensor(table.ints), torch.tensor([v < 0 for v in table.ints]),
            torch.tensor([m.bit_length() - 1 if m else 0 for m in mags]),
            torch.tensor(table.odd), torch.tensor([m == 0 for m in mags]))


def _operand(table: CodeTable | None, x: torch.Tensor):
    """Split codes into (sign, exponent or integer, parity, zero); pixels are integers."""
    if table is None:
        return ("int", x.long())
    ints, sign, exps, odd, zero = _fields(table.fmt)
    idx = x.long()
    if not table.fmt.is_log:
        return ("int", ints[idx])
    return ("shift", sign[idx], exps[idx], odd[idx], zero[idx])


def _product(x, w) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One tap: (even part, sqrt2 part) of x * w on the layer's grid."""
    if x[0] == "shift" and w[0] == "shift":  # exponent addition, then one shift
        _, sx, ex, ox, zx = x
        _, sw, ew, ow, zw = w
        both_odd = (ox & ow).long()
        value = torch.bitwise_left_shift(torch.ones_like(ex), ex + ew + both_odd)
        value = torch.where(sx ^ sw, -value, value).masked_fill(zx | zw, 0)
        odd = ox ^ ow
        return value.masked_fill(odd, 0), value.masked_fill(~odd, 0)
    if x[0] == "int" and w[0] == "int":  # linear x linear: the one real multiply
        return x[1] * w[1], None
    ints, (_, sign, exp, odd, zero) = (x[1], w) if x[0] == "int" else (w[1], x)
    value = torch.bitwise_left_shift(ints, exp)  # integer times a power of two: a shift
    value = torch.where(sign, -value, value).masked_fill(zero, 0)
    return value.masked_fill(odd, 0), value.masked_fill(~odd, 0)


def layer_sums(layer: LayerPlan, x: torch.Tensor, w_codes: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B): the exact even and sqrt2 sums of a conv/linear layer, bias not included."""
    op = layer.op
    if op["op"] == "linear":
        x, w_codes = x[:, :, None, None], w_codes[:, :, None, None]
        stride, padding, dilation, groups = (1, 1), (0, 0), (1, 1), 1
    else:
        stride, padding, dilation, groups = op["stride"], op["padding"], op["dilation"], \
            op["groups"]
    n, cin, h, w = x.shape
    cout, cin_g, kh, kw = w_codes.shape
    xp = torch.zeros((n, cin, h + 2 * padding[0], w + 2 * padding[1]), dtype=x.dtype)
    xp[:, :, padding[0]:padding[0] + h, padding[1]:padding[1] + w] = x  # code 0 is zero
    ho = (xp.shape[2] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (xp.shape[3] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    even = torch.zeros((n, cout, ho, wo), dtype=torch.int64)
    odd = torch.zeros_like(even)
    per_group = cout // groups
    for g in range(groups):
        outs = slice(g * per_group, (g + 1) * per_group)
        for ci in range(cin_g):
            for i in range(kh):
                for j in range(kw):
                    r, c = i * dilation[0], j * dilation[1]
                    taps = xp[:, g * cin_g + ci, r:r + (ho - 1) * stride[0] + 1:stride[0],
                              c:c + (wo - 1) * stride[1] + 1:stride[1]]
                    xo = _operand(layer.x_table, taps[:, None])
                    wo_ = _operand(layer.weight_table, w_codes[outs, ci, i, j][None, :, None,
                                                                               None])
                    e, o = _product(xo, wo_)
                    even[:, outs] += e
                    if o is not None:
                        odd[:, outs] += o
    if op["op"] == "linear":
        return even[:, :, 0, 0], odd[:, :, 0, 0]
    return even, odd


def leading_one(a: torch.Tensor) -> torch.Tensor:
    """floor(log2 a) for positive int64 a, as a priority encoder would give it."""
    n = torch.zeros_like(a)
    for k in range(1, 63):
        n += (a >= (1 << k)).long()
    return n


def encode(acc: torch.Tensor, fmt: Format, exponent: int, denominator: int,
           thresholds: torch.Tensor) -> torch.Tensor:
    """Codes of accumulators the way the hardware forms them (see module docstring)."""
    mag_acc = acc.abs()
    m = fmt.magnitude_bits
    if denominator == 1 and fmt.family == "log2":
        n = leading_one(mag_acc.clamp_min(1))
        if fmt.rounding == "log":  # one comparison: a >= ceil(2^(n + 1/2))
            ceilings = torch.tensor([sqrt2_ceiling(k) for k in range(63)])
            r = n + (mag_acc >= ceilings[n]).long()
        else:  # the bit below the leading one decides 1.5 * 2^n
            r = n + ((n >= 1) & (torch.bitwise_right_shift(mag_acc, (n - 1).clamp_min(0)) & 1
                                 == 1)).long()
            r = torch.where(n + exponent == fmt.min_level_index - 1, r.clamp_min(n + 1), r)
        r = r + exponent
        mag = (r.clamp(max=fmt.max_level_index) - fmt.min_level_index + 1).clamp_min(0)
        mag = torch.where((r < fmt.min_level_index) | (mag_acc == 0), 0, mag)
    elif denominator == 1 and fmt.family == "linear":
        shift = fmt.lsb - exponent
        if shift <= 0:  # saturate before the shift can overflow
            top = (1 << m) - 1
            mag = torch.where(mag_acc > top >> -shift, top,
                              torch.bitwise_left_shift(mag_acc.clamp(max=top), -shift))
        else:  # round half up, one shift
            mag = torch.bitwise_right_shift(mag_acc + (1 << (shift - 1)), shift)
        mag = mag.clamp(max=(1 << m) - 1)
    else:  # comparator bank against the exact thresholds
        mag = (mag_acc[..., None] >= thresholds).sum(-1)
    if fmt.signed:
        return torch.where((acc < 0) & (mag > 0), mag | (1 << m), mag).to(torch.uint8)
    return torch.where(acc > 0, mag, 0).to(torch.uint8)
