#!/usr/bin/env bash
# Install lm-eval-harness (the peer of bench/bench_scorer_vs_lm_eval.py) into an existing python environment
# without moving its torch or transformers: both are pinned through a constraints file built from what is
# installed, so pip's resolver can add lm-eval's own dependencies (datasets, evaluate, pandas, ...) but never
# swap the CPU torch for a multi-GB CUDA build or move transformers under ModelOpt.
# Idempotent: a second call only checks and prints the versions.
#   usage: bash bench/install-lm-eval.sh [PYTHON]      (default: .venv/bin/python, else python3)
#   LM_EVAL_VERSION   the lm-eval release (default 0.4.13: the newest on PyPI, works with transformers 5.x)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
LM_EVAL_VERSION=${LM_EVAL_VERSION:-0.4.13}

versions() {
  "$PY" - <<'EOF'
import importlib.metadata as md
for name in ("lm_eval", "torch", "transformers", "datasets"):
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} not installed")
EOF
}

ready() {
  "$PY" - "$LM_EVAL_VERSION" 2>/dev/null <<'EOF'
import importlib.metadata as md, sys
if md.version("lm_eval") != sys.argv[1]:
    sys.exit(1)
import lm_eval.models.openai_completions  # noqa: F401  the local-completions backend and its extras (aiohttp, tenacity)
import datasets  # noqa: F401
EOF
}

if ready; then
  echo "lm-eval ready in $PY"
  versions
  exit 0
fi

before=$("$PY" -c "import importlib.metadata as md; print(md.version('torch'), md.version('transformers'))")
read -r TORCH_V TRANSFORMERS_V <<<"$before"
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
printf 'torch==%s\ntransformers==%s\n' "${TORCH_V%%+*}" "$TRANSFORMERS_V" >"$constraints"
"$PY" -m pip install -q -c "$constraints" "lm-eval[api]==$LM_EVAL_VERSION"

after=$("$PY" -c "import importlib.metadata as md; print(md.version('torch'), md.version('transformers'))")
if [ "$before" != "$after" ]; then
  echo "install-lm-eval: torch/transformers moved: $before -> $after" >&2
  exit 1
fi
ready || { echo "install-lm-eval: lm-eval $LM_EVAL_VERSION does not import in $PY" >&2; exit 1; }
versions
