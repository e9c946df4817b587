#!/usr/bin/env bash
# Install an MLflow tracking server (the full `mlflow` package: server, UI, SQLAlchemy store) into its own venv.
# Not in .venv: mlflow 3.17.2 pins pyarrow < 26 (ModelOpt's environment has 26) and brings ~45 packages (Flask,
# gunicorn, matplotlib, scikit-learn, scipy); the plugin itself needs only the client, mlflow-skinny (the [mlflow]
# extra). The MLflow tests start this server on 127.0.0.1 (SQLite backend, local artifact root); a person can too:
#   .venv-mlflow/bin/mlflow server --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///mlflow.db
# Idempotent: a second call only checks (about a second).
#   DAY0_MLFLOW_VENV  target venv (default: .venv-mlflow in the project)
#   PYTHON            the interpreter that creates it (default: python3)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${DAY0_MLFLOW_VENV:-.venv-mlflow}
PY=${PYTHON:-python3}
MLFLOW="mlflow==3.17.2"  # the same version as the client pinned in pyproject.toml's [mlflow] extra

if [ -x "$VENV/bin/mlflow" ] && [ "$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("mlflow"))' 2>/dev/null)" = "${MLFLOW#mlflow==}" ]; then
  exit 0
fi
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "$MLFLOW"
echo "[install-mlflow] $("$VENV/bin/mlflow" --version) in $VENV"
