"""Per-layer format search on the reference model: within budget, cheaper than its start,
every result exportable; bad budgets and models refused."""

import json
import os

import pytest
import torch
from torch import nn

from logquant.cli import main
from logquant.errors import LogquantError
from logquant.evaluate import evaluate
from logquant.models import load_model
from logquant.search import Search, SearchError, run_search


@pytest.fixture(scope="module")
def small_search(fashion):
    model = load_model("refcnn")
    val = fashion.val.subset(torch.arange(500))
    float_val = evaluate(model, val, 500).top1
    search = Search(model, fashion.val.batches(250), val, "energy", num_batches=2,
                    batch_size=500, bits=(4, 8))
    return search, float_val


def test_search_lowers_the_objective_within_the_budget(small_search):
    search, float_val = small_search
    result = run_search(search, 1.0, float_val, sensitivity_size=300, max_evals=8)
    assert result.met_budget
    assert result.val_top1 >= float_val - 1.0
    start = result.steps[0]
    assert result.objective < start.objective
    accepted = [s.objective for s in result.steps if s.accepted]
    assert accepted == sorted(accepted, reverse=True)  # every accepted move saves
    assert result.objective == pytest.approx(search.objective(result.config))
    assert search.fits_engine(result.config)
    # the validation accuracy reported is the configuration's, re-measured
    assert search.accuracy(result.config, search.val) == pytest.approx(result.val_top1)


def test_unreachable_budget_returns_the_most_accurate_configuration_labelled(small_search):
    search, _ = small_search
    result = run_search(search, 0.0, 100.0, sensitivity_size=100, max_evals=3)
    assert not result.met_budget
    assert result.val_top1 == max(s.val_top1 for s in result.steps)


def test_bad_budgets_objectives_and_models_are_refused(small_search, fashion):
    search, float_val = small_search
    for budget in (-0.5, float("nan")):
        with pytest.raises(SearchError, match="budget"):
            run_search(search, budget, float_val)
    with pytest.raises(SearchError, match="objective"):
        Search(load_model("refcnn"), fashion.val.batches(250), search.val, "latency")
    with pytest.raises(SearchError, match="2..8"):
        Search(load_model("refcnn"), fashion.val.batches(250), search.val, "bits", bits=(1,))
    no_layers = nn.Sequential(nn.Flatten(), nn.ReLU())
    with pytest.raises(LogquantError, match="no conv or linear layers"):
        Search(no_layers, fashion.val.batches(250), search.val, "bits")


def test_bits_objective_counts_weight_and_activation_bits(small_search):
    search, _ = small_search
    from logquant.config import QuantConfig

    search.objective_name = "bits"
    try:
        lin8 = search.objective(QuantConfig(conv_weights="lin8", fc_weights="lin8",
                                            acts="lin8"))
        log4 = search.objective(QuantConfig(conv_weights="log4", fc_weights="log4",
                                            acts="log4"))
    finally:
        search.objective_name = "energy"
    weights = sum(s.weights for s in search.shapes.values())
    inputs = sum(s.inputs for s in search.shapes.values())
    assert lin8 == 8 * weights + 8 * inputs
    first = search.shapes[search.first].inputs  # the first layer reads 8-bit pixels
    assert log4 == 4 * weights + 4 * (inputs - first) + 8 * first


def test_search_command_writes_a_config_every_command_takes(capsys, fashion, tmp_path):
    out = tmp_path / "search"
    code = main(["search", "--out", str(out), "--val-size", "300", "--sensitivity-size",
                 "100", "--max-evals", "3", "--bits", "4", "--objective", "bits",
                 "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    summary = json.loads((out / "search.json").read_text())
    assert summary["objective_name"] == "bits" and 0 < summary["test_top1"] <= 100
    names = {r["name"] for r in summary["references"]}
    assert {"log3/log3", "lin8/lin8", "PyTorch int8 PTQ"} <= names
    assert (out / "pareto.png").stat().st_size > 10_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["search"]  # staged, swapped whole
    assert sorted(os.listdir(out)) == [".logquant.lock", "config.json", "pareto.png",
                                       "search.json"]
    sweep_like = tmp_path / "sweep_like"  # logquant's, but not search results: refused early
    sweep_like.mkdir()
    (sweep_like / ".logquant.lock").touch()
    (sweep_like / "sweep.csv").write_text("rows")
    code = main(["search", "--out", str(sweep_like), "--max-evals", "1", "--no-progress"])
    assert code == 2 and "not logquant search results" in capsys.readouterr().err
    assert sorted(os.listdir(sweep_like)) == [".logquant.lock", "sweep.csv"]
    config = str(out / "config.json")
    assert main(["eval", "--config", config, "--calib-batches", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["overrides"]
    assert main(["cost", "--config", config, "--calib-batches", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total"]["macs"] > 0
    assert main(["export", "--config", config, "--calib-batches", "1", "--out",
                 str(tmp_path / "s.lqz")]) == 0
    capsys.readouterr()
    assert main(["run", str(tmp_path / "s.lqz"), "--limit", "100", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] > 50


@pytest.mark.parametrize("argv,message", [
    (["search", "--budget", "-1", "--out", "x"], "non-negative"),
    (["search", "--objective", "latency", "--out", "x"], "invalid choice"),
    (["search", "--bits", "1,2", "--out", "{tmp}/s"], "2..8"),
])
def test_search_errors_are_one_line(capsys, fashion, tmp_path, argv, message):
    code = main([a.format(tmp=tmp_path) for a in argv])
    _, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1 and message in err, err


@pytest.mark.slow
def test_default_search_on_the_reference_model(capsys, fashion, tmp_path):
    """The documented command: within 0.5 points of float on validation, and cheaper than
    every reference configuration that is at least as accurate."""
    code = main(["search", "--out", str(tmp_path / "s"), "--no-progress"])
    capsys.readouterr()
    assert code == 0
    summary = json.loads((tmp_path / "s" / "search.json").read_text())
    assert summary["met_budget"]
    assert summary["val_top1"] >= summary["float_val_top1"] - 0.5
    assert summary["beats_every_reference_at_least_as_accurate"]
