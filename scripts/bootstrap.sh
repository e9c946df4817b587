#!/usr/bin/env bash
# Create .venv and install pytest-day0 with its CPU engines. Idempotent: a second call is a no-op check.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import pytest_day0, torch, modelopt, transformers, xdist, pytest_jsonreport, lm_eval, aiohttp" \
    2>/dev/null; then
  python -m pip install -q --upgrade pip
  # Pin torch first: the CPU build (a plain 'torch' would pull a multi-GB CUDA build).
  python -m pip install -q "torch==2.13.0"
  # lm-eval: the lm-eval engine (--day0-eval lm-eval) and its tests; its pins leave torch and transformers alone.
  python -m pip install -q -e ".[local,dev,lm-eval]"
fi
