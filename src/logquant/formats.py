"""Exact log and linear number formats (docs/FORMATS.md section 1; Miyashita et al. 2016).

Every rounding decision is made on the float's bit pattern with integer comparisons against
mantissa thresholds derived in exact integer arithmetic, so values next to the irrational
boundaries 2^(k+1/2) (or 2^(k+1/4), ...) can never misround the way a float ``log2`` can.
Large tensors go through a ``torch.compile``-fused kernel (one memory pass); small ones and
``LOGQUANT_COMPILE=0`` use the identical eager code. Exporters (ONNX, torch.export,
torch.jit.trace) cannot handle bit views, so while exporting ``quantize`` runs a portable
kernel instead: a binary search over float thresholds derived from the bit kernel, with
bit-identical results.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from collections.abc import Callable, Iterator
from functools import cache, partial
from typing import Literal

import torch

from logquant.compiled import compile_enabled, fused
from logquant.errors import LogquantError

BITS_MIN, BITS_MAX = 1, 8
FSR_MIN, FSR_MAX = -64, 64
_SQRT2_F64 = math.sqrt(2.0)


class FormatError(LogquantError):
    """An invalid format specification or an input a format cannot encode."""


# ----------------------------------------------------------------------------------------
# Float layouts and exact mantissa thresholds


@dataclasses.dataclass(frozen=True)
class _Layout:
    float_dtype: torch.dtype
    int_dtype: torch.dtype
    mant_bits: int  # p: stored mantissa bits
    bias: int  # exponent bias; normal exponents are 1 - bias .. bias

    def bits(self, exponent: int, mantissa: int = 0) -> int:
        """Bit pattern of the positive normal float 2^exponent * (1 + mantissa / 2^p)."""
        return ((exponent + self.bias) << self.mant_bits) | mantissa

    def is_normal(self, exponent: int) -> bool:
        return 1 - self.bias <= exponent <= self.bias


F32 = _Layout(torch.float32, torch.int32, 23, 127)
F64 = _Layout(torch.float64, torch.int64, 52, 1023)


def _first_mantissa(p: int, reached: Callable[[int], bool]) -> int:
    """Smallest mantissa m in [0, 2^p) whose significand s = 2^p + m satisfies ``reached(s)``.

    ``reached`` is a monotone integer predicate, so the threshold is exact (no float math).
    """
    lo, hi = 0, 1 << p
    while lo < hi:
        mid = (lo + hi) // 2
        if reached((1 << p) + mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _thresholds(p: int) -> dict[str, int]:
    """Mantissa thresholds of one binade [1, 2), as exact integers for a p-bit mantissa."""
    one = 1 << p
    return {
        "sqrt2": _first_mantissa(p, lambda s: s * s >= 2 * one * one),  # 1.41421...
        "root4_2": _first_mantissa(p, lambda s: s**4 >= 2 * one**4),  # 2^(1/4)
        "root4_8": _first_mantissa(p, lambda s: s**4 >= 8 * one**4),  # 2^(3/4)
        "1.5": one >> 1,  # exact midpoint, ties go up (>=)
        "mid_1_sqrt2": _first_mantissa(p, lambda s: (2 * s - one) ** 2 >= 2 * one * one),
        "mid_sqrt2_2": _first_mantissa(p, lambda s: (2 * (s - one)) ** 2 >= 2 * one * one),
        # mantissa of the float nearest to sqrt(2), used for odd half-octave levels
        "sqrt2_level": round(_SQRT2_F64 * one) - one,
    }


_THRESHOLDS = {F32: _thresholds(F32.mant_bits), F64: _thresholds(F64.mant_bits)}


# ----------------------------------------------------------------------------------------
# Kernels: pure tensor functions on bit patterns; compiled for large inputs


# Index of each constant in a log format's params tensor (one int tensor per float layout;
# constants travel as tensor values, not Python ints, so torch.compile never recompiles or
# specializes on them).
T_MID, T_UP, SQRT2_MANT, ZERO, LOWEST, HIGHEST, PER_OCTAVE, OFFSET, SIGN_CODE, INF, \
    MANT_BITS, MANT_MASK, ONE_OCTAVE, SIGN_BIT, ABS_MASK = range(15)


def _log_level_bits(a: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Bit pattern of the level that the non-negative float bit pattern ``a`` rounds to.

    Within a binade [2^E, 2^(E+1)) a mantissa >= T_UP rounds up to 2^(E+1), one >= T_MID to
    the half-octave level sqrt(2)*2^E (base sqrt2 only; base 2 has T_MID == T_UP), else down
    to 2^E; then the result is clamped to the format's levels and flushed below ZERO.
    """
    mant = a & params[MANT_MASK]
    up = torch.where(mant >= params[T_UP], params[ONE_OCTAVE],
                     torch.where(mant >= params[T_MID], params[SQRT2_MANT], 0))
    level = torch.clamp((a - mant) + up, params[LOWEST], params[HIGHEST])
    return torch.where(a < params[ZERO], 0, level)


