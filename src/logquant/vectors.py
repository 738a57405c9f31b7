"""Test vectors for a hardware testbench: one layer's inputs, weights and expected results.

Written to a folder: ``manifest.json`` (what every file holds: shapes, formats, grids,
widths, the value of one line), the same arrays in ``vectors.npz``, and one plain hex text
file per array, one value per line in C order: ``input_codes.hex`` (the layer's input codes;
for the first layer, pixels minus the offset), ``weight_codes.hex``, ``bias.hex``,
``accumulators.hex`` (the exact sums with bias, two's complement at the accumulator width)
and, where a quantize op follows the layer (through ReLUs), ``output_codes.hex``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from logquant.engine import Engine
from logquant.errors import LogquantError
from logquant.io import holds_only, parse_json, staged_folder
from logquant.lqz import LqzError


def _hex_lines(values: torch.Tensor, bits: int) -> str:
    digits = max(1, -(-bits // 4))
    mask = (1 << bits) - 1
    return "".join(f"{int(v) & mask:0{digits}x}\n" for v in values.reshape(-1).tolist())


def _following_quantize(ops: list[dict], out: str) -> dict | None:
    """The quantize op fed by ``out`` through ReLUs only (the layer's output codes)."""
    current = out
    for op in ops:
        if op.get("in") == current and op["op"] in ("relu", "relu6"):
            current = op["out"]
        elif op.get("in") == current and op["op"] == "quantize":
            return op
    return None


def write_vectors(engine: Engine, images: torch.Tensor, layer: str, out_dir: str | Path
                  ) -> dict[str, Any]:
    """Run ``images`` and write the vectors of ``layer`` into the folder ``out_dir`` (new,
    empty, or vectors written before: replaced whole); returns the manifest."""
    ops = engine.model.ops
    op = next((o for o in ops if o["op"] in ("conv", "linear") and o["name"] == layer), None)
    if op is None:
        names = ", ".join(o["name"] for o in engine.model.layer_ops())
        raise LqzError(f"no layer {layer!r} in this .lqz file; its layers are: {names}")
    with staged_folder(out_dir, "test vectors", _is_vectors_folder) as stage:
        manifest, arrays = _layer_vectors(engine, images, op)
        for name, (tensor, bits) in arrays.items():
            (stage / f"{name}.hex").write_text(_hex_lines(tensor, bits))
        with open(stage / "vectors.npz", "wb") as f:
            np.savez(f, **{name: t.numpy() for name, (t, _) in arrays.items()})
        (stage / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _layer_vectors(engine: Engine, images: torch.Tensor, op: dict
                   ) -> tuple[dict[str, Any], dict[str, tuple[torch.Tensor, int]]]:
    """(manifest, {file name: (integer array, bits)}) of one conv/linear op."""
    ops = engine.model.ops
    layer = op["name"]
    result = engine.run(images, trace=True)
    plan = engine.plan.layers[op["out"]]
    follow = _following_quantize(ops, op["out"])
    x_fmt = plan.x_table.fmt if plan.x_table is not None else None
    arrays = {
        "input_codes": (result.inputs[op["out"]], x_fmt.bits if x_fmt else 9),
        "weight_codes": (engine.model.weights[op["weight"]], plan.weight_format.bits),
        "accumulators": (result.sums[op["out"]], engine.plan.values[op["out"]].bound
                         .bit_length() + 1),
    }
    if op["bias"] is not None:
        arrays["bias"] = (engine.model.biases[op["bias"]], plan.acc_bits)
    if follow is not None:
        arrays["output_codes"] = (result.codes[follow["out"]], engine.plan.values[
            follow["out"]].fmt.bits)
    manifest = {
        "layer": layer, "op": {k: v for k, v in op.items() if k not in ("in", "out")},
        "images": len(images),
        "input": "pixels - offset (two's complement, 9 bits)" if x_fmt is None else x_fmt.name,
        "accumulator_exponent": engine.plan.values[op["out"]].exponent,
        "accumulator_meaning": "value = accumulator * 2^accumulator_exponent"
        + (f" (sqrt2 parts combined with {plan.combine_bits} fraction bits)"
           if plan.sqrt2 else ""),
        "relu_before_output_codes": follow is not None and follow["in"] != op["out"],
        "output_format": follow["format"] if follow else None,
        "files": {name: {"shape": list(t.shape), "bits": bits, "hex": f"{name}.hex",
                         "encoding": "two's complement" if t.dtype == torch.int64
                         else "unsigned codes (sign-magnitude formats: sign bit = MSB)"}
                  for name, (t, bits) in arrays.items()},
    }
    return manifest, arrays


def _is_vectors_folder(folder: Path) -> bool:
    """Whether ``folder`` holds test vectors written before and nothing else (its manifest
    says so and lists every file there), so that replacing it loses nothing of the user's."""
    try:
        manifest = parse_json((folder / "manifest.json").read_bytes(), "manifest.json")
        ours = {"manifest.json", "vectors.npz", *(f["hex"] for f in manifest["files"].values())}
        return "accumulator_exponent" in manifest and holds_only(folder, ours)
    except (OSError, LogquantError, KeyError, TypeError, AttributeError):
        return False
