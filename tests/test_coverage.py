"""Every conv/linear layer of a user's network is quantized, with its own forward semantics,
or refused / listed float with a reason; never skipped silently."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from logquant import QuantConfig, describe, quantize_model
from logquant.config import ConfigError
from logquant.errors import LogquantError
from logquant.formats import parse_format
from logquant.nn import UnsupportedLayerError

LOG4 = QuantConfig(conv_weights="log4", fc_weights="log4", acts="log4")


class StdConv(nn.Conv2d):
    """Weight standardization in forward (as timm's StdConv2d): the weight used is not
    the weight stored."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class SameConv(nn.Conv2d):
    """TF-style static "same" padding applied in forward (as timm's Conv2dSame)."""

    def forward(self, x):
        return super().forward(F.pad(x, (0, 1, 0, 1)))


class Double(nn.Module):
    def forward(self, w):
        return 2 * w


class MatmulLinear(nn.Linear):
    """A Linear subclass that never calls F.linear: logquant cannot see its product."""

    def forward(self, x):
        return x @ self.weight.t() + self.bias


class TwoCalls(nn.Conv2d):
    def forward(self, x):
        return self._conv_forward(self._conv_forward(x, self.weight, self.bias), self.weight,
                                  self.bias)


def _mixed_net() -> nn.Module:
    torch.manual_seed(0)
    conv_p = nn.Conv2d(8, 8, 3, padding=1, groups=2)
    parametrize.register_parametrization(conv_p, "weight", Double())
    return nn.Sequential(
        StdConv(3, 8, 3, padding=1), nn.ReLU(),
        conv_p, nn.ReLU(),
        SameConv(8, 8, 2, stride=2), nn.ReLU(),
        nn.ConvTranspose2d(8, 8, 2, stride=2), nn.ReLU(),
        nn.Conv2d(8, 8, 3, dilation=2, padding=2, padding_mode="reflect"), nn.ReLU(),
        nn.Flatten(2), nn.Conv1d(8, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 254, 5),
    ).eval()


def _reference(model: nn.Module, qmodel: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The float model with each layer's conv/linear call quantized as describe() says,
    by a slow path of its own: the layer's effective weight and input recomputed from the
    layer's own definition (hand-written per class here)."""
    rows = {r["layer"]: r for r in describe(qmodel)}
    model = copy.deepcopy(model)
    handles = []

    def fmt(text):
        return parse_format(text)

    for name, m in model.named_modules():
        row = rows.get(name)
        if row is None or row["status"] != "quantized":
            continue
        wf, xf = fmt(row["weights"]), fmt(row["input"])

        def hook(mod, args, out, wf=wf, xf=xf):
            x = args[0]
            if isinstance(mod, SameConv):
                x = F.pad(x, (0, 1, 0, 1))
            xq = x if xf is None else xf.quantize(x)
            w = mod.weight
            if isinstance(mod, StdConv):
                w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True)
                                                             + 1e-5)
            wq = w if wf is None else wf.quantize(w)
            if isinstance(mod, nn.Linear):
                return F.linear(xq, wq, mod.bias)
            if isinstance(mod, nn.ConvTranspose2d):
                return F.conv_transpose2d(xq, wq, mod.bias, mod.stride, mod.padding)
            if isinstance(mod, SameConv):
                return F.conv2d(xq, wq, mod.bias, mod.stride)
            return mod._conv_forward(xq, wq, mod.bias)

        handles.append(m.register_forward_hook(hook))
    with torch.no_grad():
        return model(x)


def test_every_layer_kind_is_quantized_with_its_own_semantics():
    model = _mixed_net()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(16, 3, 16, 16)
    q = quantize_model(model, LOG4, x)
    table = describe(q)
    assert [r["type"] for r in table] == ["StdConv", "ParametrizedConv2d", "SameConv",
                                          "ConvTranspose2d", "Conv2d", "Conv1d", "Linear"]
    assert table.quantized == table.total == 7 and table.summary() == \
        "quantized 7 of 7 conv/linear layers"
    assert all(r["weights"] != "float" for r in table)
    assert table[0]["input"] == "float" and all(r["input"] != "float" for r in table[1:])
    probe = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(q(probe), _reference(model, q, probe))
    # the float model is untouched, classes included
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert type(model[0]) is StdConv and type(model[-1]) is nn.Linear
    assert "quantized 7 of 7" in str(table) and "StdConv" in str(table)


def test_conv3d_and_transposed_1d_3d():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.ReLU(),
                          nn.ConvTranspose3d(4, 2, 2, stride=2), nn.ReLU(), nn.Flatten(2),
                          nn.ConvTranspose1d(2, 3, 3)).eval()
    x = torch.randn(3, 2, 4, 4, 4)
    q = quantize_model(model, LOG4, x)
    assert describe(q).quantized == 3
    ref = copy.deepcopy(model)
    rows = describe(q)
    for row, m in zip(rows, [ref[0], ref[2], ref[5]]):
        m.weight.data = parse_format(row["weights"]).quantize(m.weight.data)
        if row["input"] != "float":
            m.register_forward_pre_hook(
                lambda mod, a, f=parse_format(row["input"]): (f.quantize(a[0]),))
    with torch.no_grad():
        assert torch.equal(q(x), ref(x))


