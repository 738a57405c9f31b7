"""Per-layer format search: the cheapest network, in energy or bits, within an accuracy budget.

Method (documented in the README; costs counted in evaluations of the validation set):

1. Start from 8-bit fixed point everywhere (``lin8`` weights and activations), which must
   be within the budget of the float model's validation accuracy.
2. Sensitivity, once: for every slot (a layer's weights, or its input activations) and
   every candidate format of that slot, the accuracy on a validation subset when only that
   slot changes from the start. One evaluation per (slot, candidate).
3. Greedy lowering: among all moves (one slot to a candidate that lowers the objective),
   take the one with the best objective saving per predicted accuracy loss (from step 2),
   validate the whole configuration on the validation set, keep it if it stays within the
   budget, otherwise reject it (and the slot's candidates no more accurate than it). Repeat
   until no move is left or the evaluation cap is reached.

FSRs come from calibration (per layer, ``mse``). The objective is the cost model of
:mod:`logquant.cost` (``energy``: pJ per image, compute and memory) or the packed bits
(``bits``: weight bits plus activation bits moved per image). Candidates whose sums would
not fit the integer engine's accumulators are left out, so every result exports and runs.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from logquant.config import QuantConfig
from logquant.convert import PreparedModel
from logquant.cost import op_cost, summarize
from logquant.data import ImageDataset, Splits
from logquant.engine.plan import MAX_ACC_BITS, accumulator_bits
from logquant.errors import LogquantError
from logquant.evaluate import evaluate
from logquant.formats import FAMILIES, Format, family_format

OBJECTIVES = ("energy", "bits")
START = "lin8"
WEIGHT_FAMILIES, ACT_FAMILIES, BITS = FAMILIES, ("linear", "log2"), range(2, 9)
ACC_HEADROOM = 2  # bits kept free for the bias in the engine's accumulators
# Uniform configurations a search result is compared with: the sweeps' paper-grid
# combinations and plain ones
REFERENCES = [("log3", "log3"), ("log4", "log4"), ("log5", "log5"), ("lin4", "lin4"),
              ("lin8", "lin8"), ("logsqrt2-5", "log4"), ("logsqrt2-4", "log3"),
              ("log4", "log3"), ("logsqrt2-4", "logsqrt2-3"), ("lin4", "lin3")]


class SearchError(LogquantError):
    """Bad search arguments."""


@dataclasses.dataclass(frozen=True)
class LayerShape:
    kind: str  # "conv" or "fc"
    fan_in: int
    weights: int
    inputs: int  # values read per image
    outputs: int  # values written per image


def layer_shapes(prepared: PreparedModel, sample: torch.Tensor) -> dict[str, LayerShape]:
    """Per quantizable layer, its sizes per image (one forward pass with hooks)."""
    shapes, handles = {}, []
    for name, layer in prepared.layers.items():
        def hook(module, inputs, output, name=name):
            w = module.weight
            shapes[name] = LayerShape(prepared.kinds[name], w[0].numel(), w.numel(),
                                      inputs[0][0].numel(), output[0].numel())
        handles.append(layer.register_forward_hook(hook))
    try:
        with torch.no_grad():
            prepared.apply(QuantConfig())(sample)
    finally:
        for handle in handles:
            handle.remove()
    return shapes


@dataclasses.dataclass
class Step:
    """One validated configuration on the search path."""

    change: str
    objective: float
    val_top1: float
    accepted: bool


@dataclasses.dataclass
class SearchResult:
    config: QuantConfig
    objective_name: str
    objective: float
    val_top1: float
    float_val_top1: float
    budget: float
    met_budget: bool
    steps: list[Step]
    sensitivity: dict[str, dict[str, float]]
    evaluations: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["config"] = self.config.to_dict()
        return out


class Search:
    """Holds the calibrated model, the layer sizes and the cost model of one search."""

    def __init__(self, model: nn.Module, calibration, val: ImageDataset, objective: str,
                 *, num_batches: int = 4, batch_size: int = 1000,
                 bits: tuple[int, ...] = tuple(BITS)):
        if objective not in OBJECTIVES:
            raise SearchError(f"objective must be one of {', '.join(OBJECTIVES)}, "
                              f"got {objective!r}")
        self.prepared = PreparedModel(model, calibration, num_batches=num_batches,
                                      cache_weights=True)
        if not bits or any(not 2 <= b <= 8 for b in bits):
            raise SearchError(f"candidate bit widths must lie in 2..8, got {list(bits)}")
        self.objective_name, self.val, self.batch_size = objective, val, batch_size
        self.bits = tuple(sorted(set(bits)))
        self.shapes = layer_shapes(self.prepared, val.normalize(val.images[:1]))
        self.first = self.prepared.first_layer
        self.evaluations = 0

    # -- configurations ---------------------------------------------------------------
    def slots(self) -> list[tuple[str, str]]:
        out = []
        for name in self.shapes:
            out.append((name, "weights"))
            if name != self.first:
                out.append((name, "acts"))
        return out

    def config(self, assignment: dict[tuple[str, str], str]) -> QuantConfig:
        overrides: dict[str, dict[str, str]] = {}
        for (layer, part), spec in assignment.items():
            overrides.setdefault(layer, {})[part] = spec
        return QuantConfig(conv_weights=START, fc_weights=START, acts=START,
                           overrides=overrides)

    def cost_rows(self, config: QuantConfig) -> list[dict[str, Any]]:
        rows = []
        for name, (w_fmt, x_fmt) in self.prepared.resolve(config).items():
            s = self.shapes[name]
            rows.append(op_cost(name, s.kind, w_fmt, x_fmt, s.fan_in, s.weights, s.inputs,
                                s.outputs, accumulator_bits(w_fmt, x_fmt, s.fan_in)))
        return rows

    def objective(self, config: QuantConfig) -> float:
        total = summarize(self.cost_rows(config))
        if self.objective_name == "energy":
            return total["energy_pj"]["total"]
        return float(total["weight_bits"] + total["activation_bits_in"])

    def fits_engine(self, config: QuantConfig) -> bool:
        """Whether the integer engine's accumulators hold every layer's sums (the bias
        gets ``ACC_HEADROOM`` bits), so that the configuration exports and runs."""
        return all(r["accumulator_bits"] + ACC_HEADROOM <= MAX_ACC_BITS + 1
                   for r in self.cost_rows(config))

    def accuracy(self, config: QuantConfig, dataset: ImageDataset) -> float:
        self.evaluations += 1
        return evaluate(self.prepared.apply(config), dataset, self.batch_size).top1


def candidates(part: str, bits=BITS) -> list[str]:
    """The format names a slot may take: every family of the part, every bit width."""
    families = WEIGHT_FAMILIES if part == "weights" else ACT_FAMILIES
    return [family_format(family, b).name for family in families for b in bits]


def run_search(search: Search, budget: float, float_val_top1: float, *,
               sensitivity_size: int = 2000, max_evals: int = 100,
               log: Callable[[str], None] = lambda m: None) -> SearchResult:
    """The greedy search of the module docstring."""
    if not math.isfinite(budget) or budget < 0:
        raise SearchError(f"the budget must be a non-negative number of accuracy points, "
                          f"got {budget}")
    start_time = time.perf_counter()
    floor = float_val_top1 - budget
    subset = search.val.subset(torch.arange(min(sensitivity_size, len(search.val))))
    current = {slot: START for slot in search.slots()}
    start_config = search.config(current)
    current_acc = search.accuracy(start_config, search.val)
    current_obj = search.objective(start_config)
    steps = [Step("start: lin8 everywhere", current_obj, current_acc, current_acc >= floor)]
    log(f"start lin8: objective {current_obj:,.0f}, val {current_acc:.2f} % "
        f"(float {float_val_top1:.2f} %, floor {floor:.2f} %)")
    base_sub = search.accuracy(start_config, subset)
    sensitivity: dict[str, dict[str, float]] = {}
    for slot in search.slots():
        key = f"{slot[0]}.{slot[1]}"
        sensitivity[key] = {START: base_sub}
        for spec in candidates(slot[1], search.bits):
            trial = search.config({**current, slot: spec})
            if spec != START and search.fits_engine(trial):
                sensitivity[key][spec] = search.accuracy(trial, subset)
        log(f"sensitivity {key}: " + ", ".join(
            f"{s} {a - base_sub:+.2f}" for s, a in sorted(sensitivity[key].items())
            if s != START))
    best = (current_acc, current_obj, dict(current))
    rejected: set[tuple[tuple[str, str], str]] = set()
    for _ in range(max_evals):
        move = _best_move(search, current, current_obj, sensitivity, base_sub, rejected)
        if move is None:
            break
        slot, spec, objective = move
        trial = {**current, slot: spec}
        acc = search.accuracy(search.config(trial), search.val)
        accepted = acc >= floor
        steps.append(Step(f"{slot[0]}.{slot[1]} -> {spec}", objective, acc, accepted))
        log(f"{'accept' if accepted else 'reject'} {slot[0]}.{slot[1]} -> {spec}: objective "
            f"{objective:,.0f}, val {acc:.2f} %")
        if accepted:
            current, current_obj, current_acc = trial, objective, acc
        else:
            key = f"{slot[0]}.{slot[1]}"
            rejected |= {(slot, s) for s, a in sensitivity[key].items()
                         if a <= sensitivity[key][spec]}
        if acc > best[0]:
            best = (acc, objective, dict(trial))
    met = current_acc >= floor
    if not met:  # nothing met the budget: the most accurate configuration seen, labelled
        current_acc, current_obj, current = best
    return SearchResult(search.config(current), search.objective_name, current_obj,
                        current_acc, float_val_top1, budget, met, steps, sensitivity,
                        search.evaluations, time.perf_counter() - start_time)


def _best_move(search: Search, current: dict, current_obj: float,
               sensitivity: dict[str, dict[str, float]], base: float, rejected: set):
    """The move with the largest objective saving per predicted point of accuracy lost."""
    best, best_score = None, -math.inf
    for slot, spec_now in current.items():
        key = f"{slot[0]}.{slot[1]}"
        for spec, acc in sensitivity[key].items():
            if spec == spec_now or (slot, spec) in rejected:
                continue
            config = search.config({**current, slot: spec})
            objective = search.objective(config)
            saving = current_obj - objective
            if saving > 0 and not search.fits_engine(config):
                continue
            if saving <= 0:
                continue
            lost = max(0.0, sensitivity[key][spec_now] - acc)
            score = saving / (lost + 0.05)  # 0.05 points: the resolution of a subset
            if score > best_score:
                best, best_score = (slot, spec, objective), score
    return best


def describe_formats(config: QuantConfig, prepared: PreparedModel) -> list[dict[str, str]]:
    """Per layer: the calibrated weight and input formats of ``config``."""
    rows = []
    for name, (w_fmt, x_fmt) in prepared.resolve(config).items():
        rows.append({"layer": name, "weights": _name(w_fmt), "input": _name(x_fmt)})
    return rows


def _name(fmt: Format | None) -> str:
    return "float" if fmt is None else fmt.name


@dataclasses.dataclass
class SearchRun:
    """What :func:`search_to_folder` found and wrote."""

    search: Search
    result: SearchResult
    summary: dict[str, Any]  # the contents of search.json


def search_to_folder(model: nn.Module, splits: Splits, out: Path, *, objective: str = "energy",
                     budget: float = 0.5, val_size: int = 5000, sensitivity_size: int = 1000,
                     max_evals: int = 120, bits: tuple[int, ...] = tuple(BITS),
                     calib_batches: int = 4, batch_size: int = 1000,
                     log: Callable[[str], None] = lambda m: None,
                     about: dict[str, Any] | None = None) -> SearchRun:
    """The whole ``logquant search``: :func:`run_search` on the first ``val_size``
    validation images, then every configuration of ``REFERENCES`` and PyTorch's int8 PTQ
    measured the same way, the result's test accuracy measured once, and ``out`` written:
    config.json (the configuration), search.json (everything, plus ``about``), pareto.png.
    """
    from logquant.baselines import pytorch_int8
    from logquant.io import check_replaceable, staged_folder, write_json_atomic
    from logquant.nn import QuantizedLayer
    from logquant.plots import search_pareto

    check_replaceable(out, "search results", is_search_folder)  # before any work
    if any(isinstance(m, QuantizedLayer) for m in model.modules()):
        raise SearchError("search starts from a float model; this checkpoint was trained "
                          "quantization-aware")
    val = splits.val.subset(torch.arange(min(val_size, len(splits.val))))
    float_val = evaluate(model, val, batch_size).top1
    search = Search(model, splits.val.batches(250), val, objective,
                    num_batches=calib_batches, batch_size=batch_size, bits=bits)
    result = run_search(search, budget, float_val, sensitivity_size=sensitivity_size,
                        max_evals=max_evals, log=log)
    references = []
    for weights, acts in REFERENCES:
        config = QuantConfig(conv_weights=weights, fc_weights=weights, acts=acts)
        references.append({"name": f"{weights}/{acts}", "objective": search.objective(config),
                           "val_top1": search.accuracy(config, val),
                           "runs_on_engine": search.fits_engine(config)})
    int8 = pytorch_int8(model, splits.val.subset(torch.arange(min(2000, len(splits.val)))))
    lin8_rows = search.cost_rows(QuantConfig(conv_weights="lin8", fc_weights="lin8",
                                             acts="lin8"))
    int8_objective = (sum(r["energy_pj"]["int8_total"] for r in lin8_rows)
                      if objective == "energy" else
                      float(sum(r["weight_bits"] + r["activation_bits_in"] for r in lin8_rows)))
    references.append({"name": "PyTorch int8 PTQ", "objective": int8_objective,
                       "val_top1": evaluate(int8, val, batch_size).top1,
                       "runs_on_engine": False})
    test_top1 = evaluate(search.prepared.apply(result.config), splits.test,
                         batch_size).top1  # measured once, after the search
    at_least_as_accurate = [r for r in references if r["val_top1"] >= result.val_top1]
    beaten = all(r["objective"] > result.objective for r in at_least_as_accurate)
    summary = {**result.as_dict(), "test_top1": test_top1, "references": references,
               "beats_every_reference_at_least_as_accurate": beaten, **(about or {}),
               "val_images": len(val)}
    with staged_folder(out, "search results", is_search_folder) as stage:  # whole or not
        write_json_atomic(stage / "config.json", result.config.to_dict())
        write_json_atomic(stage / "search.json", summary)
        search_pareto(summary, references, stage / "pareto.png")
    return SearchRun(search, result, summary)


SEARCH_FILES = {"config.json", "search.json", "pareto.png"}


def is_search_folder(folder: Path) -> bool:
    """Whether ``folder`` holds the results of an earlier search and nothing else."""
    from logquant.io import holds_only

    return (folder / "search.json").is_file() and holds_only(folder, SEARCH_FILES)
