"""The number formats against the independent decimal reference, edge cases and properties."""

from __future__ import annotations

import math
from decimal import Decimal, localcontext

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from logquant import formats
from logquant.formats import FormatError, LinearFormat, LogFormat, parse_format
from reference_formats import PREC, RefFormat, _sqrt2

KINDS = {  # name -> (constructor, reference kind, rounding)
    "log2": (lambda b, f, s: LogFormat(b, f, signed=s), "log2", "log"),
    "log2-linround": (lambda b, f, s: LogFormat(b, f, signed=s, rounding="linear"), "log2",
                      "linear"),
    "logsqrt2": (lambda b, f, s: LogFormat(b, f, signed=s, base="sqrt2"), "logsqrt2", "log"),
    "logsqrt2-linround": (lambda b, f, s: LogFormat(b, f, signed=s, base="sqrt2",
                                                    rounding="linear"), "logsqrt2", "linear"),
    "linear": (lambda b, f, s: LinearFormat(b, f, signed=s), "linear", "log"),
}


def make(kind: str, bits: int, fsr: int, signed: bool):
    ctor, ref_kind, rounding = KINDS[kind]
    return ctor(bits, fsr, signed), RefFormat(ref_kind, bits, fsr, signed, rounding)


def f32(values) -> torch.Tensor:
    return torch.tensor(np.asarray(values, dtype=np.float32))


def probe_values(ref: RefFormat, dtype=np.float32) -> np.ndarray:
    """Both neighbours of every decision boundary, every level, every binade the format
    touches (its ends and random mantissas), and the special values."""
    rng = np.random.default_rng(0)
    info = np.finfo(dtype)
    vals = [0.0, info.tiny, info.smallest_subnormal, info.max, np.inf, 1.0]
    for bound in ref.bounds:
        b = dtype(float(bound))
        vals += [np.nextafter(b, dtype(0)), b, np.nextafter(b, dtype(np.inf))]
    for level in ref.mags:
        lv = dtype(float(level))
        vals += [lv, np.nextafter(lv, dtype(0)), np.nextafter(lv, dtype(np.inf))]
    positive = [float(b) for b in ref.bounds if b > 0] + [float(m) for m in ref.mags if m > 0]
    lo = math.floor(math.log2(min(positive))) - 2
    hi = math.ceil(math.log2(max(positive))) + 2
    for e in range(max(lo, info.minexp - info.nmant), min(hi, info.maxexp)):
        start = dtype(math.ldexp(1.0, e))
        vals += [start, np.nextafter(start, dtype(0))]
        vals += list((rng.uniform(1, 2, 16) * math.ldexp(1.0, e)).astype(dtype))
    arr = np.asarray(vals, dtype=dtype)
    arr = arr[np.isfinite(arr) | np.isinf(arr)]
    return np.concatenate([arr, -arr])


def check_against_reference(fmt, ref, dtype=np.float32):
    values = probe_values(ref, dtype)
    expected_codes = torch.tensor([ref.encode(float(v)) for v in values], dtype=torch.uint8)
    expected = torch.tensor([ref.quantize(float(v)) for v in values], dtype=torch.float64)
    expected = expected.to(torch.float32 if dtype == np.float32 else torch.float64)
    x = torch.from_numpy(values)
    codes = fmt.encode(x)
    bad = (codes != expected_codes).nonzero().flatten()
    assert bad.numel() == 0, (f"{fmt.name}: encode({values[bad[:4]]}) = {codes[bad[:4]]}, "
                              f"reference {expected_codes[bad[:4]]}")
    assert torch.equal(fmt.quantize(x), expected), fmt.name
    assert torch.equal(fmt.decode(codes, expected.dtype), expected), fmt.name


BITS_AND_SIGN = [(b, s) for b in range(1, 9) for s in (False, True) if b > 1 or not s]


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("bits, signed", BITS_AND_SIGN)
def test_matches_reference_float32(kind, bits, signed):
    for fsr in (-64, -3, 0, 2, 64):
        check_against_reference(*make(kind, bits, fsr, signed))


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("bits", [1, 3, 5, 8])
def test_matches_reference_float64(kind, bits):
    for fsr in (-5, 0, 7):
        check_against_reference(*make(kind, bits, fsr, False), dtype=np.float64)
        if bits > 1:
            check_against_reference(*make(kind, bits, fsr, True), dtype=np.float64)


