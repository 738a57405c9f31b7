"""Quantizer module, straight-through estimators, quantized conv/linear."""

import torch
from torch import nn

from logquant.formats import parse_format
from logquant.nn import (
    QConv2d,
    QLinear,
    Quantizer,
    fake_quantize,
    quantize_layer_,
    restore_float_,
)


def test_straight_through_gradients():
    fmt = parse_format("log3s@fsr1")  # levels 0.25, 0.5, 1
    x = torch.tensor([0.1, -0.3, 1.7, -2.0], requires_grad=True)
    fake_quantize(x, fmt).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0, 1.0]
    x.grad = None
    fake_quantize(x, fmt, clip=True).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0, 0.0]  # saturated inputs get no gradient
    assert torch.equal(fake_quantize(x, fmt), fmt.quantize(x.detach()))


def test_quantizer_state_travels_with_state_dict():
    q = Quantizer(parse_format("log4"))
    assert q.format is None
    q.set_fsr(2)
    assert q.format.name == "log4@fsr2"
    fresh = Quantizer(parse_format("log4"))
    fresh.load_state_dict(q.state_dict())
    assert fresh.format.name == "log4@fsr2"
    x = torch.rand(100) * 4
    assert torch.equal(fresh(x), parse_format("log4@fsr2").quantize(x))


def test_identity_quantizer_and_missing_fsr():
    x = torch.randn(10)
    assert Quantizer(None)(x) is x
    try:
        Quantizer(parse_format("log4"))(x)
    except RuntimeError as exc:
        assert "no FSR" in str(exc)
    else:
        raise AssertionError("an uncalibrated quantizer must refuse to run")


def test_quantized_layers_match_float_layers_when_formats_are_off():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, groups=1)
    lin = nn.Linear(5, 2)
    x, v = torch.randn(2, 3, 8, 8), torch.randn(3, 5)
    expected_conv, expected_lin = conv(x), lin(v)
    qconv, qlin = quantize_layer_(conv, "conv"), quantize_layer_(lin, "lin")
    assert isinstance(qconv, QConv2d) and isinstance(qlin, QLinear)
    assert torch.equal(qconv(x), expected_conv) and torch.equal(qlin(v), expected_lin)
    assert type(restore_float_(qconv)) is nn.Conv2d and "weight_quant" not in dict(
        qconv.named_modules())


def test_qat_style_weight_quantization_has_gradients():
    lin = quantize_layer_(nn.Linear(4, 3))
    lin.weight_quant = Quantizer(parse_format("log4s@fsr0"))
    out = lin(torch.randn(2, 4)).sum()
    out.backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0
    lin.freeze_weight()
    assert torch.equal(lin.weight, parse_format("log4s@fsr0").quantize(lin.weight))
