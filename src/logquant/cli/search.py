"""``logquant search``: the cheapest per-layer formats within an accuracy budget."""

from __future__ import annotations

import argparse

import torch

from logquant.cli.options import (
    add_common,
    bit_list,
    command_line,
    load_data,
    log,
    positive_int,
    refuse_device,
)


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
    add_common(p)
    p.add_argument("--checkpoint", default=None, help="weights file (default: bundled)")
    p.add_argument("--budget", type=_budget, default=0.5,
                   help="allowed loss of validation top-1, in points (default 0.5)")
    p.add_argument("--objective", choices=("energy", "bits"), default="energy",
                   help="minimize energy per image (cost model) or bits moved per image")
    p.add_argument("--out", required=True, help="output folder: config.json, search.json, "
                   "pareto.png")
    p.add_argument("--val-size", type=positive_int, default=5000,
                   help="validation images that decide the budget")
    p.add_argument("--sensitivity-size", type=positive_int, default=1000,
                   help="validation images per sensitivity measurement")
    p.add_argument("--max-evals", type=positive_int, default=120,
                   help="at most this many greedy steps (each validated)")
    p.add_argument("--bits", type=bit_list, default=(2, 3, 4, 5, 6, 7, 8),
                   metavar="2,3,...,8", help="candidate bit widths (lin, log, logsqrt2)")
    p.add_argument("--calib-batches", type=positive_int, default=4,
                   help="validation batches used to calibrate FSRs (default 4)")
    p.add_argument("--no-progress", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_search, batch_size=1000)


def cmd_search(args: argparse.Namespace, argv: list[str]) -> int:
    from logquant.coverage import describe
    from logquant.io import check_output_path, output_lock
    from logquant.models import load_checked_model
    from logquant.search import search_to_folder

    refuse_device(args, "search")
    out = check_output_path(args.out, folder=True)
    with output_lock(out):  # held throughout: a second search there is refused at once
        splits = load_data(args)
        model = load_checked_model(args.model, args.checkpoint, splits, torch.device("cpu"))
        run = search_to_folder(model, splits, out, objective=args.objective,
                               budget=args.budget, val_size=args.val_size,
                               sensitivity_size=args.sensitivity_size,
                               max_evals=args.max_evals, bits=args.bits,
                               calib_batches=args.calib_batches, batch_size=args.batch_size,
                               log=(lambda m: None) if args.no_progress else log,
                               about={"command": command_line(argv), "model": args.model,
                                      "checkpoint": args.checkpoint})
        print(describe(run.search.prepared.apply(run.result.config)).summary())
        _print(run)
        print(f"{out / 'config.json'}: the configuration (eval/export/train/run/cost "
              f"--config); {out / 'search.json'}, {out / 'pareto.png'}")
    return 0


def _print(run) -> None:
    from logquant.search import describe_formats

    summary, result = run.summary, run.result
    unit = "pJ/image" if result.objective_name == "energy" else "bits/image"
    for row in describe_formats(result.config, run.search.prepared):
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
