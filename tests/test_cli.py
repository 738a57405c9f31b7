"""The logquant command: results on real data, and one-line errors with exit code 2."""

import json
import subprocess
import sys

import pytest
import torch

from logquant.cli import main
from logquant.io import read_metadata, save_weights
from user_models import tiny_cnn


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_bundled_reference_model_reaches_its_accuracy(capsys, fashion):
    code, out, _ = run(capsys, "eval", "--json")
    assert code == 0
    result = json.loads(out)
    assert result["count"] == 10_000 and result["split"] == "test"
    assert result["top1"] >= 92.5, result  # the bar for the shipped weights
    assert result["config"]["acts"] == "float"


def test_eval_with_log_formats_reports_config_and_layers(capsys, fashion):
    code, out, _ = run(capsys, "eval", "--weights", "log5s", "--acts", "log3",
                       "--fsr-method", "mse", "--json", "--calib-batches", "2")
    assert code == 0
    result = json.loads(out)
    assert result["config"]["conv_weights"] == "log5s" and result["config"]["acts"] == "log3"
    layers = {r["layer"]: r for r in result["layers"]}
    assert layers["features.0"]["input"] == "float"
    assert layers["features.3"]["input"].startswith("log3@fsr")
    assert layers["classifier.4"]["weights"].startswith("log5s@fsr")
    assert 50 < result["top1"] < 100 and 0 < result["top5"] <= 100


def test_fixed_global_act_fsr_and_layer_override(capsys, fashion):
    code, out, _ = run(capsys, "eval", "--acts", "log4", "--act-fsr", "3", "--json",
                       "--layer", "classifier.4=weights:lin8,acts:float", "--calib-batches", "1",
                       "--split", "val")
    assert code == 0
    layers = {r["layer"]: r for r in json.loads(out)["layers"]}
    assert layers["features.3"]["input"] == "log4@fsr3"
    assert layers["classifier.4"]["input"] == "float"
    assert layers["classifier.4"]["weights"].startswith("lin8s@fsr")


BAD_COMMANDS = [
    (["eval", "--weights", "log9"], "bits must be in 1..8"),
    (["eval", "--acts", "exp3"], "unknown format 'exp3'"),
    (["eval", "--acts", "log3", "--act-fsr", "1.5"], "an integer FSR, got '1.5'"),
    (["eval", "--acts", "log3@fsr1.5"], "unknown format"),
    (["eval", "--weights", "log4", "--layer", "features.99=weights:log3"],
     "layer pattern 'features.99' selects no layer"),
    (["eval", "--layer", "features.3"], "expected NAME=weights:FMT"),
    (["eval", "--checkpoint", "/nonexistent/w.safetensors"], "weights file not found"),
    (["eval", "--data-dir", "/nonexistent"], "data directory not found"),
    (["eval", "--model", "nosuchnet"], "unknown model 'nosuchnet'"),
    (["eval", "--model", "resnet18"], "pass --checkpoint"),
    (["eval", "--model", "nosuchpkg.mod:f"], "cannot import factory"),
    (["eval", "--bogus"], "unrecognized arguments: --bogus"),
    (["eval", "--batch-size", "0"], "positive integer"),
    (["eval", "--device", "cuda:7"] if not torch.cuda.is_available() else
     ["eval", "--device", "nonsense"], "device"),
    (["train", "--out", "model.pt"], "must end in .safetensors"),
    (["frobnicate"], "invalid choice"),
    (["eval", "--device", "meta"], "runs on cpu or cuda"),
    (["train", "--seed", str(2**70), "--out", "x.safetensors"], "0 .. 2^63-1"),
    (["eval", "--model", ":x"], "expected package.module:factory"),
    (["eval", "--config", "/nonexistent/c.json"], "cannot read configuration"),
    (["sweep", "--out", "never-created", "--fsr-range", "0:100000000"], "FSRs lie in -64..64"),
    (["eval", "--image-size", "30000"], "image sides up to 2048"),
]


