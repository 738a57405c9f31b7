"""The ``logquant`` command: a thin layer of argument parsing over the library."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import shlex
import sys
from pathlib import Path

import torch

from logquant.config import FSR_METHODS
from logquant.errors import LogquantError


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line, exit code 2, and takes options
    only by their full names (an abbreviation would change meaning when options are added)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise LogquantError(f"{self.prog}: {message}")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


IMAGE_SIZE_MAX = 2048  # pixels per side: larger crops of a folder would exhaust memory


def _image_size(text: str) -> int:
    value = _positive_int(text)
    if value > IMAGE_SIZE_MAX:
        raise argparse.ArgumentTypeError(f"image sides up to {IMAGE_SIZE_MAX}, got {value}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"a seed must be in 0 .. 2^63-1, got {text}")
    return value


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="refcnn",
                   help="refcnn (bundled), a torchvision architecture, or package.module:factory")
    p.add_argument("--data-dir", default=None,
                   help="Fashion-MNIST IDX files or an image folder (train/, test/ of classes); "
                        "default $LOGQUANT_DATA_DIR or /usr/share/datasets/fashion-mnist")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--batch-size", type=_positive_int, default=500, help="evaluation batch")
    p.add_argument("--image-size", type=_image_size, default=224,
                   help="image-folder data only: side of the square crop")


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LogquantError(f"--device {name}: not a device name (cpu, cuda, cuda:0)") from None
    if device.type not in ("cpu", "cuda"):
        raise LogquantError(f"--device {name}: logquant runs on cpu or cuda devices")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LogquantError(f"--device {name}: CUDA is not available on this machine")
    return device


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="logquant", description="CNNs in logarithmic (power-of-two) data "
                     "representation: exact formats, quantization, the paper's experiments, "
                     "training.")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an unexpected (internal) error")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train a model, in float or quantization-aware "
                       "(--weights/--acts/--grads)")
    _add_common(p)
    p.add_argument("--epochs", type=_positive_int, default=15, help="passes over the "
                   "training split (default 15)")
    p.add_argument("--train-batch-size", type=_positive_int, default=128,
                   help="global batch (split across torchrun processes)")
    p.add_argument("--lr", type=float, default=0.05,
                   help="peak learning rate of SGD with Nesterov momentum (default 0.05)")
    p.add_argument("--warmup-epochs", type=int, default=1,
                   help="linear warm-up before the cosine decay (default 1)")
    p.add_argument("--seed", type=_seed, default=0,
                   help="initialization, data order and augmentation (default 0)")
    p.add_argument("--out", required=True, help="output .safetensors file (final weights)")
    p.add_argument("--checkpoint-dir", default=None,
                   help="per-epoch checkpoints (default: OUT without suffix + '.ckpt')")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir")
    p.add_argument("--init", default=None, metavar="CHECKPOINT",
                   help="start from these weights (fine-tuning) instead of random init")
    _add_format_args(p)
    p.add_argument("--grads", default=None, help="format of the back-propagated errors")
    p.add_argument("--clip-ste", action="store_true",
                   help="straight-through gradient zeroed where the input saturated")
    p.add_argument("--fold-bn", action="store_true",
                   help="fold BatchNorm into the convs before quantization-aware training")
    p.add_argument("--test-each-epoch", action="store_true",
                   help="record test accuracy per epoch (curves; never used to choose)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="top-1/top-5 of a model in float or with chosen formats")
    _add_common(p)
    p.add_argument("--checkpoint", default=None,
                   help="weights file (.safetensors, or a torch state_dict loaded safely); "
                        "default for refcnn: the bundled weights")
    _add_format_args(p)
    p.add_argument("--calib-batches", type=_positive_int, default=8,
                   help="validation batches (of --batch-size) used for calibration")
    p.add_argument("--split", choices=("test", "val"), default="test",
                   help="where accuracy is measured (calibration always uses val)")
    p.add_argument("--quantized", default=None, metavar="FILE",
                   help="a quantized model saved by --save-quantized (or save_quantized): "
                        "its formats and FSRs, no calibration; --model gives the architecture")
    p.add_argument("--save-quantized", default=None, metavar="FILE",
                   help="also write the quantized model (.safetensors) for --quantized")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_eval)

    for name, help_text in (("sweep", "evaluate the paper's grid of formats and FSRs"),
                            ("reproduce", "the paper's experiments: sweep, figures, REPORT.md")):
        p = sub.add_parser(name, help=help_text)
        _add_common(p)
        p.add_argument("--checkpoint", default=None, help="weights file (default: bundled)")
        p.add_argument("--out", required=True, help="output folder (resumed if it holds "
                       "an earlier run of the same command)")
        p.add_argument("--fsr-range", type=_fsr_range, default=None, metavar="LO:HI",
                       help="global activation FSRs to sweep (default: from calibration)")
        p.add_argument("--fsr-method", choices=FSR_METHODS, default="mse",
                       help="per-layer FSR calibration for the calibrated points")
        p.add_argument("--act-bits", type=_bit_list, default=(3, 4, 5), metavar="3,4,5",
                       help="activation bit widths of the activation grids")
        p.add_argument("--val-size", type=_positive_int, default=2000,
                       help="validation images per point (selection); test is always full")
        p.add_argument("--calib-batches", type=_positive_int, default=4,
                       help="validation batches used to calibrate FSRs (default 4)")
        p.add_argument("--oracle", action="store_true",
                       help="also measure every global FSR on the test set (slow; labelled)")
        p.add_argument("--force", action="store_true", help="overwrite a folder holding "
                       "something else")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        p.set_defaults(func=cmd_reproduce if name == "reproduce" else cmd_sweep)
    p = sub.add_parser("reproduce-training", help="the paper's training claim: float vs lin5 "
                       "vs log5 from scratch, plus log4/log3 fine-tuning")
    p.add_argument("--data-dir", default=None, help="as for eval")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--out", required=True, help="output folder (resumes an earlier run)")
    p.add_argument("--epochs", type=_positive_int, default=15,
                   help="epochs of each from-scratch run (default 15)")
    p.add_argument("--finetune-epochs", type=_positive_int, default=3,
                   help="epochs of each log4/log3 fine-tuning run (default 3)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of every run (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_reproduce_training)
    from logquant import cli_engine, cli_search  # here: those modules read this one

    cli_engine.add_commands(sub)
    cli_search.add_commands(sub)
    return parser


def cmd_reproduce_training(args: argparse.Namespace, argv: list[str]) -> int:
    from logquant.data import load_splits
    from logquant.io import check_output_path
    from logquant.training_experiment import reproduce_training

    out = check_output_path(args.out, folder=True)
    device = _device(args.device)
    splits = load_splits(args.data_dir)
    with writer_lock(out):
        summary = reproduce_training(splits, out, epochs=args.epochs,
                                     finetune_epochs=args.finetune_epochs, seed=args.seed,
                                     device=device, command="logquant " + shlex.join(argv),
                                     progress=not args.no_progress,
                                     log=lambda m: print(m, file=sys.stderr))
    print(summary)
    return 0


def writer_lock(out: Path):
    """The output lock of ``out`` on the process that writes it (rank 0 under torchrun; the
    other ranks only compute), so that a second run into ``out`` is refused."""
    from logquant.distributed import init_distributed
    from logquant.io import output_lock

    rank, _ = init_distributed()
    return output_lock(out) if rank == 0 else contextlib.nullcontext()


def _load_checked_model(args: argparse.Namespace, splits, device: torch.device):
    """The model with its weights, after one tiny forward pass proves it fits the data."""
    from logquant.convert import check_finite
    from logquant.models import load_model

    model = load_model(args.model, args.checkpoint, len(splits.train.classes),
                       splits.train.images.shape[1]).to(device)
    check_finite(model)
    probe = splits.val.normalize(splits.val.images[:2].to(device))
    try:
        with torch.no_grad():
            out = model(probe)
    except Exception as exc:  # any shape/dtype mismatch between model and data
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise LogquantError(f"--model {args.model} cannot run on this data (inputs of shape "
                            f"{tuple(probe.shape)}): {first}") from None
    if out.ndim != 2 or out.shape[1] < len(splits.train.classes):
        raise LogquantError(f"--model {args.model} returns shape {tuple(out.shape)}; expected "
                            f"(batch, {len(splits.train.classes)}) logits")
    return model


def _fsr_method_or_int(text: str) -> str | int:
    if text in FSR_METHODS:
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected {', '.join(FSR_METHODS)} or an integer FSR, got {text!r}") from None


def _add_format_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("formats (float where not given)")
    g.add_argument("--config", default=None, help="a QuantConfig JSON file (flags override)")
    g.add_argument("--weights", help="weight format of conv and fc layers, e.g. log5s")
    g.add_argument("--conv-weights", help="weight format of conv layers")
    g.add_argument("--fc-weights", help="weight format of fully connected layers")
    g.add_argument("--acts", help="activation format (inputs of conv/fc layers), e.g. log3")
    g.add_argument("--fsr-method", type=_fsr_method_or_int, default=None,
                   help="max | percentile | mse (weights and activations), or a fixed FSR")
    g.add_argument("--weight-fsr", type=_fsr_method_or_int, default=None,
                   help="FSR method (or fixed FSR) for weights")
    g.add_argument("--act-fsr", type=_fsr_method_or_int, default=None,
                   help="FSR method (or fixed, global FSR) for activations")
    g.add_argument("--percentile", type=float, default=None, help="for --fsr-method percentile")
    g.add_argument("--quantize-input", action="store_true",
                   help="also quantize the first layer's input (the image)")
    g.add_argument("--layer", action="append", default=[],
                   metavar="PATTERN=weights:FMT,acts:FMT",
                   help="per-layer override (repeatable; later ones win); PATTERN is a layer "
                        "name or glob (features.*), re:REGEX, or type:CLASS; 'float' keeps "
                        "that part in float")
    g.add_argument("--skip", action="append", default=[], metavar="PATTERN",
                   help="leave the layers PATTERN selects entirely in float (repeatable)")
    g.add_argument("--unsupported", choices=("error", "float"), default=None,
                   help="a conv/linear layer logquant cannot quantize: stop with an error "
                        "naming it (default) or leave it float and list it")


def _parse_layer_override(text: str) -> tuple[str, dict[str, str]]:
    name, sep, spec = text.partition("=")
    parts = dict(item.partition(":")[::2] for item in spec.split(",") if item)
    if not sep or not name or not parts or any(not v for v in parts.values()):
        raise LogquantError(f"--layer {text!r}: expected NAME=weights:FMT,acts:FMT")
    return name, parts


def _first_given(*values):
    """The first value that was given (an FSR of 0 is given)."""
    return next((v for v in values if v is not None), None)


def config_from_args(args: argparse.Namespace):
    """The QuantConfig that the format flags (and --config file) describe."""
    from logquant.config import QuantConfig
    from logquant.formats import parse_format

    base = QuantConfig.load(args.config).to_dict() if args.config else {}
    if args.weights:
        base["conv_weights"] = base["fc_weights"] = args.weights
    for field in ("conv_weights", "fc_weights", "acts"):
        if getattr(args, field):
            base[field] = getattr(args, field)
    for field, value in (("weight_fsr", _first_given(args.weight_fsr, args.fsr_method)),
                         ("act_fsr", _first_given(args.act_fsr, args.fsr_method))):
        if isinstance(value, int):  # a fixed FSR: pin it in the formats it applies to
            targets = ("conv_weights", "fc_weights") if field == "weight_fsr" else ("acts",)
            for target in targets:
                fmt = parse_format(str(base.get(target, "float")))
                if fmt is not None:
                    base[target] = fmt.with_fsr(value).name
        elif value is not None:
            base[field] = value
    if args.percentile is not None:
        base["percentile"] = args.percentile
    if args.quantize_input:
        base["quantize_first_input"] = True
    if args.unsupported:
        base["unsupported"] = args.unsupported
    if args.skip:
        base["skip"] = list(base.get("skip", [])) + args.skip
    overrides = dict(base.get("overrides", {}))
    for text in args.layer:
        name, parts = _parse_layer_override(text)
        overrides[name] = parts
    base["overrides"] = overrides
    return QuantConfig.from_dict(base)


def cmd_eval(args: argparse.Namespace, argv: list[str]) -> int:
    from logquant.convert import describe, quantize_model
    from logquant.data import load_splits
    from logquant.evaluate import evaluate
    from logquant.io import check_output_path
    from logquant.persist import load_quantized, save_quantized

    config = config_from_args(args)
    if args.quantized and not config.is_float:
        raise LogquantError("--quantized FILE carries its formats; drop the format flags")
    if args.save_quantized:
        check_output_path(args.save_quantized, suffixes=(".safetensors",),
                          inputs=(args.checkpoint, args.quantized, args.config))
    device = _device(args.device)
    splits = load_splits(args.data_dir, args.image_size)
    model = _load_checked_model(args, splits, device)
    if args.quantized:
        model = load_quantized(model, args.quantized)
    elif not config.is_float:
        model = quantize_model(model, config, splits.val.batches(args.batch_size, device),
                               num_batches=args.calib_batches)
    layers = describe(model)
    if args.save_quantized:
        if layers.quantized == 0:
            raise LogquantError("--save-quantized: nothing is quantized; give formats")
        save_quantized(model, args.save_quantized)
    dataset = getattr(splits, args.split)
    acc = evaluate(model, dataset, args.batch_size, device, progress=not args.json)
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


def _bit_list(text: str) -> tuple[int, ...]:
    try:
        bits = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected bit widths like 3,4,5, got {text!r}") from None
    if not bits or any(not 1 <= b <= 8 for b in bits):
        raise argparse.ArgumentTypeError(f"bit widths must be 1..8, got {text!r}")
    return bits


def _fsr_range(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition(":")
    try:
        value = (int(lo), int(hi))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO:HI integers, got {text!r}") from None
    if not sep:
        raise argparse.ArgumentTypeError(f"expected LO:HI integers, got {text!r}")
    if value[0] > value[1]:
        raise argparse.ArgumentTypeError(f"empty FSR range {text!r} (min > max)")
    from logquant.formats import FSR_MAX, FSR_MIN

    if value[0] < FSR_MIN or value[1] > FSR_MAX:
        raise argparse.ArgumentTypeError(f"FSRs lie in {FSR_MIN}..{FSR_MAX}, got {text!r}")
    return value


def _sweep_inputs(args: argparse.Namespace):
    """Data, model, output folder, manifest and settings shared by sweep and reproduce."""
    from logquant.data import load_splits
    from logquant.models import BUNDLED_WEIGHTS
    from logquant.sweep import SWEEP_VERSION, SweepSettings, file_sha256

    device = _device(args.device)
    splits = load_splits(args.data_dir, args.image_size)
    model = _load_checked_model(args, splits, torch.device("cpu"))
    weights = args.checkpoint or (BUNDLED_WEIGHTS if args.model == "refcnn" else None)
    manifest = {"version": SWEEP_VERSION, "command": args.command, "model": args.model,
                "checkpoint_sha256": file_sha256(weights) if weights else None,
                "val_size": args.val_size, "calib_batches": args.calib_batches,
                "batch_size": args.batch_size, "oracle": args.oracle,
                "test_images": len(splits.test), "data_sha256": splits.fingerprint()}
    settings = SweepSettings(val_size=args.val_size, batch_size=args.batch_size,
                             calib_batches=args.calib_batches, device=str(device),
                             oracle=args.oracle)
    return splits, model, Path(args.out), manifest, settings


def cmd_sweep(args: argparse.Namespace, argv: list[str]) -> int:
    from logquant.sweep import default_fsr_range, paper_grid, prepare_sweep, run_sweep

    with writer_lock(_sweep_folder(args)):  # first: a second sweep there is refused at once
        splits, model, out, manifest, settings = _sweep_inputs(args)
        prepared = prepare_sweep(model, splits, settings)
        print(prepared.coverage(), file=sys.stderr)
        fsr_range = args.fsr_range or default_fsr_range(prepared)
        points = paper_grid(fsr_range, args.fsr_method, args.act_bits)
        manifest.update(fsr_range=list(fsr_range), fsr_method=args.fsr_method,
                        act_bits=list(args.act_bits), points=len(points))
        run_sweep(model, splits, points, out, manifest, settings, force=args.force,
                  progress=not args.no_progress, log=lambda m: print(m, file=sys.stderr),
                  prepared=prepared)
    return 0


def cmd_reproduce(args: argparse.Namespace, argv: list[str]) -> int:
    from logquant.experiments import reproduce

    with writer_lock(_sweep_folder(args)):
        splits, model, out, manifest, settings = _sweep_inputs(args)
        summary = reproduce(model, splits, out, manifest, settings,
                            command="logquant " + shlex.join(argv), model_name=args.model,
                            fsr_range=args.fsr_range, method=args.fsr_method,
                            act_bits=args.act_bits, force=args.force,
                            progress=not args.no_progress,
                            log=lambda m: print(m, file=sys.stderr))
    if summary:
        print(summary)
        print(f"report: {out / 'REPORT.md'}")
    return 0


def _sweep_folder(args: argparse.Namespace) -> Path:
    from logquant.io import check_output_path
    from logquant.sweep import refuse_foreign_folder

    out = check_output_path(args.out, folder=True, foreign_ok=True)  # the sweep checks it
    refuse_foreign_folder(out, args.force)
    return out


def cmd_train(args: argparse.Namespace, argv: list[str]) -> int:
    from logquant.data import load_splits
    from logquant.distributed import init_distributed
    from logquant.evaluate import evaluate
    from logquant.io import (
        check_output_path,
        load_weights,
        save_weights,
        write_json_atomic,
    )
    from logquant.models import create_model
    from logquant.qat import prepare_qat
    from logquant.train import TrainConfig, train

    out = check_output_path(args.out, suffixes=(".safetensors",),
                            inputs=(args.init, args.config))
    ckpt = check_output_path(Path(args.checkpoint_dir) if args.checkpoint_dir
                             else out.with_suffix(".ckpt"), folder=True)
    config = config_from_args(args)
    if args.grads:
        config = dataclasses.replace(config, grads=args.grads)
        config = type(config).from_dict(config.to_dict())  # validates the grads format
    rank, _ = init_distributed()
    device = _device(args.device)
    if device.type == "cuda" and torch.cuda.device_count() > 1:
        device = torch.device("cuda", rank % torch.cuda.device_count())
    splits = load_splits(args.data_dir, args.image_size)
    torch.manual_seed(args.seed)
    model = create_model(args.model, num_classes=len(splits.train.classes),
                         in_channels=splits.train.images.shape[1])
    if args.init:
        load_weights(model, args.init)
    quantized = not config.is_float or config.grads is not None
    if quantized:
        from logquant.coverage import describe

        model = prepare_qat(model, config, splits.val.batches(args.batch_size),
                            fold_bn=args.fold_bn, clip_ste=args.clip_ste)
        print(describe(model).summary(), file=sys.stderr)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.train_batch_size, lr=args.lr,
                      seed=args.seed, warmup_epochs=args.warmup_epochs,
                      test_each_epoch=args.test_each_epoch)
    with writer_lock(ckpt):  # one training run per checkpoint folder
        summary = train(model, splits, cfg, device, checkpoint_dir=ckpt, resume=args.resume,
                        progress=not args.no_progress,
                        log=lambda line: print(line, file=sys.stderr))
    if rank != 0:
        return 0
    test = evaluate(model, splits.test, args.batch_size, device)
    command = "logquant " + shlex.join(argv)
    metadata = {"command": command, "seed": str(args.seed), "model": args.model,
                "test_top1": f"{test.top1:.2f}"}
    if quantized:
        metadata["logquant_qat"] = json.dumps(config.to_dict())
        metadata["fold_bn"] = str(int(args.fold_bn))
    model.cpu()
    save_weights(model, out, metadata=metadata)
    write_json_atomic(out.with_suffix(".json"), {
        "command": command, "model": args.model, "config": config.to_dict(),
        "train_config": dataclasses.asdict(cfg), "test": test.as_dict(), **summary})
    print(f"test top-1 {test.top1:.2f} %  top-5 {test.top5:.2f} %  "
          f"({summary['train_seconds']:.0f} s training) -> {out}")
    return 0


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr if file is None else file)


def main(argv: list[str] | None = None) -> int:
    import os
    import warnings

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = argv[:1] == ["--debug"] or os.environ.get("LOGQUANT_DEBUG") == "1"
    warnings.showwarning = _one_line_warning  # "warning: ..." lines, not source excerpts
    try:
        args = build_parser().parse_args(argv)
        code = args.func(args, argv)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return code
    except LogquantError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`logquant cost ... | head`): stop quietly
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what the shell reports for a killed writer
    except OSError as exc:  # the machine refused (disk full, permissions): one line too
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug of ours: one line, the traceback only when asked
        if debug:
            raise
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        print(f"error: internal error, a bug in logquant ({type(exc).__name__}: {first}); "
              "rerun with 'logquant --debug ...' for the traceback and please report it",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
