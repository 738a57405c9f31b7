"""Top-1 / top-5 accuracy of a model on a dataset."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from logquant.config import QuantConfig
from logquant.coverage import LayerTable
from logquant.data import ImageDataset, Splits
from logquant.errors import LogquantError


@dataclasses.dataclass(frozen=True)
class Accuracy:
    top1: float  # percent
    top5: float  # percent
    count: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: ImageDataset, batch_size: int = 500,
             device: str | torch.device = "cpu", progress: bool = False) -> Accuracy:
    """Accuracy in percent over the whole dataset (model put in eval mode).

    An empty dataset, or a model whose outputs are NaN, raises LogquantError: neither has
    an accuracy, and 0 % or the rank of a NaN would be a made-up number."""
    if len(dataset) == 0:
        raise LogquantError("nothing to evaluate: the dataset holds no images")
    model.eval()
    correct1 = correct5 = 0
    batches = dataset.batches(batch_size, device)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, total=-(-len(dataset) // batch_size), desc="eval",
                       leave=False, disable=None)  # None: only on a terminal
    for inputs, labels in batches:
        logits = model(inputs)
        if bool(torch.isnan(logits).any()):
            raise LogquantError(f"the model's outputs contain NaN (batch of {len(inputs)} "
                                "images): diverged weights or activations beyond the float "
                                "range")
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices  # (B, k)
        hits = top == labels[:, None]
        correct1 += int(hits[:, 0].sum())
        correct5 += int(hits.any(dim=1).sum())
    n = len(dataset)
    return Accuracy(100.0 * correct1 / n, 100.0 * correct5 / n, n)


def evaluate_config(model: nn.Module, splits: Splits, config: QuantConfig, *,
                    split: str = "test", quantized: str | None = None,
                    save_quantized: str | None = None,
                    calib_batches: int = 8, batch_size: int = 500,
                    device: str | torch.device = "cpu", progress: bool = False
                    ) -> tuple[Accuracy, LayerTable]:
    """``model`` with the formats and FSRs of the file ``quantized`` (from
    ``save_quantized``), else quantized by ``config`` (calibrated on
    ``calib_batches`` validation batches) unless it is float, measured on ``split`` of
    ``splits``; also written to ``save_quantized`` when given. Returns the accuracy and
    the per-layer table (:func:`logquant.coverage.describe`)."""
    from logquant.convert import describe, quantize_model
    from logquant.persist import load_quantized
    from logquant.persist import save_quantized as save

    if quantized:
        model = load_quantized(model, quantized)
    elif not config.is_float:
        model = quantize_model(model, config, splits.val.batches(batch_size, device),
                               num_batches=calib_batches)
    layers = describe(model)
    if save_quantized:
        if layers.quantized == 0:
            raise LogquantError("--save-quantized: nothing is quantized; give formats")
        save(model, save_quantized)
    return evaluate(model, getattr(splits, split), batch_size, device, progress=progress), layers
