"""Figures of a sweep: accuracy vs FSR, value histograms with format levels, weights bars."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on these machines
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from logquant.formats import Format  # noqa: E402
from logquant.io import atomic_path  # noqa: E402

BASE_STYLE = {  # format family (the sweep's base column) -> (label, colour, line style)
    "linear": ("linear (fixed point)", "tab:red", "-"),
    "log2": ("log base 2", "tab:blue", "-"),
    "logsqrt2": ("log base sqrt2", "tab:green", "--"),
}


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def accuracy_vs_fsr(rows: list[dict], float_top1: float, selected: dict, path: Path) -> None:
    """One panel per (scope, bits): validation top-1 against the global activation FSR."""
    curves = [r for r in rows if r["group"] == "acts-global" and r["split"] == "val"]
    scopes = [s for s in ("conv", "conv+fc") if any(r["scope"] == s for r in curves)]
    bits = sorted({r["bits"] for r in curves})
    fig, axes = plt.subplots(len(scopes), len(bits), figsize=(4.2 * len(bits), 3.4 * len(scopes)),
                             squeeze=False, sharey=True)
    for i, scope in enumerate(scopes):
        for j, b in enumerate(bits):
            ax = axes[i][j]
            for base, (label, colour, style) in BASE_STYLE.items():
                pts = sorted((r["fsr"], r["top1"]) for r in curves
                             if r["scope"] == scope and r["bits"] == b and r["base"] == base)
                if not pts:
                    continue
                ax.plot(*zip(*pts), style, color=colour, marker="o", ms=3, label=label)
                pick = selected.get((scope, base, b))
                if pick is not None:
                    ax.plot([pick], [dict(pts)[pick]], "*", color=colour, ms=12)
            ax.axhline(float_top1, color="black", lw=0.8, ls=":", label="float")
            ax.set_title(f"{b}-bit activations, {scope} inputs")
            ax.set_xlabel("FSR (all layers share it)")
            ax.grid(alpha=0.3)
            ax.set_ylim(max(0.0, float_top1 - 30), min(100.0, float_top1 + 2))
        axes[i][0].set_ylabel("validation top-1 (%)")
    axes[0][0].legend(loc="lower right", fontsize=8)
    fig.suptitle("Accuracy vs full-scale range (stars: FSR chosen on validation)")
    fig.tight_layout()
    _save(fig, path)


def histograms(panels: list[tuple[str, torch.Tensor, list[Format]]], path: Path) -> None:
    """log2|x| histograms with each format's levels drawn over them (why log fits)."""
    colours = ["tab:blue", "tab:red", "tab:green", "tab:purple"]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (title, values, formats) in zip(axes[0], panels):
        v = values.detach().float().abs()
        v = v[v > 0]
        zero_share = 1 - v.numel() / max(values.numel(), 1)
        ax.hist(torch.log2(v).numpy(), bins=80, color="0.6", density=True)
        for fmt, colour in zip(formats, colours):
            levels = [lv for lv in fmt.levels().tolist() if lv > 0]
            for k, lv in enumerate(levels):
                ax.axvline(math.log2(lv), color=colour, lw=0.9, alpha=0.8,
                           label=fmt.name if k == 0 else None)
        ax.set_title(f"{title}\n({100 * zero_share:.0f}% exact zeros not shown)", fontsize=9)
        ax.set_xlabel("log2 |value|")
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    _save(fig, path)


def weights_bars(table: dict[str, dict[str, float]], float_top1: float, path: Path) -> None:
    """Grouped bars: test top-1 per weight bit setting for linear / log2 / logsqrt2."""
    settings = list(table)
    width = 0.26
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    for k, (base, (label, colour, _)) in enumerate(BASE_STYLE.items()):
        xs = [i + (k - 1) * width for i in range(len(settings))]
        ys = [table[s].get(base, float("nan")) for s in settings]
        ax.bar(xs, ys, width, color=colour, label=label)
        for x, y in zip(xs, ys):
            if not math.isnan(y):
                ax.text(x, y + 0.3, f"{y:.1f}", ha="center", fontsize=7)
    ax.axhline(float_top1, color="black", lw=0.8, ls=":", label=f"float {float_top1:.2f}")
    ax.set_xticks(range(len(settings)), settings)
    ax.set_ylabel("test top-1 (%)")
    low = min((v for row in table.values() for v in row.values()), default=0)
    ax.set_ylim(max(0.0, low - 5), 100)
    ax.set_title("Weights only (per-layer FSR by calibration), activations float")
    ax.legend(fontsize=8, loc="lower right")
    _save(fig, path)


def training_curves(histories: dict[str, list[dict]], path: Path) -> None:
    """Test top-1 per epoch, one line per run."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for (name, history), colour in zip(histories.items(), ("black", "tab:red", "tab:blue")):
        epochs = [r["epoch"] for r in history]
        ax.plot(epochs, [r["test_top1"] for r in history], marker="o", ms=3, color=colour,
                label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("Training from scratch: float vs 5-bit linear vs 5-bit log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save(fig, path)


def search_pareto(result: dict, references: list[dict], path: Path) -> None:
    """Validation accuracy against the objective: the search path (accepted steps joined,
    rejected ones hollow), the uniform configurations and PyTorch's int8 as references."""
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    steps = result["steps"]
    accepted = [s for s in steps if s["accepted"]]
    ax.plot([s["objective"] for s in accepted], [s["val_top1"] for s in accepted], "-o",
            color="tab:blue", markersize=4, label="search path (accepted)")
    rejected = [s for s in steps if not s["accepted"]]
    ax.scatter([s["objective"] for s in rejected], [s["val_top1"] for s in rejected],
               facecolors="none", edgecolors="tab:blue", s=18, label="rejected moves")
    ax.scatter([result["objective"]], [result["val_top1"]], marker="*", s=220,
               color="tab:orange", zorder=5, label="searched configuration")
    for ref in references:
        style = ("s", "tab:red") if ref["name"].startswith("PyTorch") else ("D", "tab:gray")
        ax.scatter([ref["objective"]], [ref["val_top1"]], marker=style[0], color=style[1],
                   s=30, zorder=4)
        ax.annotate(ref["name"], (ref["objective"], ref["val_top1"]), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    floor = result["float_val_top1"] - result["budget"]
    ax.axhline(result["float_val_top1"], color="k", lw=0.8, ls=":", label="float")
    ax.axhline(floor, color="tab:orange", lw=0.8, ls="--", label=f"budget (-{result['budget']})")
    ax.set_xscale("log")
    ax.set_xlabel("energy per image (pJ)" if result["objective_name"] == "energy"
                  else "weight bits + activation bits per image")
    ax.set_ylabel("validation top-1 (%)")
    low = min([s["val_top1"] for s in accepted] + [floor]) - 1.5
    ax.set_ylim(low, None)
    below = [f"{r['name']} {r['val_top1']:.1f} %" for r in references if r["val_top1"] < low]
    if below:
        ax.text(0.01, 0.01, "below the axis: " + ", ".join(below), transform=ax.transAxes,
                fontsize=6.5, color="tab:gray")
    ax.legend(fontsize=7, loc="center right")
    ax.set_title("per-layer format search")
    _save(fig, path)
