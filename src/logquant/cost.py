"""Hardware cost of an .lqz network: operations, widths, memory traffic and energy.

Counts come from the engine's plan (exact per layer, per image). Energy uses the 45 nm,
0.9 V figures of M. Horowitz, "Computing's energy problem (and what we can do about it)",
ISSCC 2014: int add 0.03 pJ (8 bit) / 0.1 pJ (32 bit), int multiply 0.2 pJ (8 bit) /
3.1 pJ (32 bit), fp32 add 0.9 pJ, fp32 multiply 3.7 pJ, SRAM read 10 pJ per 64 bits
(8 KB cache). Widths in between are interpolated: adds linearly in the width, multiplies
quadratically (0.2 pJ * (bits / 8)^2 reproduces 3.2 ~ 3.1 pJ at 32 bits). A barrel shift
is not in the table; it is charged as one add of the accumulator width (an assumption of
this model, stated in every report). Memory energy charges every weight bit and every
activation bit moved between layers one SRAM read, for all three datapaths alike.
"""

from __future__ import annotations

import math
from typing import Any

from logquant.engine.plan import LayerPlan, Plan, plan
from logquant.formats import Format
from logquant.lqz import LqzModel

ENERGY_SOURCE = ("M. Horowitz, Computing's energy problem (and what we can do about it), "
                 "ISSCC 2014, 45 nm, 0.9 V")
PJ = {"int8_add": 0.03, "int32_add": 0.1, "int8_mul": 0.2, "int32_mul": 3.1,
      "fp32_add": 0.9, "fp32_mul": 3.7, "sram_64bit_read": 10.0}
SHIFT_ASSUMPTION = "a barrel shift costs one add of the accumulator width"


def int_add_pj(bits: int) -> float:
    """Energy of an integer add, linear in the width between the 8 and 32 bit figures."""
    return PJ["int8_add"] + (bits - 8) * (PJ["int32_add"] - PJ["int8_add"]) / 24


def int_mul_pj(bits: int) -> float:
    return PJ["int8_mul"] * (bits / 8) ** 2


def sram_pj(bits: int | float) -> float:
    return bits * PJ["sram_64bit_read"] / 64


def layer_cost(layer: LayerPlan, inputs: int, out_shape: list[int]) -> dict[str, Any]:
    """One planned layer's counts and energies per image (pJ); ``inputs``: values it reads."""
    op = layer.op
    x_fmt = None if layer.x_table is None else layer.x_table.fmt
    return op_cost(op["name"], op["op"], layer.weight_format, x_fmt, layer.fan_in,
                   math.prod(op["shape"]), inputs, math.prod(out_shape), layer.acc_bits)


