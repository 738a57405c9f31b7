"""The engine's subcommands: ``export``, ``run``, ``cost`` and ``vectors``."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from logquant import cli
from logquant.errors import LogquantError


def add_commands(sub) -> None:
    p = sub.add_parser("export", help="write a quantized model as a packed .lqz file")
    cli._add_common(p)
    p.add_argument("--checkpoint", default=None,
                   help="weights file (default: bundled); a quantization-aware checkpoint "
                        "keeps its own formats")
    p.add_argument("--calib-batches", type=cli._positive_int, default=8,
                   help="validation batches used to calibrate FSRs")
    p.add_argument("--out", required=True, help="the file to write (.lqz, or .onnx)")
    p.add_argument("--format", choices=("lqz", "onnx"), default="lqz", dest="file_format",
                   help="lqz: packed codes for the integer engine (default); onnx: the "
                        "fake-quantized model for onnxruntime (input: the normalized image)")
    p.add_argument("--compress", action="store_true",
                   help="entropy-code the weight codes (rANS) instead of bit-packing them")
    cli._add_format_args(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("run", help="integer-only inference of an .lqz file on a data split")
    _add_network_source(p)
    p.add_argument("--data-dir", default=None, help="as for eval")
    p.add_argument("--split", choices=("test", "val"), default="test",
                   help="the images to classify (default test)")
    p.add_argument("--batch-size", type=cli._positive_int, default=500,
                   help="images per engine call (default 500)")
    p.add_argument("--limit", type=cli._positive_int, default=None,
                   help="only the first N images")
    p.add_argument("--acc-bits", type=cli._positive_int, default=None,
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
    p.add_argument("--count", type=cli._positive_int, default=4,
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
    g.add_argument("--calib-batches", type=cli._positive_int, default=None,
                   help="validation batches of 500 calibrating --config's FSRs (default 8)")


def _network(args: argparse.Namespace):
    """The network to run or cost: the .lqz file, or ``--config`` exported in memory."""
    if (args.lqz is None) == (args.config is None):
        raise LogquantError("give an .lqz file or --config FILE (not both)")
    if args.lqz is not None:
        given = [f"--{n.replace('_', '-')}" for n in ("model", "checkpoint", "calib_batches")
                 if getattr(args, n) is not None]
        if given:  # refused, not ignored: the file already holds its network
            raise LogquantError(f"{', '.join(given)} apply to --config only; an .lqz file "
                                "holds its network")
        return _load(args.lqz)
    args.model = args.model or "refcnn"
    args.calib_batches = args.calib_batches or 8
    from logquant.config import QuantConfig
    from logquant.data import load_splits
    from logquant.export import build_lqz, quantize_for_export

    config = QuantConfig.load(args.config)
    splits = load_splits(args.data_dir)
    model = cli._load_checked_model(args, splits, torch.device("cpu"))
    images = splits.val.images[:args.calib_batches * 500]
    qmodel, offset = quantize_for_export(model, config, images, splits.val.mean,
                                         splits.val.std, num_batches=args.calib_batches)
    return build_lqz(qmodel, offset, list(splits.val.images.shape[1:]),
                     {"config": config.to_dict()})  # callers plan it: refusals name the op


def cmd_export(args: argparse.Namespace, argv: list[str]) -> int:
    from logquant import lqz
    from logquant.data import load_splits
    from logquant.engine import Engine
    from logquant.export import build_lqz, float32_size, quantize_for_export
    from logquant.io import check_output_path

    check_output_path(args.out, suffixes=(f".{args.file_format}",),
                      inputs=(args.checkpoint, args.config))
    config = cli.config_from_args(args)
    if args.file_format == "onnx":
        return _export_onnx(args, config)
    splits = load_splits(args.data_dir, args.image_size)
    model = cli._load_checked_model(args, splits, torch.device("cpu"))
    calibration = splits.val.images[:args.calib_batches * args.batch_size]
    qmodel, offset = quantize_for_export(model, None if config.is_float else config,
                                         calibration, splits.val.mean, splits.val.std,
                                         num_batches=args.calib_batches)
    meta = {"source": {"model": args.model, "checkpoint": args.checkpoint,
                       "command": "logquant " + shlex.join(argv)},
            "config": None if config.is_float else config.to_dict(),
            "classes": list(splits.train.classes),
            "normalization": {"mean": list(splits.val.mean), "std": list(splits.val.std)},
            "calibration": {"split": "val", "images": len(calibration)}}
    from logquant.coverage import describe

    print(describe(qmodel).summary())
    network = build_lqz(qmodel, offset, list(splits.val.images.shape[1:]), meta)
    engine = Engine(network)  # refuses, naming the op, what it could not compute exactly
    size = lqz.save(network, args.out, compress=args.compress)
    reference = float32_size(qmodel)
    for layer in engine.plan.layers.values():
        x = layer.x_table.fmt.name if layer.x_table is not None else "pixels"
        print(f"  {layer.op['name']:<20} weights {layer.weight_format.name:<14} input "
              f"{x:<14} accumulator {layer.acc_bits} bits")
    print(f"{args.out}: {size:,} bytes; float32 safetensors of the same weights "
          f"{reference:,} bytes ({reference / size:.2f}x smaller)")
    if args.compress:
        print(_coding_summary(args.out, network))
    return 0


def _export_onnx(args: argparse.Namespace, config) -> int:
    """``export --format onnx``: the model ``eval`` would quantize, as an ONNX file."""
    from logquant.convert import describe, is_quantized, quantize_model
    from logquant.data import load_splits
    from logquant.onnx_export import export_onnx

    if args.compress:
        raise LogquantError("--compress applies to .lqz files only")
    if not args.out.endswith(".onnx"):
        raise LogquantError(f"--out {args.out}: the file name must end in .onnx")
    splits = load_splits(args.data_dir, args.image_size)
    model = cli._load_checked_model(args, splits, torch.device("cpu"))
    if not is_quantized(model):
        if config.is_float:
            raise LogquantError("export needs formats: pass --weights and --acts (or --config)")
        model = quantize_model(model, config, splits.val.batches(args.batch_size),
                               num_batches=args.calib_batches)
    elif not config.is_float:
        raise LogquantError("the model was trained quantization-aware: it carries its "
                            "formats; export it without format flags")
    print(describe(model).summary())
    export_onnx(model, splits.val.normalize(splits.val.images[:2]), args.out)
    print(f"{args.out}: {Path(args.out).stat().st_size:,} bytes (ONNX; input: images "
          f"normalized with mean {list(splits.val.mean)}, std {list(splits.val.std)})")
    return 0


def _coding_summary(path: str, network) -> str:
    """Bits per weight of the compressed file (rANS where smaller, packed elsewhere)
    against the codes' empirical entropy."""
    from logquant import lqz
    from logquant.entropy import empirical_entropy_bits

    meta, arrays = lqz.read_container(Path(path))
    written = {op["out"]: op for op in json.loads(meta["lqz"])["ops"]}
    count = coded = limit = coded_layers = 0
    for op in network.layer_ops():
        codes = network.weights[op["weight"]].numpy()
        count += codes.size
        coded += 8 * sum(a.nbytes for n, a in arrays.items() if n in (
            op["weight"], op["weight"] + ".freq"))
        limit += empirical_entropy_bits(codes)
        coded_layers += written[op["out"]]["weight_encoding"] == "rans"
    bits = network.weight_format(network.layer_ops()[0]).bits
    return (f"weights: {coded / count:.3f} bits each ({coded_layers} of "
            f"{len(network.layer_ops())} layers entropy-coded, frequency tables included) vs "
            f"{limit / count:.3f} bits empirical entropy (the limit) and {bits} bits packed")


