"""Speed of the format kernels and of a PTQ-quantized model, as ratios measured side by side.

    python benchmarks/bench_formats.py [--repeats 15]

(a) LogFormat.quantize on 16M float32 values vs torch.abs on the same tensor (target <= 2.0);
(b) forward pass, batch 256, of the PTQ-quantized reference model (weights pre-quantized,
    activation quantizers on) vs the float model (target <= 1.15). The ratio against the
    BN-folded float model, i.e. the cost of the activation quantizers alone, is printed too.
(c) forward pass of torchvision's resnet18 (random weights, BN statistics set) at 224 px,
    batch 32, PTQ log4 weights and activations vs its BN-folded float model (target
    <= 1.10): the per-call cost of intercepting each layer and quantizing its input.
Timings alternate between the two sides of each ratio so machine noise hits both alike;
each ratio is the median over repeats. The last line is the JSON metrics summary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def paired_ratio(fn_a, fn_b, repeats: int) -> tuple[float, float, float]:
    """Median time of a, median time of b and median of the per-pair ratios a/b.

    The order inside each pair alternates, so a position effect (caches, clocks) cancels.
    """
    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    for _ in range(3):  # warm-up: compilation, allocator, caches
        fn_a()
        fn_b()
    times_a, times_b = [], []
    for i in range(repeats):
        if i % 2:
            times_b.append(timed(fn_b))
            times_a.append(timed(fn_a))
        else:
            times_a.append(timed(fn_a))
            times_b.append(timed(fn_b))
    ratios = [a / b for a, b in zip(times_a, times_b)]
    return statistics.median(times_a), statistics.median(times_b), statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()

    from logquant.config import QuantConfig
    from logquant.convert import quantize_model
    from logquant.data import load_splits
    from logquant.fold import fold_batchnorm
    from logquant.formats import parse_format
    from logquant.models import load_model

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16 * 1024 * 1024, generator=gen)
    metrics = {}
    for spec in ("log3@fsr0", "logsqrt2-5s@fsr1", "lin4@fsr0"):
        fmt = parse_format(spec)
        t_q, t_abs, ratio = paired_ratio(lambda f=fmt: f.quantize(x), lambda: torch.abs(x),
                                         args.repeats)
        print(f"(a) {spec:<18} quantize {t_q * 1e3:7.2f} ms   abs {t_abs * 1e3:7.2f} ms   "
              f"ratio {ratio:.2f}")
        key = "quantize_log3_vs_abs" if spec == "log3@fsr0" else f"quantize_{spec}_vs_abs"
        metrics[key] = {"value": round(ratio, 3), "target": 2.0, "better": "lower"}

    splits = load_splits()
    model = load_model("refcnn").eval()
    config = QuantConfig(conv_weights="log5", fc_weights="log4", acts="log3")
    quantized = quantize_model(model, config, splits.val.batches(256), num_batches=4)
    folded = fold_batchnorm(model)
    batch = splits.test.normalize(splits.test.images[:256])
    with torch.inference_mode():
        t_qm, t_fm, ratio = paired_ratio(lambda: quantized(batch), lambda: model(batch),
                                         args.repeats)
        _, t_ff, ratio_folded = paired_ratio(lambda: quantized(batch), lambda: folded(batch),
                                             args.repeats)
    print(f"(b) forward b=256  quantized {t_qm * 1e3:7.2f} ms   float {t_fm * 1e3:7.2f} ms   "
          f"ratio {ratio:.2f}")
    print(f"    vs BN-folded float {t_ff * 1e3:7.2f} ms: ratio {ratio_folded:.2f} "
          "(cost of the activation quantizers alone)")
    metrics["ptq_forward_vs_float"] = {"value": round(ratio, 3), "target": 1.15,
                                       "better": "lower"}
    metrics["ptq_forward_vs_folded_float"] = {"value": round(ratio_folded, 3), "target": 1.15,
                                              "better": "lower"}
    ratio_resnet = _resnet18_ratio(args.repeats)
    metrics["ptq_resnet18_224_b32_vs_folded_float"] = {"value": round(ratio_resnet, 3),
                                                       "target": 1.10, "better": "lower"}
    print(json.dumps({"metrics": metrics}))


def _resnet18_ratio(repeats: int) -> float:
    import torchvision

    from logquant.config import QuantConfig
    from logquant.convert import quantize_model
    from logquant.fold import fold_batchnorm

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    for m in model.modules():  # trained-like BatchNorm statistics, so activations are sane
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
            m.running_mean.uniform_(-0.2, 0.2)
    batch = torch.randn(32, 3, 224, 224)
    config = QuantConfig(conv_weights="log4", fc_weights="log4", acts="log4")
    quantized = quantize_model(model, config, batch[:8])
    folded = fold_batchnorm(model)
    with torch.inference_mode():
        t_q, t_f, ratio = paired_ratio(lambda: quantized(batch), lambda: folded(batch),
                                       max(5, repeats // 3))
    print(f"(c) resnet18 224 px b=32  quantized {t_q * 1e3:7.1f} ms   BN-folded float "
          f"{t_f * 1e3:7.1f} ms   ratio {ratio:.2f}")
    return ratio


if __name__ == "__main__":
    main()