def test_log_rounding_uses_the_geometric_mean():
    fmt = parse_format("log3@fsr2")  # levels ... 0.5, 1, 2
    below = np.float32(math.sqrt(2))  # the float32 nearest sqrt(2) lies just below it
    above = np.nextafter(below, np.float32(2))
    assert float(below) < math.sqrt(2) < float(above)
    assert fmt.quantize(f32([below, above, 1.45, 1.49])).tolist() == [1.0, 2.0, 2.0, 2.0]
    lin = parse_format("log3-linround@fsr2")  # nearest by difference: boundary 1.5
    assert lin.quantize(f32([1.45, 1.49, 1.5])).tolist() == [1.0, 1.0, 2.0]


def test_zero_threshold_saturation_and_specials():
    fmt = parse_format("log3s@fsr0")  # m = 2: levels 0.125, 0.25, 0.5
    assert fmt.levels().tolist() == [-0.5, -0.25, -0.125, 0.0, 0.125, 0.25, 0.5]
    zero_bound = 0.125 / math.sqrt(2)
    x = f32([np.nextafter(np.float32(zero_bound), np.float32(0)),
             np.nextafter(np.float32(zero_bound), np.float32(1)), 100.0, np.inf, -np.inf,
             -0.0, 1e-45])
    assert fmt.quantize(x).tolist() == [0.0, 0.125, 0.5, 0.5, -0.5, 0.0, 0.0]
    assert math.isnan(fmt.quantize(f32([np.nan])).item())
    with pytest.raises(FormatError, match="NaN.*weights of conv1"):
        fmt.encode(f32([1.0, np.nan]), name="weights of conv1")
    assert fmt.encode(f32([-0.0, -1e-30])).tolist() == [0, 0]  # zero always has sign 0
    unsigned = parse_format("log3@fsr0")
    assert unsigned.quantize(f32([-1.0, -np.inf])).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("spec", ["log1@fsr0", "log3@fsr1", "log4s@fsr-2", "logsqrt2-5s@fsr1",
                                  "log8@fsr3", "logsqrt2-8@fsr0", "lin4@fsr0", "lin8s@fsr5",
                                  "log5-linround@fsr0", "logsqrt2-6s-linround@fsr2"])
def test_every_code_round_trips(spec):
    fmt = parse_format(spec)
    codes = torch.arange(fmt.num_codes, dtype=torch.uint8)
    if fmt.signed:  # the "negative zero" code is never produced
        codes = codes[codes != (1 << fmt.magnitude_bits)]
    for dtype in (torch.float32, torch.float64):
        values = fmt.decode(codes, dtype)
        # log8 reaches 2^-255: levels below float32's range decode to 0 there (documented)
        representable = (values != 0) | (codes == 0) | (codes == (1 << fmt.magnitude_bits))
        if dtype == torch.float64:
            assert representable.all()
        assert torch.equal(fmt.encode(values[representable]), codes[representable])
    mags = set(fmt.decode(codes, torch.float64).abs().tolist())
    assert len(mags) == 2 ** fmt.magnitude_bits


def test_sqrt2_levels_are_half_octaves():
    fmt = parse_format("logsqrt2-4@fsr1")  # hmin = 2*1 - 16 + 1 = -13, hmax = 2*1 - 1 = 1
    levels = fmt.levels()[1:]
    assert len(levels) == 15
    assert levels[0].item() == math.ldexp(math.sqrt(2), -7)  # 2^(-13/2)
    assert levels[-1].item() == math.sqrt(2)  # 2^(1/2) < 2^fsr
    ratios = (levels[1:] / levels[:-1]).tolist()
    assert all(abs(r - math.sqrt(2)) < 1e-15 for r in ratios)


def test_linear_format_levels_and_ties():
    fmt = parse_format("lin3@fsr1")  # step 2^(1-3) = 0.25, levels 0 .. 1.75
    assert fmt.levels().tolist() == [0.25 * k for k in range(8)]
    assert fmt.quantize(f32([0.125, 0.12499999, 0.375, 1.875, 9.0, -1.0])).tolist() == [
        0.25, 0.0, 0.5, 1.75, 1.75, 0.0]
    signed = parse_format("lin3s@fsr1")  # m = 2: step 0.5
    assert signed.quantize(f32([-0.25, -0.2499, -5.0])).tolist() == [-0.5, 0.0, -1.5]
    assert signed.encode(f32([-0.25, 0.25, -0.1])).tolist() == [0b101, 0b001, 0]


# ----------------------------------------------------------------------------------------
# Properties (hypothesis)

format_strategy = st.builds(
    lambda kind, bits, fsr, signed: KINDS[kind][0](max(bits, 2) if signed else bits, fsr,
                                                   signed),
    st.sampled_from(list(KINDS)), st.integers(1, 8), st.integers(-20, 20), st.booleans())
