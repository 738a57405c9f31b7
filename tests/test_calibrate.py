"""FSR selection rules."""

import math

import pytest
import torch

from logquant.calibrate import TensorStats, choose_fsr, fsr_covering, stats_of
from logquant.formats import parse_format


@pytest.mark.parametrize("magnitude, fsr", [(1.0, 1), (0.999, 0), (0.5, 0), (0.49, -1),
                                            (3.0, 2), (2.0**-10, -9), (0.0, 0)])
def test_fsr_covering_is_the_smallest_fsr_above(magnitude, fsr):
    assert fsr_covering(magnitude) == fsr
    if magnitude:
        assert magnitude < 2.0**fsr and not magnitude < 2.0 ** (fsr - 1)


def test_max_percentile_and_mse():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(100_000, generator=gen).abs()
    x[0] = 1000.0  # one outlier
    stats = stats_of(x)
    fmt = parse_format("log3")
    assert choose_fsr(stats, fmt, "max") == 10
    assert choose_fsr(stats, fmt, "percentile", 99.0) == fsr_covering(
        float(x.kthvalue(99_000).values))

    def err(f):
        return float((fmt.with_fsr(f).quantize(x.double()) - x.double()).square().sum())

    best = choose_fsr(stats, fmt, "mse")
    assert all(err(best) <= err(f) for f in range(-5, 12))  # brute force agrees


def test_stats_keep_a_bounded_sample_and_track_sign():
    stats = TensorStats(limit=1000)
    for i in range(20):
        stats.update(torch.full((300,), float(i)) - 5)
    assert stats.sample.numel() == 1000
    assert stats.has_negative and stats.max_abs == 14.0 and stats.count == 6000
    assert not math.isinf(stats.min)
