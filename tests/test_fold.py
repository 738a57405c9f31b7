"""BatchNorm folding keeps the model's module tree: layers of classes defined outside
torch.nn (timm's Linear, Conv2dSame) stay layers, and are quantized and listed."""

import torch
import torch.nn.functional as F
from torch import nn

from logquant import QuantConfig, describe, quantize_model
from logquant.fold import fold_batchnorm


class OwnLinear(nn.Linear):
    """A Linear subclass from user code (timm.layers.Linear is one)."""


class OwnConv(nn.Conv2d):
    """A conv subclass whose forward pads first (as timm's Conv2dSame does)."""

    def forward(self, x):
        return F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias, self.stride)


class Net(nn.Module):
    """BatchNorm not inside a Sequential (found on the fx graph), user layer classes,
    a module that forward never calls, and a method of its own."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.own = OwnConv(8, 8, 3)
        self.bn2 = nn.BatchNorm2d(8)  # follows a subclass: stays (its forward may differ)
        self.head = OwnLinear(8, 4)
        self.unused = nn.Linear(4, 4)

    def features(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return torch.relu(self.bn2(self.own(x)) + x)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def _net():
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        for bn in (net.bn, net.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
    return net.eval()


def test_folding_keeps_the_module_tree():
    net = _net()
    folded = fold_batchnorm(net)
    assert type(folded) is Net and hasattr(folded, "features")
    assert isinstance(folded.bn, nn.Identity) and isinstance(folded.bn2, nn.BatchNorm2d)
    assert type(folded.own) is OwnConv and type(folded.head) is OwnLinear
    assert type(folded.unused) is nn.Linear
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), rtol=1e-5, atol=1e-5)


def test_layer_subclasses_are_quantized_and_listed():
    """fx traced through layer classes defined outside torch.nn: the folded model had bare
    parameters and a functional call instead, so head was neither quantized nor listed."""
    q = quantize_model(_net(), QuantConfig(conv_weights="log4", fc_weights="log4",
                                           acts="log4", unsupported="float"),
                       [torch.randn(2, 3, 8, 8)])
    rows = {r["layer"]: r for r in describe(q)}
    assert list(rows) == ["conv", "own", "head", "unused"]
    assert all(rows[n]["status"] == "quantized" for n in ("conv", "own", "head"))
    assert rows["unused"]["reason"] == "never ran on the calibration data"
