"""Float training of the reference CNN: seeded, augmented, cosine schedule, progress bar."""

from __future__ import annotations

import dataclasses
import json
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from logquant.data import ImageDataset, Splits
from logquant.evaluate import evaluate


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    epochs: int = 15  # full passes over train (validation images excluded)
    batch_size: int = 128
    lr: float = 0.05  # peak SGD learning rate, after a one-epoch linear warmup
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    seed: int = 0
    crop_padding: int = 2  # random-crop augmentation: pad, then crop back (pixels)
    flip: bool = True  # random horizontal flips


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


def train_float(model: nn.Module, splits: Splits, cfg: TrainConfig,
                device: str | torch.device = "cpu", progress: bool = True,
                log=print) -> dict:
    """Train ``model`` in place; return a summary with per-epoch validation accuracy."""
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model.to(device)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    train: ImageDataset = splits.train
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch

    def lr_at(step: int) -> float:  # linear warmup for one epoch, then cosine to zero
        if step < steps_per_epoch:
            return cfg.lr * (step + 1) / steps_per_epoch
        frac = (step - steps_per_epoch) / max(1, total - steps_per_epoch)
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * frac))

    history, step, start = [], 0, time.time()
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(train), generator=gen)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not progress, leave=False)
        seen = correct = 0
        loss_sum = 0.0
        for i in bar:
            idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            images = augment(train.images[idx], cfg.crop_padding, cfg.flip, gen)
            inputs = train.normalize(images.to(device))
            labels = train.labels[idx].to(device)
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            logits = model(inputs)
            loss = F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            seen += len(idx)
            correct += int((logits.argmax(1) == labels).sum())
            loss_sum += loss.item() * len(idx)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100 * correct / seen:.1f}")
        val = evaluate(model, splits.val, device=device)
        record = {"epoch": epoch + 1, "train_loss": loss_sum / seen,
                  "train_top1": 100 * correct / seen, "val_top1": val.top1,
                  "elapsed_s": round(time.time() - start, 1)}
        history.append(record)
        log(json.dumps(record))
    return {"history": history, "train_seconds": round(time.time() - start, 1)}