def _load(path: str):
    from logquant import lqz

    return lqz.load(path)


def _images(args: argparse.Namespace, classes: int):
    from logquant.data import load_splits

    splits = load_splits(args.data_dir)
    dataset = getattr(splits, args.split)
    if len(dataset.classes) != classes:
        raise LogquantError(f"the .lqz network has {classes} outputs, the data "
                            f"{len(dataset.classes)} classes")
    if len(dataset) == 0:
        raise LogquantError(f"the {args.split} split holds no images")
    limit = getattr(args, "limit", None) or getattr(args, "count", None)
    return dataset.images[:limit], dataset.labels[:limit]


def cmd_run(args: argparse.Namespace, argv: list[str]) -> int:
    from logquant.cost import cost_report
    from logquant.engine import Engine

    model = _network(args)
    engine = Engine(model, acc_bits=args.acc_bits)
    images, labels = _images(args, engine.plan.output.shape[0])
    correct, overflows, mismatches = 0, {}, {"codes": 0, "logits": 0}
    start = time.perf_counter()
    for i in range(0, len(images), args.batch_size):
        batch = images[i:i + args.batch_size]
        result = engine.run(batch, trace=args.verify)
        correct += int((result.logits.argmax(1) == labels[i:i + args.batch_size]).sum())
        for name, count in result.overflows.items():
            overflows[name] = overflows.get(name, 0) + count
        if args.verify:
            _compare(model, batch, result, mismatches)
    seconds = time.perf_counter() - start
    cost = cost_report(model, engine.plan)["total"]
    widths = {layer.op["name"]: layer.acc_bits for layer in engine.plan.layers.values()}
    summary = {"lqz": args.lqz, "config": args.config, "split": args.split, "images": len(images),
               "top1": 100.0 * correct / len(images), "seconds": seconds,
               "accumulator_bits_needed": widths, "accumulator_bits": args.acc_bits,
               "overflows": overflows, "macs_per_image": cost["macs"],
               "shift_adds_per_image": cost["shift_adds"],
               "multiplies_per_image": cost["multiplies"]}
    if args.verify:
        summary["float64_mismatches"] = mismatches
    if args.json:
        print(json.dumps(summary, sort_keys=True))
        return 0
    for name, bits in widths.items():
        extra = f", {overflows[name]:,} saturated" if overflows.get(name) else ""
        print(f"  {name:<20} accumulator {bits} bits needed{extra}")
    print(f"{args.lqz or args.config} on {args.split} ({len(images)} images): top-1 "
          f"{summary['top1']:.2f} %  "
          f"integer engine, {seconds:.1f} s; {cost['shift_adds']:,} shift-adds and "
          f"{cost['multiplies']:,} multiplies per image")
    if args.verify:
        note = ""
        if any(layer.sqrt2 for layer in engine.plan.layers.values()):
            note = (" (base sqrt2: the simulation rounds sqrt2, so exact ties such as "
                    "A + 0 sqrt2 = 0.5 can fall on the wrong side there; the engine's integer "
                    "sums get them right)")
        print(f"float64 simulation: {mismatches['codes']} activation codes and "
              f"{mismatches['logits']} logits differ{note}")
    return 0


def _compare(model, images, result, mismatches: dict) -> None:
    from logquant.simulate import simulate

    sim = simulate(model, images)
    mismatches["codes"] += sum(int((result.codes[k].long() != sim.codes[k].long()).sum())
                               for k in sim.codes)
    mismatches["logits"] += int((result.values() != sim.logits).sum())


def cmd_cost(args: argparse.Namespace, argv: list[str]) -> int:
    from logquant.cost import cost_report, format_report

    report = cost_report(_network(args))
    print(json.dumps(report, sort_keys=True) if args.json else format_report(report))
    return 0


def cmd_vectors(args: argparse.Namespace, argv: list[str]) -> int:
    from logquant.engine import Engine
    from logquant.io import check_output_path
    from logquant.vectors import write_vectors

    out = check_output_path(args.out, folder=True)
    engine = Engine(_load(args.lqz))
    images, _ = _images(args, engine.plan.output.shape[0])
    manifest = write_vectors(engine, images, args.layer, out)  # staged: replaced whole
    files = ", ".join(manifest["files"])
    print(f"{args.out}: vectors of {args.layer} for {len(images)} images ({files}; "
          f"manifest.json, vectors.npz)", file=sys.stdout)
    return 0

