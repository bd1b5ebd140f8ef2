# The two commands a new user runs on a fresh machine (see README.md).
#   make demo   set up .venv and run the main job: the demo experiment end to end (runs/demo)
#   make test   set up .venv and run the test suite (offline, CPU)
PYTHON ?= python3
VENV   ?= .venv
# Test processes: XLA compiles one at a time per process, so two keep two cores busy. Tests of a
# file stay in one process (--dist loadfile), sharing its fixtures and compiled shapes.
TEST_WORKERS ?= 2
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck bench-divergence clean

# Re-install whenever pyproject.toml changes, so the environment follows the project's own files.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/taskpgm run experiments/configs/demo.yaml --run-dir runs/demo

bench-divergence: $(STAMP)
	$(PY) benchmarks/divergence.py --json divergence_bench.json

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# Static type check of the package and of tests/typing (settings in pyproject.toml's [tool.mypy]).
typecheck: $(STAMP)
	$(PY) -m mypy

# Lint (settings in pyproject.toml's [tool.ruff]) and the type check.
lint: typecheck
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .mypy_cache
