"""Determinism: the same command with the same seed gives bit-identical files.

Covered elsewhere, by the same standard (byte or tensor equality): an interrupted sweep
resumed in a new process writes the uninterrupted run's files (test_interruptions), an
export killed and rerun writes the reference export's bytes (test_interruptions), saving a
loaded .lqz again gives the same bytes (test_lqz), a training run killed and resumed ends
with the uninterrupted run's weights (test_train), and the engine's codes, sums and logits
agree between compiled and eager kernels and 1 and 2 threads (test_engine)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from logquant.data import load_splits
from logquant.models import load_model
from logquant.sweep import Point, SweepSettings, run_sweep


def test_two_sweeps_write_identical_files(small_fashion_dir, tmp_path):
    splits, model = load_splits(small_fashion_dir), load_model("refcnn")
    points = [Point("float", "conv+fc"), Point("acts-global", "conv", acts="log4@fsr3"),
              Point("acts-calibrated", "conv+fc", acts="logsqrt2-4"),
              Point("weights", "conv+fc", conv_weights="log4", fc_weights="log4")]
    settings = SweepSettings(val_size=200, batch_size=100, calib_batches=2)
    for name in ("a", "b"):
        run_sweep(model, splits, points, tmp_path / name, {"test": 1}, settings,
                  progress=False, log=lambda m: None)
    for file in ("sweep.csv", "sweep.json", "manifest.json"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()


@pytest.mark.slow
def test_engine_vectors_identical_with_one_and_two_threads_in_separate_processes(
        refcnn_export, tmp_path):
    """Every exact integer the engine produces for a layer (inputs, sums with bias, output
    codes) as written by ``logquant vectors``, from processes with 1 and 2 threads."""
    _, _, path = refcnn_export
    outputs = []
    for threads in ("1", "2"):
        out = tmp_path / f"threads{threads}"
        env = {**os.environ, "OMP_NUM_THREADS": threads}
        proc = subprocess.run([sys.executable, "-m", "logquant", "vectors", str(path),
                               "--layer", "features.3", "--count", "64", "--out", str(out)],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        outputs.append({p.name: p.read_bytes() for p in sorted(out.iterdir())
                        if not p.name.startswith(".")})
    assert outputs[0].keys() == outputs[1].keys() and "accumulators.hex" in outputs[0]
    assert outputs[0] == outputs[1]
