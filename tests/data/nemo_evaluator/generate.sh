#!/usr/bin/env bash
# Regenerate the NeMo Evaluator fixtures next to this script: four real `nel eval run` outputs of the demo model
# (served by the reference server on 127.0.0.1) on the demo's gsm_like task as a bring-your-own benchmark.
# Needs a Python 3.12 environment with nemo-evaluator 0.3.0 and scipy (its pass@k confidence intervals import it):
#   python3.12 -m venv /tmp/nemo_venv && /tmp/nemo_venv/bin/pip install nemo-evaluator==0.3.0 scipy
# Usage: tests/data/nemo_evaluator/generate.sh [NEL]   (NEL defaults to /tmp/nemo_venv/bin/nel)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
nel="${1:-/tmp/nemo_venv/bin/nel}"
python="${PYTHON:-$root/.venv/bin/python}"
[ -x "$python" ] || python=python
work="$(mktemp -d)"
export XDG_DATA_HOME="$work/xdg" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
PYTHONPATH="$root" "$python" -m pytest_day0.serving.reference_server --checkpoint "$root/pytest_day0/demo/model" \
  --served-model-name demo --host 127.0.0.1 --port 0 --ready-file "$work/ready.json" >"$work/server.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 120); do [ -s "$work/ready.json" ] && break; sleep 1; done
url="$("$python" -c 'import json,sys; print(json.load(open(sys.argv[1]))["url"])' "$work/ready.json")/v1"
run() {  # NAME REPEATS MAX_TOKENS [PROBLEMS [URL]]
  "$nel" eval run --bench "$here/demo_gsm_like_bench.py" --model-url "${5:-$url}" --model-id demo --repeats "$2" \
    --max-problems "${4:-60}" --max-tokens "$3" --temperature 0 -o "$work/$1" >"$work/$1.log" 2>&1
  rm -rf "$here/$1" && mkdir -p "$here/$1"
  # what `nel compare` reads: the bundle and the per-sample results (logs, traces and traffic are left out)
  cp "$work/$1"/demo_gsm_like/eval-*.json "$work/$1"/demo_gsm_like/results.jsonl "$here/$1/"
}
run base 2 6       # the baseline: two repeats per problem
run rerun 2 6      # the same model and settings again: no answer changes
run truncated 2 2  # the same model with answers cut to 2 tokens: every 3-digit sum is lost
run once 1 6       # one repeat per problem: cannot be paired with two
# nothing listens on port 9: nel retries, then grades each problem 0.0 with scoring_details.error_category infra_error
run unreachable 1 6 3 http://127.0.0.1:9/v1
chmod 644 "$here"/*/*
# nel's own paired comparison of two of them, to check our pairing against (exit status 1: its verdict is BLOCK)
"$nel" compare "$here/base" "$here/truncated" --no-report -o "$here/nel_compare_base_truncated.json" \
  >"$work/compare.log" 2>&1 || true
[ -s "$here/nel_compare_base_truncated.json" ] || { cat "$work/compare.log"; exit 1; }
echo "written under $here"
