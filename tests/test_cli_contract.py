"""The command-line contract, for every subcommand: ``--help`` exists and lists exactly the
options the parser takes, each with a description; unknown or abbreviated options are
rejected; every documented error exits with code 2 and one line on stderr, no traceback,
and writes nothing."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from logquant.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


# The smallest valid command line of each subcommand ({tmp}: a fresh folder, {lqz}: a file)
MINIMAL = {
    "train": ["--out", "{tmp}/m.safetensors"],
    "eval": [],
    "sweep": ["--out", "{tmp}/sweep"],
    "reproduce": ["--out", "{tmp}/repro"],
    "reproduce-training": ["--out", "{tmp}/training"],
    "export": ["--weights", "log4", "--acts", "log4", "--out", "{tmp}/m.lqz"],
    "run": ["{lqz}"],
    "cost": ["{lqz}"],
    "vectors": ["{lqz}", "--layer", "features.0", "--out", "{tmp}/vectors"],
    "search": ["--out", "{tmp}/search"],
}

# Documented error paths: (argv, a fragment of the one-line message)
ERRORS = [
    (["train", "--out", "{tmp}/m.pt"], "must end in .safetensors"),
    (["train", "--out", "{tmp}/m.safetensors", "--epochs", "0"], "positive integer"),
    (["train", "--out", "{tmp}/m.safetensors", "--weights", "log99"], "log99"),
    (["train", "--out", "{tmp}/m.safetensors", "--grads", "banana"], "banana"),
    (["train", "--out", "{file}/m.safetensors"], "is a file"),
    (["train", "--out", "{tmp}/m.safetensors", "--init", "{tmp}/none.safetensors",
      "--data-dir", "{small}"], "weights file not found"),
    (["train", "--out", "{tmp}/m.safetensors", "--resume", "--data-dir", "{small}",
      "--epochs", "1"], "no checkpoint"),
    (["eval", "--split", "train"], "invalid choice: 'train'"),
    (["eval", "--config", "{tmp}/missing.json"], "cannot read"),
    (["eval", "--percentile", "150", "--weights", "log4", "--fsr-method", "percentile"],
     "percentile must be in (0, 100]"),
    (["eval", "--data-dir", "{tmp}"], "file not found"),
    (["sweep", "--out", "{tmp}/s", "--fsr-range", "3:1"], "empty FSR range"),
    (["sweep", "--out", "{tmp}/s", "--act-bits", "3,9"], "bit widths must be 1..8"),
    (["sweep", "--out", "{file}"], "exists and is not a folder"),
    (["reproduce", "--out", "{tmp}/r", "--fsr-method", "median"], "invalid choice"),
    (["reproduce", "--out", "{tmp}/r", "--val-size", "-5"], "positive integer"),
    (["reproduce-training", "--out", "{file}"], "exists and is not a folder"),
    (["reproduce-training", "--out", "{tmp}/t", "--finetune-epochs", "x"], "positive integer"),
    (["export", "--out", "{tmp}/x.lqz"], "needs formats"),
    (["export", "--acts", "log4", "--out", "{tmp}/x.lqz"], "float weights"),
    (["export", "--weights", "log4", "--acts", "log4", "--out", "{tmp}"], "not a file"),
    (["export", "--weights", "log4", "--acts", "log4", "--out", "{file}/x.lqz"], "is a file"),
    (["run"], "give an .lqz file or --config"),
    (["run", "{lqz}", "--config", "{tmp}/c.json"], "not both"),
    (["run", "{tmp}/missing.lqz"], "no such .lqz file"),
    (["run", "{lqz}", "--acc-bits", "1"], "accumulator width must be 2..63"),
    (["run", "{file}"], "not an .lqz file"),
    (["cost", "{tmp}/missing.lqz"], "no such .lqz file"),
    (["cost", "--config", "{tmp}/missing.json"], "cannot read"),
    (["vectors", "{lqz}", "--layer", "nope", "--out", "{tmp}/v"], "no layer 'nope'"),
    (["vectors", "{lqz}", "--layer", "features.0", "--out", "{tmp}/v", "--count", "0"],
     "positive integer"),
    (["vectors", "{lqz}", "--layer", "features.0", "--out", "{file}"],
     "exists and is not a folder"),
    (["search", "--out", "{tmp}/s", "--budget", "-1"], "non-negative"),
    (["search", "--out", "{tmp}/s", "--budget", "nan"], "non-negative"),
    (["search", "--out", "{tmp}/s", "--objective", "speed"], "invalid choice"),
    (["search", "--out", "{tmp}/s", "--bits", "2,12"], "bit widths must be 1..8"),
    (["search", "--out", "{file}"], "exists and is not a folder"),
]


@pytest.fixture
def places(tmp_path, refcnn_export, small_fashion_dir):
    """Values for the placeholders: a fresh folder, a plain file, an .lqz, small data."""
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "plain.txt").write_text("not a folder, not an .lqz\n")
    return {"tmp": str(work), "file": str(tmp_path / "plain.txt"),
            "lqz": str(refcnn_export[2]), "small": str(small_fashion_dir)}


def _fill(argv: list[str], places: dict[str, str]) -> list[str]:
    return [a.format(**places) for a in argv]


def _run(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_line_error(code: int, err: str, fragment: str) -> None:
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and fragment in err, err


def test_every_subcommand_has_a_contract():
    assert set(subcommands()) == set(MINIMAL)
    assert {argv[0] for argv, _ in ERRORS} == set(MINIMAL)


@pytest.mark.parametrize("command", sorted(MINIMAL))
def test_help_lists_exactly_the_accepted_options(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: logquant {command}")
    parser = subcommands()[command]
    listed = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", text))
    accepted = {s for a in parser._actions for s in a.option_strings if s.startswith("--")}
    assert listed == accepted, listed ^ accepted
    for action in parser._actions:
        assert action.help and action.help != argparse.SUPPRESS, action.option_strings


def test_top_level_help_names_every_subcommand(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    text = capsys.readouterr().out
    assert info.value.code == 0
    for command in MINIMAL:
        assert re.search(rf"^\s+{re.escape(command)}\s+\S", text, re.M), command


@pytest.mark.parametrize("command", sorted(MINIMAL))
def test_unknown_and_abbreviated_options_are_rejected(command, capsys, places):
    minimal = _fill(MINIMAL[command], places)
    code, _, err = _run(capsys, [command, *minimal, "--no-such-option"])
    _assert_one_line_error(code, err, "unrecognized arguments: --no-such-option")
    longest = max((s for a in subcommands()[command]._actions for s in a.option_strings
                   if s.startswith("--") and s != "--help"), key=len)
    code, _, err = _run(capsys, [command, *minimal, longest[:-2], "1"])
    _assert_one_line_error(code, err, "unrecognized arguments")
    assert os.listdir(places["tmp"]) == []


@pytest.mark.parametrize("command", sorted(c for c, argv in MINIMAL.items() if argv))
def test_missing_required_arguments(command, capsys):
    code, _, err = _run(capsys, [command] if command not in ("run", "cost") else
                        [command, "--json"])
    _assert_one_line_error(code, err, "required" if command not in ("run", "cost")
                           else "give an .lqz file")


@pytest.mark.parametrize("argv,fragment", ERRORS, ids=[" ".join(a[:3]) for a, _ in ERRORS])
def test_documented_errors_exit_2_with_one_line_and_write_nothing(argv, fragment, capsys,
                                                                  places):
    before = sorted(os.listdir(Path(places["tmp"]).parent))
    code, _, err = _run(capsys, _fill(argv, places))
    _assert_one_line_error(code, err, fragment)
    assert os.listdir(places["tmp"]) == []
    assert sorted(os.listdir(Path(places["tmp"]).parent)) == before
    assert Path(places["file"]).read_text() == "not a folder, not an .lqz\n"


@pytest.mark.slow
@pytest.mark.parametrize("command", sorted(MINIMAL))
def test_errors_in_a_real_process_have_no_traceback(command, tmp_path, refcnn_export):
    """The installed entry point, as a user runs it: exit code 2, one line on stderr."""
    places = {"tmp": str(tmp_path), "file": str(tmp_path), "lqz": str(refcnn_export[2]),
              "small": str(tmp_path)}
    argv = [*_fill(MINIMAL[command], places), "--no-such-option"]
    proc = subprocess.run([sys.executable, "-m", "logquant", command, *argv],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout == ""
