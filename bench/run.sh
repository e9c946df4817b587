#!/usr/bin/env bash
# Every benchmark in one command; each prints its table and writes bench/results/<name>.json.
#   usage: bash bench/run.sh [--quick]     (--quick: the session and divergence benchmarks on --day0-limit 40, not
#                                           the full demo, and the statistics simulations with fewer repetitions)
# Uses .venv/bin/python when present (scripts/bootstrap.sh makes it), else `python` on PATH.
# A benchmark that fails is reported and the others still run; the exit status is 1 if any failed.
set -u
cd "$(dirname "$0")/.."
PY=python
[ -x .venv/bin/python ] && PY=.venv/bin/python
QUICK=0
[ "${1:-}" = "--quick" ] && QUICK=1
CLUSTER_ENV=${SLURM_CI_BASE:-/tmp/day0-cluster}/cluster.env
failed=()

banner() { printf '\n=== %s (%s) ===\n' "$1" "$(date -u +%H:%M:%SZ)"; }
run() {  # name, command...
  local name=$1; shift
  if ! "$@"; then failed+=("$name"); echo "[bench] $name FAILED"; fi
}

echo "[bench] python: $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])'))"
echo "[bench] machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc) cpus," \
     "$(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo) RAM, load average $(cut -d' ' -f1-3 /proc/loadavg)"

banner "checkpoint gate: header-only inspection vs safetensors (local + SFTP)"
if [ -f "$CLUSTER_ENV" ]; then
  run checkpoint_gate "$PY" bench/bench_checkpoint_gate.py --sftp on
else
  echo "[bench] SFTP variant skipped: no loopback cluster ($CLUSTER_ENV; start it with tests/cluster/start-cluster.sh)"
  run checkpoint_gate "$PY" bench/bench_checkpoint_gate.py --sftp off
fi

banner "session: cached re-run vs first run, plugin overhead"
if [ "$QUICK" = 1 ]; then
  run session "$PY" bench/bench_session.py --limit 40
else
  run session "$PY" bench/bench_session.py
fi

banner "plugin idle: an unrelated session with and without pytest-day0"
run plugin_idle "$PY" bench/bench_plugin_idle.py

banner "scorer vs lm-eval-harness local-completions"
if [ -f bench/install-lm-eval.sh ] && [ -f bench/bench_scorer_vs_lm_eval.py ]; then
  if bash bench/install-lm-eval.sh "$PY"; then
    run scorer_vs_lm_eval "$PY" bench/bench_scorer_vs_lm_eval.py
    banner "lm-eval engine vs the lm-eval CLI by hand (the engine's index: included folders, then lm-eval's full one)"
    run lm_eval_engine "$PY" bench/bench_lm_eval_engine.py
    run lm_eval_engine_full_index "$PY" bench/bench_lm_eval_engine.py --full-index \
      --out bench/results/lm_eval_engine_full_index.json
  else
    failed+=(install-lm-eval); echo "[bench] bench/install-lm-eval.sh FAILED: scorer vs lm-eval not run"
  fi
else
  echo "[bench] scorer vs lm-eval: missing (bench/install-lm-eval.sh or bench/bench_scorer_vs_lm_eval.py)"
fi

banner "divergence pre-check vs the full evaluation: rank correlation with flip rates, time share"
if [ "$QUICK" = 1 ]; then
  run divergence "$PY" bench/bench_divergence.py --limit 40 --calib-size 16
else
  run divergence "$PY" bench/bench_divergence.py
fi

banner "statistics: fixed-n error rates, adaptive vs fixed-n items, session-level control (simulations)"
if [ "$QUICK" = 1 ]; then
  run sim_fixed_n "$PY" bench/sim_fixed_n.py --quick
  run sim_adaptive "$PY" bench/sim_adaptive.py --quick
  run sim_family "$PY" bench/sim_family.py --quick
else
  run sim_fixed_n "$PY" bench/sim_fixed_n.py
  run sim_adaptive "$PY" bench/sim_adaptive.py
  run sim_family "$PY" bench/sim_family.py
fi

banner "report.html with 100,000 flipped items: size, write time, time until Chromium shows it"
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  run report_html "$PY" bench/bench_report_html.py --items 100000
else
  run report_html "$PY" bench/bench_report_html.py --items 100000 --no-browser
  echo "[bench] report_html: no chromium/chromedriver (scripts/install-browser.sh): browser timings not measured"
fi

banner "done"
ls -1 bench/results/*.json 2>/dev/null | sed 's/^/[bench] wrote /'
if [ ${#failed[@]} -gt 0 ]; then
  echo "[bench] failed: ${failed[*]}"
  exit 1
fi
