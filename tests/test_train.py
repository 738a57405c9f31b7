"""The training loop: checkpoints, exact resume, divergence, distributed equality."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from logquant.cli import main
from logquant.config import QuantConfig
from logquant.data import load_splits
from logquant.models import RefCNN
from logquant.qat import prepare_qat
from logquant.train import LATEST, TrainConfig, TrainingError, train

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def small(small_fashion_dir):
    return load_splits(small_fashion_dir)


def _qat_model():
    torch.manual_seed(0)
    return prepare_qat(RefCNN(), QuantConfig(conv_weights="log5", fc_weights="log5",
                                             acts="log5", grads="log5"))


class _Stop(Exception):
    pass


def test_resume_ends_with_the_same_weights(small, tmp_path):
    cfg = TrainConfig(epochs=2, batch_size=256, seed=1)
    straight = _qat_model()
    train(straight, small, cfg, checkpoint_dir=tmp_path / "a", progress=False,
          log=lambda m: None)

    calls = []

    def stop_in_second_epoch(message):
        calls.append(message)
        if len(calls) == 2:  # epoch 2 finished but not checkpointed: as if killed
            raise _Stop

    interrupted = _qat_model()
    with pytest.raises(_Stop):
        train(interrupted, small, cfg, checkpoint_dir=tmp_path / "b", progress=False,
              log=stop_in_second_epoch)
    assert (tmp_path / "b" / LATEST).read_text().strip() == "epoch-0001"
    resumed = _qat_model()
    summary = train(resumed, small, cfg, checkpoint_dir=tmp_path / "b", resume=True,
                    progress=False, log=lambda m: None)
    assert [r["epoch"] for r in summary["history"]] == [1, 2]
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    with pytest.raises(TrainingError, match="other settings"):
        train(_qat_model(), small, TrainConfig(epochs=3, batch_size=256, seed=1),
              checkpoint_dir=tmp_path / "b", resume=True, progress=False, log=lambda m: None)


def test_resume_of_another_run_is_refused_naming_what_differs(small, tmp_path):
    """The run's identity (model, starting weights, formats) is in every checkpoint: a
    resume with another one is refused instead of silently continuing the first run."""
    cfg = TrainConfig(epochs=1, batch_size=1024, seed=1)
    identity = {"model": "refcnn", "init_sha256": "a" * 64, "config": {"acts": "log4"}}
    train(_qat_model(), small, cfg, checkpoint_dir=tmp_path, progress=False,
          log=lambda m: None, identity=identity)
    other = {**identity, "init_sha256": "b" * 64}
    with pytest.raises(TrainingError, match=r"another run \(init_sha256 differ\)"):
        train(_qat_model(), small, cfg, checkpoint_dir=tmp_path, resume=True,
              progress=False, log=lambda m: None, identity=other)
    summary = train(_qat_model(), small, cfg, checkpoint_dir=tmp_path, resume=True,
                    progress=False, log=lambda m: None, identity=identity)
    assert [r["epoch"] for r in summary["history"]] == [1]  # the same run: nothing left


class _Diverging(RefCNN):
    steps = 0

    def forward(self, x):
        out = super().forward(x)
        type(self).steps += self.training
        return out * float("nan") if type(self).steps > 10 else out


def test_divergence_names_the_step_and_keeps_the_checkpoint(small, tmp_path):
    cfg = TrainConfig(epochs=3, batch_size=256, seed=0)  # 7 steps per epoch
    with pytest.raises(TrainingError, match=r"diverged: loss is nan at step 11 \(epoch 2\).*"
                                            r"epoch-0001\) is intact"):
        train(_Diverging(), small, cfg, checkpoint_dir=tmp_path, progress=False,
              log=lambda m: None)
    assert (tmp_path / "epoch-0001" / "state.safetensors").is_file()


def test_cli_trains_quantization_aware_and_eval_reloads_it(capsys, small_fashion_dir, tmp_path):
    out = tmp_path / "qat.safetensors"
    code = main(["train", "--data-dir", str(small_fashion_dir), "--epochs", "1", "--weights",
                 "log5", "--acts", "log5", "--grads", "log5", "--out", str(out),
                 "--no-progress", "--train-batch-size", "256"])
    assert code == 0
    printed = capsys.readouterr().out
    accuracy = float(printed.split("test top-1 ")[1].split(" %")[0])
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["config"]["grads"] == "log5"
    assert (tmp_path / "qat.ckpt" / LATEST).exists()
    assert main(["eval", "--data-dir", str(small_fashion_dir), "--checkpoint", str(out),
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["top1"] == pytest.approx(accuracy, abs=0.01)  # same quantized network
    assert main(["eval", "--data-dir", str(small_fashion_dir), "--checkpoint", str(out),
                 "--acts", "log3"]) == 2
    assert "already quantized" in capsys.readouterr().err
    assert main(["train", "--data-dir", str(small_fashion_dir), "--grads", "log9",
                 "--out", str(out)]) == 2


def _run_train(args, env=None, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(TESTS), **(env or {})}
    return subprocess.run([sys.executable, "-m", "logquant", "train", *args],
                          capture_output=True, text=True, env=env, timeout=600, **kwargs)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(small_fashion_dir, tmp_path):
    common = ["--data-dir", str(small_fashion_dir), "--epochs", "3", "--weights", "log5",
              "--acts", "log5", "--no-progress", "--train-batch-size", "64"]
    straight = _run_train([*common, "--out", str(tmp_path / "a.safetensors")])
    assert straight.returncode == 0, straight.stderr
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    proc = subprocess.Popen([sys.executable, "-m", "logquant", "train", *common, "--out",
                             str(tmp_path / "b.safetensors")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = tmp_path / "b.ckpt" / LATEST
    deadline = time.time() + 300
    while not latest.exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # into the second epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "b.safetensors").exists()
    resumed = _run_train([*common, "--out", str(tmp_path / "b.safetensors"), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("formats", [[], ["--weights", "log5", "--acts", "log5",
                                          "--grads", "log5"]])
def test_two_processes_match_one_with_the_same_global_batch(small_fashion_dir, tmp_path,
                                                             formats):
    """Tolerance 1e-5: DDP sums the two halves' gradients in another order than one
    process sums the whole batch, so float rounding differs in the last bits."""
    common = ["--data-dir", str(small_fashion_dir), "--epochs", "1", "--model",
              "user_models:tiny_cnn_plain", "--train-batch-size", "64", "--no-progress",
              *formats]
    single = _run_train([*common, "--out", str(tmp_path / "one.safetensors")])
    assert single.returncode == 0, single.stderr
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run",
                             "--nproc_per_node=2", "--master_port=29531", "-m", "logquant",
                             "train", *common, "--out", str(tmp_path / "two.safetensors")],
                            capture_output=True, text=True, env=env, timeout=600)
    assert double.returncode == 0, double.stderr[-3000:]
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst < 1e-5, worst


@pytest.mark.slow
def test_reproduce_training_writes_curves_table_and_verdict(capsys, small_fashion_dir,
                                                            tmp_path):
    out = tmp_path / "training"
    assert main(["reproduce-training", "--data-dir", str(small_fashion_dir), "--out",
                 str(out), "--epochs", "1", "--finetune-epochs", "1", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "claim (log5 > lin5 after training):" in printed
    results = json.loads((out / "results.json").read_text())
    assert set(results["from_scratch"]) == {"float", "linear 5-bit", "log 5-bit"}
    assert set(results["fine_tune"]) == {"log 4-bit", "log 3-bit"}
    assert all(len(r["history"]) == 1 and r["history"][0]["test_top1"] > 0
               for r in results["from_scratch"].values())
    assert (out / "training_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "holds" in (out / "REPORT.md").read_text() or "does not hold" in (
        out / "REPORT.md").read_text()
