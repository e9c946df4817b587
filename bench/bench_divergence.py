"""The divergence pre-check against the full evaluation, on checkpoints of the demo model (issue 15 item 6).

For each checkpoint — real ModelOpt recipes of the shipped demo model, and copies of its fp8 export with weight
scales multiplied by graded factors (wrong dequantized weights, as ``tests/test_plugin_release.py`` damages them) —
the release chain (``release/chain.py``, the reference server, the scorer) measures:

  pre-check   ``ReleaseChain.divergence_check``: both sides' top-k logprobs on the text set (the defaults: 32 texts
              of the tasks, top-20), mean token KL and top-1 agreement; its time is the wall time of the candidate's
              requests (the baseline's are made once per session and shown apart)
  evaluation  every task, every sample (the full demo: 300 x 3), on the candidate: wall time of
              ``ReleaseChain.evaluation``; then ``ReleaseChain.comparison`` per task gives the flips (items lost or
              gained, graded values by at least 0.5): flip rate = flipped / paired items, over all tasks

Servers are started before either is timed (both need them). Then: Spearman's rank correlation (scipy) of the flip
rates with the mean KL and with 1 - agreement, over all checkpoints, and the pre-check's time as a share of the
evaluation's, per checkpoint and in total. The pre-check's catastrophic floor is off here (``divergence_floor=0``):
the broken checkpoints must be evaluated too, to have a flip rate.

Re-runnable: the workspace (default bench/results/divergence-ws) keeps the PTQ exports between runs; records and
logprobs are deleted at the start, so every run measures both again. Works on whatever demo model is shipped.

Run: python bench/bench_divergence.py [--limit N] [--recipes fp8,int4_awq,...] [--calib-size N]
Prints a table and writes bench/results/divergence.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pytest_day0.config import RunConfig  # noqa: E402
from pytest_day0.gates.divergence import divergence_stats  # noqa: E402
from pytest_day0.release.chain import BASELINE, ReleaseChain  # noqa: E402

REAL = ("fp8", "int8_smoothquant", "int4_awq", "w4a8_awq_beta", "nvfp4")
# name -> {tensor: factor} applied to the fp8 export: graded severity, from a nudge of one layer to every layer
DAMAGE: dict[str, dict[str, float]] = {
    "fp8 L0.down x1.25": {"model.layers.0.mlp.down_proj.weight_scale": 1.25},
    "fp8 L0.down x1.5": {"model.layers.0.mlp.down_proj.weight_scale": 1.5},
    "fp8 L0.down x2.5": {"model.layers.0.mlp.down_proj.weight_scale": 2.5},
    "fp8 L0.down x4": {"model.layers.0.mlp.down_proj.weight_scale": 4.0},
    "fp8 L1.o x4": {"model.layers.1.self_attn.o_proj.weight_scale": 4.0},
    "fp8 all down x2": {f"model.layers.{i}.mlp.down_proj.weight_scale": 2.0 for i in range(4)},
    "fp8 all down x4": {f"model.layers.{i}.mlp.down_proj.weight_scale": 4.0 for i in range(4)},
    "fp8 all linear x8": {f"model.layers.{i}.{m}.weight_scale": 8.0 for i in range(4) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")},
}


def damaged_copy(source: Path, target: Path, factors: dict[str, float]) -> Path:
    """The fp8 export with some weight scales multiplied (safetensors, real files)."""
    from safetensors.torch import load_file, save_file

    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
    tensors = load_file(target / "model.safetensors")
    for name, factor in factors.items():
        if name not in tensors:
            raise SystemExit(f"{name} is not in {source}: the demo model changed shape, update DAMAGE")
        tensors[name] = tensors[name] * factor
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


def config(ws: Path, recipe: str, args: argparse.Namespace, **extra: Any) -> RunConfig:
    return RunConfig(model="demo", recipes=(recipe,), workdir=ws, calib_size=args.calib_size, limit=args.limit,
                     divergence_floor=0.0, divergence_texts=args.texts, divergence_top_k=args.top_k, **extra)


def measure(chain: ReleaseChain, side: str, label: str, first: bool) -> dict[str, Any]:
    tasks = [t.name for t in chain.tasks()]
    chain.deploy(BASELINE)
    chain.deploy(side)  # both servers up before anything is timed
    row: dict[str, Any] = {"checkpoint": label}
    if first:  # the baseline's own cost, once: its logprobs and its evaluation serve every candidate
        row["baseline_precheck_s"] = chain.divergence_logprobs(BASELINE).seconds
        started = time.perf_counter()
        for task in tasks:
            chain.evaluation(BASELINE, task)
        row["baseline_eval_s"] = time.perf_counter() - started
    started = time.perf_counter()
    check = chain.divergence_check(side)
    row["precheck_call_s"] = time.perf_counter() - started
    assert check.stats is not None, check.message
    row["_logprobs"] = (chain.divergence_logprobs(BASELINE).texts, chain.divergence_logprobs(side).texts)
    row.update(kl=check.stats.mean_kl, max_kl=check.stats.max_kl, agreement=check.stats.agreement,
               positions=check.stats.positions, texts=check.stats.texts, precheck_s=check.seconds,
               precheck_class=str(check.failure_class or "PASS"))
    started = time.perf_counter()
    for task in tasks:
        chain.evaluation(side, task)
    row["eval_s"] = time.perf_counter() - started
    flipped = paired = 0
    per_task: dict[str, Any] = {}
    for task in tasks:
        comparison = chain.comparison(side, task)
        assert comparison.flips is not None
        flipped += len(comparison.flips.lost) + len(comparison.flips.gained)
        paired += comparison.flips.n
        per_task[task] = {"baseline": comparison.baseline, "candidate": comparison.candidate,
                          "flips": comparison.flips.describe()}
    row.update(flipped=flipped, paired=paired, flip_rate=flipped / paired if paired else 0.0, tasks=per_task,
               share=row["precheck_s"] / row["eval_s"] if row["eval_s"] else None)
    return row


def brief(row: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in row.items() if k not in ("tasks", "_logprobs")}, default=str)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / "results" / "divergence-ws")
    parser.add_argument("--recipes", default=",".join(REAL))
    parser.add_argument("--limit", type=int, default=None, help="--day0-limit: samples per task (default all)")
    parser.add_argument("--calib-size", type=int, default=64)
    defaults = RunConfig.model_fields
    parser.add_argument("--texts", type=int, default=defaults["divergence_texts"].default)
    parser.add_argument("--top-k", type=int, default=defaults["divergence_top_k"].default)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "divergence.json")
    args = parser.parse_args()

    from scipy.stats import spearmanr

    ws: Path = args.workdir
    load_before = os.getloadavg()
    for measured in ("evals", "divergence", "deploy", "runs", "servers"):
        shutil.rmtree(ws / measured, ignore_errors=True)
    recipes = [r for r in args.recipes.split(",") if r]
    rows: list[dict[str, Any]] = []
    stamp = int(time.time())
    fp8_export: Path | None = None
    plan: list[tuple[str, RunConfig, str]] = [(r, config(ws, r, args), r) for r in recipes]
    for i, (label, cfg, side) in enumerate(plan):
        chain = ReleaseChain(cfg, f"bench-div-{stamp}-{i}", progress=lambda line: print(line, flush=True))
        try:
            started = time.perf_counter()
            result = chain.quantized(side)
            print(f"[bench] PTQ {side}: {time.perf_counter() - started:.1f}s ({'reused' if result.reused else 'made'})")
            if side == "fp8":
                fp8_export = Path(result.checkpoint)
            rows.append(measure(chain, side, label, first=i == 0))
            print(f"[bench] {brief(rows[-1])}", flush=True)
        finally:
            chain.stop_servers()
            chain.close()
    if fp8_export is None:
        raise SystemExit("the damaged checkpoints are copies of the fp8 export: include fp8 in --recipes")
    for j, (label, factors) in enumerate(DAMAGE.items()):
        path = damaged_copy(fp8_export, ws / "damaged" / label.replace(" ", "_"), factors)
        cfg = config(ws, "fp8", args, quantize="existing", checkpoint=path)
        chain = ReleaseChain(cfg, f"bench-div-{stamp}-d{j}", progress=lambda line: print(line, flush=True))
        try:
            rows.append(measure(chain, "fp8", label, first=False))
            print(f"[bench] {brief(rows[-1])}", flush=True)
        finally:
            chain.stop_servers()
            chain.close()

    flips = [r["flip_rate"] for r in rows]
    rho_kl = float(spearmanr([r["kl"] for r in rows], flips).statistic)
    rho_agree = float(spearmanr([1 - r["agreement"] for r in rows], flips).statistic)
    # fewer texts: the first n of the same set (text_set is a prefix-stable order), from the logprobs measured
    by_texts: dict[int, dict[str, float]] = {}
    for n in sorted({8, 16, args.texts // 2, args.texts} - {0}):
        stats = [divergence_stats(r["_logprobs"][0][:n], r["_logprobs"][1][:n], args.top_k) for r in rows]
        by_texts[n] = {"positions": stats[0].positions,
                       "spearman_kl": float(spearmanr([s.mean_kl for s in stats], flips).statistic),
                       "spearman_disagreement": float(spearmanr([1 - s.agreement for s in stats], flips).statistic)}
    for r in rows:
        del r["_logprobs"]
    total_pre = sum(r["precheck_s"] for r in rows) + rows[0]["baseline_precheck_s"]
    total_eval = sum(r["eval_s"] for r in rows) + rows[0]["baseline_eval_s"]
    summary = {"spearman_kl_vs_flip_rate": rho_kl, "spearman_disagreement_vs_flip_rate": rho_agree,
               "precheck_total_s": total_pre, "eval_total_s": total_eval, "precheck_share": total_pre / total_eval,
               "largest_share": max(r["share"] for r in rows), "by_texts": by_texts,
               "load_before": load_before, "load_after": os.getloadavg()}
    print()
    print("| checkpoint | mean KL (nats) | top-1 agreement | flip rate | flipped / items | pre-check s | "
          "evaluation s | share | pre-check class |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['checkpoint']} | {r['kl']:.4f} | {r['agreement']:.1%} | {r['flip_rate']:.1%} | "
              f"{r['flipped']} / {r['paired']} | {r['precheck_s']:.2f} | {r['eval_s']:.2f} | {r['share']:.1%} | "
              f"{r['precheck_class']} |")
    print(f"| baseline (once) | | | | | {rows[0]['baseline_precheck_s']:.2f} | {rows[0]['baseline_eval_s']:.2f} | "
          f"{rows[0]['baseline_precheck_s'] / rows[0]['baseline_eval_s']:.1%} | |")
    print()
    print(f"Spearman(mean KL, flip rate) = {rho_kl:.3f}; Spearman(1 - agreement, flip rate) = {rho_agree:.3f}; "
          f"pre-check {total_pre:.2f} s of {total_eval:.2f} s evaluation ({summary['precheck_share']:.1%}), largest "
          f"per checkpoint {summary['largest_share']:.1%}; load average {load_before[0]:.1f} -> "
          f"{summary['load_after'][0]:.1f}")
    for n, values in by_texts.items():
        print(f"first {n} texts ({values['positions']} positions): Spearman KL {values['spearman_kl']:.3f}, "
              f"1 - agreement {values['spearman_disagreement']:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "load": os.getloadavg()}, "args": {k: str(v) for k, v in vars(args).items()},
        "rows": rows, "summary": summary}, indent=2, default=str) + "\n")
    print(f"[bench] wrote {args.out}")


if __name__ == "__main__":
    main()