def _log_kernel(x: torch.Tensor, params: torch.Tensor, signed: bool, encode: bool):
    """Quantize (float out) or encode (integer codes out) ``x`` in a log format."""
    bits = x.view(params.dtype)
    a = bits & params[ABS_MASK]
    level = _log_level_bits(a, params)
    negative = bits < 0
    if encode:
        odd = ((level & params[MANT_MASK]) != 0).to(params.dtype)
        octave = torch.bitwise_right_shift(level, params[MANT_BITS])
        code = torch.where(level == 0, 0, params[PER_OCTAVE] * octave + odd - params[OFFSET])
        if signed:
            return torch.where(negative & (code != 0), code | params[SIGN_CODE], code)
        return torch.where(negative, 0, code)
    if signed:
        out = torch.where(level == 0, 0, level | (bits & params[SIGN_BIT]))
    else:
        out = torch.where(negative, 0, level)
    out = torch.where(a > params[INF], a, out)  # NaN in, NaN out
    return out.view(x.dtype)


def _linear_kernel(x: torch.Tensor, params: torch.Tensor, signed: bool, encode: bool):
    """Round to the nearest multiple of step (ties up), saturating at kmax steps.

    params = (1 / step, step, kmax) in x's dtype; step is a power of two, so scaling is exact.
    """
    y = x.abs() if signed else x
    k = torch.clamp(y * params[0], min=0)
    k = torch.minimum(k, params[2])  # NaN stays NaN
    whole = torch.floor(k)
    k = whole + (k - whole >= 0.5).to(k.dtype)  # k - whole is exact, so ties are exact
    if encode:
        code = k.to(torch.int32)
        if signed:  # the sign bit sits just above the magnitude bits: code kmax + 1
            sign_code = params[2].to(torch.int32) + 1
            return torch.where((x < 0) & (code != 0), code | sign_code, code)
        return code
    out = k * params[1]
    if signed:
        out = torch.where((x < 0) & (k > 0), -out, out)  # zero keeps sign 0, never -0.0
    return out


_COMPILE_MIN_NUMEL = 1 << 16


def _write_into(kernel: Callable) -> Callable:
    """``kernel`` storing its result into ``out``: fused, this writes ``out`` directly."""

    def into(x: torch.Tensor, *args, out: torch.Tensor) -> torch.Tensor:
        out.copy_(kernel(x, *args))
        return out

    into.__name__ = f"{kernel.__name__}_into"
    return into


_INTO = {}


def _run(kernel: Callable, x: torch.Tensor, *args, out: torch.Tensor | None = None):
    """Run ``kernel`` fused by torch.compile for large tensors, eagerly otherwise.

    Both paths execute the same integer code, so results are bit-identical (tested). With
    ``out`` the result is written into that tensor (same shape and dtype as the result).
    """
    if x.numel() < _COMPILE_MIN_NUMEL or not compile_enabled():
        result = kernel(x, *args)
        return result if out is None else out.copy_(result)
    if out is None:
        return fused(kernel, x.reshape(-1), *args).view(x.shape)
    into = _INTO.get(kernel)
    if into is None:
        into = _INTO[kernel] = _write_into(kernel)
    fused(into, x.reshape(-1), *args, out=out.view(-1))
    return out


# ----------------------------------------------------------------------------------------
# Portable kernel: no bit views, so that ONNX and torch.export can trace it


_torch_exporting = getattr(torch.compiler, "is_exporting", lambda: False)  # torch >= 2.6


def is_exporting() -> bool:
    """True while torch.export, an ONNX exporter or torch.jit.trace is tracing."""
    return _torch_exporting() or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()