finite_f32 = st.floats(width=32, allow_nan=False, allow_infinity=True)


@settings(max_examples=300, deadline=None)
@given(format_strategy, st.lists(finite_f32, min_size=1, max_size=64))
def test_quantize_is_idempotent_and_matches_codes(fmt, values):
    x = f32(values)
    q = fmt.quantize(x)
    assert torch.equal(fmt.quantize(q), q)
    assert torch.equal(fmt.decode(fmt.encode(x)), q)


@settings(max_examples=300, deadline=None)
@given(format_strategy, st.lists(st.floats(0, 2.0**100, width=32), min_size=2, max_size=64))
def test_quantize_is_monotone_in_magnitude(fmt, values):
    x = f32(sorted(values))
    q = fmt.quantize(x)
    assert torch.all(q[1:] >= q[:-1])
    codes = fmt.encode(x).long()
    assert torch.all(codes[1:] >= codes[:-1])  # codes are monotone in magnitude too


@settings(max_examples=200, deadline=None)
@given(format_strategy, st.lists(finite_f32, min_size=1, max_size=64))
def test_signed_formats_are_odd_symmetric(fmt, values):
    fmt = fmt.with_signed(True) if fmt.bits >= 2 else fmt
    if not fmt.signed:
        return
    x = f32(values)
    assert torch.equal(fmt.quantize(-x), -fmt.quantize(x) + 0.0)


@settings(max_examples=200, deadline=None)
@given(format_strategy, st.integers(-10, 10), st.lists(st.floats(-2.0**20, 2.0**20, width=32),
                                                       min_size=1, max_size=64))
def test_scaling_by_power_of_two_shifts_the_fsr(fmt, k, values):
    x = f32(values)
    x = x[(x == 0) | (x.abs() > 1e-30)]  # stay clear of subnormals after scaling by 2^-10
    shifted = fmt.with_fsr(fmt.fsr + k)
    assert torch.equal(shifted.quantize(x * 2.0**k), fmt.quantize(x) * 2.0**k)


@pytest.mark.parametrize("spec", ["log1@fsr0", "log3@fsr0", "log5s@fsr1", "logsqrt2-6s@fsr0",
                                  "log8@fsr0", "lin4@fsr0", "lin8s@fsr0"])
def test_exactly_two_to_the_m_magnitudes(spec):
    fmt = parse_format(spec)
    # a dense sweep through every binade the format covers hits every level
    x = torch.logspace(-300, 3, 400_001, base=2, dtype=torch.float64)
    x = torch.cat([x, torch.linspace(0, 2.0 ** fmt.fsr, 100_001, dtype=torch.float64)])
    mags = torch.unique(fmt.quantize(x).abs())
    assert mags.numel() == 2 ** fmt.magnitude_bits


# ----------------------------------------------------------------------------------------
# Fast paths, dtypes, names


@pytest.mark.parametrize("spec", ["log3@fsr0", "log5s@fsr2", "logsqrt2-5s@fsr1", "lin4s@fsr0",
                                  "log8@fsr0", "log4s-linround@fsr0"])
def test_compiled_kernel_is_bit_identical_to_eager(spec, monkeypatch):
    fmt = parse_format(spec)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1 << 17, generator=gen) * torch.exp2(torch.randint(-12, 6, (1 << 17,),
                                                                       generator=gen))
    x[:4] = torch.tensor([float("inf"), -float("inf"), 0.0, float("nan")])
    compiled_q, compiled_c = fmt.quantize(x), fmt.encode(x[4:])
    monkeypatch.setenv("LOGQUANT_COMPILE", "0")
    eager_q, eager_c = fmt.quantize(x), fmt.encode(x[4:])
    assert torch.equal(compiled_q.view(torch.int32), eager_q.view(torch.int32))
    assert torch.equal(compiled_c, eager_c)


def test_half_precision_inputs_keep_their_dtype():
    fmt = parse_format("log4s@fsr1")
    x = torch.tensor([0.3, -0.7, 5.0], dtype=torch.bfloat16)
    q = fmt.quantize(x)
    assert q.dtype == torch.bfloat16
    assert q.float().tolist() == fmt.quantize(x.float()).tolist()


@pytest.mark.parametrize("spec", ["log3", "log5s", "logsqrt2-5s", "lin4", "log5s@fsr2",
                                  "log3@fsr-4", "log4-linround@fsr1", "lin8s@fsr0"])
def test_names_round_trip(spec):
    assert parse_format(spec).name == spec
    assert parse_format(spec.upper()).name == spec


