"""The .lqz workflows: export a model to a file, build one in memory, classify a split with
the integer engine (checked against the float64 simulation), write a layer's test vectors."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from logquant import lqz
from logquant.config import QuantConfig
from logquant.data import Splits
from logquant.engine import Engine
from logquant.errors import LogquantError
from logquant.export import build_lqz, float32_size, quantize_for_export
from logquant.lqz import LqzModel


@dataclasses.dataclass
class ExportedLqz:
    """What :func:`export_lqz` wrote."""

    network: LqzModel
    engine: Engine  # planned: each layer's formats and accumulator width
    size: int  # bytes of the file
    float32_size: int  # bytes of the same weights as float32 safetensors


def export_lqz(model: nn.Module, config: QuantConfig, splits: Splits, out: str | os.PathLike,
               *, calib_batches: int = 8, batch_size: int = 500,
               source: dict[str, Any] | None = None, compress: bool = False,
               log: Callable[[str], None] = print) -> ExportedLqz:
    """Quantize ``model`` (float ``config``: a quantization-aware model keeps its formats),
    calibrating on the first ``calib_batches * batch_size`` validation images, plan it on the
    integer engine (which refuses, naming the op, what it cannot compute exactly) and write
    it to ``out``; ``source`` is recorded in the header. ``log`` gets the coverage line."""
    meta = {"source": source,
            "config": None if config.is_float else config.to_dict(),
            "classes": list(splits.train.classes),
            "normalization": {"mean": list(splits.val.mean), "std": list(splits.val.std)},
            "calibration": {"split": "val", "images": len(
                splits.val.images[:calib_batches * batch_size])}}
    qmodel, network = _quantized_network(model, None if config.is_float else config, splits,
                                         calib_batches, batch_size, meta, log)
    engine = Engine(network)
    size = lqz.save(network, out, compress=compress)
    return ExportedLqz(network, engine, size, float32_size(qmodel))


def network_from_config(model: nn.Module, config: QuantConfig, splits: Splits,
                        calib_batches: int = 8) -> LqzModel:
    """``model`` quantized by ``config`` (calibrated on ``calib_batches`` validation batches
    of 500) as an in-memory .lqz network, not yet planned: whoever plans it gets the
    refusals that name the op."""
    return _quantized_network(model, config, splits, calib_batches, 500,
                              {"config": config.to_dict()})[1]


def _quantized_network(model: nn.Module, config: QuantConfig | None, splits: Splits,
                       calib_batches: int, batch_size: int, meta: dict[str, Any],
                       log: Callable[[str], None] | None = None) -> tuple[nn.Module, LqzModel]:
    """(quantized model, .lqz network with header ``meta``), calibrated on the first
    ``calib_batches * batch_size`` validation images; ``log`` gets the coverage line."""
    from logquant.coverage import describe

    qmodel, offset = quantize_for_export(model, config,
                                         splits.val.images[:calib_batches * batch_size],
                                         splits.val.mean, splits.val.std,
                                         num_batches=calib_batches)
    if log is not None:
        log(describe(qmodel).summary())
    return qmodel, build_lqz(qmodel, offset, list(splits.val.images.shape[1:]), meta)


def coding_summary(path: str | os.PathLike, network: LqzModel) -> str:
    """Bits per weight of a compressed file (rANS where smaller, packed elsewhere) against
    the codes' empirical entropy."""
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


def split_images(data_dir: str | os.PathLike | None, split: str, classes: int,
                 limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``limit`` images and labels of ``split`` for a network of ``classes``
    outputs (refused when the data has another number of classes, or none)."""
    from logquant.data import load_splits

    dataset = getattr(load_splits(data_dir), split)
    if len(dataset.classes) != classes:
        raise LogquantError(f"the .lqz network has {classes} outputs, the data "
                            f"{len(dataset.classes)} classes")
    if len(dataset) == 0:
        raise LogquantError(f"the {split} split holds no images")
    return dataset.images[:limit], dataset.labels[:limit]


@dataclasses.dataclass
class EngineRun:
    """What :func:`run_network` measured."""

    engine: Engine
    summary: dict[str, Any]  # images, top1, seconds, widths, overflows, costs, mismatches


def run_network(network: LqzModel, data_dir: str | os.PathLike | None, split: str = "test",
                *, limit: int | None = None, acc_bits: int | None = None,
                batch_size: int = 500, verify: bool = False) -> EngineRun:
    """Classify ``split`` with the integer engine (accumulators of ``acc_bits``, by default
    wide enough never to overflow; narrower ones saturate, counted per layer); with
    ``verify`` also count the activation codes and logits the float64 simulation gets
    otherwise."""
    from logquant.cost import cost_report
    from logquant.simulate import mismatches

    engine = Engine(network, acc_bits=acc_bits)
    images, labels = split_images(data_dir, split, engine.plan.output.shape[0], limit)
    correct, overflows, differ = 0, {}, {"codes": 0, "logits": 0}
    start = time.perf_counter()
    for i in range(0, len(images), batch_size):
        batch = images[i:i + batch_size]
        result = engine.run(batch, trace=verify)
        correct += int((result.logits.argmax(1) == labels[i:i + batch_size]).sum())
        for name, count in result.overflows.items():
            overflows[name] = overflows.get(name, 0) + count
        if verify:
            for key, count in mismatches(network, batch, result).items():
                differ[key] += count
    seconds = time.perf_counter() - start
    cost = cost_report(network, engine.plan)["total"]
    summary = {"images": len(images), "top1": 100.0 * correct / len(images),
               "seconds": seconds,
               "accumulator_bits_needed": {layer.op["name"]: layer.acc_bits
                                           for layer in engine.plan.layers.values()},
               "accumulator_bits": acc_bits, "overflows": overflows,
               "macs_per_image": cost["macs"], "shift_adds_per_image": cost["shift_adds"],
               "multiplies_per_image": cost["multiplies"]}
    if verify:
        summary["float64_mismatches"] = differ
    return EngineRun(engine, summary)


def write_split_vectors(path: str | os.PathLike, layer: str, out: Path, *,
                        data_dir: str | os.PathLike | None = None, split: str = "test",
                        count: int = 4) -> tuple[dict[str, Any], int]:
    """The test vectors (:func:`logquant.vectors.write_vectors`) of ``layer`` of the .lqz
    file ``path`` for the first ``count`` images of ``split``, into ``out`` (staged and
    swapped in whole); returns the manifest and the number of images."""
    from logquant.vectors import write_vectors

    engine = Engine(lqz.load(path))
    images, _ = split_images(data_dir, split, engine.plan.output.shape[0], count)
    return write_vectors(engine, images, layer, out), len(images)