def _portable_kernel(x: torch.Tensor, thresholds: tuple[float, ...],
                     table: tuple[float, ...]) -> torch.Tensor:
    """Quantize by table lookup: index i = how many ``thresholds`` |x| reaches, found by a
    branch-free binary search (2^k thresholds, ascending, entry 0 unused, +inf padded);
    ``table`` holds the results for x >= 0 in its first 2^k entries, for x < 0 after them."""
    size = len(thresholds)
    thr = torch.tensor(thresholds, dtype=x.dtype, device=x.device)
    a = x.abs().reshape(-1)  # 1-D for index_select: CPU advanced indexing is ~1000x slower
    index = torch.zeros_like(a, dtype=torch.int64)
    step = size // 2
    while step:
        index = torch.where(a >= thr.index_select(0, index + step), index + step, index)
        step //= 2
    index = torch.where(x.reshape(-1) < 0, index + size, index)
    out = torch.tensor(table, dtype=x.dtype, device=x.device).index_select(0, index)
    return torch.where(torch.isnan(a), a, out).reshape(x.shape)  # NaN stays NaN, sign cleared


@contextlib.contextmanager
def _real_tensors() -> Iterator[None]:
    """Run eagerly on real tensors even inside an exporter's trace (fake tensors, proxy
    modes, the jit tracer), so that tables derived there are plain Python constants."""
    state = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)
    try:
        with torch.utils._python_dispatch._disable_current_modes():
            yield
    finally:
        torch._C._set_tracing_state(state)


def _first_reaching(quantize: Callable, targets: torch.Tensor) -> torch.Tensor:
    """Bit patterns of the smallest non-negative floats x (of targets' dtype) with
    quantize(x) >= target: bisection over bit patterns, exact since quantize is monotone."""
    lay = F64 if targets.dtype == torch.float64 else F32
    lo = torch.zeros_like(targets, dtype=torch.int64)
    hi = torch.full_like(lo, lay.bits(lay.bias + 1))  # +inf
    while bool((lo < hi).any()):
        mid = lo + (hi - lo) // 2
        reached = quantize(mid.to(lay.int_dtype).view(lay.float_dtype)) >= targets
        hi, lo = torch.where(reached, mid, hi), torch.where(reached, lo, mid + 1)
    return lo.to(lay.int_dtype)


def _portable_tables(fmt: Format, dtype: torch.dtype) -> tuple[tuple[float, ...], ...]:
    """The cached tables; dynamo (strict torch.export) calls this and takes the result as a
    constant instead of tracing the derivation."""
    return _derive_portable_tables(fmt, dtype)


# what torch.compiler.assume_constant_result does, without importing torch._dynamo (3 s)
_portable_tables._dynamo_marked_constant = True


@cache
def _derive_portable_tables(fmt: Format, dtype: torch.dtype) -> tuple[tuple[float, ...], ...]:
    """(thresholds, table) for ``_portable_kernel``, taken from the bit kernel itself: each
    threshold is the smallest float of ``dtype`` reaching the next output value, each table
    entry the bit kernel's output there (and at its negation), so both kernels agree."""
    with _real_tensors():
        quantize = partial(fmt._apply, encode=False)
        probes = torch.tensor([*fmt.magnitudes(), math.inf], dtype=torch.float64).to(dtype)
        values = set(quantize(probes).tolist()) - {0.0}
        while True:  # add output values until none lies between two found thresholds
            first = _first_reaching(quantize, torch.tensor(sorted(values), dtype=dtype))
            found = torch.cat([quantize(first.view(dtype)), quantize((first - 1).view(dtype))])
            new = set(found.tolist()) - values - {0.0}
            if not new:
                break
            values |= new
        size = 1 << len(values).bit_length()  # room for zero plus one entry per value
        thresholds = torch.cat([first.new_zeros(1), first]).view(dtype)
        padding = size - thresholds.numel()
        table = [torch.cat([q, q[-1:].expand(padding)])
                 for q in (quantize(thresholds), quantize(-thresholds))]
        thresholds = torch.cat([thresholds, thresholds.new_full((padding,), math.inf)])
        return tuple(thresholds.tolist()), tuple(torch.cat(table).tolist())


# ----------------------------------------------------------------------------------------
# The formats


