"""What a quantized model holds: every conv/linear layer, quantized or not, and why.

``describe(model)`` returns a ``LayerTable``: a list of dict rows (JSON-ready) that prints
as an aligned table and knows its counts (``quantized`` of ``total``).
"""

from __future__ import annotations

import json
from typing import Any

from torch import nn

from logquant.nn import QuantizedLayer, float_class, layer_kind

FLOAT_REASONS_ATTR = "logquant_float_layers"  # root attribute: layer name -> reason


class LayerTable(list):
    """Rows ``{layer, type, kind, weights, input, status, reason}``, one per conv/linear."""

    @property
    def total(self) -> int:
        return len(self)

    @property
    def quantized(self) -> int:
        return sum(row["status"] == "quantized" for row in self)

    def summary(self) -> str:
        return f"quantized {self.quantized} of {self.total} conv/linear layers"

    def to_json(self) -> str:
        return json.dumps(list(self), sort_keys=True)

    def __str__(self) -> str:
        columns = ("layer", "type", "weights", "input", "status")
        cells = [[str(row[c]) if c != "status" or row["status"] == "quantized"
                  else f"float ({row['reason']})" for c in columns] for row in self]
        widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
        lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells]
        return "\n".join(lines + [self.summary()])


def _format_name(quantizer) -> str:
    """The complete format; a training quantizer whose FSR its rule has not set yet shows
    its spec with ``@fsr?``."""
    if quantizer.spec is None:
        return "float"
    return quantizer.format.name if quantizer.format is not None else \
        f"{quantizer.spec.name}@fsr?"


def describe(model: nn.Module) -> LayerTable:
    """Every conv/linear layer of ``model`` (subclasses included) in module order: its
    formats (with FSRs) when quantized, else "float" and the reason."""
    reasons: dict[str, str] = getattr(model, FLOAT_REASONS_ATTR, {})
    rows = LayerTable()
    for name, module in model.named_modules():
        kind = layer_kind(module)
        if kind is None:
            continue
        row: dict[str, Any] = {"layer": name, "type": float_class(module).__name__,
                               "kind": kind, "weights": "float", "input": "float"}
        if isinstance(module, QuantizedLayer):
            row["weights"] = _format_name(module.weight_quant)
            row["input"] = _format_name(module.input_quant)
        active = row["weights"] != "float" or row["input"] != "float"
        row["status"] = "quantized" if active else "float"
        row["reason"] = "" if active else reasons.get(
            name, "formats are float in this configuration" if isinstance(
                module, QuantizedLayer) else "not quantized")
        rows.append(row)
    return rows
