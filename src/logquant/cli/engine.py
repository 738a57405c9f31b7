"""The engine's commands: ``export``, ``run``, ``cost`` and ``vectors``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from logquant.cli.config_options import add_format_args, config_from_args
from logquant.cli.options import (
    add_common,
    command_line,
    load_data,
    positive_int,
    refuse_device,
)
from logquant.errors import LogquantError


def add_commands(sub) -> None:
    p = sub.add_parser("export", help="write a quantized model as a packed .lqz file")
    add_common(p)
    p.add_argument("--checkpoint", default=None,
                   help="weights file (default: bundled); a quantization-aware checkpoint "
                        "keeps its own formats")
    p.add_argument("--calib-batches", type=positive_int, default=8,
                   help="validation batches used to calibrate FSRs")
    p.add_argument("--out", required=True, help="the file to write (.lqz, or .onnx)")
    p.add_argument("--format", choices=("lqz", "onnx"), default="lqz", dest="file_format",
                   help="lqz: packed codes for the integer engine (default); onnx: the "
                        "fake-quantized model for onnxruntime (input: the normalized image)")
    p.add_argument("--compress", action="store_true",
                   help="entropy-code the weight codes (rANS) instead of bit-packing them")
    add_format_args(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("run", help="integer-only inference of an .lqz file on a data split")
    _add_network_source(p)
    p.add_argument("--data-dir", default=None, help="as for eval")
    p.add_argument("--split", choices=("test", "val"), default="test",
                   help="the images to classify (default test)")
    p.add_argument("--batch-size", type=positive_int, default=500,
                   help="images per engine call (default 500)")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="only the first N images")
    p.add_argument("--acc-bits", type=positive_int, default=None,
                   help="accumulator width (default: the width that never overflows); "
                        "narrower accumulators saturate and overflows are counted")
    p.add_argument("--verify", action="store_true",
                   help="also run the float64 simulation and count mismatching codes/logits")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("cost", help="hardware cost of an .lqz network: MACs, widths, "
                       "memory bits, energy vs fp32 and int8")
    _add_network_source(p)
    p.add_argument("--data-dir", default=None, help="calibration data for --config")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_cost)

    p = sub.add_parser("vectors", help="test vectors of one layer for a hardware testbench")
    p.add_argument("lqz", help="the .lqz file")
    p.add_argument("--layer", required=True, help="conv/linear layer name (see 'cost')")
    p.add_argument("--count", type=positive_int, default=4,
                   help="how many test images to push through")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--data-dir", default=None, help="as for eval")
    p.add_argument("--split", choices=("test", "val"), default="test",
                   help="where the images come from (default test)")
    p.set_defaults(func=cmd_vectors)


def _add_network_source(p: argparse.ArgumentParser) -> None:
    p.add_argument("lqz", nargs="?", default=None, help="the .lqz file")
    g = p.add_argument_group("or export on the fly (instead of an .lqz file)")
    g.add_argument("--config", default=None, help="a QuantConfig JSON file (e.g. from search)")
    g.add_argument("--model", default=None, help="as for eval (with --config; default refcnn)")
    g.add_argument("--checkpoint", default=None, help="weights file (with --config)")
    g.add_argument("--calib-batches", type=positive_int, default=None,
                   help="validation batches of 500 calibrating --config's FSRs (default 8)")


def _network(args: argparse.Namespace):
    """The network to run or cost: the .lqz file, or ``--config`` exported in memory."""
    from logquant import lqz

    if (args.lqz is None) == (args.config is None):
        raise LogquantError("give an .lqz file or --config FILE (not both)")
    if args.lqz is not None:
        given = [f"--{n.replace('_', '-')}" for n in ("model", "checkpoint", "calib_batches")
                 if getattr(args, n) is not None]
        if given:  # refused, not ignored: the file already holds its network
            raise LogquantError(f"{', '.join(given)} apply to --config only; an .lqz file "
                                "holds its network")
        return lqz.load(args.lqz)
    from logquant.config import QuantConfig
    from logquant.data import load_splits
    from logquant.deploy import network_from_config
    from logquant.models import load_checked_model

    config = QuantConfig.load(args.config)
    splits = load_splits(args.data_dir)
    model = load_checked_model(args.model or "refcnn", args.checkpoint, splits,
                               torch.device("cpu"))
    return network_from_config(model, config, splits, args.calib_batches or 8)


def cmd_export(args: argparse.Namespace, argv: list[str]) -> int:
    from logquant.deploy import coding_summary, export_lqz
    from logquant.io import check_output_path
    from logquant.models import load_checked_model

    refuse_device(args, "export")
    check_output_path(args.out, suffixes=(f".{args.file_format}",),
                      inputs=(args.checkpoint, args.config))
    config = config_from_args(args)
    if args.file_format == "onnx":
        return _export_onnx(args, config)
    splits = load_data(args)
    model = load_checked_model(args.model, args.checkpoint, splits, torch.device("cpu"))
    exported = export_lqz(model, config, splits, args.out, calib_batches=args.calib_batches,
                          batch_size=args.batch_size, compress=args.compress,
                          source={"model": args.model, "checkpoint": args.checkpoint,
                                  "command": command_line(argv)})
    for layer in exported.engine.plan.layers.values():
        x = layer.x_table.fmt.name if layer.x_table is not None else "pixels"
        print(f"  {layer.op['name']:<20} weights {layer.weight_format.name:<14} input "
              f"{x:<14} accumulator {layer.acc_bits} bits")
    size, reference = exported.size, exported.float32_size
    print(f"{args.out}: {size:,} bytes; float32 safetensors of the same weights "
          f"{reference:,} bytes ({reference / size:.2f}x smaller)")
    if args.compress:
        print(coding_summary(args.out, exported.network))
    return 0


def _export_onnx(args: argparse.Namespace, config) -> int:
    """``export --format onnx``: the model ``eval`` would quantize, as an ONNX file."""
    from logquant.models import load_checked_model
    from logquant.onnx_export import quantize_and_export_onnx

    if args.compress:
        raise LogquantError("--compress applies to .lqz files only")
    if not args.out.endswith(".onnx"):
        raise LogquantError(f"--out {args.out}: the file name must end in .onnx")
    splits = load_data(args)
    model = load_checked_model(args.model, args.checkpoint, splits, torch.device("cpu"))
    quantize_and_export_onnx(model, config, splits, args.out, batch_size=args.batch_size,
                             calib_batches=args.calib_batches)
    print(f"{args.out}: {Path(args.out).stat().st_size:,} bytes (ONNX; input: images "
          f"normalized with mean {list(splits.val.mean)}, std {list(splits.val.std)})")
    return 0


def cmd_run(args: argparse.Namespace, argv: list[str]) -> int:
    from logquant.deploy import run_network

    run = run_network(_network(args), args.data_dir, args.split, limit=args.limit,
                      acc_bits=args.acc_bits, batch_size=args.batch_size, verify=args.verify)
    summary = {"lqz": args.lqz, "config": args.config, "split": args.split, **run.summary}
    if args.json:
        print(json.dumps(summary, sort_keys=True))
        return 0
    overflows = summary["overflows"]
    for name, bits in summary["accumulator_bits_needed"].items():
        extra = f", {overflows[name]:,} saturated" if overflows.get(name) else ""
        print(f"  {name:<20} accumulator {bits} bits needed{extra}")
    print(f"{args.lqz or args.config} on {args.split} ({summary['images']} images): top-1 "
          f"{summary['top1']:.2f} %  "
          f"integer engine, {summary['seconds']:.1f} s; {summary['shift_adds_per_image']:,} "
          f"shift-adds and {summary['multiplies_per_image']:,} multiplies per image")
    if args.verify:
        note = ""
        if any(layer.sqrt2 for layer in run.engine.plan.layers.values()):
            note = (" (base sqrt2: the simulation rounds sqrt2, so exact ties such as "
                    "A + 0 sqrt2 = 0.5 can fall on the wrong side there; the engine's integer "
                    "sums get them right)")
        mismatches = summary["float64_mismatches"]
        print(f"float64 simulation: {mismatches['codes']} activation codes and "
              f"{mismatches['logits']} logits differ{note}")
    return 0


def cmd_cost(args: argparse.Namespace, argv: list[str]) -> int:
    from logquant.cost import cost_report, format_report

    report = cost_report(_network(args))
    print(json.dumps(report, sort_keys=True) if args.json else format_report(report))
    return 0


def cmd_vectors(args: argparse.Namespace, argv: list[str]) -> int:
    from logquant.deploy import write_split_vectors
    from logquant.io import check_output_path

    out = check_output_path(args.out, folder=True)
    manifest, count = write_split_vectors(args.lqz, args.layer, out, data_dir=args.data_dir,
                                          split=args.split, count=args.count)
    files = ", ".join(manifest["files"])
    print(f"{args.out}: vectors of {args.layer} for {count} images ({files}; "
          f"manifest.json, vectors.npz)")
    return 0
