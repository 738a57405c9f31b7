"""A user's own model factory, loaded by the CLI as ``user_models:tiny_cnn``."""

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
