"""The shared format configuration."""

import json

import pytest

from logquant.config import ConfigError, QuantConfig


def test_round_trip_through_dict_and_json(tmp_path):
    config = QuantConfig(conv_weights="logsqrt2-5s", fc_weights="log4s@fsr-2", acts="log3",
                         act_fsr="percentile", percentile=99.9, skip=("features.0",),
                         overrides={"classifier.4": {"weights": "lin8", "acts": "float"}})
    data = config.to_dict()
    assert QuantConfig.from_dict(data) == config
    path = tmp_path / "c.json"
    path.write_text(json.dumps(data))
    assert QuantConfig.load(path) == config
    assert config.weight_format("classifier.4", "fc").name == "lin8"
    assert config.act_format("classifier.4") is None
    assert config.weight_format("features.0", "conv") is None


@pytest.mark.parametrize("data, message", [
    ({"acts": "log9"}, "bits must be in 1..8"),
    ({"acts": "log3@fsr1.5"}, "unknown format"),
    ({"weight_fsr": "median"}, "weight_fsr must be one of"),
    ({"colour": "blue"}, "unknown configuration keys"),
    ({"overrides": {"x": {"wieghts": "log3"}}}, "unknown keys"),
    ({"percentile": 0}, "percentile"),
])
def test_invalid_configurations(data, message):
    with pytest.raises(ConfigError, match=message):
        QuantConfig.from_dict(data)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        QuantConfig.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        QuantConfig.load(tmp_path / "bad.json")
