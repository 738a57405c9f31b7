"""Calibration data in every usual shape, as a stream of input tensors.

Accepted: one tensor (a single batch); an ImageDataset; or any iterable (a list, a
generator, a ``torch.utils.data.DataLoader``) of tensors, of ``(input, target, ...)``
tuples or lists, or of dicts (the input under ``input_key``). Anything else is one clear
``LogquantError`` naming what was given.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from logquant.errors import LogquantError

_KINDS = ("a tensor, an iterable (list, generator, DataLoader) of tensors, of "
          "(input, target) pairs or of dicts (with input_key=)")


def _input_of(batch: Any, index: int, input_key: str | None) -> torch.Tensor:
    if isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]
    elif isinstance(batch, dict):
        if input_key is None:
            tensors = [k for k, v in batch.items() if isinstance(v, torch.Tensor)]
            if len(tensors) != 1:
                raise LogquantError(f"calibration batch {index} is a dict with keys "
                                    f"{sorted(map(str, batch))}: pass input_key= to say "
                                    "which holds the model input")
            input_key = tensors[0]
        if input_key not in batch:
            raise LogquantError(f"calibration batch {index} has no key {input_key!r} "
                                f"(keys: {sorted(map(str, batch))})")
        batch = batch[input_key]
    if not isinstance(batch, torch.Tensor):
        raise LogquantError(f"calibration batch {index} holds a {type(batch).__name__}, "
                            f"not a tensor; calibration data must be {_KINDS}")
    if not batch.is_floating_point():
        raise LogquantError(f"calibration batch {index} is a {batch.dtype} tensor; the model "
                            "input must be floating point")
    return batch


def input_batches(data: Any, limit: int | None = None,
                  input_key: str | None = None) -> Iterator[torch.Tensor]:
    """Yield the model inputs of ``data``, at most ``limit`` batches."""
    from logquant.data import ImageDataset

    if isinstance(data, ImageDataset):
        data = data.batches(256)
    elif isinstance(data, torch.Tensor):
        data = [data]
    elif isinstance(data, (str, bytes, dict)) or not hasattr(data, "__iter__"):
        raise LogquantError(f"calibration data must be {_KINDS}; got {type(data).__name__}")
    for index, batch in enumerate(data):
        if limit is not None and index >= limit:
            return
        yield _input_of(batch, index, input_key)
