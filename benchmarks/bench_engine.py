"""The integer engine against the float32 model and PyTorch's own int8 quantization.

    python benchmarks/bench_engine.py [--repeats 9] [--formats log4]

On the bundled reference model, batch 256 of Fashion-MNIST test images, measured side by
side in one run: time per batch (median of alternating pairs), test accuracy on all
10,000 images, and file size, for (1) the float32 PyTorch model, (2) the .lqz file on the
integer engine, (3) PyTorch's int8 post-training quantization (FX graph mode, x86 backend,
calibrated on the same 2,000 validation images), plus the log3 file on the engine.
Target: engine time <= 2x float32 (the headline uses --formats, default log4).
Also: the 3-bit file's size against the float32 safetensors (target >= 0.95 * 32/3).
The last line is the JSON metrics summary.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import torch

from logquant import lqz
from logquant.baselines import pytorch_int8
from logquant.config import QuantConfig
from logquant.data import load_splits
from logquant.engine import Engine
from logquant.export import build_lqz, float32_size, quantize_for_export
from logquant.models import BUNDLED_WEIGHTS, load_model

sys.path.insert(0, str(Path(__file__).parent))
from bench_formats import paired_ratio  # noqa: E402  (the sibling script's timing helper)

BATCH = 256


def export(spec: str, splits, path: Path):
    config = QuantConfig(conv_weights=spec, fc_weights=spec, acts=spec)
    qmodel, offset = quantize_for_export(load_model("refcnn"), config,
                                         splits.val.images[:2000], splits.val.mean,
                                         splits.val.std, num_batches=8)
    return qmodel, lqz.save(build_lqz(qmodel, offset, [1, 28, 28]), path)


def accuracy(predict, splits) -> float:
    correct = 0
    for start in range(0, len(splits.test), 1000):
        images = splits.test.images[start:start + 1000]
        correct += int((predict(images) == splits.test.labels[start:start + 1000]).sum())
    return 100.0 * correct / len(splits.test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--formats", default="log4", help="weights and activations format")
    parser.add_argument("--out", default="runs/bench_engine", help="folder for the files")
    args = parser.parse_args()
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    splits = load_splits()
    qmodel, lqz_size = export(args.formats, splits, out / f"refcnn_{args.formats}.lqz")
    engine = Engine(lqz.load(out / f"refcnn_{args.formats}.lqz"))
    model = load_model("refcnn").eval()
    quantized = pytorch_int8(load_model("refcnn"), splits.val.subset(torch.arange(2000)))
    images = splits.test.images[:BATCH]
    normalized = splits.test.normalize(images)

    @torch.no_grad()
    def float_batch():
        return model(normalized)

    @torch.no_grad()
    def int8_batch():
        return quantized(normalized)

    def engine_batch():
        return engine.run(images)

    qmodel3, size3 = export("log3", splits, out / "refcnn_log3.lqz")
    engine3 = Engine(lqz.load(out / "refcnn_log3.lqz"))

    def engine3_batch():
        return engine3.run(images)

    t_engine, t_float, engine_ratio = paired_ratio(engine_batch, float_batch, args.repeats)
    t_engine3, _, engine3_ratio = paired_ratio(engine3_batch, float_batch, args.repeats)
    t_int8, _, int8_ratio = paired_ratio(int8_batch, float_batch, args.repeats)
    with torch.no_grad():
        acc_float = accuracy(lambda x: model(splits.test.normalize(x)).argmax(1), splits)
        acc_int8 = accuracy(lambda x: quantized(splits.test.normalize(x)).argmax(1), splits)
    acc_engine = accuracy(lambda x: engine.run(x).logits.argmax(1), splits)
    acc_engine3 = accuracy(lambda x: engine3.run(x).logits.argmax(1), splits)
    buffer = io.BytesIO()
    torch.save(quantized.state_dict(), buffer)
    int8_size = len(buffer.getbuffer())
    reference_size = float32_size(qmodel)
    ratio3 = float32_size(qmodel3) / size3

    print(f"reference model, batch {BATCH}, test set of {len(splits.test)} images")
    print(f"{'':<34}{'top-1 %':>9}{'file bytes':>12}{'ms/batch':>10}{'x float':>9}")
    rows = [("float32 PyTorch", acc_float, BUNDLED_WEIGHTS.stat().st_size, t_float, 1.0),
            (f"logquant engine ({args.formats} .lqz)", acc_engine, lqz_size, t_engine,
             engine_ratio),
            ("logquant engine (log3 .lqz)", acc_engine3, size3, t_engine3, engine3_ratio),
            ("PyTorch int8 PTQ (fx, x86)", acc_int8, int8_size, t_int8, int8_ratio)]
    for name, acc, size, seconds, ratio in rows:
        print(f"{name:<34}{acc:>9.2f}{size:>12,}{seconds * 1e3:>10.1f}{ratio:>9.2f}")
    print(f"float32 safetensors of the exported weights: {reference_size:,} bytes; "
          f"{args.formats} .lqz {reference_size / lqz_size:.2f}x smaller, log3 .lqz "
          f"{ratio3:.2f}x smaller")
    print(json.dumps({"metrics": {
        "engine_time_vs_float32": {"value": round(engine_ratio, 3), "target": 2.0,
                                   "better": "lower"},
        "log3_file_size_reduction": {"value": round(ratio3, 3), "target": round(0.95 * 32 / 3,
                                                                                 3),
                                     "better": "higher"},
        "engine_top1": {"value": round(acc_engine, 2), "target": round(acc_int8, 2),
                        "better": "higher"},
    }}))


if __name__ == "__main__":
    main()
