"""logquant export / run / cost / vectors on the real model and data, and their errors."""

import json

import numpy as np
import pytest

from logquant.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def exported(tmp_path_factory, fashion):
    path = tmp_path_factory.mktemp("cli") / "ref.lqz"
    assert main(["export", "--weights", "log4", "--acts", "log4", "--calib-batches", "2",
                 "--out", str(path)]) == 0
    return path


def test_export_prints_layers_and_size(capsys, fashion, tmp_path):
    code, out, _ = run(capsys, "export", "--weights", "log3", "--acts", "log3",
                       "--calib-batches", "1", "--out", str(tmp_path / "m.lqz"))
    assert code == 0
    assert "features.0" in out and "accumulator" in out and "x smaller" in out
    ratio = float(out.split("(")[-1].split("x smaller")[0])
    assert ratio >= 0.95 * 32 / 3


def test_compressed_export_reports_its_coding_and_runs_like_the_packed_one(capsys, exported,
                                                                          tmp_path):
    """Small layers stay packed under --compress (rANS would not be smaller there)."""
    code, out, _ = run(capsys, "export", "--weights", "log4", "--acts", "log4",
                       "--calib-batches", "2", "--compress", "--out", str(tmp_path / "c.lqz"))
    assert code == 0, out
    line = next(line for line in out.splitlines() if line.startswith("weights:"))
    assert "6 of 7 layers entropy-coded" in line
    assert float(line.split()[1]) < 4
    packed = json.loads(run(capsys, "run", str(exported), "--limit", "500", "--json")[1])
    coded = json.loads(run(capsys, "run", str(tmp_path / "c.lqz"), "--limit", "500",
                           "--json")[1])
    assert coded["top1"] == packed["top1"]


def test_run_reports_accuracy_and_matches_float64(capsys, exported):
    code, out, _ = run(capsys, "run", str(exported), "--limit", "1000", "--verify", "--json")
    assert code == 0
    result = json.loads(out)
    assert result["images"] == 1000 and result["top1"] > 88
    assert result["float64_mismatches"] == {"codes": 0, "logits": 0}
    assert result["multiplies_per_image"] == 0 and result["shift_adds_per_image"] > 10**7
    assert result["accumulator_bits_needed"]["features.0"] < 32
    code, out, _ = run(capsys, "run", str(exported), "--limit", "200", "--acc-bits", "20")
    assert code == 0 and "saturated" in out


def test_cost_table_and_json(capsys, exported):
    code, out, _ = run(capsys, "cost", str(exported))
    assert code == 0 and "total" in out and "Horowitz" in out
    code, out, _ = run(capsys, "cost", str(exported), "--json")
    report = json.loads(out)
    total = report["total"]
    assert total["macs"] == sum(r["macs"] for r in report["layers"])
    assert total["shift_adds"] == total["macs"] and total["multiplies"] == 0
    assert 0 < total["energy_vs_fp32"] < 0.2 and 0 < total["energy_vs_int8"] < 1.5
    conv = report["layers"][1]
    assert conv["exponent_adder_bits"] == 5 and conv["shifter_span"] == 2**4 + 2**3 - 3
    assert conv["weight_bits"] == 32 * 32 * 9 * 4


def test_vectors_hex_npz_and_engine_agree(capsys, exported, tmp_path, fashion):
    from logquant import lqz
    from logquant.engine import Engine

    out_dir = tmp_path / "vec"
    code, _, _ = run(capsys, "vectors", str(exported), "--layer", "features.3", "--count", "2",
                     "--out", str(out_dir))
    assert code == 0
    manifest = json.loads((out_dir / "manifest.json").read_text())
    arrays = np.load(out_dir / "vectors.npz")
    for name, info in manifest["files"].items():
        lines = (out_dir / info["hex"]).read_text().split()
        assert len(lines) == arrays[name].size
        bits = info["bits"]
        values = [int(v, 16) for v in lines]
        if info["encoding"] == "two's complement":
            values = [v - (1 << bits) if v >> (bits - 1) else v for v in values]
        assert values == arrays[name].reshape(-1).tolist(), name
    engine = Engine(lqz.load(exported))
    result = engine.run(fashion.test.images[:2], trace=True)
    out_name = next(op["out"] for op in engine.model.ops if op.get("name") == "features.3")
    assert np.array_equal(arrays["accumulators"], result.sums[out_name].numpy())
    assert set(manifest["files"]) == {"input_codes", "weight_codes", "bias", "accumulators",
                                      "output_codes"}
    assert manifest["output_format"].startswith("log4@fsr")


@pytest.mark.parametrize("argv,message", [
    (["run", "missing.lqz"], "no such .lqz file"),
    (["cost", "missing.lqz"], "no such .lqz file"),
    (["run", "{lqz}", "--acc-bits", "1"], "accumulator width must be 2..63"),
    (["vectors", "{lqz}", "--layer", "nope", "--out", "{tmp}"], "no layer 'nope'"),
    (["export", "--acts", "log4", "--out", "{tmp}/x.lqz"], "float weights"),
    (["export", "--out", "{tmp}/x.lqz"], "needs formats"),
    (["run", "{lqz}", "--bogus"], "unrecognized arguments"),
    (["run", "{lqz}", "--model", "resnet18", "--checkpoint", "w.pt"],
     "--model, --checkpoint apply to --config only"),
    (["cost", "{lqz}", "--calib-batches", "2"], "--calib-batches apply to --config only"),
    (["export", "--format", "onnx", "--weights", "log4", "--out", "{tmp}/x.lqz"],
     "must end in .onnx"),
])
def test_errors_are_one_line_with_exit_code_2(capsys, exported, tmp_path, argv, message):
    argv = [a.format(lqz=exported, tmp=tmp_path) for a in argv]
    code, out, err = run(capsys, *argv)
    assert code == 2, (out, err)
    assert err.startswith("error:") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "x.lqz").exists()


def test_corrupted_file_is_one_line_error(capsys, exported, tmp_path):
    data = bytearray(exported.read_bytes())
    data[len(data) // 2] ^= 0x10
    bad = tmp_path / "bad.lqz"
    bad.write_bytes(bytes(data))
    code, _, err = run(capsys, "run", str(bad))
    assert code == 2 and err.count("\n") == 1 and "bad.lqz" in err


def test_every_engine_subcommand_has_help(capsys):
    for command in ("export", "run", "cost", "vectors"):
        with pytest.raises(SystemExit) as info:
            main([command, "--help"])
        assert info.value.code == 0
        assert "usage: logquant " + command in capsys.readouterr().out
