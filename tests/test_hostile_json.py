"""Untrusted JSON (configs, .lqz headers, quantized-model metadata, checkpoint records): any
malformed or hostile document is one LogquantError line, never a traceback."""

import json

import pytest
import torch

from logquant.cli import main
from logquant.config import ConfigError, QuantConfig
from logquant.errors import LogquantError
from logquant.formats import FormatError, parse_format
from logquant.io import JSON_MAX_DEPTH, JsonError, parse_json

HOSTILE = {
    "deeply nested": "[" * 100_000 + "]" * 100_000,
    "nested past the limit": "[" * (JSON_MAX_DEPTH + 1) + "]" * (JSON_MAX_DEPTH + 1),
    "5000-digit integer": '{"percentile": ' + "9" * 5000 + "}",
    "float overflow": '{"percentile": 1e999}',
    "NaN constant": '{"percentile": NaN}',
    "latin-1 bytes": '{"acts": "log4 \xe9"}'.encode("latin-1"),
    "truncated": '{"acts": ',
    "not UTF-8 at all": b"\xff\xfe\x00{",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_parse_json_refuses_in_one_line(name):
    with pytest.raises(JsonError) as info:
        parse_json(HOSTILE[name], "where.json")
    assert str(info.value).startswith("where.json: ") and "\n" not in str(info.value)


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_config_files_through_the_cli(name, tmp_path, capsys):
    path = tmp_path / "config.json"
    text = HOSTILE[name]
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert main(["eval", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and len(err) < 400


def test_config_fields_are_type_checked():
    bad = [{"quantize_first_input": "no"}, {"quantize_first_input": 1},
           {"percentile": "99"}, {"percentile": True}, {"weight_fsr": ["mse"]},
           {"overrides": ["features.0"]}, {"overrides": {"features.0": "log4"}},
           {"skip": "features.0"}, {"acts": 4}, {"acts": "log٣"}]
    for data in bad:
        with pytest.raises(ConfigError):
            QuantConfig.from_dict(data)
            pytest.fail(f"{data} was accepted")
    assert QuantConfig.from_dict({"quantize_first_input": False}).quantize_first_input is False


def test_format_grammar_takes_few_ascii_digits():
    for text in ("log٣", "log3@fsr" + "9" * 5000, "log" + "3" * 50):
        with pytest.raises(FormatError) as info:
            parse_format(text)
        assert len(str(info.value)) < 300


def test_hostile_metadata_in_a_quantized_model_file(tmp_path):
    from safetensors.torch import save_file

    from logquant.persist import _digest, load_quantized

    meta = {"kind": "logquant-quantized-model", "version": "1",
            "config": "[" * 50_000 + "]" * 50_000, "layers": "{}", "float_layers": "{}"}
    tensors = {"w": torch.zeros(1)}
    meta["sha256"] = _digest(meta, tensors)
    save_file(tensors, str(tmp_path / "q.safetensors"), metadata=meta)
    with pytest.raises(LogquantError, match="nested too deeply|nested deeper"):
        load_quantized(torch.nn.Linear(1, 1), tmp_path / "q.safetensors")
    assert json.loads("[]") == []  # the json module itself is untouched
