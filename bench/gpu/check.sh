#!/usr/bin/env bash
# The GPU proof in one command: build, pytest -m gpu, compute-sanitizer, the benchmark sweep.
#   bash bench/gpu/check.sh RESULTS_DIR [--budget 480] [--dry-run] [--steps a,b] [--cap STEP=S] [--commit SHA]
# All logic is in bench/gpu/gpucheck.py (standard library only, so it reports even
# when torch is broken); this picks the interpreter: $PYTHON, else python3, else python.
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
exec "$PY" "$ROOT/bench/gpu/gpucheck.py" "$@"
