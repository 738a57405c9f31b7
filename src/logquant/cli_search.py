"""``logquant search``: the cheapest per-layer formats within an accuracy budget."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from logquant import cli
from logquant.errors import LogquantError

# Uniform configurations: the paper-grid combinations of the sweeps and plain ones
REFERENCES = [("log3", "log3"), ("log4", "log4"), ("log5", "log5"), ("lin4", "lin4"),
              ("lin8", "lin8"), ("logsqrt2-5", "log4"), ("logsqrt2-4", "log3"),
              ("log4", "log3"), ("logsqrt2-4", "logsqrt2-3"), ("lin4", "lin3")]


def _budget(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of points, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"the budget must be a non-negative number of "
                                         f"accuracy points, got {text}")
    return value


def add_commands(sub) -> None:
    p = sub.add_parser("search", help="per-layer formats: the cheapest network (energy or "
                       "bits) within an accuracy budget of float")
    cli._add_common(p)
    p.add_argument("--checkpoint", default=None, help="weights file (default: bundled)")
    p.add_argument("--budget", type=_budget, default=0.5,
                   help="allowed loss of validation top-1, in points (default 0.5)")
    p.add_argument("--objective", choices=("energy", "bits"), default="energy",
                   help="minimize energy per image (cost model) or bits moved per image")
    p.add_argument("--out", required=True, help="output folder: config.json, search.json, "
                   "pareto.png")
    p.add_argument("--val-size", type=cli._positive_int, default=5000,
                   help="validation images that decide the budget")
    p.add_argument("--sensitivity-size", type=cli._positive_int, default=1000,
                   help="validation images per sensitivity measurement")
    p.add_argument("--max-evals", type=cli._positive_int, default=120,
                   help="at most this many greedy steps (each validated)")
    p.add_argument("--bits", type=cli._bit_list, default=(2, 3, 4, 5, 6, 7, 8),
                   metavar="2,3,...,8", help="candidate bit widths (lin, log, logsqrt2)")
    p.add_argument("--calib-batches", type=cli._positive_int, default=4,
                   help="validation batches used to calibrate FSRs (default 4)")
    p.add_argument("--no-progress", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_search, batch_size=1000)


def cmd_search(args: argparse.Namespace, argv: list[str]) -> int:
    from logquant.io import check_output_path, output_lock

    out = check_output_path(args.out, folder=True)
    with output_lock(out):  # held throughout: a second search there is refused at once
        return _search(args, argv, out)


def _search(args: argparse.Namespace, argv: list[str], out: Path) -> int:
    from logquant.baselines import pytorch_int8
    from logquant.config import QuantConfig
    from logquant.data import load_splits
    from logquant.evaluate import evaluate
    from logquant.io import write_json_atomic
    from logquant.nn import QuantizedLayer
    from logquant.plots import search_pareto
    from logquant.search import Search, run_search

    splits = load_splits(args.data_dir, args.image_size)
    model = cli._load_checked_model(args, splits, torch.device("cpu"))
    if any(isinstance(m, QuantizedLayer) for m in model.modules()):
        raise LogquantError("search starts from a float model; this checkpoint was trained "
                            "quantization-aware")
    val = splits.val.subset(torch.arange(min(args.val_size, len(splits.val))))

    def log(message: str) -> None:
        if not args.no_progress:
            print(message, file=sys.stderr)

    float_val = evaluate(model, val, args.batch_size).top1
    search = Search(model, splits.val.batches(250), val, args.objective,
                    num_batches=args.calib_batches, batch_size=args.batch_size, bits=args.bits)
    result = run_search(search, args.budget, float_val, sensitivity_size=args.sensitivity_size,
                        max_evals=args.max_evals, log=log)
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
                      if args.objective == "energy" else
                      float(sum(r["weight_bits"] + r["activation_bits_in"] for r in lin8_rows)))
    references.append({"name": "PyTorch int8 PTQ", "objective": int8_objective,
                       "val_top1": evaluate(int8, val, args.batch_size).top1,
                       "runs_on_engine": False})
    test_top1 = evaluate(search.prepared.apply(result.config), splits.test,
                         args.batch_size).top1  # measured once, after the search
    at_least_as_accurate = [r for r in references if r["val_top1"] >= result.val_top1]
    beaten = all(r["objective"] > result.objective for r in at_least_as_accurate)
    summary = {**result.as_dict(), "test_top1": test_top1, "references": references,
               "beats_every_reference_at_least_as_accurate": beaten,
               "command": "logquant " + shlex.join(argv), "model": args.model,
               "checkpoint": args.checkpoint, "val_images": len(val)}
    write_json_atomic(out / "config.json", result.config.to_dict())
    write_json_atomic(out / "search.json", summary)
    search_pareto(summary, references, out / "pareto.png")
    from logquant.coverage import describe

    print(describe(search.prepared.apply(result.config)).summary())
    _print(summary, search, result)
    print(f"{out / 'config.json'}: the configuration (eval/export/train/run/cost --config); "
          f"{out / 'search.json'}, {out / 'pareto.png'}")
    return 0


def _print(summary: dict, search, result) -> None:
    from logquant.search import describe_formats

    unit = "pJ/image" if result.objective_name == "energy" else "bits/image"
    for row in describe_formats(result.config, search.prepared):
        print(f"  {row['layer']:<16} weights {row['weights']:<18} input {row['input']}")
    label = "" if result.met_budget else "  [BUDGET NOT MET: the most accurate found]"
    print(f"searched: {result.objective:,.0f} {unit}, val {result.val_top1:.2f} % (float "
          f"{result.float_val_top1:.2f} %, budget {result.budget}), test "
          f"{summary['test_top1']:.2f} %, {result.evaluations} evaluations, "
          f"{result.seconds:.0f} s{label}")
    for ref in sorted(summary["references"], key=lambda r: r["objective"]):
        print(f"  reference {ref['name']:<24} {ref['objective']:>14,.0f} {unit}  val "
              f"{ref['val_top1']:.2f} %")
    verdict = "beats" if summary["beats_every_reference_at_least_as_accurate"] else \
        "does NOT beat"
    print(f"the searched configuration {verdict} every reference at least as accurate")
