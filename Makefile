# make demo: the main job (the paper's experiments on the reference model: REPORT.md)
# make test: lint + every test, the slow end-to-end ones included (what CI runs)
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-fast lint bench

setup:
	bash scripts/setup.sh

demo: setup
	$(VENV)/bin/logquant reproduce --out runs/reproduce

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks scripts

test-fast: setup
	$(PY) -m pytest -q

test: lint
	$(PY) -m pytest -q -m "slow or not slow" --durations=25

bench: setup
	$(PY) benchmarks/bench_formats.py
