"""Training (float or quantization-aware): seeded, augmented, resumable, distributed.

One loop serves every run: the model passed in is a float model or one prepared by
``prepare_qat``. Under ``torchrun`` each process takes its slice of every global batch
(the same batches, augmentations and learning rates as one process), and DDP averages the
gradients. A checkpoint folder is written atomically after every epoch; ``resume``
continues from the last one and ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from logquant.config import QuantConfig
from logquant.data import ImageDataset, Splits
from logquant.distributed import barrier, init_distributed
from logquant.errors import LogquantError
from logquant.evaluate import evaluate
from logquant.io import read_json, write_text_atomic

LATEST = "LATEST"
KEEP_CHECKPOINTS = 2


class TrainingError(LogquantError):
    """Divergence, or a checkpoint folder that cannot be resumed."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    epochs: int = 15  # full passes over train (validation images excluded)
    batch_size: int = 128  # global batch, split across processes when distributed
    lr: float = 0.05  # peak SGD learning rate, after a one-epoch linear warmup
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    seed: int = 0
    crop_padding: int = 2  # random-crop augmentation: pad, then crop back (pixels)
    flip: bool = True  # random horizontal flips
    warmup_epochs: int = 1
    test_each_epoch: bool = False  # also record test accuracy per epoch (curves only)


def augment(images: torch.Tensor, padding: int, flip: bool, gen: torch.Generator):
    """Random crop (after zero padding) and horizontal flip of a uint8 batch (N, C, H, W)."""
    n, _, h, w = images.shape
    if padding:
        padded = F.pad(images, (padding,) * 4)
        dy = torch.randint(0, 2 * padding + 1, (n, 1, 1), generator=gen)
        dx = torch.randint(0, 2 * padding + 1, (n, 1, 1), generator=gen)
        rows = dy + torch.arange(h).view(1, h, 1)  # (N, H, 1)
        cols = dx + torch.arange(w).view(1, 1, w)  # (N, 1, W)
        images = padded[torch.arange(n).view(n, 1, 1), :, rows, cols].permute(0, 3, 1, 2)
    if flip:
        mask = torch.rand(n, generator=gen) < 0.5
        images = torch.where(mask.view(n, 1, 1, 1), images.flip(3), images)
    return images


# ----------------------------------------------------------------------------------------
# Checkpoints: <dir>/epoch-NNNN/{state.safetensors, state.json}, <dir>/LATEST names the last


def save_checkpoint(directory: Path, model: nn.Module, opt: torch.optim.Optimizer,
                    gen: torch.Generator, state: dict) -> Path:
    """Write one epoch's checkpoint folder atomically (folder rename), then point LATEST."""
    from safetensors.torch import save_file

    name = f"epoch-{state['epoch']:04d}"
    tensors = {f"model/{k}": v.detach().contiguous().cpu()
               for k, v in model.state_dict().items()}
    slots = {}
    for index, entry in opt.state_dict()["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{index}/{key}"] = value.contiguous().cpu()
            else:
                slots.setdefault(str(index), {})[key] = value
    record = {**state, "optimizer_groups": opt.state_dict()["param_groups"],
              "optimizer_scalars": slots,
              "rng": {"torch": torch.get_rng_state().tolist(),
                      "data": gen.get_state().tolist()}}
    directory.mkdir(parents=True, exist_ok=True)
    staging = directory / f".{name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    save_file(tensors, str(staging / "state.safetensors"))
    (staging / "state.json").write_text(json.dumps(record))
    final = directory / name
    if final.exists():
        if final not in _own_checkpoints(directory).values():
            raise TrainingError(f"{final}: exists and is not a logquant checkpoint; move it")
        shutil.rmtree(final)
    os.replace(staging, final)
    write_text_atomic(directory / LATEST, name + "\n")
    own = _own_checkpoints(directory)
    for epoch in sorted(own)[:-KEEP_CHECKPOINTS]:  # by epoch number; only our own folders
        if own[epoch] != final:
            shutil.rmtree(own[epoch], ignore_errors=True)
    return final


CHECKPOINT_FILES = {"state.safetensors", "state.json"}


def _own_checkpoints(directory: Path) -> dict[int, Path]:
    """Epoch -> folder of the checkpoints this code wrote: named exactly epoch-NNNN and
    holding only its two files. Anything else in the folder is the user's: never deleted."""
    own = {}
    for entry in directory.iterdir():
        match = re.fullmatch(r"epoch-(\d{4,9})", entry.name)
        if match and entry.is_dir() and not entry.is_symlink() and \
                {p.name for p in entry.iterdir()} <= CHECKPOINT_FILES:
            own[int(match[1])] = entry
    return own


