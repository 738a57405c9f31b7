"""``logquant sweep`` and ``logquant reproduce``: the paper's grid of formats and FSRs."""

from __future__ import annotations

import argparse
from pathlib import Path

from logquant.cli.options import (
    add_common,
    bit_list,
    command_line,
    device,
    load_data,
    log,
    positive_int,
)
from logquant.config import FSR_METHODS


def _fsr_range(text: str) -> tuple[int, int]:
    from logquant.formats import FSR_MAX, FSR_MIN

    lo, sep, hi = text.partition(":")
    try:
        value = (int(lo), int(hi))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO:HI integers, got {text!r}") from None
    if not sep:
        raise argparse.ArgumentTypeError(f"expected LO:HI integers, got {text!r}")
    if value[0] > value[1]:
        raise argparse.ArgumentTypeError(f"empty FSR range {text!r} (min > max)")
    if value[0] < FSR_MIN or value[1] > FSR_MAX:
        raise argparse.ArgumentTypeError(f"FSRs lie in {FSR_MIN}..{FSR_MAX}, got {text!r}")
    return value


def add_commands(sub) -> None:
    for name, help_text in (("sweep", "evaluate the paper's grid of formats and FSRs"),
                            ("reproduce", "the paper's experiments: sweep, figures, REPORT.md")):
        p = sub.add_parser(name, help=help_text)
        add_common(p)
        p.add_argument("--checkpoint", default=None, help="weights file (default: bundled)")
        p.add_argument("--out", required=True, help="output folder (resumed if it holds "
                       "an earlier run of the same command)")
        p.add_argument("--fsr-range", type=_fsr_range, default=None, metavar="LO:HI",
                       help="global activation FSRs to sweep (default: from calibration)")
        p.add_argument("--fsr-method", choices=FSR_METHODS, default="mse",
                       help="per-layer FSR calibration for the calibrated points")
        p.add_argument("--act-bits", type=bit_list, default=(3, 4, 5), metavar="3,4,5",
                       help="activation bit widths of the activation grids")
        p.add_argument("--val-size", type=positive_int, default=2000,
                       help="validation images per point (selection); test is always full")
        p.add_argument("--calib-batches", type=positive_int, default=4,
                       help="validation batches used to calibrate FSRs (default 4)")
        p.add_argument("--oracle", action="store_true",
                       help="also measure every global FSR on the test set (slow; labelled)")
        p.add_argument("--force", action="store_true", help="overwrite a folder holding "
                       "something else")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        p.set_defaults(func=cmd_reproduce if name == "reproduce" else cmd_sweep)


def _inputs(args: argparse.Namespace):
    """Data, model, manifest and settings shared by sweep and reproduce."""
    import torch

    from logquant.models import load_checked_model
    from logquant.sweep import SweepSettings, sweep_manifest

    where = device(args.device)
    splits = load_data(args)
    model = load_checked_model(args.model, args.checkpoint, splits, torch.device("cpu"))
    settings = SweepSettings(val_size=args.val_size, batch_size=args.batch_size,
                             calib_batches=args.calib_batches, device=str(where),
                             oracle=args.oracle)
    manifest = sweep_manifest(args.command, args.model, args.checkpoint, splits, settings)
    return splits, model, manifest, settings


def _locked_folder(args: argparse.Namespace):
    """The lock on --out, taken first: a second run there is refused at once (a folder of
    other files than a sweep's is refused even before, so that no lock file lands there)."""
    from logquant.io import check_output_path, writer_lock
    from logquant.sweep import refuse_foreign_folder

    out = check_output_path(args.out, folder=True, foreign_ok=True)  # the sweep checks it
    refuse_foreign_folder(out, args.force)
    return writer_lock(out)


def cmd_sweep(args: argparse.Namespace, argv: list[str]) -> int:
    from logquant.sweep import paper_sweep

    with _locked_folder(args):
        splits, model, manifest, settings = _inputs(args)
        paper_sweep(model, splits, Path(args.out), manifest, settings,
                    fsr_range=args.fsr_range, method=args.fsr_method, act_bits=args.act_bits,
                    force=args.force, progress=not args.no_progress, log=log)
    return 0


def cmd_reproduce(args: argparse.Namespace, argv: list[str]) -> int:
    from logquant.experiments import reproduce

    out = Path(args.out)
    with _locked_folder(args):
        splits, model, manifest, settings = _inputs(args)
        summary = reproduce(model, splits, out, manifest, settings,
                            command=command_line(argv), model_name=args.model,
                            fsr_range=args.fsr_range, method=args.fsr_method,
                            act_bits=args.act_bits, force=args.force,
                            progress=not args.no_progress, log=log)
    if summary:
        print(summary)
        print(f"report: {out / 'REPORT.md'}")
    return 0
