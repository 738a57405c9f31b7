"""The engine's integer arithmetic against the independent Decimal reference: accumulator ->
code decisions (comparator bank, leading-one), every product of two codes, the sqrt2
combination."""

import itertools
from decimal import Decimal, localcontext

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from logquant.engine import literal
from logquant.engine.arith import (
    code_table,
    encode_accumulator,
    linear_code_of_integer,
    log2_code_of_integer,
    shift_product,
    sqrt2_ceiling,
    thresholds,
)
from logquant.engine.plan import sqrt2_constant
from logquant.formats import LinearFormat, LogFormat, parse_format
from reference_formats import PREC, RefFormat

FORMATS = ["log3@fsr0", "log4s@fsr2", "log5@fsr-3", "log4-linround@fsr1", "log5s-linround@fsr0",
           "logsqrt2-4@fsr0", "logsqrt2-5s@fsr1", "logsqrt2-4s-linround@fsr-1", "lin4@fsr3",
           "lin5s@fsr0", "lin8@fsr2", "log2@fsr1", "log1@fsr0"]


def ref_of(fmt) -> RefFormat:
    if isinstance(fmt, LinearFormat):
        return RefFormat("linear", fmt.bits, fmt.fsr, fmt.signed)
    kind = "logsqrt2" if fmt.base == "sqrt2" else "log2"
    return RefFormat(kind, fmt.bits, fmt.fsr, fmt.signed, fmt.rounding)


def ref_code(ref: RefFormat, a: int, exponent: int, denominator: int) -> int:
    """The reference code of the exact value a * 2^exponent / denominator."""
    with localcontext() as ctx:
        ctx.prec = PREC
        value = Decimal(a) * Decimal(2) ** exponent / Decimal(denominator)
        index = ref.magnitude_index(abs(value))
    if a < 0 and not ref.signed:
        return 0
    return index | (1 << ref.m) if a < 0 and index else index


def interesting_integers(limit: int) -> list[int]:
    """Every integer near a power of two and near each 2^(n+1/2) up to ``limit``."""
    values = set(range(0, 70))
    for n in range(1, limit.bit_length()):
        for centre in (1 << n, sqrt2_ceiling(n), 3 << (n - 1)):
            values.update(range(max(0, centre - 2), centre + 3))
    return sorted(v for v in values if v < limit)


@pytest.mark.parametrize("spec", FORMATS)
@pytest.mark.parametrize("exponent,denominator", [(-7, 1), (0, 1), (3, 1), (-4, 9), (-2, 4)])
def test_comparator_bank_matches_reference(spec, exponent, denominator):
    fmt = parse_format(spec)
    ref = ref_of(fmt)
    table = torch.tensor(thresholds(fmt, exponent, denominator))
    ints = interesting_integers(1 << 40)
    acc = torch.tensor(ints + [-v for v in ints])
    got = encode_accumulator(acc, fmt, table).tolist()
    want = [ref_code(ref, a, exponent, denominator) for a in acc.tolist()]
    assert got == want


@pytest.mark.parametrize("spec", [s for s in FORMATS if "sqrt2" not in s])
@pytest.mark.parametrize("exponent", [-40, -9, -1, 0, 2])
def test_leading_one_and_shift_match_reference(spec, exponent):
    """The hardware's way (leading-one + one comparison; linear: a shift) on every boundary,
    far beyond float64's 53 bits."""
    fmt = parse_format(spec)
    ref = ref_of(fmt)
    ints = interesting_integers(1 << 62)
    scalar = log2_code_of_integer if isinstance(fmt, LogFormat) else linear_code_of_integer
    mask = (1 << fmt.magnitude_bits) - 1
    want = [ref_code(ref, a, exponent, 1) & mask for a in ints]
    assert [scalar(a, exponent, fmt) for a in ints] == want
    acc = torch.tensor(ints + [-a for a in ints])
    table = torch.tensor(thresholds(fmt, exponent, 1))
    vectorized = literal.encode(acc, fmt, exponent, 1, table).tolist()
    assert vectorized == [ref_code(ref, a, exponent, 1) for a in acc.tolist()]


@settings(max_examples=300, deadline=None)
@given(a=st.integers(-(1 << 61), 1 << 61), exponent=st.integers(-60, 10),
       spec=st.sampled_from(FORMATS), denominator=st.sampled_from([1, 1, 3, 4, 49]))
