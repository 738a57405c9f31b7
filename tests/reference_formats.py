"""A slow, independent reference for the number formats: exact decimal arithmetic, per scalar.

It shares no code with logquant.formats: levels and decision boundaries are computed from
docs/FORMATS.md section 1 directly (geometric means for log rounding, arithmetic means for linear
rounding) with 1200 significant digits (every power of two exact), and each input is
located by bisection.
"""

from __future__ import annotations

import bisect
import math
from decimal import Decimal, localcontext

PREC = 1200  # enough digits for every power of two the formats reach to be exact


def _sqrt2() -> Decimal:
    with localcontext() as ctx:
        ctx.prec = PREC
        return Decimal(2).sqrt()


class RefFormat:
    """Reference codec for one format; ``kind`` is "log2", "logsqrt2" or "linear"."""

    def __init__(self, kind: str, bits: int, fsr: int, signed: bool, rounding: str = "log"):
        self.kind, self.bits, self.fsr, self.signed, self.rounding = (
            kind, bits, fsr, signed, rounding)
        m = bits - (1 if signed else 0)
        self.m = m
        with localcontext() as ctx:
            ctx.prec = PREC
            if kind == "linear":
                step = Decimal(2) ** (fsr - m)
                self.mags = [step * k for k in range(2**m)]  # includes zero
                bounds = [(a + b) / 2 for a, b in zip(self.mags, self.mags[1:])]
                self.ties_up = True
            else:
                if kind == "log2":
                    exps = [Decimal(fsr - 2**m + 1 + i) for i in range(2**m - 1)]
                    ratio = Decimal(2)
                else:
                    exps = [Decimal(2 * fsr - 2**m + 1 + i) / 2 for i in range(2**m - 1)]
                    ratio = _sqrt2()
                nonzero = [_pow2(e) for e in exps]
                self.mags = [Decimal(0)] + nonzero
                if rounding == "log":
                    bounds = [nonzero[0] / ratio.sqrt()]  # 2^(emin - 1/2) (base sqrt2: 1/4)
                    bounds += [(a * b).sqrt() for a, b in zip(nonzero, nonzero[1:])]
                else:
                    bounds = [nonzero[0] / 2]
                    bounds += [(a + b) / 2 for a, b in zip(nonzero, nonzero[1:])]
            self.bounds = bounds

    def magnitude_index(self, mag: Decimal) -> int:
        """Index into self.mags of the level |x| = mag rounds to (ties go up)."""
        return bisect.bisect_right(self.bounds, mag)

    def encode(self, x: float) -> int:
        if math.isnan(x):
            raise ValueError("nan")
        negative = x < 0
        if math.isinf(x):
            index = len(self.mags) - 1
        else:
            with localcontext() as ctx:
                ctx.prec = PREC
                index = self.magnitude_index(abs(Decimal(x)))
        if negative and not self.signed:
            return 0
        if negative and index:
            return index | (1 << self.m)
        return index

    def decode(self, code: int) -> float:
        """Nearest float64 of the level (the caller casts to float32 where needed)."""
        index = code & ((1 << self.m) - 1)
        value = float(self.mags[index])
        return -value if (code >> self.m) and self.signed and index else value

    def quantize(self, x: float) -> float:
        if math.isnan(x):
            return math.nan
        return self.decode(self.encode(x))


def _pow2(exponent: Decimal) -> Decimal:
    whole = int(exponent.to_integral_value(rounding="ROUND_FLOOR"))
    frac = exponent - whole
    value = Decimal(2) ** whole
    return value * _sqrt2() if frac else value
