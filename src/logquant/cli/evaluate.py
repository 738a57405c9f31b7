"""``logquant eval``: top-1/top-5 of a model in float or with chosen formats."""

from __future__ import annotations

import argparse
import json

from logquant.cli.config_options import add_format_args, config_from_args
from logquant.cli.options import add_common, device, load_data, positive_int
from logquant.errors import LogquantError


def add_commands(sub) -> None:
    p = sub.add_parser("eval", help="top-1/top-5 of a model in float or with chosen formats")
    add_common(p)
    p.add_argument("--checkpoint", default=None,
                   help="weights file (.safetensors, or a torch state_dict loaded safely); "
                        "default for refcnn: the bundled weights")
    add_format_args(p)
    p.add_argument("--calib-batches", type=positive_int, default=None,
                   help="validation batches (of --batch-size) used for calibration "
                        "(default 8)")
    p.add_argument("--split", choices=("test", "val"), default="test",
                   help="where accuracy is measured (calibration always uses val)")
    p.add_argument("--quantized", default=None, metavar="FILE",
                   help="a quantized model saved by --save-quantized (or save_quantized): "
                        "its formats and FSRs, no calibration; --model gives the architecture")
    p.add_argument("--save-quantized", default=None, metavar="FILE",
                   help="also write the quantized model (.safetensors) for --quantized")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace, argv: list[str]) -> int:
    from logquant.evaluate import evaluate_config
    from logquant.io import check_output_path
    from logquant.models import load_checked_model

    config = config_from_args(args)
    if args.quantized and not config.is_float:
        raise LogquantError("--quantized FILE carries its formats; drop the format flags")
    if args.quantized and args.calib_batches is not None:
        raise LogquantError("--quantized FILE carries its FSRs; drop --calib-batches")
    if args.save_quantized:
        check_output_path(args.save_quantized, suffixes=(".safetensors",),
                          inputs=(args.checkpoint, args.quantized, args.config))
    where = device(args.device)
    splits = load_data(args)
    model = load_checked_model(args.model, args.checkpoint, splits, where)
    acc, layers = evaluate_config(model, splits, config, split=args.split,
                                  quantized=args.quantized, save_quantized=args.save_quantized,
                                  calib_batches=args.calib_batches or 8, batch_size=args.batch_size,
                                  device=where, progress=not args.json)
    if args.json:
        print(json.dumps({"model": args.model, "checkpoint": args.checkpoint,
                          "split": args.split, **acc.as_dict(), "config": config.to_dict(),
                          "layers": list(layers), "quantized_layers": layers.quantized,
                          "conv_linear_layers": layers.total}, sort_keys=True))
    else:
        print(layers)
        label = "quantized" if layers.quantized else "float"
        print(f"{args.model} ({label}) on {args.split} ({acc.count} images): "
              f"top-1 {acc.top1:.2f} %  top-5 {acc.top5:.2f} %")
    return 0
