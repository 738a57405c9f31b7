"""``reproduce``: the paper's experiments end to end: sweep, figures, REPORT.md."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from logquant.config import QuantConfig
from logquant.convert import PreparedModel
from logquant.data import Splits
from logquant.formats import family_format
from logquant.io import write_text_atomic
from logquant.plots import accuracy_vs_fsr, histograms, weights_bars
from logquant.report import headline, render, summarize, verdicts
from logquant.sweep import (
    SweepSettings,
    paper_sweep,
    process_rank,
)

FIGURES = {"fsr": "figures/accuracy_vs_fsr.png", "hist": "figures/histograms.png",
           "weights": "figures/weights.png"}


def _histogram_panels(prepared: PreparedModel, summary, act_bits: tuple[int, ...]) -> list:
    """Activations and weights of the second conv and the first fc layer, with the levels
    of the formats the report compares (FSRs as selected on validation)."""
    convs = [n for n, k in prepared.kinds.items() if k == "conv"]
    fcs = [n for n, k in prepared.kinds.items() if k == "fc"]
    panels = []
    for name in convs[1:2] + fcs[:1]:
        act_formats = []
        for family in ("log2", "linear"):
            fmt = family_format(family, min(act_bits))
            entry = summary.acts.get(("conv+fc", family, fmt.bits)) or {}
            if "fsr" in entry:
                act_formats.append(fmt.with_fsr(entry["fsr"]))
        panels.append((f"inputs of {name}", prepared.act_stats[name].sample, act_formats))
        weight_formats = []
        for stem in ("logsqrt2-5", "log5", "lin5"):
            config = QuantConfig(conv_weights=stem, fc_weights=stem)
            weight_formats.append(prepared.resolve(config)[name][0])
        panels.append((f"weights of {name}", prepared.float_weights[name], weight_formats))
    return panels


def reproduce(model: torch.nn.Module, splits: Splits, out: Path, manifest: dict,
              settings: SweepSettings, *, command: str, model_name: str,
              fsr_range: tuple[int, int] | None = None, method: str = "mse",
              act_bits: tuple[int, ...] = (3, 4, 5), force: bool = False,
              progress: bool = True, log=print) -> str:
    """Run the paper grid into ``out``, draw the figures, write REPORT.md; return the
    terminal summary."""
    start = time.time()
    rows, calibration, fsr_range = paper_sweep(model, splits, out, manifest, settings,
                                               fsr_range=fsr_range, method=method,
                                               act_bits=act_bits, force=force,
                                               progress=progress, log=log)
    if process_rank() != 0:
        return ""
    summary = summarize(rows)
    verdict = verdicts(summary)
    (out / "figures").mkdir(exist_ok=True)
    selected = {key: v["fsr"] for key, v in summary.acts.items() if "fsr" in v}
    accuracy_vs_fsr(rows, summary.float_val, selected, out / FIGURES["fsr"])
    weights_bars(summary.weights, summary.float_test, out / FIGURES["weights"])
    histograms(_histogram_panels(calibration, summary, act_bits), out / FIGURES["hist"])
    settings_text = (f"validation subset {settings.val_size} images, {settings.calib_batches}"
                     f" calibration batches of {settings.batch_size}, global FSR range "
                     f"{fsr_range[0]}..{fsr_range[1]}, FSR method {method}")
    report = render(summary, verdict, command=command, model=model_name, figures=FIGURES,
                    seconds=time.time() - start, settings=settings_text)
    write_text_atomic(out / "REPORT.md", report)
    return headline(summary, verdict)
