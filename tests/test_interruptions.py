"""Interruptions and concurrent runs: SIGKILL at any moment leaves either the previous or the
complete new output, never a partial file; a rerun completes and equals an uninterrupted
run; two processes writing the same output folder do not interleave (the second is
refused). Training's kill-and-resume test lives in test_train.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from logquant import lqz
from logquant.io import LOCK_FILE, OutputError, atomic_path, output_lock
from logquant.sweep import read_rows

SRC = Path(__file__).resolve().parent.parent / "src"


def _python(code: str) -> subprocess.Popen:
    """A child Python process running ``code``; it prints 'ready' when it has got there."""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                            text=True)


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_sigkill_inside_an_atomic_write_keeps_the_old_file_and_the_next_write_cleans_up(
        tmp_path):
    target = tmp_path / "result.json"
    target.write_text("old, complete\n")
    proc = _python(f"""
from logquant.io import atomic_path
with atomic_path({str(target)!r}) as tmp:
    with open(tmp, "w") as f:
        f.write("half of the new")
        f.flush()
        print("ready", flush=True)
        import time; time.sleep(60)
""")
    assert proc.stdout.readline().strip() == "ready"
    _kill(proc)
    assert target.read_text() == "old, complete\n"
    leftovers = list(tmp_path.glob(".result.json.*.tmp"))
    assert len(leftovers) == 1 and f".{proc.pid}." in leftovers[0].name
    with atomic_path(target) as tmp:
        tmp.write_text("new, complete\n")
    assert target.read_text() == "new, complete\n"
    assert list(tmp_path.glob(".result.json.*.tmp")) == []  # the killed writer's is gone


def test_a_live_writers_temporary_file_is_left_alone(tmp_path):
    target = tmp_path / "x.txt"
    live = tmp_path / f".x.txt.{os.getpid()}.abc.tmp"
    live.write_text("being written")
    with atomic_path(target) as tmp:
        tmp.write_text("done")
    assert live.exists() and target.read_text() == "done"


def test_second_writer_of_a_folder_is_refused_until_the_first_dies(tmp_path):
    folder = tmp_path / "out"
    proc = _python(f"""
from logquant.io import output_lock
with output_lock({str(folder)!r}):
    print("ready", flush=True)
    import time; time.sleep(60)
""")
    assert proc.stdout.readline().strip() == "ready"
    with pytest.raises(OutputError, match=f"another logquant process \\(pid {proc.pid}\\)"), \
            output_lock(folder):
        pass
    _kill(proc)  # the OS releases a dead process's lock: no stale-lock cleanup needed
    with output_lock(folder):
        assert (folder / LOCK_FILE).exists()
    with output_lock(folder), output_lock(folder):  # re-entrant within one process
        pass


# ----------------------------------------------------------------------------------------
# End to end, with real commands


def _logquant(*argv: str, cwd: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.Popen([sys.executable, "-m", "logquant", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=cwd, env=env)


SWEEP = ["sweep", "--act-bits", "3", "--fsr-range", "0:1", "--val-size", "200",
         "--calib-batches", "1", "--no-progress"]


@pytest.mark.slow
def test_sweep_killed_mid_run_resumes_to_the_uninterrupted_result_and_refuses_a_second(
        small_fashion_dir, tmp_path, capsys, monkeypatch):
    import logquant.data
    from logquant.cli import main

    common = [*SWEEP, "--data-dir", str(small_fashion_dir)]
    straight = _logquant(*common, "--out", str(tmp_path / "a"))
    assert straight.wait(timeout=600) == 0, straight.stderr.read()

    out = tmp_path / "b"
    proc = _logquant(*common, "--out", str(out))
    deadline = time.time() + 300
    while len(read_rows(out / "sweep.csv")) < 8 and time.time() < deadline:
        time.sleep(0.05)  # every read sees complete rows only, while it is writing them
    assert proc.poll() is None, "the sweep finished before it could be interrupted"
    # a second sweep into the same folder, while the first runs: refused, nothing touched
    rows_before = (out / "sweep.csv").read_bytes()

    def no_work(*args, **kwargs):
        raise AssertionError("the second sweep loaded data before it was refused")

    with monkeypatch.context() as patch:  # the lock is taken first, before any work
        patch.setattr(logquant.data, "load_splits", no_work)
        assert main([*common, "--out", str(out)]) == 2
    assert "another logquant process" in capsys.readouterr().err
    _kill(proc)
    partial = read_rows(out / "sweep.csv")
    assert len(partial) >= len(read_rows_from_bytes(rows_before, tmp_path))
    assert not (out / "sweep.json").exists()  # written at the end only

    rerun = _logquant(*common, "--out", str(out))
    assert rerun.wait(timeout=600) == 0, rerun.stderr.read()
    assert (out / "sweep.csv").read_bytes() == (tmp_path / "a" / "sweep.csv").read_bytes()
    assert (out / "sweep.json").read_bytes() == (tmp_path / "a" / "sweep.json").read_bytes()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [LOCK_FILE]


def read_rows_from_bytes(data: bytes, tmp_path: Path) -> list[dict]:
    copy = tmp_path / "copy.csv"
    copy.write_bytes(data)
    return read_rows(copy)


@pytest.mark.slow
def test_export_killed_at_any_moment_leaves_no_partial_file(small_fashion_dir, tmp_path):
    """Kills spread over the whole export (data, calibration, packing, writing): the .lqz is
    absent or complete, and the rerun writes the same bytes as an uninterrupted export."""
    common = ["export", "--weights", "log4", "--acts", "log4", "--calib-batches", "1",
              "--data-dir", str(small_fashion_dir), "--out", "m.lqz"]  # the command is
    (tmp_path / "ref").mkdir()  # recorded in the file: run it identically in two folders
    start = time.time()
    reference = _logquant(*common, cwd=tmp_path / "ref")
    assert reference.wait(timeout=300) == 0, reference.stderr.read()
    duration, expected = time.time() - start, (tmp_path / "ref" / "m.lqz").read_bytes()
    target = tmp_path / "m.lqz"
    for fraction in (0.3, 0.6, 0.8, 0.9, 0.95, 0.98):
        proc = _logquant(*common, cwd=tmp_path)
        time.sleep(duration * fraction)
        _kill(proc)
        if target.exists():  # finished before the kill: complete and loadable
            assert target.read_bytes() == expected
            lqz.load(target)
            target.unlink()
    rerun = _logquant(*common, cwd=tmp_path)
    assert rerun.wait(timeout=300) == 0, rerun.stderr.read()
    assert target.read_bytes() == expected
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".tmp") == []