def _check_int(name: str, value, lo: int, hi: int, spec: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise FormatError(f"{spec}: {name} must be an integer in {lo}..{hi}, got {value!r}")
    if not lo <= value <= hi:
        raise FormatError(f"{spec}: {name} must be in {lo}..{hi}, got {value}")
    return value


@dataclasses.dataclass(frozen=True)
class _Format:
    """Shared behaviour of the formats: validation, codes, lookup-table decode, names."""

    bits: int
    fsr: int | None = None
    signed: bool = dataclasses.field(default=False, kw_only=True)

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits", _check_int("bits", self.bits, BITS_MIN, BITS_MAX,
                                                    self.__class__.__name__))
        if self.signed and self.bits < 2:
            raise FormatError(f"{self.name}: a signed format needs at least 2 bits "
                              "(one sign bit plus magnitude)")
        if self.fsr is not None:
            object.__setattr__(self, "fsr", _check_int("fsr", self.fsr, FSR_MIN, FSR_MAX,
                                                       self.name))

    # -- description ------------------------------------------------------------------
    @property
    def magnitude_bits(self) -> int:
        """m: the stored bits that are not the sign bit."""
        return self.bits - int(self.signed)

    @property
    def num_codes(self) -> int:
        return 1 << self.bits

    @property
    def family(self) -> str:
        """One of FAMILIES ("linear", "log2", "logsqrt2"): the kind of levels, rounding and
        sign aside; sweep rows, reports and plots group formats by it."""
        raise NotImplementedError

    @property
    def is_log(self) -> bool:
        """Whether the nonzero levels are powers of 2 (or of sqrt2), so products are shifts."""
        return self.family != "linear"

    @property
    def lsb(self) -> int:
        """Exponent of the levels' integer grid: every magnitude is an integer times 2^lsb
        (times sqrt2 for odd half-octave levels); the engine computes on this grid."""
        raise NotImplementedError

    def integer_magnitudes(self) -> tuple[list[int], list[bool]]:
        """(n, odd), one entry per magnitude code, code 0 (zero) first: magnitude c is
        n[c] * 2^lsb, times sqrt2 where odd[c]. The engine's integer view; needs an FSR."""
        raise NotImplementedError

    def with_fsr(self, fsr: int | None):
        return dataclasses.replace(self, fsr=fsr)

    def with_signed(self, signed: bool):
        return dataclasses.replace(self, signed=signed)

    def __str__(self) -> str:
        return self.name

    def _fixed_fsr(self) -> int:
        if self.fsr is None:
            raise FormatError(f"{self.name}: no FSR set; give one ('{self.name}@fsr0') "
                              "or calibrate it (quantize_model does)")
        return self.fsr

    # -- codes ------------------------------------------------------------------------
    def magnitudes(self) -> list[float]:
        """The 2^m magnitudes in code order (code 0 = zero), as exact float64 values."""
        raise NotImplementedError

    def levels(self) -> torch.Tensor:
        """All representable values, ascending, float64."""
        mags = self.magnitudes()
        values = sorted(set(mags) | ({-v for v in mags} if self.signed else set()))
        return torch.tensor(values, dtype=torch.float64)

    @property
    def max_value(self) -> float:
        """The largest representable magnitude (the STE's saturation point)."""
        return self.magnitudes()[-1]

    def _table(self, dtype: torch.dtype, device) -> torch.Tensor:
        mags = torch.tensor(self.magnitudes(), dtype=torch.float64)
        if self.signed:  # code 2^m ("negative zero") is never produced; it decodes to 0
            mags = torch.cat([mags, torch.cat([mags.new_zeros(1), -mags[1:]])])
        return mags.to(dtype=dtype, device=device)

    def decode(self, codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Values of integer ``codes`` (sign bit at bit ``bits-1`` for signed formats).

        Each value is the ``dtype`` number nearest the exact level; levels below the dtype's
        range decode to 0 in that dtype (in float32: log8, and log7 / log8s / logsqrt2-8 at
        FSR -23 and below; docs/FORMATS.md section 3).
        """
        if codes.is_floating_point() or codes.is_complex():
            raise FormatError(f"{self.name}: decode needs integer codes, got {codes.dtype}")
        idx = codes.long()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.num_codes):
            raise FormatError(f"{self.name}: codes must lie in 0..{self.num_codes - 1}, got "
                              f"{int(idx.min())}..{int(idx.max())}")
        return self._table(dtype, codes.device)[idx]

    def encode(self, x: torch.Tensor, name: str = "tensor") -> torch.Tensor:
        """Integer codes (uint8) of ``x``; NaN cannot be encoded and raises, naming ``name``."""
        x = _as_float(x, self.name)
        if torch.isnan(x).any():
            raise FormatError(f"{self.name}: cannot encode NaN (found in {name})")
        return self._apply(x, encode=True).to(torch.uint8)

    def quantize(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """decode(encode(x)) without the codes: the float simulation; NaN stays NaN.

        ``out`` (contiguous, x's shape and dtype) receives the result without a new
        allocation; inference reuses such buffers, since fresh large tensors cost page faults.
        """
        x = _as_float(x, self.name)
        if out is not None and (out.shape != x.shape or out.dtype != x.dtype
                                or not out.is_contiguous()):
            raise FormatError(f"{self.name}: out must be contiguous with shape "
                              f"{tuple(x.shape)} and dtype {x.dtype}")
        if is_exporting():
            result = self.quantize_portable(x)
            return result if out is None else out.copy_(result)
        if x.dtype in (torch.float32, torch.float64):
            return self._apply(x, encode=False, out=out)
        result = self._apply(x.float(), encode=False).to(x.dtype)
        return result if out is None else out.copy_(result)

    def quantize_portable(self, x: torch.Tensor) -> torch.Tensor:
        """``quantize`` bit for bit (NaN gives NaN, as |x|), built only from comparisons,
        ``where`` and table lookups: the kernel ``quantize`` uses while exporting to ONNX or
        torch.export, which cannot trace the bit views of the faster bit-pattern kernel."""
        x = _as_float(x, self.name)
        work = x if x.dtype in (torch.float32, torch.float64) else x.float()
        thresholds, table = _portable_tables(self, work.dtype)
        return _portable_kernel(work, thresholds, table).to(x.dtype)

    def _apply(self, x: torch.Tensor, encode: bool,
               out: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError


def _as_float(x, spec: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x, dtype=torch.float32)
    if not x.is_floating_point():
        raise FormatError(f"{spec}: expected a floating-point tensor, got {x.dtype}")
    return x.contiguous()


@dataclasses.dataclass(frozen=True)
class LogFormat(_Format):
    """Zero plus 2^m - 1 powers of 2 (base "2") or of sqrt(2) (base "sqrt2") below 2^fsr.

    Code c >= 1 is 2^(emin + c - 1) with emin = fsr - 2^m + 1 (base sqrt2: 2^(h/2),
    h = 2 fsr - 2^m + c). "log" rounding rounds log2|x| (boundary 2^(k+1/2)); "linear"
    rounding picks the nearest level by absolute difference (ties to the larger).
    """

    base: Literal["2", "sqrt2"] = dataclasses.field(default="2", kw_only=True)
    rounding: Literal["log", "linear"] = dataclasses.field(default="log", kw_only=True)

    def __post_init__(self) -> None:
        if self.base not in ("2", "sqrt2"):
            raise FormatError(f"LogFormat: base must be '2' or 'sqrt2', got {self.base!r}")
        if self.rounding not in ("log", "linear"):
            raise FormatError(f"LogFormat: rounding must be 'log' or 'linear', "
                              f"got {self.rounding!r}")
        super().__post_init__()
        # kernel constants, computed once here rather than lazily: a lazy cached_property
        # takes a lock that torch.compile / torch.export cannot trace (a graph break)
        object.__setattr__(self, "_params", None if self.fsr is None else {
            lay: self._layout_params(lay) for lay in (F32, F64)})

    @property
    def name(self) -> str:
        stem = "logsqrt2-" if self.base == "sqrt2" else "log"
        text = f"{stem}{self.bits}{'s' if self.signed else ''}"
        if self.rounding == "linear":
            text += "-linround"
        return text if self.fsr is None else f"{text}@fsr{self.fsr}"

    @property
    def steps_per_octave(self) -> int:
        return 2 if self.base == "sqrt2" else 1

    @property
    def min_level_index(self) -> int:
        """Exponent of the smallest level in units of 1/steps_per_octave octaves."""
        return self.steps_per_octave * self._fixed_fsr() - (1 << self.magnitude_bits) + 1

    @property
    def max_level_index(self) -> int:
        """Exponent of the largest level in units of 1/steps_per_octave octaves (emax for
        base 2, hmax for base sqrt2): the level just below 2^fsr."""
        return self.steps_per_octave * self._fixed_fsr() - 1

    @property
    def family(self) -> str:
        return "logsqrt2" if self.base == "sqrt2" else "log2"

    @property
    def lsb(self) -> int:
        """emin for base 2; floor(hmin / 2) for base sqrt2 (odd levels carry the sqrt2)."""
        return self.min_level_index // self.steps_per_octave

    def integer_magnitudes(self) -> tuple[list[int], list[bool]]:
        ints, odd = [0], [False]
        for h in range(self.min_level_index, self.max_level_index + 1):
            octave, parity = divmod(h, self.steps_per_octave)
            ints.append(1 << (octave - self.lsb))
            odd.append(parity == 1)
        return ints, odd

    def magnitudes(self) -> list[float]:
        lo, spo = self.min_level_index, self.steps_per_octave
        mags = [0.0]
        for h in range(lo, lo + (1 << self.magnitude_bits) - 1):
            octave, odd = divmod(h, spo)
            mags.append(math.ldexp(_SQRT2_F64 if odd else 1.0, octave))
        return mags

    def _layout_params(self, lay: _Layout) -> torch.Tensor | None:
        """Kernel constants for one float layout, or None if its normal range is too small."""
        t = _THRESHOLDS[lay]
        spo, hmin = self.steps_per_octave, self.min_level_index
        hmax = hmin + (1 << self.magnitude_bits) - 2
        if spo == 1:
            t_up = t["sqrt2"] if self.rounding == "log" else t["1.5"]
            t_mid = t_up
            zero = (hmin - 1, t["sqrt2"] if self.rounding == "log" else 0)
        elif self.rounding == "log":
            t_mid, t_up = t["root4_2"], t["root4_8"]
            j, odd = divmod(hmin, 2)
            zero = (j, t["root4_2"]) if odd else (j - 1, t["root4_8"])
        else:
            t_mid, t_up = t["mid_1_sqrt2"], t["mid_sqrt2_2"]
            j, odd = divmod(hmin, 2)
            zero = (j - 1, t["sqrt2"]) if odd else (j - 1, 0)

        def level_bits(h: int) -> tuple[int, int]:
            octave, odd = divmod(h, spo)
            return octave, t["sqrt2_level"] if odd else 0

        lowest, highest = level_bits(hmin), level_bits(hmax)
        if not (lay.is_normal(zero[0]) and lay.is_normal(highest[0])):
            return None
        # code = per_octave * (level >> p) + odd - offset
        offset = spo * lay.bias + hmin - 1
        info = torch.iinfo(lay.int_dtype)
        p = lay.mant_bits
        values = [t_mid, t_up, t["sqrt2_level"], lay.bits(*zero), lay.bits(*lowest),
                  lay.bits(*highest), spo, offset, 1 << self.magnitude_bits,
                  lay.bits(lay.bias + 1), p, (1 << p) - 1, 1 << p, info.min, info.max]
        return torch.tensor(values, dtype=lay.int_dtype)

    def kernel(self, dtype: torch.dtype = torch.float64) -> tuple[Callable, torch.Tensor]:
        """(fn, params) with ``fn(x, params, signed, encode)`` this format's exact
        elementwise kernel for ``x`` of ``dtype``: for fusing into larger compiled code."""
        self._fixed_fsr()
        params = self._params[F64 if dtype == torch.float64 else F32]
        if params is None or dtype not in (torch.float32, torch.float64):
            raise FormatError(f"{self.name}: no {dtype} kernel for these levels")
        return _log_kernel, params

    def _apply(self, x: torch.Tensor, encode: bool,
               out: torch.Tensor | None = None) -> torch.Tensor:
        self._fixed_fsr()
        lay = F64 if x.dtype == torch.float64 or self._params[F32] is None else F32
        params = self._params[lay]
        if params is None:
            raise FormatError(f"{self.name}: levels outside the float64 range")
        params = params.to(x.device)
        if lay.float_dtype == x.dtype:
            return _run(_log_kernel, x, params, self.signed, encode, out=out)
        result = _run(_log_kernel, x.to(lay.float_dtype), params, self.signed, encode)
        result = result if encode else result.to(x.dtype)
        return result if out is None else out.copy_(result)


@dataclasses.dataclass(frozen=True)
class LinearFormat(_Format):
    """Fixed point: levels k * 2^(fsr - m) for k = 0 .. 2^m - 1, nearest with ties up."""

    @property
    def name(self) -> str:
        text = f"lin{self.bits}{'s' if self.signed else ''}"
        return text if self.fsr is None else f"{text}@fsr{self.fsr}"

    @property
    def step(self) -> float:
        return math.ldexp(1.0, self._fixed_fsr() - self.magnitude_bits)

    @property
    def family(self) -> str:
        return "linear"

    @property
    def lsb(self) -> int:
        """fsr - m: the step is 2^lsb."""
        return self._fixed_fsr() - self.magnitude_bits

    def integer_magnitudes(self) -> tuple[list[int], list[bool]]:
        self._fixed_fsr()  # as for log formats: the integers mean nothing without 2^lsb
        count = 1 << self.magnitude_bits
        return list(range(count)), [False] * count

    def magnitudes(self) -> list[float]:
        return [k * self.step for k in range(1 << self.magnitude_bits)]

    def kernel(self, dtype: torch.dtype = torch.float64) -> tuple[Callable, torch.Tensor]:
        """(fn, params) with ``fn(x, params, signed, encode)`` this format's exact
        elementwise kernel for ``x`` of ``dtype``: for fusing into larger compiled code."""
        step = self.step
        return _linear_kernel, torch.tensor([1.0 / step, step, (1 << self.magnitude_bits) - 1],
                                            dtype=dtype)

    def _apply(self, x: torch.Tensor, encode: bool,
               out: torch.Tensor | None = None) -> torch.Tensor:
        kernel, params = self.kernel(x.dtype)
        return _run(kernel, x, params.to(x.device), self.signed, encode, out=out)


Format = LogFormat | LinearFormat
FAMILIES = ("linear", "log2", "logsqrt2")  # the values of ``Format.family``, in table order


def family_format(family: str, bits: int, fsr: int | None = None, *,
                  signed: bool = False) -> Format:
    """The format of ``family`` (one of FAMILIES) with log rounding: the inverse of
    ``fmt.family``, for grids that range over families without spelling names."""
    if family == "linear":
        return LinearFormat(bits, fsr, signed=signed)
    if family in ("log2", "logsqrt2"):
        return LogFormat(bits, fsr, signed=signed, base="sqrt2" if family == "logsqrt2" else "2")
    raise FormatError(f"unknown format family {family!r}; expected one of "
                      f"{', '.join(FAMILIES)}")

# ----------------------------------------------------------------------------------------
# String forms: log3, log5s, logsqrt2-5s, lin4, log4-linround, with optional @fsrN

# ASCII digits only, and few of them: "log٣" is not log3, and a 5000-digit FSR is refused
# by the grammar before int() could choke on it
_SPEC = re.compile(r"^(?P<kind>logsqrt2-|log|lin)(?P<bits>\d{1,3})(?P<signed>s?)"
                   r"(?P<linround>-linround)?(?:@fsr(?P<fsr>[+-]?\d{1,6}))?$", re.ASCII)
FLOAT_NAMES = ("float", "none", "fp32")


def parse_format(spec: str) -> Format | None:
    """Parse a format name such as ``log3``, ``log5s@fsr2``, ``logsqrt2-5s``, ``lin4``.

    ``float`` (or ``none``) means "leave in floating point" and returns None.
    """
    if not isinstance(spec, str):
        raise FormatError(f"format must be a string such as 'log3', got {spec!r}")
    text = spec.strip().lower()
    if text in FLOAT_NAMES:
        return None
    match = _SPEC.match(text)
    if match is None:
        shown = repr(spec) if len(spec) <= 40 else repr(spec[:40]) + f"... ({len(spec)} chars)"
        raise FormatError(f"unknown format {shown}; expected e.g. log3, log5s, logsqrt2-5s, "
                          "lin4, log4-linround, optionally with @fsrN (N an integer)")
    bits = int(match["bits"])
    fsr = int(match["fsr"]) if match["fsr"] is not None else None
    signed = bool(match["signed"])
    if match["kind"] == "lin" and match["linround"]:
        raise FormatError(f"{spec!r}: -linround applies to log formats only")
    try:
        if match["kind"] == "lin":
            return LinearFormat(bits, fsr, signed=signed)
        return LogFormat(bits, fsr, signed=signed,
                         base="sqrt2" if match["kind"] == "logsqrt2-" else "2",
                         rounding="linear" if match["linround"] else "log")
    except FormatError as exc:  # name the text the user wrote
        raise FormatError(f"{spec!r}: {exc}") from None
