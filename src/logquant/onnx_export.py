"""The quantized model in a standard runtime: an ONNX file that onnxruntime runs.

The fake-quantized PyTorch model is exported as it computes: each quantizer becomes a few
standard ONNX operators (comparisons against the format's exact decision thresholds and a
table lookup, see ``Format.quantize_portable``), so onnxruntime reproduces the quantized
values bit for bit and the network's outputs within float32 summation-order differences.
Needs the optional extra ``logquant[onnx]`` (onnx, onnxscript; onnxruntime to run it).
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from logquant.config import QuantConfig
from logquant.data import Splits
from logquant.errors import LogquantError
from logquant.io import atomic_path


def _require(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise LogquantError(f"ONNX export needs {', '.join(missing)}: "
                            "pip install 'logquant[onnx]'")


def export_onnx(qmodel: nn.Module, example_input: torch.Tensor, path: str | os.PathLike,
                *, dynamic_batch: bool = True) -> Path:
    """Write ``qmodel`` (any model; usually from ``quantize_model``) as ONNX to ``path``,
    atomically; the batch dimension stays dynamic unless ``dynamic_batch=False``."""
    _require("onnx", "onnxscript")
    path = Path(path)
    if path.suffix != ".onnx":
        raise LogquantError(f"{path}: the file name must end in .onnx")
    qmodel = qmodel.eval()
    shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(qmodel, (example_input,), dynamo=True,
                                        dynamic_shapes=shapes, verbose=False)
    except Exception as exc:  # the exporter's own report is long; keep its first line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise LogquantError(f"ONNX export failed: {first}") from None
    with atomic_path(path) as tmp:
        program.save(str(tmp))
    return path


def quantize_and_export_onnx(model: nn.Module, config: QuantConfig, splits: Splits,
                             path: str | os.PathLike, *, calib_batches: int = 8,
                             batch_size: int = 500, log=print) -> Path:
    """What ``eval`` would evaluate, as ONNX: ``model`` quantized by ``config`` (a
    calibrated on ``splits``' validation batches), or a quantization-aware
    model as it is (then ``config`` must be float); ``log`` gets the coverage line."""
    from logquant.convert import describe, is_quantized, quantize_model

    if not is_quantized(model):
        if config.is_float:
            raise LogquantError("export needs formats: pass --weights and --acts (or --config)")
        model = quantize_model(model, config, splits.val.batches(batch_size),
                               num_batches=calib_batches)
    elif not config.is_float:
        raise LogquantError("the model was trained quantization-aware: it carries its "
                            "formats; export it without format flags")
    log(describe(model).summary())
    return export_onnx(model, splits.val.normalize(splits.val.images[:2]), path)
