"""The fixed-n paired interval's one-sided error rates over a grid of n, item kinds, agreements and true deltas.

The claim under test (issue 11 item 2): at *every* n >= 1 and for every kind of per-item value, each one-sided
claim the comparison can make is wrong at most 5% of the time (nominal, one-sided 95%):

  false REGRESSION    true drop <= threshold (delta = +t, 0, -t), the rule says the drop exceeds it
  false PASS          true drop >= threshold (delta = -t), the rule says it is within it
  false CATASTROPHIC  true drop = floor (delta = -0.10), the rule says it exceeds the floor
  false ANOMALOUS     true gain = implausible gain (delta = +0.05), the rule says it exceeds it

for thresholds t = 0.01 (1 point) and t = 0 (any drop is a regression; the "±threshold" cells become delta =
±0.01). Item kinds (``simdata``): 0/1, avg-of-2, avg-of-8 and continuous graded scores, at 50%, 90% and 99%
agreement between the sides (99% with a 1-point drop is the case where every disagreement is a loss, the one
that breaks score intervals). The rule is ``sequential.fixed_many``, the vectorised form of ``stats.paired_stats``
as ``compare.py`` reads it (``tests/test_sequential.py`` checks they decide alike). For 0/1 items the previous
rule (Tango's score interval guarded by exact McNemar, from the counts) runs on the same draws for comparison.

Run: python bench/sim_fixed_n.py [--quick] [--reps R]; prints the worst cells and a table, writes
bench/results/sim_fixed_n.json. --quick: 300 repetitions per cell, for CI speed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from functools import cache
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from simdata import clopper_pearson_upper, draw, feasible  # noqa: E402

from pytest_day0.gates import sequential as seq  # noqa: E402

NS = [5, 10, 20, 50, 100, 200, 500, 1000, 2000]
KINDS = ["0/1", "avg-of-2", "avg-of-8", "continuous"]
AGREEMENTS = [0.5, 0.9, 0.99]
FLOOR = 0.10
GAIN = 0.05
NOMINAL = 0.05
# (threshold, true delta, the claims that are false there)
CASES = [
    (0.01, 0.01, ("regression",)),
    (0.01, 0.0, ("regression",)),
    (0.01, -0.01, ("regression", "pass")),
    (0.01, -FLOOR, ("catastrophic",)),
    (0.01, GAIN, ("anomalous",)),
    (0.0, 0.01, ("regression",)),
    (0.0, 0.0, ("regression", "pass")),
    (0.0, -0.01, ("pass",)),
]


def claimed(codes: np.ndarray, claim: str) -> np.ndarray:
    if claim == "regression":
        return np.isin(codes, (seq.REGRESSION, seq.CATASTROPHIC))
    if claim == "pass":
        return np.isin(codes, (seq.PASS, seq.ANOMALOUS))
    if claim == "catastrophic":
        return codes == seq.CATASTROPHIC
    return codes == seq.ANOMALOUS


# ------------------------------------------------------------------ the previous 0/1 rule, for comparison

Z = NormalDist().inv_cdf(0.95)


def _tango_z(gains: np.ndarray, losses: np.ndarray, n: int, d0: np.ndarray) -> np.ndarray:
    """Tango's score statistic for H0: delta = d0, vectorised (the previous stats._tango_z)."""
    w = -gains - losses + (2 * n - gains + losses) * d0
    q = (np.sqrt(np.maximum(w * w + 8 * n * losses * d0 * (1 - d0), 0.0)) - w) / (4 * n)
    var = n * (2 * q + d0 - d0 * d0)
    num = gains - losses - n * d0
    tiny = var <= 1e-12 * n
    with np.errstate(divide="ignore", invalid="ignore"):
        z = num / np.sqrt(np.where(tiny, 1.0, var))
    flat = np.where(np.abs(num) <= 1e-12 * n, 0.0, np.copysign(np.inf, num))
    result: np.ndarray = np.where(tiny, flat, z)
    return result


def _solve(gains: np.ndarray, losses: np.ndarray, n: int, lo: np.ndarray, hi: np.ndarray,
           target: float) -> np.ndarray:
    for _ in range(60):  # Z decreases in d0: bisect for Z(d0) = target
        mid = (lo + hi) / 2
        above = _tango_z(gains, losses, n, mid) > target
        lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
    result: np.ndarray = (lo + hi) / 2
    return result


@cache
def _tails(m: int) -> np.ndarray:
    """P(X >= k) for X ~ Binomial(m, 1/2), k = 0..m (exact sums of C(m, i) / 2^m, in log space)."""
    i = np.arange(m + 1)
    log_pmf = np.array([math.lgamma(m + 1) - math.lgamma(j + 1) - math.lgamma(m - j + 1) for j in i]) - m * math.log(2)
    tails: np.ndarray = np.minimum(1.0, np.cumsum(np.exp(log_pmf)[::-1])[::-1])
    return tails


def _upper_tail(k: int, m: int) -> float:
    return 1.0 if k <= 0 else float(_tails(m)[k])


