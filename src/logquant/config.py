"""The format configuration shared by post-training quantization, training, export and cost.

One frozen object says which format applies where: conv weights, fc weights, activations
(the inputs of conv/linear layers), back-propagated errors, with per-layer overrides. It
round-trips through a plain dict (JSON files, the .lqz header, ``--json`` output).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from logquant.calibrate import FSR_POLICIES
from logquant.errors import LogquantError
from logquant.formats import Format, FormatError, LinearFormat, LogFormat, parse_format

FSR_METHODS = tuple(FSR_POLICIES)  # max, percentile, mse
UNSUPPORTED_CHOICES = ("error", "float")


class ConfigError(LogquantError):
    """An invalid configuration value or file."""


def _format_name(fmt: Format | None) -> str:
    return "float" if fmt is None else fmt.name


def _parse(value: Any, where: str) -> Format | None:
    if value is None or isinstance(value, (LogFormat, LinearFormat)):
        return value
    try:
        return parse_format(value)
    except FormatError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def check_pattern(pattern: str, where: str) -> str:
    """Validate a layer pattern (see ``layer_matches``); returns it."""
    if not isinstance(pattern, str) or not pattern:
        raise ConfigError(f"{where}: a layer pattern must be a non-empty string, "
                          f"got {pattern!r}")
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as exc:
            raise ConfigError(f"{where}: bad regular expression {pattern[3:]!r} ({exc})") \
                from None
    return pattern


def layer_matches(pattern: str, name: str, types: Sequence[str] = ()) -> bool:
    """Does ``pattern`` select the layer called ``name`` whose class (and base classes) are
    named ``types``? ``re:REGEX`` matches the whole name; ``type:GLOB`` a class name
    (``type:Conv2d`` also selects subclasses of Conv2d); anything else is a glob on the
    name (``features.*``; a plain name matches itself)."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    if pattern.startswith("type:"):
        return any(fnmatchcase(t, pattern[5:]) for t in types)
    return fnmatchcase(name, pattern)