def load_checkpoint(directory: Path, model: nn.Module, opt: torch.optim.Optimizer,
                    gen: torch.Generator) -> dict:
    """Restore model, optimizer and RNG states from the folder LATEST names."""
    from safetensors.torch import load_file

    try:
        name = (directory / LATEST).read_text().strip()
        if not re.fullmatch(r"epoch-\d{4,9}", name):  # never a path out of the folder
            raise TrainingError(f"{directory / LATEST}: names {name[:40]!r}, not one of "
                                "logquant's epoch-NNNN checkpoints")
        record = read_json(directory / name / "state.json", "checkpoint state")
        tensors = load_file(str(directory / name / "state.safetensors"))
    except (OSError, ValueError) as exc:  # JsonError is a ValueError too
        raise TrainingError(f"{directory}: no checkpoint to resume from ({exc})") from None
    if not isinstance(record, dict):
        raise TrainingError(f"{directory / name}/state.json: not a checkpoint record")
    try:
        model.load_state_dict({k[len("model/"):]: v for k, v in tensors.items()
                               if k.startswith("model/")})
    except RuntimeError as exc:
        raise TrainingError(f"{directory / name}: does not fit this model "
                            f"({str(exc).splitlines()[0]})") from None
    try:
        kinds = {"epoch": int, "step": int, "history": list, "train_config": dict}
        for key, kind in kinds.items():
            if not isinstance(record[key], kind) or isinstance(record[key], bool):
                raise TypeError(f"{key} is not a JSON {kind.__name__}")
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer/"):
                _, index, slot = key.split("/", 2)
                state.setdefault(int(index), {})[slot] = value
        for index, scalars in record["optimizer_scalars"].items():
            state.setdefault(int(index), {}).update(scalars)
        opt.load_state_dict({"state": state, "param_groups": record["optimizer_groups"]})
        torch.set_rng_state(torch.tensor(record["rng"]["torch"], dtype=torch.uint8))
        gen.set_state(torch.tensor(record["rng"]["data"], dtype=torch.uint8))
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError,
            OverflowError) as exc:  # an edited or damaged record: whichever field it hits
        raise TrainingError(f"{directory / name}/state.json: damaged or edited "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0][:120]})") \
            from None
    return record


# ----------------------------------------------------------------------------------------
# The loop


def _sum_gradients(state, bucket):
    """DDP communication hook: sum the gradients (DDP's default averages them). Each
    process's loss is already divided by the global batch size."""
    import torch.distributed as dist

    future = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
    return future.then(lambda fut: fut.value()[0])


def _lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warmup, then cosine to zero."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return 0.5 * peak * (1 + math.cos(math.pi * frac))


def train(model: nn.Module, splits: Splits, cfg: TrainConfig,
          device: str | torch.device = "cpu", *, checkpoint_dir: Path | None = None,
          resume: bool = False, progress: bool = True, log=print,
          identity: dict | None = None) -> dict:
    """Train ``model`` in place; return the summary (per-epoch metrics, timings).

    ``identity`` (JSON values: model, starting weights' SHA-256, formats...) is recorded in
    each checkpoint; a resume whose identity differs is refused, as one on other data is."""
    from tqdm import tqdm

    rank, world = init_distributed()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model.to(device)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    train_set: ImageDataset = splits.train
    steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    history, start_epoch, step = [], 0, 0
    data_sha256 = splits.fingerprint() if checkpoint_dir is not None else None
    if resume:
        if checkpoint_dir is None or not (checkpoint_dir / LATEST).exists():
            raise TrainingError(f"--resume: no checkpoint in {checkpoint_dir}")
        record = load_checkpoint(checkpoint_dir, model, opt, gen)
        if record["train_config"] != dataclasses.asdict(cfg):
            raise TrainingError(f"{checkpoint_dir}: was written with other settings "
                                f"{record['train_config']}; resume with the same ones")
        if record.get("data_sha256") not in (None, data_sha256):
            raise TrainingError(f"{checkpoint_dir}: was trained on other data (another "
                                "--data-dir?); resume on the same data")
        previous = record.get("identity")
        if previous is not None and previous != identity:
            before = previous if isinstance(previous, dict) else {"identity": previous}
            now = identity or {}
            differ = sorted(k for k in {*before, *now} if before.get(k) != now.get(k))
            raise TrainingError(f"{checkpoint_dir}: was written for another run ("
                                f"{', '.join(differ)} differ); resume with the same model, "
                                "starting weights and formats")
        history, start_epoch, step = record["history"], record["epoch"], record["step"]
        log(f"resumed from {checkpoint_dir} after epoch {start_epoch}")
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device] if torch.device(
            device).type == "cuda" else None)
        net.register_comm_hook(None, _sum_gradients)
    start = time.time()
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        order = torch.randperm(len(train_set), generator=gen)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=(not progress or rank != 0) or None, leave=False)
        seen = correct = 0
        loss_sum = 0.0
        for i in bar:
            idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            # every process draws the augmentation of the whole global batch, then keeps
            # its slice: the same data as one process would see
            images = augment(train_set.images[idx], cfg.crop_padding, cfg.flip, gen)
            part = torch.tensor_split(torch.arange(len(idx)), world)[rank]
            inputs = train_set.normalize(images[part].to(device))
            labels = train_set.labels[idx][part].to(device)
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, total, cfg.warmup_epochs * steps_per_epoch, cfg.lr)
            logits = net(inputs)
            if world == 1:
                loss = F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
            else:  # summed over the slice, divided by the global batch: each sample's error
                # is what one process computes, and the hook sums gradients across processes
                loss = F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing,
                                       reduction="sum") / len(idx)
            if not torch.isfinite(loss):
                last = checkpoint_dir / LATEST if checkpoint_dir else None
                kept = (f"; the last good checkpoint ({last.read_text().strip()}) is intact"
                        if last is not None and last.exists() else "")
                raise TrainingError(f"training diverged: loss is {loss.item()} at step "
                                    f"{step + 1} (epoch {epoch + 1}){kept}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            seen += len(part)
            correct += int((logits.argmax(1) == labels).sum())
            loss_sum += loss.item() * len(idx)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100 * correct / seen:.1f}")
        bar.close()
        record = {"epoch": epoch + 1, "step": step, "train_loss": loss_sum / seen,
                  "train_top1": 100 * correct / seen}
        if rank == 0:
            record["val_top1"] = evaluate(model, splits.val, device=device).top1
            if cfg.test_each_epoch:
                record["test_top1"] = evaluate(model, splits.test, device=device).top1
        record["elapsed_s"] = round(time.time() - start, 1)
        history.append(record)
        if rank == 0:
            log(json.dumps(record))
            if checkpoint_dir is not None:
                save_checkpoint(checkpoint_dir, model, opt, gen,
                                {"epoch": epoch + 1, "step": step, "history": history,
                                 "train_config": dataclasses.asdict(cfg),
                                 "data_sha256": data_sha256, "identity": identity})
                write_metrics(checkpoint_dir / "metrics.jsonl", history)
        barrier()
    return {"history": history, "train_seconds": round(time.time() - start, 1)}


