"""Entropy coding of weight codes (``logquant export --compress``): static rANS.

Log-quantized weights are far from uniform (most sit in a few exponents near the top), so
a coder driven by their histogram beats fixed-width packing. This is byte-wise rANS
(J. Duda, "Asymmetric numeral systems", 2013; the layout of F. Giesen's ``rans_byte``):
frequencies scaled to 2^12, a 32-bit state renormalized a byte at a time. Its cost is
within a fraction of a percent of the empirical entropy plus the frequency table.

Decoding is bounded and self-checking: it reads exactly ``count`` symbols, never past the
stream, and must end in the encoder's initial state having consumed every byte; anything
else is a corrupted stream.
"""

from __future__ import annotations

import numpy as np

from logquant.errors import LogquantError

SCALE_BITS = 12
TOTAL = 1 << SCALE_BITS
LOW = 1 << 23  # state interval [LOW, 256 * LOW)


class EntropyError(LogquantError):
    """A compressed code stream or frequency table that does not decode."""


def empirical_entropy_bits(codes: np.ndarray) -> float:
    """Total bits of the order-0 empirical entropy of ``codes`` (the coder's limit)."""
    counts = np.bincount(codes.reshape(-1))
    p = counts[counts > 0] / codes.size
    return float(-(p * np.log2(p)).sum() * codes.size)


def frequencies(codes: np.ndarray, alphabet: int) -> np.ndarray:
    """Histogram scaled to sum to 2^12, every present symbol at least 1."""
    counts = np.bincount(codes.reshape(-1), minlength=alphabet).astype(np.int64)
    if counts.size > alphabet:
        raise EntropyError(f"codes exceed the alphabet of {alphabet}")
    freqs = np.zeros(alphabet, dtype=np.int64)
    present = counts > 0
    freqs[present] = np.maximum(1, counts[present] * TOTAL // max(codes.size, 1))
    while freqs.sum() != TOTAL:  # hand the rounding error to (or take it from) the largest
        i = int(np.argmax(freqs))
        freqs[i] += TOTAL - freqs.sum()
        if freqs[i] < 1:
            raise EntropyError("too many distinct codes for 12-bit frequencies")
    return freqs.astype(np.uint16)


def _cumulative(freqs: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(freqs.astype(np.int64))])[:-1]


def encode(codes: np.ndarray, freqs: np.ndarray) -> bytes:
    """The rANS stream of ``codes`` under ``freqs`` (from :func:`frequencies`)."""
    f = freqs.astype(np.int64).tolist()
    c = _cumulative(freqs).tolist()
    out = bytearray()
    x = LOW
    for s in reversed(codes.reshape(-1).tolist()):
        fs = f[s]
        x_max = ((LOW >> SCALE_BITS) << 8) * fs
        while x >= x_max:
            out.append(x & 0xFF)
            x >>= 8
        x = ((x // fs) << SCALE_BITS) + (x % fs) + c[s]
    out += x.to_bytes(4, "little")[::-1]
    out.reverse()  # the decoder reads forward what the encoder wrote backward
    return bytes(out)


def decode(stream: bytes, freqs: np.ndarray, count: int) -> np.ndarray:
    """``count`` codes from ``stream``; EntropyError if the stream or table is corrupt."""
    freqs = np.asarray(freqs)
    if freqs.ndim != 1 or int(freqs.astype(np.int64).sum()) != TOTAL or len(stream) < 4:
        raise EntropyError("corrupted entropy-coded weights (frequency table or stream)")
    f = freqs.astype(np.int64).tolist()
    c = _cumulative(freqs).tolist()
    symbol_of_slot = np.repeat(np.arange(len(f)), freqs.astype(np.int64)).tolist()
    x = int.from_bytes(stream[:4], "little")
    pos, end = 4, len(stream)
    out = bytearray(count)
    mask = TOTAL - 1
    for i in range(count):
        slot = x & mask
        s = symbol_of_slot[slot]
        out[i] = s
        x = f[s] * (x >> SCALE_BITS) + slot - c[s]
        while x < LOW:
            if pos >= end:
                raise EntropyError("corrupted entropy-coded weights (stream too short)")
            x = (x << 8) | stream[pos]
            pos += 1
    if x != LOW or pos != end:
        raise EntropyError("corrupted entropy-coded weights (stream does not end cleanly)")
    return np.frombuffer(bytes(out), dtype=np.uint8)
