"""Family-wise error of a session's REGRESSION verdicts over 10 tasks, per-task claims against Holm.

Each simulated session compares two models on 10 tasks (sizes 300-3000, agreement 50-99%, 0/1 or avg-of-4 items,
drawn per task). Two scenarios, both with no task truly regressed:

* identical models: delta = 0 on every task;
* drop = threshold on every task: delta = -1 point, the boundary where each task's REGRESSION claim is wrong
  most often.

A session is a *false REGRESSION verdict* when at least one task is declared REGRESSION. Counted for

* fixed-n: per task (each at 5%, no adjustment) and through ``family.family_decision`` (Holm on the tasks'
  ``p_regression``), the p-values of ``stats.one_sided_p`` in vectorised form;
* sequential: ``sequential.run_many`` per task, its anytime p-value at the stop, then Holm; and the variant where
  each task stops on REGRESSION only at ``family.per_task_confidence(10)`` (Bonferroni), so a per-task stop is
  already a family-wise claim.

Run: python bench/sim_family.py [--quick] [--sessions S]; writes bench/results/sim_family.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from simdata import clopper_pearson_upper, draw  # noqa: E402

from pytest_day0.gates import sequential as seq  # noqa: E402
from pytest_day0.gates.betting import log_threshold  # noqa: E402
from pytest_day0.gates.family import TaskEvidence, family_decision, per_task_confidence  # noqa: E402

TASKS = 10
THRESHOLD = 0.01
FLOOR = 0.10
SIZES = [300, 1000, 3000]
AGREEMENTS = [0.5, 0.7, 0.9, 0.95, 0.99]
KINDS = ["0/1", "avg-of-4"]


def fixed_p_regression(d: np.ndarray) -> np.ndarray:
    """The fixed-n rule's p_regression per row: 1 / the largest capital K-(threshold), 1 if the estimate is above."""
    limits = seq._Limits(THRESHOLD, FLOOR, 0.05, 0.95, 0.95)
    x = (d + 1) / 2
    paths = seq._Paths(x, x.shape[-1], limits)
    m = limits.m_threshold
    best = paths.best["regression"][..., -1]
    p: np.ndarray = np.where(paths.mean[..., -1] < m, np.exp(-best), 1.0)
    return p


def session_tasks(rng: np.random.Generator, sessions: int) -> list[tuple[str, float, int]]:
    """The 10 task settings of each session (kind, agreement, size), drawn once per session."""
    return [(str(rng.choice(KINDS)), float(rng.choice(AGREEMENTS)), int(rng.choice(SIZES)))
            for _ in range(sessions * TASKS)]


def run(rng: np.random.Generator, delta: float, sessions: int) -> dict[str, Any]:
    settings = session_tasks(rng, sessions)
    alpha = 0.05
    p_fixed = np.ones((sessions, TASKS))
    p_seq = np.ones((sessions, TASKS))
    seq_claim = np.zeros((sessions, TASKS), dtype=bool)
    p_bonf = np.ones((sessions, TASKS))
    bonf_claim = np.zeros((sessions, TASKS), dtype=bool)
    items_seq = items_bonf = items_fixed = 0
    strict = per_task_confidence(TASKS)
    # group equal settings so each draw is one vectorised call
    groups: dict[tuple[str, float, int], list[int]] = {}
    for index, setting in enumerate(settings):
        groups.setdefault(setting, []).append(index)
    for (kind, agreement, size), indices in groups.items():
        if abs(delta) > 1 - agreement:
            raise ValueError("infeasible setting")
        d = draw(rng, kind, len(indices), size, agreement, delta)
        rows, cols = np.divmod(np.array(indices), TASKS)
        p_fixed[rows, cols] = fixed_p_regression(d)
        schedule = seq.round_schedule(size)
        codes, used, p = seq.run_many(d, threshold=THRESHOLD, floor=FLOOR, task_size=size, schedule=schedule)
        p_seq[rows, cols] = p["regression"]
        seq_claim[rows, cols] = np.isin(codes, (seq.REGRESSION, seq.CATASTROPHIC))
        codes_b, used_b, p_b = seq.run_many(d, threshold=THRESHOLD, floor=FLOOR, task_size=size, schedule=schedule,
                                            regression_confidence=strict)
        p_bonf[rows, cols] = p_b["regression"]
        bonf_claim[rows, cols] = np.isin(codes_b, (seq.REGRESSION, seq.CATASTROPHIC))
        items_seq += int(used.sum())
        items_bonf += int(used_b.sum())
        items_fixed += size * len(indices)

    def holm_sessions(p: np.ndarray) -> np.ndarray:
        out = np.zeros(sessions, dtype=bool)
        for s in range(sessions):
            evidence = [TaskEvidence(task=f"t{j}", p_regression=float(p[s, j])) for j in range(TASKS)]
            out[s] = bool(family_decision(evidence).regression)
        return out

    counts = {
        "fixed_per_task": int((p_fixed <= alpha).any(axis=1).sum()),
        "fixed_holm": int(holm_sessions(p_fixed).sum()),
        "sequential_per_task": int(seq_claim.any(axis=1).sum()),
        "sequential_holm": int(holm_sessions(p_seq).sum()),
        "sequential_bonferroni_stop": int(bonf_claim.any(axis=1).sum()),
        "sequential_bonferroni_stop_holm": int(holm_sessions(p_bonf).sum()),
    }
    task_rate = float((p_fixed <= alpha).mean())
    return {"delta_points": delta * 100, "sessions": sessions,
            "rates": {k: v / sessions for k, v in counts.items()},
            "upper95": {k: clopper_pearson_upper(v, sessions) for k, v in counts.items()},
            "fixed_per_task_claim_rate": task_rate,
            "items_per_task": {"fixed": items_fixed / (sessions * TASKS), "sequential": items_seq / (sessions * TASKS),
                               "sequential_bonferroni_stop": items_bonf / (sessions * TASKS)},
            "level_per_task_bonferroni": strict, "log_threshold_bonferroni": log_threshold(1 - strict)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sessions", type=int, default=None)
    parser.add_argument("--seed", type=int, default=20240603)
    args = parser.parse_args()
    sessions = args.sessions or (200 if args.quick else 2000)
    rng = np.random.default_rng(args.seed)
    started = time.perf_counter()
    results = [run(rng, 0.0, sessions), run(rng, -THRESHOLD, sessions)]
    elapsed = time.perf_counter() - started
    print(f"{TASKS} tasks per session, {sessions} sessions per scenario, {elapsed:.0f} s")
    print(f"{'scenario':<24} " + " ".join(f"{k:>16}" for k in results[0]["rates"]))
    for r in results:
        name = "identical models" if r["delta_points"] == 0 else "drop = threshold"
        print(f"{name:<24} " + " ".join(f"{v:>16.4f}" for v in r["rates"].values()))
    print(json.dumps(results, indent=1))
    out = ROOT / "bench" / "results" / "sim_family.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"results": results, "seconds": round(elapsed, 1), "quick": args.quick,
                               "seed": args.seed}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
