"""Quantization-aware training: FSR rules, error quantization, prepare_qat."""

import pytest
import torch
from torch import nn

from logquant.calibrate import fsr_covering
from logquant.config import QuantConfig
from logquant.formats import parse_format
from logquant.models import RefCNN
from logquant.nn import ErrorQuantizer, QConv2d, QLinear, Quantizer
from logquant.qat import prepare_qat


def test_error_quantizer_rule():
    eq = ErrorQuantizer(parse_format("log4"))  # errors are signed: becomes log4s
    x = torch.randn(64, requires_grad=True)
    g = torch.randn(64) * 0.01
    eq.train()(x).backward(g)
    fsr = fsr_covering(float(g.abs().max()))
    assert eq.last_fsr.item() == fsr
    assert torch.equal(x.grad, parse_format(f"log4s@fsr{fsr}").quantize(g))
    y = torch.randn(8, requires_grad=True)
    eq(y).backward(torch.zeros(8))
    assert torch.equal(y.grad, torch.zeros(8))  # all-zero errors stay zero


def test_running_max_and_current_max_rules():
    q = Quantizer(parse_format("log3"), rule="running_max", momentum=0.5).train()
    q(torch.tensor([1.5, 0.2]))  # first step: the batch max itself
    assert q.running_max.item() == 1.5 and q.format.fsr == 1
    q(torch.tensor([5.5, 0.2]))  # 0.5 * 1.5 + 0.5 * 5.5 = 3.5 -> FSR 2
    assert q.running_max.item() == 3.5 and q.format.fsr == 2
    q.eval()(torch.tensor([100.0]))  # eval: frozen
    assert q.format.fsr == 2
    w = Quantizer(parse_format("log5"), rule="current_max").train()
    w(torch.tensor([0.3, -0.1]))
    assert w.format.name == "log5s@fsr-1"  # negative values: signed, same total bits


def test_prepare_qat_quantizes_weights_inputs_and_errors():
    torch.manual_seed(0)
    model = RefCNN()
    x = torch.randn(16, 1, 28, 28)
    config = QuantConfig(conv_weights="log5", fc_weights="log5", acts="log4", grads="log5")
    qat = prepare_qat(model, config, [x])
    assert not any(isinstance(m, (QConv2d, QLinear)) for m in model.modules())
    layers = [m for m in qat.modules() if isinstance(m, (QConv2d, QLinear))]
    assert layers[0].input_quant.spec is None and layers[1].input_quant.format.name.startswith(
        "log4@fsr")
    assert layers[-1].error_quant.spec is None  # the loss gradient at the logits stays float
    assert all(m.error_quant.spec.name == "log5s" for m in layers[:-1])
    out = qat(x)
    out.sum().backward()
    conv = layers[1]
    assert torch.equal(conv.quantized_weight().detach(), conv.weight_quant.format.quantize(
        conv.weight.detach()))
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    assert conv.error_quant.last_fsr.item() != 0


def test_qat_state_round_trips_and_fixed_fsr_is_kept():
    config = QuantConfig(conv_weights="log5@fsr-2", acts="log4")
    qat = prepare_qat(RefCNN(), config, [torch.randn(4, 1, 28, 28)])
    assert qat.get_submodule("features.3").weight_quant.rule == "fixed"
    clone = prepare_qat(RefCNN(), config)
    clone.load_state_dict(qat.state_dict())
    qat.eval(), clone.eval()
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(qat(x), clone(x))


def test_unknown_layer_in_qat_config():
    with pytest.raises(Exception, match="selects no layer"):
        prepare_qat(RefCNN(), QuantConfig(skip=("nope",)))


def test_fixed_fsr_weight_formats_keep_the_sign_of_negative_weights():
    torch.manual_seed(0)
    qat = prepare_qat(nn.Sequential(nn.Linear(4, 3)), QuantConfig(fc_weights="log5@fsr0"))
    layer = qat[0]
    assert layer.weight_quant.format.name == "log5s@fsr0"
    assert (layer.weight_quant(layer.weight) < 0).any()