def test_unsupported_layers_raise_naming_them_or_stay_float_when_asked():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), MatmulLinear(4 * 26 * 26, 3),
                          nn.ReLU(), nn.Linear(3, 2)).eval()
    x = torch.randn(4, 1, 28, 28)
    with pytest.raises(UnsupportedLayerError, match="^2: its forward computes no conv/linear"):
        quantize_model(model, LOG4, x)
    q = quantize_model(model, QuantConfig(conv_weights="log4", fc_weights="log4",
                                          acts="log4", unsupported="float"), x)
    rows = describe(q)
    assert [r["status"] for r in rows] == ["quantized", "float", "quantized"]
    assert "no conv/linear op" in rows[1]["reason"] and rows.summary() == \
        "quantized 2 of 3 conv/linear layers"
    assert type(q[2]) is MatmulLinear  # left exactly as it was
    with torch.no_grad():
        q(x)
    with pytest.raises(UnsupportedLayerError, match="more than one"):
        quantize_model(nn.Sequential(TwoCalls(2, 2, 1)), LOG4, torch.randn(2, 2, 4, 4))


def test_layer_that_never_runs_is_refused_or_listed():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.spare = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.used(torch.relu(self.used(x)))

    x = torch.randn(8, 4)
    with pytest.raises(UnsupportedLayerError, match="spare: its forward never ran"):
        quantize_model(Unused(), LOG4, x)
    rows = describe(quantize_model(Unused(), QuantConfig(fc_weights="log4", acts="log4",
                                                         unsupported="float"), x))
    assert rows[1]["status"] == "float" and "never ran" in rows[1]["reason"]


def test_multihead_attention_out_proj_is_not_silently_counted():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.attn(x, x, x)[0].mean(1))

    x = torch.randn(4, 5, 8)
    with pytest.raises(UnsupportedLayerError, match="attn.out_proj"):
        quantize_model(Attn().eval(), LOG4, x)
    q = quantize_model(Attn().eval(), QuantConfig(fc_weights="log4", acts="log4",
                                                  unsupported="float"), x)
    assert describe(q).summary() == "quantized 1 of 2 conv/linear layers"


def test_patterns_select_layers_by_glob_regex_and_type():
    model = _mixed_net()
    x = torch.randn(8, 3, 16, 16)
    config = QuantConfig(conv_weights="log4", fc_weights="log4", acts="log4",
                         skip=("type:ConvTranspose*",),
                         overrides={"re:[0-9]": {"weights": "lin5"},  # single-digit names
                                    "type:Conv1d": {"acts": "float"},
                                    "1?": {"weights": "logsqrt2-5"}})
    rows = {r["layer"]: r for r in describe(quantize_model(model, config, x))}
    assert rows["6"]["status"] == "float" and "type:ConvTranspose*" in rows["6"]["reason"]
    assert rows["0"]["weights"].startswith("lin5s@") and rows["8"]["weights"].startswith(
        "lin5s@")
    assert rows["11"]["weights"].startswith("logsqrt2-5s@") and rows["11"]["input"] == "float"
    assert rows["14"]["weights"].startswith("logsqrt2-5s@")  # later entries win
    assert rows["2"]["weights"].startswith("lin5s@")  # StdConv subclass: type:Conv2d too
    sub = QuantConfig(conv_weights="log4", skip=("type:Conv2d",))
    rows = describe(quantize_model(model, sub))
    assert [r["status"] for r in rows] == ["float", "float", "float", "quantized", "float",
                                           "quantized", "float"]  # ConvTranspose, Conv1d
    assert rows[6]["reason"] == "formats are float in this configuration"
    for bad in ("nothing*", "re:zz", "type:LSTM"):
        with pytest.raises(ConfigError, match="selects no layer"):
            quantize_model(model, QuantConfig(conv_weights="log4", skip=(bad,)), x)
    with pytest.raises(ConfigError, match="bad regular expression"):
        QuantConfig(skip=("re:(",))
    with pytest.raises(ConfigError, match="list of layer patterns"):
        QuantConfig.from_dict({"skip": "features.0"})


def test_weight_only_needs_no_data_and_activation_fsrs_do():
    model = _mixed_net()
    q = quantize_model(model, QuantConfig(conv_weights="log4", fc_weights="lin4"))
    rows = describe(q)
    assert rows.quantized == 7 and all(r["input"] == "float" for r in rows)
    with torch.no_grad():
        q(torch.randn(2, 3, 16, 16))
    with pytest.raises(LogquantError, match="pass calibration_data"):
        quantize_model(model, LOG4)
    fixed = quantize_model(model, QuantConfig(conv_weights="log4", acts="log4@fsr2"))
    assert describe(fixed)[1]["input"] == "log4@fsr2"


def test_calibration_data_in_every_usual_shape():
    model = _mixed_net()
    x = torch.randn(12, 3, 16, 16)
    reference = quantize_model(model, LOG4, x)
    probe = torch.randn(2, 3, 16, 16)
    expected = reference(probe)
    dataset = torch.utils.data.TensorDataset(x, torch.zeros(12))
    shapes = {
        "list of tensors": ([x[:6], x[6:]], {}),
        "pairs": ([(x[:6], 0), (x[6:], 1)], {}),
        "dicts": ([{"image": x[:6], "label": 0}, {"image": x[6:], "label": 1}],
                  {"input_key": "image"}),
        "one-tensor dicts": ([{"pixels": x}], {}),
        "DataLoader": (torch.utils.data.DataLoader(dataset, batch_size=5), {}),
        "generator": ((b for b in (x[:4], x[4:])), {}),
    }
    for what, (data, kwargs) in shapes.items():
        q = quantize_model(model, LOG4, data, **kwargs)
        assert torch.equal(q(probe), expected), what
    bad = {"a string": "images/", "a number": 3, "dicts without key": [{"a": x, "b": x}],
           "wrong key": ([{"image": x}], "img"), "not tensors": [[1, 2]],
           "integer tensors": [x.long()], "empty": []}
    for what, data in bad.items():
        key = None
        if isinstance(data, tuple):
            data, key = data
        with pytest.raises(LogquantError):
            quantize_model(model, LOG4, data, input_key=key)
            pytest.fail(f"{what} was accepted")