@dataclasses.dataclass(frozen=True)
class LayerOverride:
    """Formats for one named layer; a field left as ``"inherit"`` keeps the global choice."""

    weights: Format | None | str = "inherit"
    acts: Format | None | str = "inherit"

    def __post_init__(self) -> None:
        for field in ("weights", "acts"):
            value = getattr(self, field)
            if value != "inherit":
                object.__setattr__(self, field, _parse(value, f"override {field}"))

    def to_dict(self) -> dict[str, str]:
        return {f: (v if v == "inherit" else _format_name(v))
                for f in ("weights", "acts") if (v := getattr(self, f)) != "inherit"}


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Where which number format applies. ``None`` (or "float") leaves a tensor in float.

    A format without ``@fsr`` gets its FSR per layer from calibration (``weight_fsr`` /
    ``act_fsr``). Unsigned formats become signed, same total bits, where the tensor they
    quantize has negative values (weights almost always; activations after no ReLU).
    """

    conv_weights: Format | None = None  # weights of Conv2d layers
    fc_weights: Format | None = None  # weights of Linear layers
    acts: Format | None = None  # the input of every conv/linear layer but the first
    grads: Format | None = None  # back-propagated errors (quantized training only)
    weight_fsr: str = "mse"  # FSR method for weights: max | percentile | mse
    act_fsr: str = "mse"  # FSR method for activations: max | percentile | mse
    percentile: float = 99.99  # for the "percentile" method, of |x|
    quantize_first_input: bool = False  # also quantize the network input (the image)
    skip: tuple[str, ...] = ()  # layer patterns (see layer_matches) left entirely in float
    # layer pattern -> formats; where several match a layer, later entries win per field
    overrides: dict[str, LayerOverride] = dataclasses.field(default_factory=dict)
    unsupported: str = "error"  # a layer logquant cannot quantize: "error" or stay "float"

    def __post_init__(self) -> None:
        for field in ("conv_weights", "fc_weights", "acts", "grads"):
            object.__setattr__(self, field, _parse(getattr(self, field), field))
        if not isinstance(self.quantize_first_input, bool):
            raise ConfigError(f"quantize_first_input must be true or false (a JSON boolean), "
                              f"got {self.quantize_first_input!r}")
        if isinstance(self.percentile, bool) or not isinstance(self.percentile, (int, float)):
            raise ConfigError(f"percentile must be a number, got {self.percentile!r}")
        if not isinstance(self.overrides, dict):
            raise ConfigError(f"overrides must be an object of layer pattern -> formats, "
                              f"got {type(self.overrides).__name__}")
        for field in ("weight_fsr", "act_fsr"):
            if not isinstance(getattr(self, field), str) or \
                    getattr(self, field) not in FSR_METHODS:
                raise ConfigError(f"{field} must be one of {', '.join(FSR_METHODS)}, "
                                  f"got {getattr(self, field)!r}")
        if not 0.0 < float(self.percentile) <= 100.0:
            raise ConfigError(f"percentile must be in (0, 100], got {self.percentile}")
        if self.unsupported not in UNSUPPORTED_CHOICES:
            raise ConfigError(f"unsupported must be 'error' or 'float', got "
                              f"{self.unsupported!r}")
        if isinstance(self.skip, str):
            raise ConfigError(f"skip must be a list of layer patterns, got {self.skip!r}")
        object.__setattr__(self, "skip", tuple(check_pattern(p, "skip") for p in self.skip))
        overrides = {}
        for name, value in dict(self.overrides).items():
            check_pattern(name, "overrides")
            if isinstance(value, dict):
                unknown = set(value) - {"weights", "acts"}
                if unknown:
                    raise ConfigError(f"override for {name}: unknown keys {sorted(unknown)}; "
                                      "use 'weights' and/or 'acts'")
                value = LayerOverride(**value)
            elif not isinstance(value, LayerOverride):
                raise ConfigError(f"override for {name}: expected an object such as "
                                  f'{{"weights": "log4"}}, got {type(value).__name__}')
            overrides[name] = value
        object.__setattr__(self, "overrides", overrides)

    # -- lookups ------------------------------------------------------------------------
    def layer_patterns(self) -> list[str]:
        """Every layer pattern the configuration holds (each must select a layer)."""
        return list(self.skip) + list(self.overrides)

    def skipped_by(self, layer: str, types: Sequence[str] = ()) -> str | None:
        """The skip pattern that leaves ``layer`` in float, if any."""
        return next((p for p in self.skip if layer_matches(p, layer, types)), None)

    def _override(self, field: str, layer: str, types: Sequence[str], default):
        for pattern, override in self.overrides.items():
            value = getattr(override, field)
            if value != "inherit" and layer_matches(pattern, layer, types):
                default = value
        return default

    def weight_format(self, layer: str, kind: str, types: Sequence[str] = ()) -> Format | None:
        """The weight format of ``layer``; ``kind`` is "conv" or "fc"; ``types`` the names
        of its class and base classes (for ``type:`` patterns)."""
        if self.skipped_by(layer, types):
            return None
        return self._override("weights", layer, types,
                              self.conv_weights if kind == "conv" else self.fc_weights)

    def act_format(self, layer: str, types: Sequence[str] = ()) -> Format | None:
        """The format of ``layer``'s input (before the first-layer rule)."""
        if self.skipped_by(layer, types):
            return None
        return self._override("acts", layer, types, self.acts)

    @property
    def needs_act_calibration(self) -> bool:
        """Does some activation format take its FSR from data?"""
        formats = [self.acts] + [o.acts for o in self.overrides.values()]
        return any(f not in (None, "inherit") and f.fsr is None for f in formats)

    @property
    def is_float(self) -> bool:
        return (self.conv_weights is None and self.fc_weights is None and self.acts is None
                and not any(o.weights not in ("inherit", None) or o.acts not in ("inherit", None)
                            for o in self.overrides.values()))

    # -- (de)serialization --------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "conv_weights": _format_name(self.conv_weights),
            "fc_weights": _format_name(self.fc_weights),
            "acts": _format_name(self.acts),
            "grads": _format_name(self.grads),
            "weight_fsr": self.weight_fsr,
            "act_fsr": self.act_fsr,
            "percentile": self.percentile,
            "quantize_first_input": self.quantize_first_input,
            "skip": list(self.skip),
            "overrides": {k: v.to_dict() for k, v in self.overrides.items()},
            "unsupported": self.unsupported,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"configuration must be a JSON object, got {type(data).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise ConfigError(f"unknown configuration keys {sorted(unknown)}; "
                              f"known: {sorted(fields)}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ConfigError(f"bad configuration: {exc}") from None

    @classmethod
    def load(cls, path: str | Path) -> QuantConfig:
        from logquant.io import JsonError, read_json

        try:
            data = read_json(path, "configuration")
        except JsonError as exc:
            raise ConfigError(str(exc)) from None
        return cls.from_dict(data)
