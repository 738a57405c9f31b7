"""The portable (exportable) quantize kernel against the bit-pattern kernel, bit for bit, and
quantized modules exported to torch.export, TorchScript and onnxruntime."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import require
from logquant import formats
from logquant.formats import parse_format
from test_formats import BITS_AND_SIGN, KINDS, format_strategy

LAYOUTS = {torch.float32: formats.F32, torch.float64: formats.F64}


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(LAYOUTS[x.dtype].int_dtype)


def assert_same(portable: torch.Tensor, reference: torch.Tensor, x: torch.Tensor) -> None:
    """Bit-identical, -0.0 vs +0.0 included; NaN only by position, since the bit kernel's NaN
    payload and sign vary with the CPU code path (SIMD lanes vs scalar tail, compiled)."""
    nan = torch.isnan(reference)
    assert torch.equal(torch.isnan(portable), nan), x[torch.isnan(portable) != nan][:4]
    bad = (bits(portable) != bits(reference)) & ~nan
    assert not bad.any(), (f"quantize({x[bad][:4].tolist()}): portable {portable[bad][:4]}, "
                           f"bit kernel {reference[bad][:4]}")


def probes(fmt, dtype: torch.dtype, random: int = 2048) -> torch.Tensor:
    """Every decision threshold, every level, zero, subnormals, the ends of the normal range,
    infinities, NaNs (one with a payload) and random bit patterns (so every binade), each with
    both float neighbours, and all of them negated."""
    lay = LAYOUTS[dtype]
    inf = lay.bits(lay.bias + 1)
    thresholds = torch.tensor(formats._portable_tables(fmt, dtype)[0][1:], dtype=dtype)
    special = torch.tensor([0, 1, 2, 3, lay.bits(1 - lay.bias) - 1, lay.bits(1 - lay.bias),
                            inf - 1, inf, inf | 1 << (lay.mant_bits - 1), inf | 12345],
                           dtype=torch.int64)
    gen = torch.Generator().manual_seed(fmt.bits)
    special = torch.cat([special, torch.randint(0, inf, (random,), generator=gen)])
    x = torch.cat([thresholds, fmt.levels().to(dtype), special.to(lay.int_dtype).view(dtype)])
    x = torch.cat([x, torch.nextafter(x, x.new_tensor(-torch.inf)),
                   torch.nextafter(x, x.new_tensor(torch.inf))])
    return torch.cat([x, -x])


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("bits, signed", BITS_AND_SIGN)
def test_portable_is_bit_identical(kind, bits, signed):
    for fsr in (-64, -3, 0, 2, 64):
        fmt = KINDS[kind][0](bits, fsr, signed)
        for dtype in LAYOUTS:
            x = probes(fmt, dtype)
            assert_same(fmt.quantize_portable(x), fmt.quantize(x), x)


@settings(max_examples=200, deadline=None)
@given(format_strategy, st.lists(st.floats(width=32), min_size=1, max_size=64),
       st.lists(st.floats(), min_size=1, max_size=64))
def test_portable_is_bit_identical_property(fmt, values32, values64):
    for x in (torch.tensor(values32, dtype=torch.float32),
              torch.tensor(values64, dtype=torch.float64)):
        assert_same(fmt.quantize_portable(x), fmt.quantize(x), x)


def test_portable_keeps_half_precision_dtypes():
    fmt = parse_format("log4s@fsr1")
    x = torch.tensor([0.3, -0.7, 5.0, -0.0], dtype=torch.bfloat16)
    assert torch.equal(fmt.quantize_portable(x).view(torch.int16),
                       fmt.quantize(x).view(torch.int16))


# ----------------------------------------------------------------------------------------
# Export: quantize switches to the portable kernel while exporting

FORMATS = [parse_format(spec) for spec in ("log3@fsr0", "log4s@fsr1", "logsqrt2-5s@fsr1",
                                           "log4-linround@fsr-2", "lin4@fsr0", "lin5s@fsr2")]
# (format, input): all formats on a float32 input, two also on a float64 one
EXPORTED = [(fmt, 0) for fmt in FORMATS] + [(FORMATS[2], 1), (FORMATS[5], 1)]


class Quantize(torch.nn.Module):
    """fmt.quantize(xs[i]) for each (fmt, i): one export covers them all (exports are slow)."""

    def __init__(self, pairs):
        super().__init__()
        self.pairs = pairs

    def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(fmt.quantize(xs[i]) for fmt, i in self.pairs)


def exported_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """The probes of all formats, in float32 and float64."""
    return tuple(torch.cat([probes(fmt, dtype, random=64) for fmt in FORMATS])
                 for dtype in LAYOUTS)


def assert_all_same(outputs, xs) -> None:
    assert len(outputs) == len(EXPORTED)
    for out, (fmt, i) in zip(outputs, EXPORTED):
        assert out.dtype == xs[i].dtype, fmt.name
        assert_same(out, fmt.quantize(xs[i]), xs[i])


def has_bit_view(graph: torch.fx.Graph) -> bool:
    return any(node.target == torch.ops.aten.view.dtype for node in graph.nodes)


def test_onnxruntime_matches_pytorch(tmp_path):
    for module in ("onnx", "onnxscript"):
        require(module)
    ort = require("onnxruntime")
    xs = exported_inputs()
    path = tmp_path / "quantize.onnx"
    torch.onnx.export(Quantize(EXPORTED).eval(), xs, path, dynamo=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {arg.name: x.numpy() for arg, x in zip(session.get_inputs(), xs)}
    assert_all_same([torch.from_numpy(out) for out in session.run(None, feed)], xs)


def test_torch_export_matches_eager():
    xs = exported_inputs()
    program = torch.export.export(Quantize(EXPORTED), xs)
    assert not has_bit_view(program.graph)
    assert_all_same(program.module()(*xs), xs)


def test_strict_export_and_jit_trace_match_eager():
    fmt = parse_format("logsqrt2-5s@fsr1")
    x = probes(fmt, torch.float32, random=0)
    program = torch.export.export(Quantize([(fmt, 0)]), (x,), strict=True)
    assert not has_bit_view(program.graph)
    assert_same(program.module()(x)[0], fmt.quantize(x), x)
    with warnings.catch_warnings():  # jit.trace is deprecated; constants are intended
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(Quantize([(fmt, 0)]), (x,))
    assert_same(traced(x)[0], fmt.quantize(x), x)


def test_bit_kernel_stays_outside_export():
    assert not formats.is_exporting()
    fmt = parse_format("log4s@fsr1")
    x = torch.linspace(-3, 3, 101)
    assert torch.equal(fmt.quantize(x), fmt.quantize_portable(x))
