"""The log-vs-linear comparison table on a trained model (the main job, for now).

Each row quantizes the float model with one configuration (FSRs calibrated on validation
images, never on the test set) and measures top-1/top-5 on the full test split.
"""

from __future__ import annotations

import dataclasses
import time

import torch
from torch import nn

from logquant.config import QuantConfig
from logquant.convert import quantize_model
from logquant.data import Splits
from logquant.evaluate import evaluate


@dataclasses.dataclass(frozen=True)
class Row:
    label: str  # what is quantized
    config: QuantConfig


def paper_rows(fsr_method: str = "mse") -> list[Row]:
    """Activations log vs linear at 3/4/5 bits; weights linear / log2 / logsqrt2 (5b conv,
    4b fc, the paper's weight setting); and log weights with log activations together."""
    rows = []
    for bits in (3, 4, 5):
        for fmt in (f"lin{bits}", f"log{bits}"):
            rows.append(Row(f"activations {fmt}", QuantConfig(acts=fmt, act_fsr=fsr_method)))
    for conv, fc in (("lin5", "lin4"), ("log5", "log4"), ("logsqrt2-5", "logsqrt2-4")):
        rows.append(Row(f"weights {conv} conv / {fc} fc",
                        QuantConfig(conv_weights=conv, fc_weights=fc, weight_fsr=fsr_method)))
    rows.append(Row("weights logsqrt2-5 + activations log4",
                    QuantConfig(conv_weights="logsqrt2-5", fc_weights="logsqrt2-5", acts="log4",
                                weight_fsr=fsr_method, act_fsr=fsr_method)))
    return rows


def run_table(model: nn.Module, splits: Splits, rows: list[Row], *, batch_size: int = 500,
              calib_batches: int = 8, device: torch.device | str = "cpu",
              progress: bool = True) -> list[dict]:
    """Float baseline plus one result per row, each measured on the full test split."""
    from tqdm import tqdm

    results = []
    float_acc = evaluate(model, splits.test, batch_size, device)
    results.append({"label": "float", "config": QuantConfig().to_dict(),
                    **float_acc.as_dict(), "seconds": 0.0})
    for row in tqdm(rows, desc="configurations", disable=None if progress else True):
        start = time.time()
        quantized = quantize_model(model, row.config, splits.val.batches(batch_size, device),
                                   num_batches=calib_batches)
        acc = evaluate(quantized, splits.test, batch_size, device)
        results.append({"label": row.label, "config": row.config.to_dict(), **acc.as_dict(),
                        "seconds": round(time.time() - start, 2)})
    return results


def format_table(results: list[dict]) -> str:
    base = results[0]["top1"]
    lines = [f"{'configuration':<44} {'top-1':>7} {'top-5':>7} {'vs float':>9}",
             "-" * 70]
    for r in results:
        lines.append(f"{r['label']:<44} {r['top1']:>6.2f}% {r['top5']:>6.2f}% "
                     f"{r['top1'] - base:>+8.2f}")
    return "\n".join(lines)