def write_metrics(path: Path, history: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in history))


def train_to_file(model_name: str, splits: Splits, config: QuantConfig, cfg: TrainConfig,
                  device: torch.device, out: Path, checkpoint_dir: Path, *,
                  init: str | None = None, fold_bn: bool = False, clip_ste: bool = False,
                  eval_batch_size: int = 500, resume: bool = False, command: str = "",
                  progress: bool = True, log=print) -> dict | None:
    """One training run of ``logquant train``: a fresh ``model_name`` (or ``init``'s
    weights), made quantization-aware when ``config`` quantizes anything (calibrated on
    validation batches of ``eval_batch_size``), trained with checkpoints in
    ``checkpoint_dir`` (locked), measured on test, written to ``out`` (weights, with the QAT
    record ``load_model`` reads) and ``out``'s ``.json``.

    Returns that JSON record; None on the processes of rank > 0 (only rank 0 writes)."""
    from logquant.coverage import describe
    from logquant.io import (
        file_sha256,
        load_weights,
        save_weights,
        write_json_atomic,
        writer_lock,
    )
    from logquant.models import create_model
    from logquant.qat import prepare_qat

    rank, _ = init_distributed()
    if device.type == "cuda" and torch.cuda.device_count() > 1:
        device = torch.device("cuda", rank % torch.cuda.device_count())
    torch.manual_seed(cfg.seed)
    model = create_model(model_name, num_classes=len(splits.train.classes),
                         in_channels=splits.train.images.shape[1])
    if init:
        load_weights(model, init)
    quantized = not config.is_float or config.grads is not None
    if quantized:
        model = prepare_qat(model, config, splits.val.batches(eval_batch_size),
                            fold_bn=fold_bn, clip_ste=clip_ste)
        log(describe(model).summary())
    with writer_lock(checkpoint_dir):  # one training run per checkpoint folder
        identity = {"model": model_name, "init_sha256": file_sha256(init) if init else None,
                    "config": config.to_dict(), "fold_bn": fold_bn, "clip_ste": clip_ste}
        summary = train(model, splits, cfg, device, checkpoint_dir=checkpoint_dir,
                        resume=resume, progress=progress, log=log, identity=identity)
    if rank != 0:
        return None
    test = evaluate(model, splits.test, eval_batch_size, device)
    metadata = {"command": command, "seed": str(cfg.seed), "model": model_name,
                "test_top1": f"{test.top1:.2f}"}
    if quantized:
        metadata["logquant_qat"] = json.dumps(config.to_dict())
        metadata["fold_bn"] = str(int(fold_bn))
    model.cpu()
    save_weights(model, out, metadata=metadata)
    record = {"command": command, "model": model_name, "config": config.to_dict(),
              "train_config": dataclasses.asdict(cfg), "test": test.as_dict(), **summary}
    write_json_atomic(out.with_suffix(".json"), record)
    return record
