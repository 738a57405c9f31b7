"""Slow end-to-end checks on the full data, each in a real process (CI runs them)."""

import json
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def logquant(*argv, timeout=900):
    return subprocess.run([sys.executable, "-m", "logquant", *argv], capture_output=True,
                          text=True, timeout=timeout)


def test_main_job_prints_the_log_vs_linear_table(fashion, tmp_path):
    out_file = tmp_path / "compare.json"
    proc = logquant("compare", "--json-out", str(out_file))
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^float\s+93\.82%", proc.stdout, re.M), proc.stdout
    for label in ("activations log3", "activations lin3", "weights logsqrt2-5 conv"):
        assert label in proc.stdout
    results = json.loads(out_file.read_text())["results"]
    assert len(results) == 11 and all(r["count"] == 10_000 for r in results)
    assert all(0 < r["top1"] <= 100 for r in results)


def test_training_from_scratch_learns(fashion, tmp_path):
    """Two epochs of the reference recipe on the full training split."""
    out_file = tmp_path / "two_epochs.safetensors"
    proc = logquant("train", "--epochs", "2", "--out", str(out_file), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(out_file.with_suffix(".json").read_text())
    assert len(record["history"]) == 2
    # the full 15-epoch run reaches 93.8 %; after 2 epochs it was at 90 % validation
    assert record["test"]["top1"] > 88.0, record["test"]
