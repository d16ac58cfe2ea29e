#!/usr/bin/env bash
# The GPU check (issue #18): run on a lent GPU machine from the repository root, <= 8 min.
# Sets up .venv like `make` does when it is missing, then runs benchmarks/gpu_check.py, which
# writes benchmarks/results/gpu.json (copy it back with the device tool's $OUT).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
if [ ! -x "$PY" ]; then
  python3 -m venv .venv
  "$PY" -m pip install -q -e ".[dev]"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
exec timeout 480 "$PY" benchmarks/gpu_check.py "$@"