def old_interval(gains: np.ndarray, losses: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The previous rule's interval of delta: Tango's score bounds, a side the exact McNemar test could not
    establish at 5% extended to 0 (git history: pytest_day0/gates/stats.py binary_stats)."""
    g, lo_ = gains.astype(np.float64), losses.astype(np.float64)
    point = (g - lo_) / n
    low = np.where(point <= -1 + 1e-12, -1.0, _solve(g, lo_, n, np.full_like(point, -1.0), point, Z))
    high = np.where(point >= 1 - 1e-12, 1.0, _solve(g, lo_, n, point, np.ones_like(point), -Z))
    low, high = np.maximum(-1.0, np.minimum(low, point)), np.minimum(1.0, np.maximum(high, point))
    m = (gains + losses).tolist()
    no_drop = np.array([_upper_tail(k, mm) > 0.05 for k, mm in zip(losses.tolist(), m, strict=True)])
    no_gain = np.array([_upper_tail(k, mm) > 0.05 for k, mm in zip(gains.tolist(), m, strict=True)])
    high = np.where(no_drop, np.maximum(high, 0.0), high)
    low = np.where(no_gain, np.minimum(low, 0.0), low)
    return low, high


def old_codes(d: np.ndarray, threshold: float) -> np.ndarray:
    pairs = np.stack([(d > 0).sum(axis=1), (d < 0).sum(axis=1)], axis=1)
    unique, inverse = np.unique(pairs, axis=0, return_inverse=True)
    low, high = old_interval(unique[:, 0], unique[:, 1], d.shape[1])
    low, high = low[inverse.ravel()], high[inverse.ravel()]
    eps = 1e-9
    out = np.full(d.shape[0], seq.INCONCLUSIVE)
    out = np.where(-low <= threshold + eps, seq.PASS, out)
    out = np.where(low > GAIN + eps, seq.ANOMALOUS, out)
    out = np.where(-high > threshold + eps, seq.REGRESSION, out)
    out = np.where(-high > FLOOR + eps, seq.CATASTROPHIC, out)
    return out


# ------------------------------------------------------------------ the grid

REFINE_AT = 0.035


def cell(rng: np.random.Generator, kind: str, agreement: float, threshold: float, delta: float,
         claims: tuple[str, ...], n: int, reps: int) -> list[dict[str, Any]]:
    codes_parts, old_parts = [], []
    chunk = max(1, 4_000_000 // n)
    for start in range(0, reps, chunk):
        d = draw(rng, kind, min(chunk, reps - start), n, agreement, delta)
        codes_parts.append(seq.fixed_many(d, threshold=threshold, floor=FLOOR, implausible_gain=GAIN))
        if kind == "0/1":
            old_parts.append(old_codes(d, threshold))
    codes = np.concatenate(codes_parts)
    old = np.concatenate(old_parts) if old_parts else None
    out = []
    for claim in claims:
        hits = int(claimed(codes, claim).sum())
        row: dict[str, Any] = {"kind": kind, "agreement": agreement, "threshold": threshold, "delta": delta, "n": n,
                               "claim": claim, "reps": reps, "rate": hits / reps, "hits": hits}
        if old is not None:
            row["old_rate"] = float(claimed(old, claim).mean())
        out.append(row)
    return out



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=20240602)
    args = parser.parse_args()
    reps = args.reps or (300 if args.quick else 2000)
    rng = np.random.default_rng(args.seed)
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for kind in KINDS:
        for agreement in AGREEMENTS:
            for threshold, delta, claims in CASES:
                if not feasible(agreement, delta):
                    continue
                for n in NS:
                    rows.extend(cell(rng, kind, agreement, threshold, delta, claims, n, reps))
    # second stage: a cell whose estimate is near the nominal rate is drawn again, 10x larger, so the table says
    # where its true rate lies rather than where one draw's noise put it
    refine = [r for r in rows if r["rate"] > REFINE_AT]
    for r in refine:
        again = cell(rng, r["kind"], r["agreement"], r["threshold"], r["delta"], (r["claim"],), r["n"], 10 * reps)
        r.update(first_stage_rate=r["rate"], rate=again[0]["rate"], hits=again[0]["hits"], reps=10 * reps)
    elapsed = time.perf_counter() - started
    worst = max(rows, key=lambda r: r["rate"])
    over = [r for r in rows if r["rate"] > NOMINAL]
    old_rows = [r for r in rows if "old_rate" in r]
    old_worst = max(old_rows, key=lambda r: r["old_rate"])
    old_over = [r for r in old_rows if r["old_rate"] > NOMINAL]
    summary = {
        "cells": len(rows), "reps_per_cell": reps, "seconds": round(elapsed, 1),
        "worst": {**{k: worst[k] for k in ("kind", "agreement", "threshold", "delta", "n", "claim", "reps")},
                  "rate": worst["rate"], "upper95": clopper_pearson_upper(worst["hits"], worst["reps"])},
        "refined_cells": len(refine),
        "cells_over_nominal": len(over),
        "old_rule_0_1_worst": {**{k: old_worst[k] for k in ("agreement", "threshold", "delta", "n", "claim")},
                               "rate": old_worst["old_rate"]},
        "old_rule_0_1_cells_over_nominal": len(old_over),
    }
    # a compact table: the worst rate over n for each (kind, agreement, threshold, delta, claim), and where
    print(f"{'kind':<10} {'agree':>5} {'t':>5} {'delta':>6} {'claim':<12} | worst over n  (n) | "
          + " ".join(f"{n:>5}" for n in NS) + " | old 0/1 worst")
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["kind"], r["agreement"], r["threshold"], r["delta"], r["claim"]), []).append(r)
    for (kind, agreement, threshold, delta, claim), group in groups.items():
        w = max(group, key=lambda r: r["rate"])
        old = max((r.get("old_rate", -1.0) for r in group), default=-1.0)
        print(f"{kind:<10} {agreement:>5.2f} {threshold:>5.2f} {delta:>+6.2f} {claim:<12} | {w['rate']:>12.4f} "
              f"({w['n']:>4}) | " + " ".join(f"{r['rate']:>5.3f}" for r in group)
              + (f" | {old:.4f}" if old >= 0 else " |"))
    print()
    print(json.dumps(summary, indent=1))
    out = ROOT / "bench" / "results" / "sim_fixed_n.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "rows": rows, "quick": args.quick, "seed": args.seed},
                              indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
