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


def test_main_job_reproduces_the_paper_grid(fashion, tmp_path):
    """The README's main job on the full data: the whole grid, figures and REPORT.md."""
    out = tmp_path / "report"
    proc = logquant("reproduce", "--out", str(out), "--no-progress", timeout=1500)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "float: val" in proc.stdout and "test 93.82 %" in proc.stdout
    assert re.search(r"^claim1: (HOLDS|PARTLY|DOES NOT HOLD)", proc.stdout, re.M)
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    test_rows = [r for r in rows if r["split"] == "test"]
    assert test_rows and all(r["images"] == 10_000 for r in test_rows)
    report = (out / "REPORT.md").read_text()
    for claim in ("Claim 1", "Claim 2", "Claim 3"):
        assert claim in report


def test_training_from_scratch_learns(fashion, tmp_path):
    """Two epochs of the reference recipe on the full training split."""
    out_file = tmp_path / "two_epochs.safetensors"
    proc = logquant("train", "--epochs", "2", "--out", str(out_file), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(out_file.with_suffix(".json").read_text())
    assert len(record["history"]) == 2
    # the full 15-epoch run reaches 93.8 %; after 2 epochs it was at 90 % validation
    assert record["test"]["top1"] > 88.0, record["test"]