@pytest.mark.parametrize("spec", ["log0", "log9", "lin", "log3@fsr1.5", "log3@fsr99", "exp3",
                                  "log1s", "lin4-linround", "log3@", ""])
def test_bad_names_raise_one_clear_error(spec):
    with pytest.raises(FormatError) as info:
        parse_format(spec)
    assert "\n" not in str(info.value)


def test_float_means_no_format_and_fsr_is_required():
    assert parse_format("float") is None
    with pytest.raises(FormatError, match="no FSR"):
        parse_format("log3").quantize(torch.ones(2))
    with pytest.raises(FormatError, match="integer"):
        LogFormat(3, 1.5)
    with pytest.raises(FormatError, match="integer codes"):
        parse_format("log3@fsr0").decode(torch.ones(2))
    with pytest.raises(FormatError, match="0..7"):
        parse_format("log3@fsr0").decode(torch.tensor([8]))


def test_thresholds_are_exact():
    t = formats._thresholds(23)
    one = 1 << 23
    for key, (num, power) in {"sqrt2": (2, 2), "root4_2": (2, 4), "root4_8": (8, 4)}.items():
        m = t[key]
        assert (one + m) ** power >= num * one**power > (one + m - 1) ** power


@pytest.mark.parametrize("spec", ["log3@fsr0", "lin4s@fsr0", "log8@fsr0"])
@pytest.mark.parametrize("numel", [100, 1 << 17])
def test_quantize_into_out_buffer(spec, numel):
    fmt = parse_format(spec)
    x = torch.randn(numel, generator=torch.Generator().manual_seed(1))
    out = torch.full_like(x, 7.0)
    assert fmt.quantize(x, out=out) is out
    assert torch.equal(out, fmt.quantize(x))
    with pytest.raises(FormatError, match="out must be"):
        fmt.quantize(x, out=torch.empty(3))


# ----------------------------------------------------------------------------------------
# What a format says about itself: family, integer grid (callers ask these, never the name)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("bits, signed", BITS_AND_SIGN)
def test_family_grid_and_integer_view_match_the_reference(kind, bits, signed):
    for fsr in (-64, -3, 0, 5, 64):
        fmt, ref = make(kind, bits, fsr, signed)
        assert fmt.family == ref.kind and fmt.family in formats.FAMILIES
        assert fmt.is_log == (ref.kind != "linear")
        assert parse_format(fmt.name).family == fmt.family
        ints, odd = fmt.integer_magnitudes()
        assert len(ints) == len(odd) == 2**fmt.magnitude_bits == len(ref.mags)
        assert ints[0] == 0 and not odd[0] and ints[1] == 1  # 2^lsb: the smallest level's grid
        assert all(type(n) is int for n in ints) and ints == sorted(ints)
        assert any(odd) == (fmt.family == "logsqrt2"  # odd half-octaves: sqrt2 * 2^k
                            and (len(ints) > 2 or fmt.min_level_index % 2 == 1))
        with localcontext() as ctx:
            ctx.prec = PREC
            unit = Decimal(2) ** fmt.lsb
            exact = [n * unit * (_sqrt2() if o else 1) for n, o in zip(ints, odd)]
        assert exact == ref.mags, fmt.name
        if fmt.is_log:
            spo = fmt.steps_per_octave
            assert fmt.max_level_index - fmt.min_level_index == 2**fmt.magnitude_bits - 2
            assert fmt.max_level_index == spo * fsr - 1  # the top level is just below 2^fsr
            assert fmt.lsb == fmt.min_level_index // spo


def test_grid_needs_an_fsr():
    for spec in ("log3", "logsqrt2-4s", "lin4"):
        fmt = parse_format(spec)
        assert fmt.family == formats.family_format(fmt.family, 3).family  # no FSR needed
        with pytest.raises(FormatError, match="no FSR"):
            fmt.lsb  # noqa: B018
        with pytest.raises(FormatError, match="no FSR"):
            fmt.integer_magnitudes()


@pytest.mark.parametrize("family", formats.FAMILIES)
@pytest.mark.parametrize("bits, signed", BITS_AND_SIGN)
def test_family_format_is_the_inverse_of_family(family, bits, signed):
    for fsr in (None, -2, 3):
        fmt = formats.family_format(family, bits, fsr, signed=signed)
        assert (fmt.family, fmt.bits, fmt.fsr, fmt.signed) == (family, bits, fsr, signed)
        assert parse_format(fmt.name) == fmt
        assert "linround" not in fmt.name  # the default rounding
    with pytest.raises(FormatError, match="unknown format family 'lin'"):
        formats.family_format("lin", 3)
