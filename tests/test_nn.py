"""Quantizer module, straight-through estimators, quantized conv/linear."""

import torch
from torch import nn

from logquant.formats import parse_format
from logquant.nn import QConv2d, QLinear, Quantizer, fake_quantize


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
    assert torch.equal(QConv2d.from_float(conv)(x), conv(x))
    assert torch.equal(QLinear.from_float(lin)(v), lin(v))


def test_qat_style_weight_quantization_has_gradients():
    lin = QLinear.from_float(nn.Linear(4, 3), weight_format=parse_format("log4s@fsr0"))
    out = lin(torch.randn(2, 4)).sum()
    out.backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0
    lin.freeze_weight()
    assert torch.equal(lin.weight, parse_format("log4s@fsr0").quantize(lin.weight))


def test_inference_scratch_buffer_is_reused_only_without_autograd():
    q = Quantizer(parse_format("log3@fsr1"))
    x, y = torch.rand(4, 8) * 2, torch.rand(4, 8) * 2
    with torch.no_grad():
        first = q(x, scratch=True)
        expected_first = first.clone()
        second = q(y, scratch=True)
    assert second.data_ptr() == first.data_ptr()  # one buffer, reused
    assert torch.equal(expected_first, q(x)) and torch.equal(second, q(y))
    x.requires_grad_(True)
    out = q(x, scratch=True)  # autograd on: a fresh tensor that backward can rely on
    assert out.data_ptr() != first.data_ptr() and out.requires_grad
