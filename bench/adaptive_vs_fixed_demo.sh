#!/usr/bin/env bash
# Fixed n vs --day0-adaptive on the demo at full size: per checkpoint two fresh workspaces, the same existing fp8
# export (PTQ not counted); prints items per side, wall and the verdict of each. bench/RESULTS.md has the figures.
#   bash bench/adaptive_vs_fixed_demo.sh FP8_EXPORT_DIR      (an fp8 export of the demo: any session's checkpoints/fp8-*)
# Besides the export it measures two damaged copies of it (weight scales multiplied, as the tests damage them).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
src=${1:?an fp8 export of the demo}
out=$(mktemp -d)
child=""
trap 'rm -rf "$out"' EXIT
# SIGTERM/SIGINT reach the session too (it stops its servers), then the script ends: nothing is left running
trap 'if [ -n "$child" ]; then kill -TERM "$child" 2>/dev/null; wait "$child"; fi; exit 143' TERM INT
damage() {  # damage NAME TENSOR FACTOR
  cp -r "$src" "$out/$1"
  "$PY" -c "import sys; from safetensors.torch import load_file, save_file
p = sys.argv[1] + '/model.safetensors'; t = load_file(p); t[sys.argv[2]] = t[sys.argv[2]] * float(sys.argv[3])
save_file(t, p, metadata={'format': 'pt'})" "$out/$1" "$2" "$3"
}
damage moderate model.layers.0.mlp.down_proj.weight_scale 2.5
damage heavy model.layers.1.self_attn.o_proj.weight_scale 4.0
for ck in "$src" "$out/moderate" "$out/heavy"; do
  for mode in fixed adaptive; do
    ws="$out/ws-$(basename "$ck")-$mode"
    flag=(); [ "$mode" = adaptive ] && flag=(--day0-adaptive)
    start=$(date +%s.%N)
    rc=0
    "$PY" -m pytest -p no:cacheprovider -q --day0-model demo --recipe fp8 --day0-quantize=existing \
      "--day0-checkpoint=$ck" "--day0-workdir=$ws" "${flag[@]}" > "$ws.log" 2>&1 &
    child=$!
    wait "$child" || rc=$?
    child=""
    wall=$(echo "$(date +%s.%N) - $start" | bc)
    items=$("$PY" -c "import sys, pathlib
n = {}
for p in pathlib.Path(sys.argv[1], 'evals').rglob('*.jsonl'):
    n[p.parent.name.split('-')[0]] = n.get(p.parent.name.split('-')[0], 0) + sum(1 for _ in open(p))
print(n)" "$ws")
    printf '%-10s %-8s rc=%s wall=%6.1fs items=%s %s\n' "$(basename "$ck")" "$mode" "$rc" "$wall" "$items" \
      "$(grep -m1 '^VERDICT' "$ws.log")"
  done
done
