"""Post-training quantization of arbitrary CNNs: folding, calibration, wrapping."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from logquant.config import ConfigError, QuantConfig
from logquant.convert import describe, quantize_model
from logquant.errors import LogquantError
from logquant.fold import fold_batchnorm
from logquant.models import RefCNN
from logquant.nn import QConv2d, QLinear

LOG = QuantConfig(conv_weights="log5", fc_weights="log4", acts="log3")


def _calibration(shape=(32, 1, 28, 28), seed=0):
    return [torch.randn(shape, generator=torch.Generator().manual_seed(seed))]


def _trained_like(model):
    """Give BatchNorm layers non-trivial statistics so folding is really tested."""
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return model.eval()


def test_batchnorm_folding_preserves_the_function():
    model = _trained_like(RefCNN())
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = _calibration()[0]
    torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)


def test_float_model_is_never_modified():
    model = _trained_like(RefCNN())
    before = copy.deepcopy(model.state_dict())
    quantize_model(model, LOG, _calibration())
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(isinstance(m, (QConv2d, QLinear)) for m in model.modules())


def test_weights_are_quantized_and_first_input_stays_float():
    model = _trained_like(RefCNN())
    q = quantize_model(model, LOG, _calibration())
    rows = describe(q)
    assert [r["layer"] for r in rows] == ["features.0", "features.3", "features.7",
                                          "features.10", "features.14", "classifier.1",
                                          "classifier.4"]
    assert rows[0]["input"] == "float"
    for r in rows[1:]:
        assert r["input"].startswith("log3@fsr")  # post-ReLU inputs: unsigned
    for name, module in q.named_modules():
        if isinstance(module, (QConv2d, QLinear)):
            fmt = module.weight_quant.format
            assert fmt.signed and fmt.bits == (5 if isinstance(module, QConv2d) else 4)
            assert torch.equal(fmt.quantize(module.weight), module.weight), name
            levels = set(fmt.levels().float().tolist())
            assert set(module.weight.unique().tolist()) <= levels


def test_quantized_forward_equals_manual_simulation():
    model = _trained_like(RefCNN())
    q = quantize_model(model, LOG, _calibration())
    x = _calibration(seed=5)[0]
    conv = q.get_submodule("features.3")
    seen = {}
    conv.register_forward_hook(lambda mod, inputs, out: seen.update(
        h=inputs[0], out=out.clone()))  # clone: the ReLU after it works in place
    q(x)
    expected = F.conv2d(conv.input_quant.format.quantize(seen["h"]), conv.weight, conv.bias,
                        padding=1)
    assert torch.equal(seen["out"], expected)


def test_signed_activation_format_where_inputs_are_negative():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 26 * 26, 3))
    q = quantize_model(model, QuantConfig(acts="log4"), _calibration())
    assert describe(q)[1]["input"].startswith("log4s@")  # no ReLU: negative inputs


def test_fixed_fsr_overrides_and_skip():
    config = QuantConfig(conv_weights="log5@fsr-1", fc_weights="lin4", acts="log3@fsr2",
                         overrides={"features.3": {"weights": "logsqrt2-5", "acts": "float"}},
                         skip=("classifier.4",), weight_fsr="max")
    rows = {r["layer"]: r for r in describe(quantize_model(RefCNN(), config, _calibration()))}
    assert rows["features.7"]["weights"] == "log5s@fsr-1"
    assert rows["features.7"]["input"] == "log3@fsr2"
    assert rows["features.3"]["weights"].startswith("logsqrt2-5s@fsr")
    assert rows["features.3"]["input"] == "float"
    assert rows["classifier.1"]["weights"].startswith("lin4s@fsr")
    assert rows["classifier.4"] == {"layer": "classifier.4", "type": "Linear", "kind": "fc",
                                    "weights": "float", "input": "float", "status": "float",
                                    "reason": "skipped by pattern 'classifier.4'"}


def test_bad_configuration_and_inputs():
    with pytest.raises(ConfigError, match="layer pattern 'features.99' selects no layer"):
        quantize_model(RefCNN(), QuantConfig(skip=("features.99",)), _calibration())
    with pytest.raises(LogquantError, match="no conv or linear layers"):
        quantize_model(nn.Sequential(nn.ReLU()), LOG, _calibration())
    with pytest.raises(LogquantError, match="calibration data is empty"):
        quantize_model(RefCNN(), LOG, [])
    with pytest.raises(ConfigError, match="1 bit"):
        quantize_model(RefCNN(), QuantConfig(conv_weights="log1"), _calibration())


class FunctionalResidual(nn.Module):
    """Calls F.relu and adds a skip connection: nothing for a module swap to see."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        h = F.relu(self.a(x))
        h = F.relu6(self.bn(self.b(h)) + h)
        return self.fc(h.mean((2, 3)))


def test_functional_relu_residual_and_depthwise():
    model = _trained_like(FunctionalResidual())
    q = quantize_model(model, LOG, _calibration())
    rows = {r["layer"]: r for r in describe(q)}
    assert rows["b"]["input"].startswith("log3@") and rows["fc"]["input"].startswith("log3@")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in q.modules())
    x = _calibration(seed=3)[0]
    assert q(x).shape == (32, 10)


@pytest.mark.parametrize("name, size", [("resnet18", 32), ("mobilenet_v2", 32),
                                        ("alexnet", 64), ("vgg16", 32)])
def test_torchvision_architectures(name, size):
    tvm = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    model = _trained_like(tvm.get_model(name, weights=None, num_classes=10))
    config = QuantConfig(conv_weights="logsqrt2-5", fc_weights="log4", acts="log4",
                         weight_fsr="max" if name in ("vgg16", "alexnet") else "mse")
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    q = quantize_model(model, config, [x])
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(describe(q)) == len(convs)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in q.modules())
    with torch.no_grad():
        out, ref = q(x), model(x)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    # coarse formats change the numbers, but not beyond the scale of the float output
    assert float((out - ref).abs().mean()) < 2 * float(ref.abs().mean()) + 1e-3, name


def test_prepared_model_takes_configurations_in_turn():
    """Reapplying configurations (as sweeps do) equals quantizing from scratch each time."""
    from logquant.convert import PreparedModel

    model = _trained_like(RefCNN())
    calibration, x = _calibration(), _calibration(seed=9)[0]
    prepared = PreparedModel(model, calibration, cache_weights=True)
    configs = [LOG, QuantConfig(acts="lin4@fsr2"), QuantConfig(conv_weights="logsqrt2-4"), LOG]
    with torch.no_grad():
        for config in configs:
            expected = quantize_model(model, config, calibration)(x)
            assert torch.equal(prepared.apply(config)(x), expected), config
    assert describe(prepared.model) == describe(quantize_model(model, LOG, calibration))


def test_top_level_api():
    import logquant

    q = logquant.quantize_model(RefCNN(), logquant.QuantConfig(acts="log4"), _calibration())
    assert logquant.describe(q)[1]["input"].startswith("log4@")
    assert isinstance(logquant.parse_format("log3"), logquant.LogFormat)
