"""The format options of eval, train and export, and the QuantConfig they describe."""

from __future__ import annotations

import argparse

from logquant.cli.options import fsr_method_or_int
from logquant.config import QuantConfig
from logquant.errors import LogquantError
from logquant.formats import parse_format


def add_format_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("formats (float where not given)")
    g.add_argument("--config", default=None, help="a QuantConfig JSON file (flags override)")
    g.add_argument("--weights", help="weight format of conv and fc layers, e.g. log5s")
    g.add_argument("--conv-weights", help="weight format of conv layers")
    g.add_argument("--fc-weights", help="weight format of fully connected layers")
    g.add_argument("--acts", help="activation format (inputs of conv/fc layers), e.g. log3")
    g.add_argument("--fsr-method", type=fsr_method_or_int, default=None,
                   help="max | percentile | mse (weights and activations), or a fixed FSR")
    g.add_argument("--weight-fsr", type=fsr_method_or_int, default=None,
                   help="FSR method (or fixed FSR) for weights")
    g.add_argument("--act-fsr", type=fsr_method_or_int, default=None,
                   help="FSR method (or fixed, global FSR) for activations")
    g.add_argument("--percentile", type=float, default=None, help="for --fsr-method percentile")
    g.add_argument("--quantize-input", action="store_true",
                   help="also quantize the first layer's input (the image)")
    g.add_argument("--layer", action="append", default=[],
                   metavar="PATTERN=weights:FMT,acts:FMT",
                   help="per-layer override (repeatable; later ones win); PATTERN is a layer "
                        "name or glob (features.*), re:REGEX, or type:CLASS; 'float' keeps "
                        "that part in float")
    g.add_argument("--skip", action="append", default=[], metavar="PATTERN",
                   help="leave the layers PATTERN selects entirely in float (repeatable)")
    g.add_argument("--unsupported", choices=("error", "float"), default=None,
                   help="a conv/linear layer logquant cannot quantize: stop with an error "
                        "naming it (default) or leave it float and list it")


def _parse_layer_override(text: str) -> tuple[str, dict[str, str]]:
    name, sep, spec = text.partition("=")
    parts = dict(item.partition(":")[::2] for item in spec.split(",") if item)
    if not sep or not name or not parts or any(not v for v in parts.values()):
        raise LogquantError(f"--layer {text!r}: expected NAME=weights:FMT,acts:FMT")
    return name, parts


def _first_given(*values):
    """The first value that was given (an FSR of 0 is given)."""
    return next((v for v in values if v is not None), None)


def config_from_args(args: argparse.Namespace) -> QuantConfig:
    """The QuantConfig that the format flags (and --config file) describe."""
    base = QuantConfig.load(args.config).to_dict() if args.config else {}
    if args.weights:
        base["conv_weights"] = base["fc_weights"] = args.weights
    for field in ("conv_weights", "fc_weights", "acts"):
        if getattr(args, field):
            base[field] = getattr(args, field)
    for field, value in (("weight_fsr", _first_given(args.weight_fsr, args.fsr_method)),
                         ("act_fsr", _first_given(args.act_fsr, args.fsr_method))):
        if isinstance(value, int):  # a fixed FSR: pin it in the formats it applies to
            targets = ("conv_weights", "fc_weights") if field == "weight_fsr" else ("acts",)
            for target in targets:
                fmt = parse_format(str(base.get(target, "float")))
                if fmt is not None:
                    base[target] = fmt.with_fsr(value).name
        elif value is not None:
            base[field] = value
    if args.percentile is not None:
        base["percentile"] = args.percentile
    if args.quantize_input:
        base["quantize_first_input"] = True
    if args.unsupported:
        base["unsupported"] = args.unsupported
    if args.skip:
        base["skip"] = list(base.get("skip", [])) + args.skip
    overrides = dict(base.get("overrides", {}))
    for text in args.layer:
        name, parts = _parse_layer_override(text)
        overrides[name] = parts
    base["overrides"] = overrides
    config = QuantConfig.from_dict(base)
    if args.percentile is not None and "percentile" not in (config.weight_fsr, config.act_fsr):
        raise LogquantError("--percentile applies with --fsr-method percentile (or "
                            "--weight-fsr / --act-fsr percentile); drop it or choose that "
                            "method")
    return config
