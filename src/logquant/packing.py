"""Bit packing of format codes: n codes of b bits stored in exactly ceil(n * b / 8) bytes.

The bit stream is little-endian: code i occupies stream bits i*b .. i*b + b - 1, least
significant bit first, and stream bit k is bit (k % 8) of byte k // 8. This is the layout
of weight tensors in the packed .lqz file (the container itself is a separate issue).
"""

from __future__ import annotations

import numpy as np
import torch

from logquant.errors import LogquantError


class PackingError(LogquantError):
    """Codes that do not fit their bit width, or packed data of the wrong length."""


def packed_size(count: int, bits: int) -> int:
    """Bytes needed for ``count`` codes of ``bits`` bits."""
    return (count * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise PackingError(f"bits must be an integer in 1..8, got {bits!r}")


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer ``codes`` (any shape, flattened in C order) into a uint8 byte tensor."""
    _check_bits(bits)
    if codes.is_floating_point() or codes.is_complex():
        raise PackingError(f"codes must be integers, got {codes.dtype}")
    flat = codes.detach().reshape(-1).cpu().to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise PackingError(f"codes must lie in 0..{(1 << bits) - 1} for {bits} bits, got "
                           f"{int(flat.min())}..{int(flat.max())}")
    as_bytes = flat.numpy().astype(np.uint8)[:, None]  # (N, 1)
    stream = np.unpackbits(as_bytes, axis=1, bitorder="little")[:, :bits].reshape(-1)
    return torch.from_numpy(np.packbits(stream, bitorder="little"))


def unpack_codes(data: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The ``count`` codes (uint8, 1-D) packed in ``data`` by :func:`pack_codes`."""
    _check_bits(bits)
    if data.dtype != torch.uint8 or data.dim() != 1:
        raise PackingError(f"packed data must be a 1-D uint8 tensor, got {data.dtype} "
                           f"with shape {tuple(data.shape)}")
    if count < 0 or data.numel() != packed_size(count, bits):
        raise PackingError(f"{count} codes of {bits} bits need {packed_size(count, bits)} "
                           f"bytes, got {data.numel()}")
    stream = np.unpackbits(data.cpu().numpy(), bitorder="little")[:count * bits]
    matrix = stream.reshape(count, bits)
    codes = np.packbits(matrix, axis=1, bitorder="little").reshape(count)
    return torch.from_numpy(codes)