def test_every_encoder_agrees_on_random_accumulators(a, exponent, spec, denominator):
    fmt = parse_format(spec)
    want = ref_code(ref_of(fmt), a, exponent, denominator)
    table = torch.tensor(thresholds(fmt, exponent, denominator))
    acc = torch.tensor([a])
    assert encode_accumulator(acc, fmt, table).item() == want
    assert literal.encode(acc, fmt, exponent, denominator, table).item() == want


def signed_specs():
    for kind, bits in itertools.product(("log", "logsqrt2-", "lin"), (2, 3, 4, 5)):
        yield f"{kind}{bits}s@fsr1"


@pytest.mark.parametrize("w_spec", list(signed_specs()))
@pytest.mark.parametrize("x_spec", ["log4@fsr3", "log3s@fsr0", "logsqrt2-4@fsr2", "lin4@fsr2",
                                    "log5@fsr-2"])
def test_every_product_of_two_codes_is_exact(w_spec, x_spec):
    """Exhaustive over all code pairs: (even + odd sqrt2) * 2^(lsb_x + lsb_w) equals the
    product of the two exact levels."""
    w_fmt, x_fmt = parse_format(w_spec), parse_format(x_spec)
    w_ref, x_ref = ref_of(w_fmt), ref_of(x_fmt)
    pairs = list(itertools.product(range(x_fmt.num_codes), range(w_fmt.num_codes)))
    x_codes = torch.tensor([p[0] for p in pairs], dtype=torch.uint8)
    w_codes = torch.tensor([p[1] for p in pairs], dtype=torch.uint8)
    even, odd = literal._product(literal._operand(code_table(x_fmt), x_codes),
                                 literal._operand(code_table(w_fmt), w_codes))
    odd = torch.zeros_like(even) if odd is None else odd
    with localcontext() as ctx:
        ctx.prec = PREC
        scale = Decimal(2) ** (x_fmt.lsb + w_fmt.lsb)
        root2 = Decimal(2).sqrt()
        for (xc, wc), e, o in zip(pairs, even.tolist(), odd.tolist()):
            exact = _level(x_ref, xc) * _level(w_ref, wc)
            assert abs((Decimal(e) + Decimal(o) * root2) * scale - exact) <= abs(exact) * Decimal(
                10) ** -(PREC - 10), (xc, wc, e, o)
            assert e == 0 or o == 0  # each product is either a power of two or sqrt2 times one
    if isinstance(x_fmt, LogFormat) and isinstance(w_fmt, LogFormat) and (
            x_fmt.base == w_fmt.base == "2"):
        scalar = [shift_product(xc, wc, x_fmt, w_fmt) for xc, wc in pairs]
        assert scalar == even.tolist()


def _level(ref: RefFormat, code: int) -> Decimal:
    index = code & ((1 << ref.m) - 1)
    value = ref.mags[index]
    return -value if ref.signed and code >> ref.m and index else value


def test_sqrt2_constant_and_ceilings_are_exact():
    with localcontext() as ctx:
        ctx.prec = 200
        root2 = Decimal(2).sqrt()
        for bits in range(0, 62):
            scaled = root2 * Decimal(2) ** bits
            assert sqrt2_constant(bits) == int((scaled + Decimal("0.5")).to_integral_value(
                rounding="ROUND_FLOOR"))
            assert sqrt2_ceiling(bits) == int(scaled.to_integral_value(rounding="ROUND_CEILING"))


@settings(max_examples=200, deadline=None)
@given(even=st.integers(-(1 << 40), 1 << 40), odd=st.integers(-(1 << 40), 1 << 40),
       bits=st.integers(8, 20))
def test_sqrt2_combination_error_is_within_its_documented_bound(even, odd, bits):
    """(A << P) + B round(sqrt2 2^P) differs from (A + B sqrt2) 2^P by at most |B| / 2."""
    combined = (even << bits) + odd * sqrt2_constant(bits)
    with localcontext() as ctx:
        ctx.prec = 200
        exact = (Decimal(even) + Decimal(odd) * Decimal(2).sqrt()) * Decimal(2) ** bits
        assert abs(Decimal(combined) - exact) <= Decimal(abs(odd)) / 2


def test_thresholds_are_increasing_and_positive():
    for spec in FORMATS:
        fmt = parse_format(spec)
        for exponent in (-30, 0, 5):
            table = thresholds(fmt, exponent)
            assert all(t >= 1 for t in table)
            assert table == sorted(table)
            assert len(table) == (1 << fmt.magnitude_bits) - 1
