"""Reference points from outside logquant: PyTorch's own int8 post-training quantization."""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from logquant.data import ImageDataset


def pytorch_int8(model: nn.Module, calibration: ImageDataset, batch_size: int = 250):
    """``model`` quantized by PyTorch (FX graph mode, x86 backend: int8 weights per channel,
    int8 activations per tensor), calibrated on ``calibration``. CPU only."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    model = copy.deepcopy(model).cpu().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FX quantization's deprecation notices
        example = (calibration.normalize(calibration.images[:2]),)
        prepared = prepare_fx(model, get_default_qconfig_mapping("x86"), example)
        with torch.no_grad():
            for inputs, _ in calibration.batches(batch_size):
                prepared(inputs)
        return convert_fx(prepared)
