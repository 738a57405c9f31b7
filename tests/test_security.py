"""Loading never runs code from a file, and names inside a file never become paths.

- The source has no pickle-based loader: no pickle/marshal/shelve/dill imports, every
  ``torch.load`` passes ``weights_only=True``, no ``np.load``, ``eval``/``exec`` or YAML;
  processes under torchrun exchange JSON, not pickles.
- A crafted pickle payload disguised as a checkpoint (.pt or .safetensors) is refused by
  every command that reads weights, and its code never runs.
- Layer and tensor names from a crafted .lqz that look like paths (``../``, absolute) do
  not steer any write: ``vectors`` writes its fixed file names inside --out only.
"""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from logquant import lqz
from logquant.cli import main

SRC = Path(__file__).resolve().parent.parent / "src" / "logquant"
FORBIDDEN_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "yaml",
                     "joblib"}


def _calls(tree: ast.AST, dotted: str):
    module, _, name = dotted.rpartition(".")
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            if (isinstance(func, ast.Attribute) and func.attr == name and isinstance(
                    func.value, ast.Name) and func.value.id == module) or (
                    not module and isinstance(func, ast.Name) and func.id == name):
                yield node


def test_source_has_no_code_executing_loader():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 30
    torch_loads = 0
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                names = {(node.module or "").split(".")[0]}
            else:
                continue
            assert not names & FORBIDDEN_MODULES, (path, names)
        for call in _calls(tree, "torch.load"):
            keywords = {k.arg: k.value for k in call.keywords}
            assert isinstance(keywords.get("weights_only"), ast.Constant) and \
                keywords["weights_only"].value is True, f"{path}:{call.lineno}"
            torch_loads += 1
        for banned in ("np.load", "numpy.load", "eval", "exec", "all_gather_object",
                       "broadcast_object_list"):
            assert not list(_calls(tree, banned)), (path, banned)
        for node in ast.walk(tree):  # dist.broadcast_object_list etc. through any name
            if isinstance(node, ast.Attribute):
                assert node.attr not in ("all_gather_object", "broadcast_object_list",
                                         "gather_object", "scatter_object_list"), path
    assert torch_loads == 1  # io.read_state_dict: the one place torch files are read


class _Payload:
    """Unpickling this runs ``open(marker, 'w').write('ran')``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


COMMANDS = {
    "eval": ["eval", "--checkpoint", "{evil}"],
    "export": ["export", "--checkpoint", "{evil}", "--weights", "log4", "--acts", "log4",
               "--out", "{tmp}/m.lqz"],
    "sweep": ["sweep", "--checkpoint", "{evil}", "--out", "{tmp}/sweep"],
    "search": ["search", "--checkpoint", "{evil}", "--out", "{tmp}/search"],
    "train --init": ["train", "--init", "{evil}", "--out", "{tmp}/m.safetensors",
                     "--epochs", "1"],
    "run --config": ["run", "--config", "{config}", "--checkpoint", "{evil}"],
}


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_pickle_payload_disguised_as_a_checkpoint_is_refused(command, suffix, capsys,
                                                             small_fashion_dir, tmp_path):
    marker = tmp_path / "payload-ran"
    evil = tmp_path / f"weights{suffix}"
    torch.save({"features.0.weight": _Payload(marker)}, evil)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"conv_weights": "log4", "fc_weights": "log4",
                                  "acts": "log4"}))
    (tmp_path / "work").mkdir()
    argv = [a.format(evil=evil, tmp=tmp_path / "work", config=config)
            for a in COMMANDS[command]]
    code = main([*argv, "--data-dir", str(small_fashion_dir)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert str(evil) in err and ("not a loadable weights file" in err or
                                 "not a valid safetensors file" in err), err
    assert not marker.exists()
    assert os.listdir(tmp_path / "work") == []


def test_path_like_names_in_an_lqz_do_not_steer_writes(refcnn_export, fashion, tmp_path,
                                                       capsys):
    """A crafted file (valid checksum) whose layer and tensor names are paths."""
    _, _, path = refcnn_export
    meta, arrays = lqz.read_container(path)
    header = json.loads(meta["lqz"])
    arrays = {k: np.array(v) for k, v in arrays.items()}
    renames = {"features.3": "../../escaped", "features.7": str(tmp_path / "absolute")}
    for op in header["ops"]:
        if op.get("name") in renames:
            new = renames[op["name"]]
            arrays[new + ".weight"] = arrays.pop(op["weight"])
            op["name"], op["weight"] = new, new + ".weight"
    crafted = tmp_path / "sub" / "crafted.lqz"
    crafted.parent.mkdir()
    crafted.write_bytes(lqz.file_bytes(header, arrays))
    before = {p for p in tmp_path.rglob("*")}
    out = tmp_path / "sub" / "vectors"
    for layer in renames.values():
        assert main(["vectors", str(crafted), "--layer", layer, "--count", "2",
                     "--out", str(out)]) == 0, capsys.readouterr().err
    written = {p for p in tmp_path.rglob("*")} - before
    assert written and all(out in p.parents or p == out for p in written), written
    assert {p.name for p in written if p.is_file()} <= {
        "manifest.json", "vectors.npz", "input_codes.hex", "weight_codes.hex", "bias.hex",
        "accumulators.hex", "output_codes.hex", ".logquant.lock"}
