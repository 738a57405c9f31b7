"""``logquant train`` and ``logquant reproduce-training``."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from logquant.cli.config_options import add_format_args, config_from_args
from logquant.cli.options import (
    add_common,
    command_line,
    device,
    load_data,
    log,
    positive_int,
    seed,
)
from logquant.errors import LogquantError


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model, in float or quantization-aware "
                       "(--weights/--acts/--grads)")
    add_common(p)
    p.add_argument("--epochs", type=positive_int, default=15, help="passes over the "
                   "training split (default 15)")
    p.add_argument("--train-batch-size", type=positive_int, default=128,
                   help="global batch (split across torchrun processes)")
    p.add_argument("--lr", type=float, default=0.05,
                   help="peak learning rate of SGD with Nesterov momentum (default 0.05)")
    p.add_argument("--warmup-epochs", type=int, default=1,
                   help="linear warm-up before the cosine decay (default 1)")
    p.add_argument("--seed", type=seed, default=0,
                   help="initialization, data order and augmentation (default 0)")
    p.add_argument("--out", required=True, help="output .safetensors file (final weights)")
    p.add_argument("--checkpoint-dir", default=None,
                   help="per-epoch checkpoints (default: OUT without suffix + '.ckpt')")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir")
    p.add_argument("--init", default=None, metavar="CHECKPOINT",
                   help="start from these weights (fine-tuning) instead of random init")
    add_format_args(p)
    p.add_argument("--grads", default=None, help="format of the back-propagated errors")
    p.add_argument("--clip-ste", action="store_true",
                   help="straight-through gradient zeroed where the input saturated")
    p.add_argument("--fold-bn", action="store_true",
                   help="fold BatchNorm into the convs before quantization-aware training")
    p.add_argument("--test-each-epoch", action="store_true",
                   help="record test accuracy per epoch (curves; never used to choose)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)


def add_reproduce_training(sub) -> None:
    p = sub.add_parser("reproduce-training", help="the paper's training claim: float vs lin5 "
                       "vs log5 from scratch, plus log4/log3 fine-tuning")
    p.add_argument("--data-dir", default=None, help="as for eval")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--out", required=True, help="output folder (resumes an earlier run)")
    p.add_argument("--epochs", type=positive_int, default=15,
                   help="epochs of each from-scratch run (default 15)")
    p.add_argument("--finetune-epochs", type=positive_int, default=3,
                   help="epochs of each log4/log3 fine-tuning run (default 3)")
    p.add_argument("--seed", type=seed, default=0, help="seed of every run (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_reproduce_training)


def cmd_train(args: argparse.Namespace, argv: list[str]) -> int:
    from logquant.io import check_output_path
    from logquant.train import TrainConfig, train_to_file

    out = check_output_path(args.out, suffixes=(".safetensors",),
                            inputs=(args.init, args.config))
    ckpt = check_output_path(Path(args.checkpoint_dir) if args.checkpoint_dir
                             else out.with_suffix(".ckpt"), folder=True)
    config = config_from_args(args)
    if args.grads:
        config = dataclasses.replace(config, grads=args.grads)
        config = type(config).from_dict(config.to_dict())  # validates the grads format
    if config.is_float and config.grads is None and (args.fold_bn or args.clip_ste):
        given = " and ".join(o for o, on in (("--fold-bn", args.fold_bn),
                                            ("--clip-ste", args.clip_ste)) if on)
        raise LogquantError(f"{given}: quantization-aware training options; this run "
                            "trains in float (give formats, e.g. --weights log4)")
    where = device(args.device)
    splits = load_data(args)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.train_batch_size, lr=args.lr,
                      seed=args.seed, warmup_epochs=args.warmup_epochs,
                      test_each_epoch=args.test_each_epoch)
    record = train_to_file(args.model, splits, config, cfg, where, out, ckpt, init=args.init,
                           fold_bn=args.fold_bn, clip_ste=args.clip_ste,
                           eval_batch_size=args.batch_size, resume=args.resume,
                           command=command_line(argv), progress=not args.no_progress, log=log)
    if record is None:  # a torchrun process of rank > 0: rank 0 reports
        return 0
    print(f"test top-1 {record['test']['top1']:.2f} %  top-5 {record['test']['top5']:.2f} %  "
          f"({record['train_seconds']:.0f} s training) -> {out}")
    return 0


def cmd_reproduce_training(args: argparse.Namespace, argv: list[str]) -> int:
    from logquant.data import load_splits
    from logquant.io import check_output_path, writer_lock
    from logquant.training_experiment import reproduce_training

    out = check_output_path(args.out, folder=True)
    where = device(args.device)
    splits = load_splits(args.data_dir)
    with writer_lock(out):
        summary = reproduce_training(splits, out, epochs=args.epochs,
                                     finetune_epochs=args.finetune_epochs, seed=args.seed,
                                     device=where, command=command_line(argv),
                                     progress=not args.no_progress, log=log)
    print(summary)
    return 0
