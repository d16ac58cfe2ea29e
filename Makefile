# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when it is
# missing and install the locked dependencies with one pip command (`pip install -c
# requirements.lock -e ".[serve]"` for the demo and the service, `".[dev]"` for the tests:
# requirements.lock holds the exact versions, pyproject.toml the ranges); `make test`
# also installs Debian's chromium + chromium-driver for the headless-browser test of the web
# viewer when they are missing (as root with apt-get, as in CI; otherwise it prints a note).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
LOCK := requirements.lock
RUNTIME_STAMP := $(VENV)/.installed-runtime
STAMP := $(VENV)/.installed-dev
PYTEST_ARGS ?=

CHROMIUM := /usr/bin/chromium
CHROMEDRIVER := /usr/bin/chromedriver

.PHONY: setup browser demo serve-demo test test-fast bench lock clean-demo help

help:
	@echo "make demo       run the whole pipeline on the embedded synthetic cohort"
	@echo "make serve-demo serve the model make demo trained on http://127.0.0.1:8000"
	@echo "make test       the full CPU test suite (what CI runs)"
	@echo "make test-fast  skip tests marked ray/slow"
	@echo "make bench      paper Tables 1-3 on CPU -> benchmarks/results/bench + docs/results.md"
	@echo "make lock       rewrite requirements.lock from the installed dev environment"

# runtime: the pipeline, the CLI and the service; dev adds the test tools (a superset)
$(RUNTIME_STAMP): pyproject.toml $(LOCK)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c $(LOCK) -e ".[serve]"
	@touch $(RUNTIME_STAMP)

$(STAMP): pyproject.toml $(LOCK)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c $(LOCK) -e ".[dev]"
	@touch $(STAMP) $(RUNTIME_STAMP)

# After changing the ranges in pyproject.toml: install the dev environment from the ranges
# alone, then record every installed version except this project's own.
lock:
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e ".[dev]"
	@{ echo "# pip constraints: the exact versions make installs (make lock rewrites this file)"; \
	   $(PY) -m pip list --format=freeze --exclude-editable | grep -v -E "^(pip|setuptools|wheel)=="; \
	 } > $(LOCK).tmp && mv $(LOCK).tmp $(LOCK)
	@touch $(STAMP) $(RUNTIME_STAMP)
	@echo "wrote $(LOCK) ($$(grep -c '==' $(LOCK)) packages)"

# Idempotent: nothing to do when both binaries exist. tests/test_serve.py's browser test fails
# under CI=true without them and is skipped (with this reason) elsewhere.
browser:
	@if [ -x $(CHROMIUM) ] && [ -x $(CHROMEDRIVER) ]; then \
	  :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing chromium + chromium-driver (Debian packages) for the viewer's browser test"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	else \
	  echo "NOTE: $(CHROMIUM) / $(CHROMEDRIVER) missing and not root with apt-get: the headless-browser"; \
	  echo "      test of the web viewer will be skipped (it fails under CI=true). As root:"; \
	  echo "      apt-get install -y chromium chromium-driver"; \
	fi

setup: $(STAMP) browser

demo: $(RUNTIME_STAMP)
	$(PY) jobs/pipeline.py --config configs/demo.yaml

# The model `make demo` leaves, over HTTP on 127.0.0.1:8000 (the web viewer at /). The API key
# comes from PGASR_API_KEYS (comma-separated); nothing is served without one.
serve-demo: $(RUNTIME_STAMP)
	@test -f runs/demo/stage2/meta.json || { echo "no demo model in runs/demo/stage2: run make demo first"; exit 2; }
	@test -n "$$PGASR_API_KEYS" || { echo "set an API key first: export PGASR_API_KEYS=\$$(openssl rand -hex 16)"; exit 2; }
	$(PY) -m serve.app --config configs/demo.yaml --set serve.checkpoint=runs/demo/stage2

test: $(STAMP) browser
	$(PY) -m pytest -q --durations=25 $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not ray and not slow" $(PYTEST_ARGS)

# Tables 1-3 + Figs. 1/4 vs the paper (pgasr/report.py): ~15 min per seed on 2 idle CPU cores
# measured with the residual CNN capped at 120 s; it now trains as long as PGASR's stages
# 1 + 2 of the full row (equal budget), which adds that time per seed and scale; writes
# benchmarks/results/bench/{results.json,*.png} and docs/results.md. BENCH_ARGS="--quick" for
# one seed and three rows; BENCH_ARGS="--render-only" re-renders the Markdown from the JSON.
BENCH_ARGS ?=
bench: $(RUNTIME_STAMP)
	$(PY) -m pgasr.report --config configs/bench.yaml $(BENCH_ARGS)
