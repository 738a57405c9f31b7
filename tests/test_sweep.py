"""Sweeps: grids, honest selection, resumable output, refusal of foreign folders, report."""

import gzip
import json
import shutil
import subprocess
import sys

import pytest

from logquant import sweep as sweep_module
from logquant.cli import main
from logquant.data import load_splits
from logquant.models import load_model
from logquant.sweep import (
    Point,
    SweepError,
    SweepSettings,
    paper_grid,
    read_rows,
    run_sweep,
    selected_for_test,
)


def test_paper_grid_covers_the_papers_settings():
    points = paper_grid((0, 3))
    ids = [p.id for p in points]
    assert len(ids) == len(set(ids))
    groups = {p.group for p in points}
    assert groups == {"float", "acts-global", "acts-calibrated", "weights", "weights+acts"}
    # activations: 2 scopes x 3 bases x 3 bit widths x 4 FSRs
    assert sum(p.group == "acts-global" for p in points) == 2 * 3 * 3 * 4
    paper_weights = [p for p in points if p.group == "weights" and p.fc_weights.endswith("4")
                     and p.conv_weights.endswith("5")]
    assert {p.conv_weights for p in paper_weights} == {"lin5", "log5", "logsqrt2-5"}
    with pytest.raises(SweepError, match="empty"):
        paper_grid((3, 1))


def test_selection_uses_validation_only_and_prefers_larger_fsr_on_ties():
    rows = [{"id": f"a{f}", "group": "acts-global", "scope": "conv", "base": "log2",
             "bits": 3, "fsr": f, "top1": acc} for f, acc in ((1, 90.0), (2, 93.0), (3, 93.0),
                                                              (4, 91.0))]
    rows.append({"id": "w", "group": "weights", "scope": "conv+fc", "base": "log2",
                 "bits": 5, "fsr": "", "top1": 80.0})
    assert sorted(selected_for_test(rows)) == ["a3", "w"]


@pytest.fixture(scope="module")
def small(small_fashion_dir):
    return load_splits(small_fashion_dir), load_model("refcnn")


SMALL_POINTS = [Point("float", "conv+fc"),
                Point("acts-global", "conv", acts="log3@fsr2"),
                Point("acts-global", "conv", acts="log3@fsr4"),
                Point("acts-calibrated", "conv+fc", acts="lin3"),
                Point("weights", "conv+fc", conv_weights="logsqrt2-5", fc_weights="logsqrt2-4")]


def test_sweep_rows_resume_and_refusal(small, tmp_path, monkeypatch):
    splits, model = small
    out = tmp_path / "sweep"
    settings = SweepSettings(val_size=100, batch_size=100, calib_batches=1)
    manifest = {"test": 1}
    rows = run_sweep(model, splits, SMALL_POINTS, out, manifest, settings, progress=False,
                     log=lambda m: None)
    val = [r for r in rows if r["split"] == "val"]
    test = [r for r in rows if r["split"] == "test"]
    assert len(val) == 5 and all(r["images"] == 100 for r in val)
    assert len(test) == 4 and all(r["images"] == 500 for r in test)  # one FSR of the curve
    assert read_rows(out / "sweep.csv") == rows
    first = (out / "sweep.csv").read_bytes()
    # an interrupted run: drop two rows, rerun, only those are measured again
    calls = []
    real = sweep_module.evaluate
    monkeypatch.setattr(sweep_module, "evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
    sweep_module._write_rows(out / "sweep.csv", rows[:-2])
    again = run_sweep(model, splits, SMALL_POINTS, out, manifest, settings, progress=False,
                      log=lambda m: None)
    assert len(calls) == 2
    key = [(r["id"], r["split"]) for r in again]
    assert sorted(key) == sorted((r["id"], r["split"]) for r in rows)
    assert again == rows and (out / "sweep.csv").read_bytes() == first  # byte for byte

    with pytest.raises(SweepError, match="another sweep"):
        run_sweep(model, splits, SMALL_POINTS, out, {"test": 2}, settings, progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(SweepError, match="other files"):
        run_sweep(model, splits, SMALL_POINTS, tmp_path / "other", manifest, settings,
                  progress=False)
    rows = run_sweep(model, splits, SMALL_POINTS[:1], out, {"test": 2}, settings, force=True,
                     progress=False, log=lambda m: None)
    assert len(rows) == 2
    with pytest.raises(SweepError, match="empty"):
        run_sweep(model, splits, [], tmp_path / "empty", manifest, settings, progress=False)


def test_reproduce_writes_report_figures_and_data(capsys, small_fashion_dir, tmp_path):
    out = tmp_path / "report"
    argv = ["reproduce", "--data-dir", str(small_fashion_dir), "--out", str(out),
            "--act-bits", "3", "--fsr-range", "1:4", "--val-size", "200", "--batch-size",
            "250", "--calib-batches", "1", "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "claim1:" in printed and "claim3:" in printed
    report = (out / "REPORT.md").read_text()
    assert "logquant reproduce --data-dir" in report
    for figure in ("accuracy_vs_fsr.png", "histograms.png", "weights.png"):
        assert (out / "figures" / figure).read_bytes()[:4] == b"\x89PNG"
        assert f"figures/{figure}" in report
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert {r["split"] for r in rows} == {"val", "test"}
    # a rerun of the same command finds every row done and rewrites the report
    assert main(argv) == 0
    # the same command on other data is refused: its rows would mix with these
    other = tmp_path / "other_data"
    shutil.copytree(small_fashion_dir, other)
    labels = other / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(labels.read_bytes()))
    raw[-1] = (raw[-1] + 1) % 10
    labels.write_bytes(gzip.compress(bytes(raw)))
    capsys.readouterr()
    assert main([a if a != str(small_fashion_dir) else str(other) for a in argv]) == 2
    assert "holds another sweep" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["sweep", "--out", "x", "--fsr-range", "3:1"], "empty FSR range"),
    (["sweep", "--out", "x", "--fsr-range", "a:b"], "expected LO:HI"),
    (["reproduce", "--out", "x", "--act-bits", "9"], "bit widths must be 1..8"),
    (["sweep", "--out", "x", "--model", "nosuch"], "unknown model"),
])
def test_sweep_bad_input(capsys, fashion, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(small_fashion_dir, tmp_path):
    common = ["sweep", "--data-dir", str(small_fashion_dir), "--act-bits", "3",
              "--fsr-range", "2:3", "--val-size", "200", "--batch-size", "250",
              "--calib-batches", "1", "--no-progress"]
    single = subprocess.run([sys.executable, "-m", "logquant", *common, "--out",
                             str(tmp_path / "one")], capture_output=True, text=True,
                            timeout=600)
    assert single.returncode == 0, single.stderr
    env_cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               "--master_port=29517", "-m", "logquant", *common, "--out", str(tmp_path / "two")]
    double = subprocess.run(env_cmd, capture_output=True, text=True, timeout=600)
    assert double.returncode == 0, double.stderr[-2000:]

    def key(rows):
        return sorted((r["id"], r["split"], r["top1"], r["top5"], r["images"]) for r in rows)

    one, two = read_rows(tmp_path / "one" / "sweep.csv"), read_rows(tmp_path / "two" / "sweep.csv")
    assert len(one) > 40 and key(one) == key(two)
