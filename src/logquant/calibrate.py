"""Where an FSR comes from: one registry of policies, each choosing the FSR of a format for
data with given statistics (``max``, ``percentile``, ``mse``), shared by post-training
quantization, training (whose running rules feed ``max``) and export.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from logquant.formats import FSR_MAX, FSR_MIN, Format

SAMPLE_LIMIT = 1 << 18  # values kept per layer for percentile / mse calibration
MSE_SEARCH_BELOW = 8  # mse tries FSRs from fsr_max - 8 up to fsr_max + 1


def fsr_covering(magnitude: float) -> int:
    """Smallest integer FSR with ``magnitude < 2^FSR`` (clamped to the valid FSR range)."""
    if not magnitude > 0 or not math.isfinite(magnitude):
        return 0 if not magnitude > 0 else FSR_MAX
    _, exponent = math.frexp(magnitude)  # magnitude = mant * 2^exponent, mant in [0.5, 1)
    return min(max(exponent, FSR_MIN), FSR_MAX)


class TensorStats:
    """Running statistics of the values a quantizer will see: max |x|, min x and a sample."""

    def __init__(self, seed: int = 0, limit: int = SAMPLE_LIMIT):
        self.max_abs = 0.0
        self.min = math.inf
        self.count = 0
        self.limit = limit
        self._chunks: list[torch.Tensor] = []
        self._kept = 0
        self._gen = torch.Generator().manual_seed(seed)

    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1).float().cpu()
        if flat.numel() == 0:
            return
        is_finite = torch.isfinite(flat)
        finite = flat if bool(is_finite.all()) else flat[is_finite]  # masking: a slow copy
        if finite.numel():
            self.max_abs = max(self.max_abs, float(finite.abs().max()))
            self.min = min(self.min, float(finite.min()))
        self.count += flat.numel()
        if finite.numel() == 0:
            return
        room = self.limit - self._kept
        if room <= 0:  # keep the sample unbiased across batches: replace a random part
            keep = self.limit // 8
            victims = torch.randperm(self.limit, generator=self._gen)[:keep]
            sample = torch.cat(self._chunks)
            sample[victims] = finite[torch.randint(len(finite), (keep,), generator=self._gen)]
            self._chunks = [sample]
            return
        if finite.numel() > room:
            finite = finite[torch.randperm(finite.numel(), generator=self._gen)[:room]]
        self._chunks.append(finite.clone())
        self._kept += finite.numel()

    @property
    def sample(self) -> torch.Tensor:
        return torch.cat(self._chunks) if self._chunks else torch.zeros(0)

    @property
    def has_negative(self) -> bool:
        return self.min < 0


FsrPolicy = Callable[["TensorStats", Format, float], int]  # (stats, format, percentile)
FSR_POLICIES: dict[str, FsrPolicy] = {}


def fsr_policy(name: str) -> Callable[[FsrPolicy], FsrPolicy]:
    """Register an FSR policy under ``name`` (the value of weight_fsr / act_fsr)."""
    def register(policy: FsrPolicy) -> FsrPolicy:
        FSR_POLICIES[name] = policy
        return policy
    return register


@fsr_policy("max")
def _covering_max(stats: TensorStats, fmt: Format, percentile: float) -> int:
    """The smallest FSR whose range covers max |x|: nothing saturates."""
    return fsr_covering(stats.max_abs)


@fsr_policy("percentile")
def _covering_percentile(stats: TensorStats, fmt: Format, percentile: float) -> int:
    """The smallest FSR covering the given percentile of |x| (outliers saturate)."""
    sample = stats.sample
    if sample.numel() == 0:
        return fsr_covering(stats.max_abs)
    magnitudes = sample.abs()
    k = max(1, min(magnitudes.numel(), math.ceil(percentile / 100.0 * magnitudes.numel())))
    return fsr_covering(float(magnitudes.kthvalue(k).values))


@fsr_policy("mse")
def _least_squared_error(stats: TensorStats, fmt: Format, percentile: float) -> int:
    """The FSR (max's and the 8 below it, one above) whose quantization error is least."""
    fsr_max = fsr_covering(stats.max_abs)
    sample = stats.sample
    if sample.numel() == 0:
        return fsr_max
    best, best_err = fsr_max, math.inf
    sample64 = sample.double()  # errors summed in float64; quantized values are exact
    for fsr in range(fsr_max + 1, fsr_max - MSE_SEARCH_BELOW - 1, -1):
        if not FSR_MIN <= fsr <= FSR_MAX:
            continue
        quantized = fmt.with_fsr(fsr).quantize(sample).double()
        err = float((quantized - sample64).square().sum())
        if err < best_err:  # strict: ties keep the larger FSR (less clipping)
            best, best_err = fsr, err
    return best


def choose_fsr(stats: TensorStats, fmt: Format, method: str, percentile: float = 99.99) -> int:
    """The FSR of ``fmt`` for data with these statistics, by the policy called ``method``."""
    policy = FSR_POLICIES.get(method)
    if policy is None:
        raise ValueError(f"unknown FSR method {method!r}; known: {', '.join(FSR_POLICIES)}")
    return policy(stats, fmt, percentile)


def stats_of(tensor: torch.Tensor) -> TensorStats:
    """Statistics of a whole tensor (e.g. a weight), every value kept."""
    stats = TensorStats(limit=max(1, tensor.numel()))
    stats.update(tensor)
    return stats
