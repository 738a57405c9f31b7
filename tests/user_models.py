"""Models for tests: a user's own factories (the CLI loads ``user_models:tiny_cnn``) and
a small network using every op the integer engine runs, with a helper to export it."""

import torch
from torch import nn


def tiny_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(4),
        nn.Flatten(), nn.Linear(8 * 7 * 7, 10))


def tiny_cnn_plain() -> nn.Module:
    """No BatchNorm, no dropout: distributed runs must match one process exactly."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4),
        nn.Flatten(), nn.Linear(8 * 7 * 7, 10))


class Residual(nn.Module):
    """Every op the engine runs: conv (strided, grouped, dilated), add, relu6, pools."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2)
        self.b = nn.Conv2d(8, 8, 1)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.avg = nn.AvgPool2d(2)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = nn.functional.relu6(self.b(torch.relu(self.a(x))))
        x = self.pool(x + y)
        x = self.avg(torch.relu(self.down(x)))
        x = nn.functional.adaptive_avg_pool2d(x, 1)
        return self.head(torch.flatten(x, 1))


def export(model, spec_w, spec_a, fashion, count=256):
    """``model`` quantized (weights ``spec_w``, activations ``spec_a``) as an LqzModel."""
    from logquant.config import QuantConfig
    from logquant.export import build_lqz, quantize_for_export

    torch.manual_seed(0)
    config = QuantConfig(conv_weights=spec_w, fc_weights=spec_w, acts=spec_a)
    qmodel, offset = quantize_for_export(model, config, fashion.val.images[:count],
                                         fashion.val.mean, fashion.val.std, num_batches=1)
    return build_lqz(qmodel, offset, [1, 28, 28])
