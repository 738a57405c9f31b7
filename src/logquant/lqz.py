"""The packed .lqz file: a quantized network as a safetensors container, safe to open.

Layout (format version 1). A standard safetensors file (no pickle, no code) whose metadata
holds two strings: ``lqz``, the JSON header (input spec, the list of ops, formats, the
configuration and provenance), and ``checksum``, the SHA-256 of the header and of every
tensor (name, dtype, shape, bytes). Tensors: ``<layer>.weight`` is the layer's weight codes
bit-packed at exactly the format's width (see :mod:`logquant.packing`), ``<layer>.bias``
the bias as integers on the accumulator grid, in the narrowest integer type that holds it.

The reader validates every length, offset, shape, dtype and format before allocating or
reading the data, then verifies the checksum; any problem raises :class:`LqzError`. What it
allocates stays within a fixed multiple of the file's size: an entropy-coded layer may
claim at most ``MAX_CODES_PER_RANS_BYTE`` weights per byte of its stream (the writer packs
near-constant layers instead). ``tests/test_fuzz_lqz.py`` holds the reader to this.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from logquant.errors import LogquantError
from logquant.formats import Format, FormatError, parse_format
from logquant.io import JsonError, parse_json
from logquant.packing import pack_codes, packed_size, unpack_codes

MAGIC = "logquant-lqz"
VERSION = 1
MAX_HEADER_BYTES = 1 << 22  # a network description is a few kB; refuse absurd headers
MAX_TENSORS = 4096
# An entropy-coded layer may decode to at most this many codes per byte of its stream
# (1/4 bit per weight): the reader's allocation stays within a fixed multiple of the file.
MAX_CODES_PER_RANS_BYTE = 32

# op -> required fields (besides "op", "in", "out"); "in" is a list for "add"
OPS: dict[str, tuple[str, ...]] = {
    "input": ("shape", "offset"),
    "conv": ("name", "weight", "bias", "weight_format", "shape", "stride", "padding",
             "dilation", "groups"),
    "linear": ("name", "weight", "bias", "weight_format", "shape"),
    "quantize": ("format",),
    "relu": (),
    "relu6": (),
    "maxpool": ("kernel", "stride", "padding", "dilation", "ceil_mode"),
    "avgpool": ("kernel", "stride", "padding", "ceil_mode", "count_include_pad"),
    "global_avgpool": (),
    "add": (),
    "flatten": (),
    "output": (),
}
_DTYPES = {"U8": np.uint8, "I8": np.int8, "I16": np.int16, "I32": np.int32, "I64": np.int64}


class LqzError(LogquantError):
    """A .lqz file that is missing, damaged, of another version, or describes a network
    the engine cannot run."""


@dataclasses.dataclass
class LqzModel:
    """A network in log representation: the header, weight codes and integer biases."""

    header: dict[str, Any]
    weights: dict[str, torch.Tensor]  # name -> uint8 codes, in the layer's weight shape
    biases: dict[str, torch.Tensor]  # name -> int64

    @property
    def ops(self) -> list[dict[str, Any]]:
        return self.header["ops"]

    def layer_ops(self) -> list[dict[str, Any]]:
        return [op for op in self.ops if op["op"] in ("conv", "linear")]

    def weight_format(self, op: dict[str, Any]) -> Format:
        return parse_format(op["weight_format"])


# ----------------------------------------------------------------------------------------
# Writing


def _narrow_int(values: torch.Tensor) -> np.ndarray:
    array = values.cpu().numpy().astype(np.int64)
    for dtype in (np.int8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if array.size == 0 or (array.min() >= info.min and array.max() <= info.max):
            return array.astype(dtype)
    return array


def _checksum(header_json: str, arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256(header_json.encode())
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"\n{name}:{array.dtype.str}:{list(array.shape)}\n".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


ENCODINGS = ("packed", "rans")


def _weight_arrays(name: str, codes: torch.Tensor, fmt: Format,
                   compress: bool) -> tuple[str, dict[str, np.ndarray]]:
    """(encoding, tensors) of one layer's weight codes: rANS-coded with a ``.freq`` table
    where ``compress`` asks and that is smaller than packing and within the codes per
    stream byte the reader accepts (a near-constant layer stays packed); else bit-packed."""
    from logquant import entropy

    packed = pack_codes(codes, fmt.bits).numpy()
    if compress:
        flat = codes.numpy().reshape(-1).astype(np.uint8)
        freqs = entropy.frequencies(flat, fmt.num_codes).astype(np.int16)
        stream = np.frombuffer(entropy.encode(flat, freqs), dtype=np.uint8)
        if (stream.size + freqs.nbytes < packed.size
                and flat.size <= MAX_CODES_PER_RANS_BYTE * stream.size):
            return "rans", {name: stream, name + ".freq": freqs}
    return "packed", {name: packed}


_DTYPE_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


def container_bytes(arrays: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """A safetensors file, byte for byte deterministic: tensors in name order, sorted JSON
    keys, header padded with spaces to a multiple of 8 (as the format recommends)."""
    table: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    chunks, offset = [], 0
    for name in sorted(arrays):
        data = np.ascontiguousarray(arrays[name]).tobytes()
        table[name] = {"dtype": _DTYPE_NAMES[arrays[name].dtype],
                       "shape": list(arrays[name].shape), "data_offsets": [offset,
                                                                            offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    header = json.dumps(table, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + b"".join(chunks)


def file_bytes(header: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
    """The .lqz file of ``header`` and tensors ``arrays``, checksum included; no checks
    (``save`` validates first; tests use it to craft hostile files that pass the checksum)."""
    header_json = json.dumps(header, sort_keys=True, separators=(",", ":"))
    metadata = {"checksum": _checksum(header_json, arrays), "lqz": header_json}
    return container_bytes(arrays, metadata)


def save(model: LqzModel, path: str | os.PathLike, compress: bool = False) -> int:
    """Write ``model`` to ``path`` atomically; returns the file size in bytes.
    ``compress`` entropy-codes the weight codes (rANS) of every layer where that is
    smaller than bit-packing them."""
    from logquant.io import atomic_path

    header = json.loads(json.dumps(model.header))
    validate_header(header)
    arrays: dict[str, np.ndarray] = {}
    for op in header["ops"]:
        if op["op"] in ("conv", "linear"):
            op["weight_encoding"], tensors = _weight_arrays(
                op["weight"], model.weights[op["weight"]], parse_format(op["weight_format"]),
                compress)
            arrays.update(tensors)
            if op["bias"] is not None:
                arrays[op["bias"]] = _narrow_int(model.biases[op["bias"]])
    with atomic_path(path) as tmp:
        tmp.write_bytes(file_bytes(header, arrays))
    return Path(path).stat().st_size


# ----------------------------------------------------------------------------------------
# Reading


def _fail(path: Path, message: str):
    raise LqzError(f"{path}: {message}")


def read_container(path: Path) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """Parse a safetensors file with every field checked before the data is read."""
    if not path.is_file():
        _fail(path, "no such .lqz file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            _fail(path, f"truncated: {size} bytes is shorter than the 8-byte header length")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > MAX_HEADER_BYTES:
            _fail(path, f"header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit"
                  " (corrupted or not an .lqz file)")
        if 8 + header_len > size:
            _fail(path, f"truncated: header of {header_len} bytes, file of {size} bytes")
        try:
            table = parse_json(f.read(header_len), "header")
        except JsonError as exc:
            _fail(path, f"corrupted {exc}")
        if not isinstance(table, dict):
            _fail(path, "corrupted header (not a JSON object)")
        metadata = table.pop("__metadata__", None)
        if not isinstance(metadata, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            _fail(path, "not an .lqz file (no string metadata)")
        if len(table) > MAX_TENSORS:
            _fail(path, f"{len(table)} tensors exceeds the limit of {MAX_TENSORS}")
        data_len = size - 8 - header_len
        spans = []
        for name, info in table.items():
            ok = (isinstance(info, dict) and info.get("dtype") in _DTYPES
                  and isinstance(info.get("shape"), list)
                  and all(type(d) is int and 0 <= d < 1 << 40 for d in info["shape"])
                  and isinstance(info.get("data_offsets"), list)
                  and len(info["data_offsets"]) == 2
                  and all(type(o) is int for o in info["data_offsets"]))
            if not ok:
                _fail(path, f"corrupted entry for tensor {name!r}")
            begin, end = info["data_offsets"]
            count = int(np.prod(info["shape"], dtype=object)) if info["shape"] else 1
            nbytes = count * np.dtype(_DTYPES[info["dtype"]]).itemsize
            if not 0 <= begin <= end <= data_len or end - begin != nbytes:
                _fail(path, f"tensor {name!r}: data offsets {begin}..{end} do not fit its shape "
                      f"{info['shape']} or the file's {data_len} data bytes (truncated?)")
            spans.append((begin, end))
        spans.sort()
        covered = 0
        for begin, end in spans:
            if begin != covered:
                _fail(path, "tensor data overlaps or leaves gaps (corrupted)")
            covered = end
        if covered != data_len:
            _fail(path, f"{data_len - covered} trailing bytes after the tensor data (corrupted)")
        data = f.read(data_len)
    arrays = {}
    for name, info in table.items():
        begin, end = info["data_offsets"]
        arrays[name] = np.frombuffer(data, dtype=_DTYPES[info["dtype"]], count=(end - begin)
                                     // np.dtype(_DTYPES[info["dtype"]]).itemsize,
                                     offset=begin).reshape(info["shape"])
    return metadata, arrays


def load(path: str | os.PathLike) -> LqzModel:
    """Read and fully validate an .lqz file (never executes anything from it)."""
    path = Path(path)
    metadata, arrays = read_container(path)
    if "lqz" not in metadata or "checksum" not in metadata:
        _fail(path, "not an .lqz file (a safetensors file without the lqz header)")
    header_json = metadata["lqz"]
    if _checksum(header_json, arrays) != metadata["checksum"]:
        _fail(path, "checksum mismatch: the file is corrupted")
    try:
        header = parse_json(header_json, "lqz header")
    except JsonError as exc:
        _fail(path, f"corrupted {exc}")
    try:
        validate_header(header)
        return _unpack(header, arrays)
    except LqzError as exc:
        raise LqzError(f"{path}: {exc}") from None


def _unpack(header: dict[str, Any], arrays: dict[str, np.ndarray]) -> LqzModel:
    weights, biases = {}, {}
    expected = set()
    for op in header["ops"]:
        if op["op"] not in ("conv", "linear"):
            continue
        fmt = parse_format(op["weight_format"])
        shape, name = op["shape"], op["weight"]
        count = math.prod(shape)  # exact: numpy's product wraps around at 2^64
        packed = arrays.get(name)
        if packed is None or packed.dtype != np.uint8 or packed.ndim != 1:
            raise LqzError(f"{op['name']}: weight tensor {name!r} missing or not bytes")
        if op.get("weight_encoding", "packed") == "rans":
            weights[name] = _decode_rans(op, packed, arrays.get(name + ".freq"), fmt, count)
            expected.add(name + ".freq")
        else:
            if packed.size != packed_size(count, fmt.bits):
                raise LqzError(f"{op['name']}: {count} weights of {fmt.bits} bits need "
                               f"{packed_size(count, fmt.bits)} bytes, the file holds "
                               f"{packed.size}")
            weights[name] = unpack_codes(torch.from_numpy(packed.copy()), fmt.bits, count)
        weights[name] = weights[name].reshape(shape)
        expected.add(name)
        if op["bias"] is not None:
            bias = arrays.get(op["bias"])
            if bias is None or bias.dtype == np.uint8 or list(bias.shape) != [shape[0]]:
                raise LqzError(f"{op['name']}: bias tensor {op['bias']!r} missing or not "
                               f"{shape[0]} integers")
            biases[op["bias"]] = torch.from_numpy(bias.astype(np.int64))
            expected.add(op["bias"])
    extra = sorted(set(arrays) - expected)
    if extra:
        raise LqzError(f"unexpected tensor {extra[0]!r} in the file")
    return LqzModel(header, weights, biases)


def _decode_rans(op: dict, stream: np.ndarray, freqs, fmt: Format, count: int) -> torch.Tensor:
    from logquant import entropy

    if freqs is None or freqs.dtype != np.int16 or freqs.shape != (fmt.num_codes,) or (
            freqs < 0).any():
        raise LqzError(f"{op['name']}: frequency table missing or not {fmt.num_codes} counts")
    if stream.size > 2 * packed_size(count, 8) + 64:  # far above any honest stream
        raise LqzError(f"{op['name']}: entropy-coded weights larger than possible")
    if count > MAX_CODES_PER_RANS_BYTE * stream.size:
        raise LqzError(f"{op['name']}: {count} weights cannot come from a {stream.size}-byte "
                       f"stream (at most {MAX_CODES_PER_RANS_BYTE} per byte)")
    try:
        codes = entropy.decode(stream.tobytes(), freqs, count)
    except entropy.EntropyError as exc:
        raise LqzError(f"{op['name']}: {exc}") from None
    return torch.from_numpy(codes.copy())


# ----------------------------------------------------------------------------------------
# Header schema


def _int_list(value, length: int | None = None) -> bool:
    return (isinstance(value, list) and all(type(v) is int for v in value)
            and (length is None or len(value) == length))


def validate_header(header: Any) -> None:
    """Structural checks of a header (the engine checks the arithmetic when it plans)."""
    if not isinstance(header, dict) or header.get("format") != MAGIC:
        raise LqzError("not an .lqz header")
    if header.get("version") != VERSION:
        raise LqzError(f"unsupported .lqz version {header.get('version')!r} (this logquant "
                       f"reads version {VERSION})")
    ops = header.get("ops")
    if not isinstance(ops, list) or not ops:
        raise LqzError("the header has no ops")
    defined: set[str] = set()
    tensors: set[str] = set()
    for i, op in enumerate(ops):
        where = f"op {i}"
        if not isinstance(op, dict) or not isinstance(op.get("op"), str) or op["op"] not in OPS:
            kind = op.get("op") if isinstance(op, dict) else op
            raise LqzError(f"{where}: unknown op {kind!r}; this engine runs "
                           f"{', '.join(OPS)}")
        missing = [k for k in OPS[op["op"]] + ("out",) if k not in op]
        if missing:
            raise LqzError(f"{where} ({op['op']}): missing field {missing[0]!r}")
        if op["op"] == "input" and "in" in op:
            raise LqzError(f"{where} (input): the input op reads nothing, but has 'in'")
        inputs = [] if op["op"] == "input" else (
            op.get("in") if op["op"] == "add" else [op.get("in")])
        if not isinstance(inputs, list) or any(
                not isinstance(v, str) or v not in defined for v in inputs) or (
                op["op"] == "add" and len(inputs) != 2):
            raise LqzError(f"{where} ({op['op']}): input {op.get('in')!r} is not an earlier "
                           "op's output")
        if not isinstance(op["out"], str) or op["out"] in defined:
            raise LqzError(f"{where} ({op['op']}): output name {op['out']!r} reused or invalid")
        defined.add(op["out"])
        _validate_fields(op, where, tensors)
    if ops[0]["op"] != "input" or ops[-1]["op"] != "output" or sum(
            op["op"] == "input" for op in ops) != 1 or sum(op["op"] == "output"
                                                          for op in ops) != 1:
        raise LqzError("ops must start with the one input and end with the one output")


def _format(name: Any, where: str) -> Format:
    try:
        fmt = parse_format(name) if isinstance(name, str) else None
    except FormatError as exc:
        raise LqzError(f"{where}: {exc}") from None
    if fmt is None or fmt.fsr is None:
        raise LqzError(f"{where}: {name!r} is not a format with an FSR")
    return fmt


def _validate_fields(op: dict[str, Any], where: str, tensors: set[str]) -> None:
    kind = op["op"]
    if kind == "input":
        shape = op["shape"]
        if not _int_list(shape, 3) or not all(0 < d <= 1 << 14 for d in shape):
            raise LqzError(f"{where}: input shape must be [C, H, W], got {shape!r}")
        if not _int_list(op["offset"], shape[0]) or not all(0 <= v <= 255 for v in op["offset"]):
            raise LqzError(f"{where}: input offset must be {shape[0]} integers in 0..255")
    elif kind in ("conv", "linear"):
        where = f"{where} ({op['name']!r})"
        fmt = _format(op["weight_format"], where)
        if not fmt.signed:
            raise LqzError(f"{where}: weight formats are signed, got {fmt.name}")
        dims = 4 if kind == "conv" else 2
        if not _int_list(op["shape"], dims) or not all(0 < d <= 1 << 20 for d in op["shape"]):
            raise LqzError(f"{where}: weight shape must be {dims} positive integers, "
                           f"got {op['shape']!r}")
        if op.get("weight_encoding", "packed") not in ENCODINGS:
            raise LqzError(f"{where}: weight_encoding must be one of {', '.join(ENCODINGS)}")
        names = [op["weight"]] + ([op["bias"]] if op["bias"] is not None else [])
        if not all(isinstance(n, str) for n in names) or tensors & set(names):
            raise LqzError(f"{where}: tensor names invalid or reused")
        tensors.update(names)
        if kind == "conv":
            for field in ("stride", "padding", "dilation"):
                if not _int_list(op[field], 2) or not all(0 <= v <= 1024 for v in op[field]):
                    raise LqzError(f"{where}: {field} must be two small integers")
            if min(op["stride"] + op["dilation"]) < 1 or type(op["groups"]) is not int or not (
                    1 <= op["groups"] <= op["shape"][0]) or op["shape"][0] % op["groups"]:
                raise LqzError(f"{where}: invalid stride, dilation or groups")
    elif kind == "quantize":
        _format(op["format"], where)
    elif kind in ("maxpool", "avgpool"):
        for field in ("kernel", "stride", "padding") + (("dilation",) if kind == "maxpool"
                                                        else ()):
            if not _int_list(op[field], 2) or not all(0 <= v <= 1024 for v in op[field]):
                raise LqzError(f"{where} ({kind}): {field} must be two small integers")
        if min(op["kernel"] + op["stride"]) < 1 or (kind == "maxpool" and min(
                op["dilation"]) < 1) or any(2 * p > k for p, k in zip(op["padding"],
                                                                       op["kernel"])):
            raise LqzError(f"{where} ({kind}): invalid kernel, stride, padding or dilation")
        if kind == "avgpool" and op.get("dilation", [1, 1]) != [1, 1]:
            raise LqzError(f"{where} (avgpool): average pooling has no dilation")
        if type(op["ceil_mode"]) is not bool or (kind == "avgpool" and type(
                op["count_include_pad"]) is not bool):
            raise LqzError(f"{where} ({kind}): ceil_mode/count_include_pad must be booleans")