@pytest.mark.parametrize("argv, message", BAD_COMMANDS)
def test_bad_input_gives_one_line_and_exit_code_2(capsys, fashion, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_act_fsr_zero_is_used_not_calibrated(capsys, fashion):
    code, out, _ = run(capsys, "eval", "--acts", "log4", "--act-fsr", "0", "--json",
                       "--calib-batches", "1", "--split", "val")
    assert code == 0
    layers = json.loads(out)["layers"]
    assert {r["input"] for r in layers[1:]} == {"log4@fsr0"}


def test_eval_prints_coverage_and_keeps_the_quantized_model(capsys, fashion, tmp_path):
    saved = tmp_path / "q.safetensors"
    code, out, _ = run(capsys, "eval", "--weights", "log4", "--acts", "log4", "--skip",
                       "classifier.*", "--calib-batches", "1", "--split", "val",
                       "--save-quantized", str(saved))
    assert code == 0
    assert "quantized 5 of 7 conv/linear layers" in out
    assert "float (skipped by pattern 'classifier.*')" in out
    first = out.splitlines()[-1]
    code, out, _ = run(capsys, "eval", "--quantized", str(saved), "--split", "val")
    assert code == 0 and out.splitlines()[-1] == first  # same accuracy, no calibration
    code, _, err = run(capsys, "eval", "--quantized", str(saved), "--acts", "log3")
    assert code == 2 and "carries its formats" in err
    code, _, err = run(capsys, "eval", "--quantized", str(tmp_path / "none.safetensors"))
    assert code == 2 and "file not found" in err


def test_bad_config_file(capsys, fashion, tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"acts": "log3", "colour": 1}')
    code, _, err = run(capsys, "eval", "--config", str(path))
    assert code == 2 and "unknown configuration keys ['colour']" in err


def test_train_writes_weights_and_record(capsys, small_fashion_dir, tmp_path):
    out_file = tmp_path / "net.safetensors"
    code, out, _ = run(capsys, "train", "--data-dir", str(small_fashion_dir), "--epochs", "1",
                       "--out", str(out_file), "--seed", "3", "--no-progress")
    assert code == 0 and "test top-1" in out
    record = json.loads(out_file.with_suffix(".json").read_text())
    assert record["command"].startswith("logquant train") and "--seed 3" in record["command"]
    assert read_metadata(out_file)["seed"] == "3"
    code, out, _ = run(capsys, "eval", "--data-dir", str(small_fashion_dir), "--checkpoint",
                       str(out_file), "--json")
    assert code == 0 and json.loads(out)["count"] == 500


def test_user_factory_model(capsys, small_fashion_dir, tmp_path):
    weights = tmp_path / "tiny.safetensors"
    save_weights(tiny_cnn(), weights)
    code, out, _ = run(capsys, "eval", "--data-dir", str(small_fashion_dir), "--model",
                       "user_models:tiny_cnn", "--checkpoint", str(weights), "--weights",
                       "log4", "--acts", "log4", "--json")
    assert code == 0
    assert [r["layer"] for r in json.loads(out)["layers"]] == ["0", "5"]


def test_model_that_does_not_fit_the_data(capsys, small_fashion_dir, tmp_path):
    torchvision = pytest.importorskip("torchvision")
    weights = tmp_path / "resnet.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), weights)
    code, _, err = run(capsys, "eval", "--data-dir", str(small_fashion_dir), "--model",
                       "resnet18", "--checkpoint", str(weights))
    assert code == 2 and "cannot run on this data" in err and err.count("\n") == 1


def test_pickled_code_in_a_checkpoint_is_refused(capsys, small_fashion_dir, tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.pt"
    torch.save({"weight": Payload()}, evil)
    code, out, err = run(capsys, "eval", "--data-dir", str(small_fashion_dir), "--checkpoint",
                         str(evil))
    assert code == 2 and "pwned" not in out and "not a loadable weights file" in err


def test_console_entry_point_is_a_real_process():
    proc = subprocess.run([sys.executable, "-m", "logquant", "eval", "--weights", "log0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and "Traceback" not in proc.stderr


def test_torchvision_model_on_an_image_folder(capsys, tmp_path):
    torchvision = pytest.importorskip("torchvision")
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for part, count in (("train", 12), ("test", 6)):
        for cls in ("a", "b", "c"):
            (tmp_path / "data" / part / cls).mkdir(parents=True)
            for i in range(count):
                pixels = torch.randint(0, 256, (36, 36, 3), generator=gen, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(tmp_path / "data" / part / cls / f"{i}.png")
    weights = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), weights)
    code, out, err = run(capsys, "eval", "--model", "resnet18", "--checkpoint", str(weights),
                         "--data-dir", str(tmp_path / "data"), "--image-size", "32",
                         "--weights", "logsqrt2-5", "--acts", "log4", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["count"] == 18 and len(result["layers"]) == 21  # 20 convs + fc
    (tmp_path / "data" / "test" / "c").rename(tmp_path / "data" / "test" / "d")
    code, out, err = run(capsys, "eval", "--model", "resnet18", "--checkpoint", str(weights),
                         "--data-dir", str(tmp_path / "data"), "--image-size", "32")
    assert code == 2 and "test/ has other classes than train/ (c, d)" in err, err


def test_internal_errors_are_one_line_with_exit_1_and_debug_shows_them(capsys, monkeypatch):
    import logquant.cli.evaluate as cli_module

    def broken(args, argv):
        raise KeyError("a bug")

    monkeypatch.setattr(cli_module, "cmd_eval", broken)
    code, _, err = run(capsys, "eval")
    assert code == 1 and err.count("\n") == 1
    assert "internal error, a bug in logquant (KeyError: 'a bug')" in err and "--debug" in err
    with pytest.raises(KeyError):
        main(["--debug", "eval"])


def test_a_closed_stdout_pipe_ends_quietly(refcnn_export):
    proc = subprocess.Popen([sys.executable, "-m", "logquant", "cost", str(refcnn_export[2])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before anything is written (`| head -0`)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == ""
