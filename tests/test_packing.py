"""Bit packing of codes: exact sizes, a known layout, round trips, bad input."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from logquant.formats import parse_format
from logquant.packing import PackingError, pack_codes, packed_size, unpack_codes


def test_known_layout_is_little_endian_lsb_first():
    # codes 1, 2, 3 in 3 bits: stream 100 010 110 -> byte 0 = 0b11010001, byte 1 = 0
    packed = pack_codes(torch.tensor([1, 2, 3], dtype=torch.uint8), 3)
    assert packed.tolist() == [0b11010001, 0]
    assert pack_codes(torch.tensor([0xAB]), 8).tolist() == [0xAB]
    assert pack_codes(torch.tensor([1, 0, 1, 1, 0, 0, 0, 0, 1]), 1).tolist() == [0b1101, 1]


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [0, 1, 7, 8, 9, 1000, 4097])
def test_round_trip_and_exact_size(bits, count):
    gen = torch.Generator().manual_seed(bits * 7919 + count)
    codes = torch.randint(0, 1 << bits, (count,), generator=gen, dtype=torch.int64)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_size(count, bits)
    assert packed.numel() == -(-count * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, count), codes.to(torch.uint8))


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 8).flatmap(lambda b: st.tuples(
    st.just(b), st.lists(st.integers(0, (1 << b) - 1), max_size=300))))
def test_round_trip_property(case):
    bits, values = case
    codes = torch.tensor(values, dtype=torch.uint8)
    assert torch.equal(unpack_codes(pack_codes(codes, bits), bits, len(values)), codes)


def test_packed_format_codes_of_a_real_tensor():
    fmt = parse_format("log3s@fsr0")
    weights = torch.randn(64, 32, 3, 3, generator=torch.Generator().manual_seed(0)) * 0.1
    codes = fmt.encode(weights)
    packed = pack_codes(codes, fmt.bits)
    assert packed.numel() == packed_size(weights.numel(), 3)  # 3/32 of the float32 bytes
    restored = fmt.decode(unpack_codes(packed, 3, weights.numel()).view(weights.shape))
    assert torch.equal(restored, fmt.quantize(weights))


def test_bad_input():
    with pytest.raises(PackingError, match="0..7"):
        pack_codes(torch.tensor([8]), 3)
    with pytest.raises(PackingError, match="0..7"):
        pack_codes(torch.tensor([-1]), 3)
    with pytest.raises(PackingError, match="integers"):
        pack_codes(torch.tensor([1.0]), 3)
    with pytest.raises(PackingError, match="1..8"):
        pack_codes(torch.tensor([1]), 9)
    with pytest.raises(PackingError, match="need 2 bytes, got 1"):
        unpack_codes(torch.zeros(1, dtype=torch.uint8), 3, 4)
    with pytest.raises(PackingError, match="1-D uint8"):
        unpack_codes(torch.zeros(2, dtype=torch.int32), 3, 4)
