#!/usr/bin/env bash
# Create .venv and install pytest-day0 with its CPU engines, MLflow's client and the test tools. Idempotent: once
# done, a second call only checks (about a second); a changed pyproject.toml installs again.
#   PYTHON            the interpreter that creates .venv (default: python3, >= 3.11)
#   DAY0_TORCH_INDEX  where the CPU build of torch comes from (default: PyTorch's CPU index; empty: pip's own
#                     configuration only)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH="torch==2.13.0"
TORCH_INDEX=${DAY0_TORCH_INDEX-https://download.pytorch.org/whl/cpu}
say() { echo "[bootstrap] $*"; }

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
# What was installed, keyed by what decides it; the import check is not enough: `import pytest_day0` succeeds from
# this directory without any install, and a dependency added to pyproject.toml would never be installed.
stamp="$TORCH $(sha256sum pyproject.toml | cut -d' ' -f1)"
# Installed distributions are read from their metadata, not imported (importing torch + modelopt takes seconds).
if [ "$(cat .venv/.day0-bootstrap 2>/dev/null)" = "$stamp" ] && python -c "import importlib.metadata as m
for d in ('pytest-day0', 'torch', 'nvidia-modelopt', 'transformers', 'pytest-xdist', 'pytest-json-report', 'lm-eval'):
    m.version(d)" 2>/dev/null; then
  exit 0
fi
python -m pip install -q --upgrade pip
# torch first, pinned, from its CPU build: PyPI's Linux wheel of the same version is the CUDA build (~530 MB plus
# several GB of nvidia-* wheels). The CPU index's "2.13.0+cpu" is a higher version than PyPI's "2.13.0", so pip
# takes it when both are reachable; without that index, whatever pip's configuration offers.
torch_from=()
if [ -n "$TORCH_INDEX" ]; then
  if python - "$TORCH_INDEX" 2>/dev/null <<'EOF'
import sys, urllib.request
urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=10)
EOF
  then
    torch_from=(--extra-index-url "$TORCH_INDEX")
  else
    say "$TORCH_INDEX does not answer: $TORCH from pip's configured index (on plain PyPI that is the CUDA build)"
  fi
fi
python -m pip install -q "$TORCH" "${torch_from[@]}"
# lm-eval: the lm-eval engine (--day0-eval lm-eval) and its tests; its pins leave torch and transformers alone.
python -m pip install -q -e ".[local,dev,lm-eval,mlflow]"
python -c "import torch; print(f'[bootstrap] torch {torch.__version__}, CUDA build: {torch.version.cuda or \"no\"}')"
echo "$stamp" > .venv/.day0-bootstrap
