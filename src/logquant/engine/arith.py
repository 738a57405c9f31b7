"""The engine's integer arithmetic: codes as shifts, and accumulators back to codes.

Everything here is exact integer math (Python ints for the constants, int64 tensors for the
data). A format's codes are integers on a fixed-point grid 2^lsb: a base-2 log code c >= 1
is the integer 1 << (c - 1), a linear code k is k itself. Base sqrt2 codes are an integer
(the even part) times sqrt2 or not (the parity). A product of two codes is therefore a
shift, and a layer's sum is an integer on the grid 2^(lsb_x + lsb_w).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from fractions import Fraction

import torch

from logquant.formats import Format, LinearFormat, LogFormat

ACC_LIMIT = 1 << 62  # |accumulator| < 2^62 in the engine (int64 with headroom)


def is_sqrt2(fmt: Format | None) -> bool:
    """Whether codes of ``fmt`` (None: pixels) carry sqrt2 parts (odd half-octave levels)."""
    return fmt is not None and fmt.family == "logsqrt2"


@dataclasses.dataclass(frozen=True)
class CodeTable:
    """Per code (all 2^bits, sign bit included): its signed integer on the grid, its
    sqrt2 parity (the value is ints * sqrt2 where odd), and its order key for max-pooling."""

    fmt: Format
    lsb: int
    ints: list[int]
    odd: list[bool]
    keys: list[int]

    @property
    def max_int(self) -> int:
        return max(abs(v) for v in self.ints)


@functools.cache
def code_table(fmt: Format) -> CodeTable:
    m = fmt.magnitude_bits
    mags, odd = fmt.integer_magnitudes()
    ints, keys = list(mags), list(range(1 << m))
    if fmt.signed:  # code 2^m is "negative zero": never produced, decodes to 0
        ints += [0] + [-v for v in mags[1:]]
        keys += [0] + [-c for c in range(1, 1 << m)]
        odd += odd
    return CodeTable(fmt, fmt.lsb, ints, odd, keys)


# ----------------------------------------------------------------------------------------
# Decision thresholds: accumulator integers -> magnitude codes


def _smallest(reached: Callable[[int], bool]) -> int:
    """Smallest integer a >= 0 with ``reached(a)`` (a monotone predicate)."""
    hi = 1
    while not reached(hi):
        hi *= 2
    lo = 0
    while lo < hi:
        mid = (lo + hi) // 2
        if reached(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _at_least_sqrt2_form(a: Fraction, alpha: Fraction, beta: Fraction) -> bool:
    """Exactly: a >= alpha + beta * sqrt2 (rationals)."""
    y = a - alpha
    if beta <= 0:
        return y >= 0 or y * y <= 2 * beta * beta
    return y > 0 and y * y >= 2 * beta * beta


def _boundary(fmt: Format, c: int) -> Callable[[Fraction], bool]:
    """Predicate value >= the boundary between magnitude codes c-1 and c (ties go up)."""
    if not fmt.is_log:
        edge = Fraction(2 * c - 1, 2) * Fraction(2) ** fmt.lsb
        return lambda v: v >= edge
    spo = fmt.steps_per_octave
    h = fmt.min_level_index + c - 1  # level c is 2^(h / spo)
    if fmt.rounding == "log":  # geometric midpoint: 2^((2h - 1) / (2 spo))
        return lambda v: v > 0 and _at_least_root_fraction(v, 2 * spo, 2 * h - 1)
    # nearest level by absolute difference: the arithmetic mean (half the smallest for c=1)
    def level(j: int) -> tuple[Fraction, Fraction]:  # 2^(j/spo) as alpha + beta sqrt2
        octave, odd = divmod(j, spo)
        p = Fraction(2) ** octave
        return (Fraction(0), p) if odd else (p, Fraction(0))

    hi_a, hi_b = level(h)
    lo_a, lo_b = level(h - 1) if c > 1 else (Fraction(0), Fraction(0))
    return lambda v: _at_least_sqrt2_form(v, (hi_a + lo_a) / 2, (hi_b + lo_b) / 2)


def _at_least_root_fraction(v: Fraction, k: int, q: int) -> bool:
    """Exactly: v >= 2^(q / k) for a positive rational v."""
    num, den = v.numerator**k, v.denominator**k
    return num >= den * 2**q if q >= 0 else num * 2**-q >= den


@functools.cache
def thresholds(fmt: Format, exponent: int, denominator: int = 1) -> list[int]:
    """t_c for c = 1 .. 2^m - 1: an accumulator a (value a * 2^exponent / denominator)
    gets magnitude code c exactly when t_c <= |a| < t_(c+1). Exact integers, capped at
    2^62, which no accumulator of the engine reaches."""
    unit = Fraction(2) ** exponent / denominator
    out = []
    for c in range(1, 1 << fmt.magnitude_bits):
        reached = _boundary(fmt, c)
        if reached(ACC_LIMIT * unit):
            out.append(max(1, _smallest(lambda a, r=reached: r(a * unit))))
        else:
            out.append(ACC_LIMIT)
    return out


def encode_accumulator(acc: torch.Tensor, fmt: Format, table: torch.Tensor) -> torch.Tensor:
    """Codes of int64 accumulators, given ``table = thresholds(...)`` as an int64 tensor:
    a bank of comparators (searchsorted), sign-magnitude; unsigned formats clip at zero."""
    mag = torch.searchsorted(table, acc.abs(), right=True)
    if fmt.signed:
        negative = (acc < 0) & (mag > 0)
        return (mag | (negative.long() << fmt.magnitude_bits)).to(torch.uint8)
    return torch.where(acc > 0, mag, 0).to(torch.uint8)


# ----------------------------------------------------------------------------------------
# The literal forms the hardware uses, one value at a time (reference path and tests)


def sqrt2_ceiling(n: int) -> int:
    """ceil(2^(n + 1/2)): the rounding threshold of the leading-one position n."""
    return math.isqrt(1 << (2 * n + 1)) + 1


def log2_code_of_integer(a: int, exponent: int, fmt: LogFormat) -> int:
    """Base-2 magnitude code of the value a * 2^exponent (a >= 0): the leading-one
    position n, plus one comparison for the rounding bit; no float log."""
    if a <= 0:
        return 0
    n = a.bit_length() - 1  # 2^n <= a < 2^(n+1)
    if fmt.rounding == "log":
        r = n + (a >= sqrt2_ceiling(n))  # round(log2 a): boundary 2^(n+1/2)
    else:
        r = n + (n >= 1 and (a >> (n - 1)) & 1 == 1)  # boundary 1.5 * 2^n
    emin = fmt.min_level_index
    r += exponent
    if fmt.rounding == "linear" and n + exponent == emin - 1:  # nearer 2^emin than zero
        r = emin
    if r < emin:
        return 0
    return min(r, fmt.max_level_index) - emin + 1


def linear_code_of_integer(a: int, exponent: int, fmt: LinearFormat) -> int:
    """Linear magnitude code of a * 2^exponent (a >= 0): a shift, round half up, saturate."""
    shift = fmt.lsb - exponent
    k = a << -shift if shift <= 0 else (a + (1 << (shift - 1))) >> shift
    return min(k, (1 << fmt.magnitude_bits) - 1)


def shift_product(x_code: int, w_code: int, x_fmt: LogFormat, w_fmt: LogFormat) -> int:
    """The product of two signed base-2 log codes as an integer on the grid
    2^(lsb_x + lsb_w): exponent addition, then one shift of 1, then the sign (XOR)."""
    mx, mw = x_fmt.magnitude_bits, w_fmt.magnitude_bits
    cx, cw = x_code & ((1 << mx) - 1), w_code & ((1 << mw) - 1)
    if cx == 0 or cw == 0:
        return 0
    negative = bool(x_fmt.signed and x_code >> mx & 1) ^ bool(w_fmt.signed and w_code >> mw & 1)
    value = 1 << ((cx - 1) + (cw - 1))  # exponent add: (emin_x+cx-1)+(emin_w+cw-1) - lsb
    return -value if negative else value