def op_cost(name: str, kind: str, w_fmt: Format, x_fmt: Format | None, fan_in: int,
            weights: int, inputs: int, outputs: int, acc: int) -> dict[str, Any]:
    """Counts and energies per image (pJ) of one conv/linear layer from its formats and
    sizes; ``x_fmt`` None means 8-bit integer pixels (the first layer)."""
    macs = outputs * fan_in
    log_w = w_fmt.is_log
    log_x = x_fmt is not None and x_fmt.is_log
    input_bits = 8 if x_fmt is None else x_fmt.bits
    exp_adder = max(w_fmt.magnitude_bits, x_fmt.magnitude_bits) + 1 if log_w and log_x else 0
    if log_w and log_x:
        span = (1 << w_fmt.magnitude_bits) + (1 << x_fmt.magnitude_bits) - 3
        mac_pj = int_add_pj(exp_adder) + 2 * int_add_pj(acc)
    elif log_w or log_x:
        span = (1 << (w_fmt if log_w else x_fmt).magnitude_bits) - 2
        mac_pj = 2 * int_add_pj(acc)
    else:
        span = 0
        mac_pj = int_mul_pj(max(w_fmt.bits, input_bits)) + int_add_pj(acc)
    weight_bits, act_bits = weights * w_fmt.bits, inputs * input_bits
    memory_pj = sram_pj(weight_bits + act_bits)
    shift_adds = log_w or log_x
    return {
        "layer": name, "op": kind, "macs": macs,
        "shift_adds": macs if shift_adds else 0,
        "multiplies": 0 if shift_adds else macs,
        "weight_format": w_fmt.name, "input_format": x_fmt.name if x_fmt else "pixels (8 bit)",
        "exponent_adder_bits": exp_adder, "shifter_span": span, "accumulator_bits": acc,
        "weight_bits": weight_bits, "activation_bits_in": act_bits,
        "energy_pj": {
            "compute": macs * mac_pj, "memory": memory_pj,
            "total": macs * mac_pj + memory_pj,
            "fp32_total": macs * (PJ["fp32_mul"] + PJ["fp32_add"])
            + sram_pj(32 * (weights + inputs)),
            "int8_total": macs * (PJ["int8_mul"] + PJ["int32_add"])
            + sram_pj(8 * (weights + inputs)),
        },
    }


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals over layers, with the energy ratios against fp32 and int8 datapaths."""
    total: dict[str, Any] = {key: sum(r[key] for r in rows) for key in (
        "macs", "shift_adds", "multiplies", "weight_bits", "activation_bits_in")}
    total["accumulator_bits"] = max(r["accumulator_bits"] for r in rows)
    total["energy_pj"] = {key: sum(r["energy_pj"][key] for r in rows)
                          for key in rows[0]["energy_pj"]}
    e = total["energy_pj"]
    total["energy_vs_fp32"] = e["total"] / e["fp32_total"]
    total["energy_vs_int8"] = e["total"] / e["int8_total"]
    return total


def cost_report(model: LqzModel, planned: Plan | None = None) -> dict[str, Any]:
    """Per layer and total counts and energies (per image), as one JSON-able dict;
    ``planned``: the model's plan, if the caller has it already."""
    p = planned or plan(model)
    rows = []
    for out, layer in p.layers.items():
        inputs = math.prod(p.values[layer.op["in"]].shape)
        rows.append(layer_cost(layer, inputs, p.values[out].shape))
    return {"layers": rows, "total": summarize(rows), "per": "image",
            "engine_bytes_per_image": p.bytes_per_image, "energy_source": ENERGY_SOURCE,
            "energy_pj_table": PJ,
            "assumptions": [SHIFT_ASSUMPTION, "adds linear and multiplies quadratic in width",
                            "each weight and activation bit read once from SRAM"]}


def format_report(report: dict[str, Any]) -> str:
    """The cost report as a fixed-width table."""
    head = (f"{'layer':<16}{'MACs':>11}{'shift-add':>11}{'exp add':>8}{'shift':>6}"
            f"{'acc':>5}{'w bits':>11}{'act bits':>10}{'log pJ':>13}{'fp32 pJ':>13}"
            f"{'int8 pJ':>13}")
    lines = [head, "-" * len(head)]

    def line(name, r):
        e = r["energy_pj"]
        lines.append(f"{name:<16}{r['macs']:>11,}{r['shift_adds']:>11,}"
                     f"{r.get('exponent_adder_bits', ''):>8}{r.get('shifter_span', ''):>6}"
                     f"{r['accumulator_bits']:>5}{r['weight_bits']:>11,}"
                     f"{r['activation_bits_in']:>10,}{e['total']:>13,.0f}"
                     f"{e['fp32_total']:>13,.0f}{e['int8_total']:>13,.0f}")

    for r in report["layers"]:
        line(r["layer"], r)
    lines.append("-" * len(head))
    line("total", report["total"])
    t = report["total"]
    lines.append(f"energy per image: {t['energy_pj']['total'] / 1e6:.3f} uJ log datapath = "
                 f"{t['energy_vs_fp32']:.3f} x fp32, {t['energy_vs_int8']:.3f} x int8 "
                 f"(compute {t['energy_pj']['compute'] / 1e6:.3f} uJ, memory "
                 f"{t['energy_pj']['memory'] / 1e6:.3f} uJ)")
    lines.append(f"integer engine working memory: about "
                 f"{report['engine_bytes_per_image'] / 2**20:.1f} MiB per image (planned)")
    lines.append(f"energy table: {report['energy_source']}; assumed: "
                 + "; ".join(report["assumptions"]))
    return "\n".join(lines)
