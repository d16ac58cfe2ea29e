# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when it is
# missing and install the pinned dependencies with one `pip install -e ".[dev]"`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast bench clean-demo help

help:
	@echo "make demo       run the whole pipeline on the embedded synthetic cohort"
	@echo "make test       the full CPU test suite (what CI runs)"
	@echo "make test-fast  skip tests marked ray/slow"
	@echo "make bench      benchmarks -> benchmarks/results (JSON + PNG)"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) jobs/pipeline.py --config configs/demo.yaml

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not ray and not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m pgasr.demo --config configs/bench.yaml --bench
