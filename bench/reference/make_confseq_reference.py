"""Writes tests/data/confseq_reference.json: capital processes and confidence sequences computed by the paper's
reference code (confseq 0.0.11, gostevehoward/confseq), which tests/test_betting.py compares ours with.

confseq is source-only (it builds a C++ extension and pulls matplotlib, multiprocess, pandas), so it is not a
dependency; its betting code is pure numpy and runs from the unpacked sdist with those two imports stubbed:

    pip download --no-deps -d /tmp/x confseq==0.0.11 && tar xzf /tmp/x/confseq-0.0.11.tar.gz -C /tmp/x
    python bench/reference/make_confseq_reference.py /tmp/x/confseq-0.0.11/src
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np

STRIDE = 25  # every 25th time of each path is stored (t = 25, 50, ...)


def load_confseq(src: str) -> tuple[types.ModuleType, types.ModuleType]:
    for name in ("matplotlib", "matplotlib.pyplot", "multiprocess"):
        sys.modules.setdefault(name, types.ModuleType(name))
    if not hasattr(np, "float_"):  # confseq 0.0.11 predates numpy 2
        np.float_ = np.float64  # type: ignore[attr-defined]
    sys.path.insert(0, src)
    import confseq.betting as betting  # type: ignore[import-not-found]
    import confseq.betting_strategies as strategies  # type: ignore[import-not-found]

    return betting, strategies


def main() -> None:
    betting, strategies = load_confseq(sys.argv[1])
    rng = np.random.default_rng(20240601)
    cases = []
    samples = {
        "paired_0_1": (rng.choice([0.0, 0.5, 1.0], size=400, p=[0.06, 0.9, 0.04])),
        "avg_of_4": np.clip(0.5 + rng.choice([-1, 0, 1], size=300, p=[0.1, 0.8, 0.1]) * rng.integers(1, 5, 300) / 8,
                            0, 1),
        "beta": rng.beta(2.0, 3.0, size=250),
    }
    for name, x in samples.items():
        for alpha in (0.05, 0.1):
            for horizon in (None, len(x)):
                lam = strategies.lambda_predmix_eb(x, alpha=alpha, fixed_n=horizon)
                for m in (0.3, 0.45, 0.5, 0.55):
                    for theta, side in ((1, 1), (0, -1)):
                        cap = betting.betting_mart(x, m, alpha=alpha, theta=theta, trunc_scale=0.9, m_trunc=True,
                                                   lambdas_fn_positive=lambda x_, m_, lam=lam: lam,
                                                   lambdas_fn_negative=lambda x_, m_, lam=lam: lam)
                        cases.append({"sample": name, "alpha": alpha, "horizon": horizon, "m": m, "side": side,
                                      "log_capital": [float(f"{v:.12g}") for v in np.log(cap)[STRIDE - 1::STRIDE]]})
    intervals = []
    for name, x in samples.items():
        for horizon in (None, len(x)):
            def fn(x_: np.ndarray, m_: float, horizon: int | None = horizon) -> np.ndarray:
                return strategies.lambda_predmix_eb(x_, alpha=0.05, fixed_n=horizon)  # type: ignore[no-any-return]

            # one-sided 95% bounds: a two-sided "max" hedge with theta = 1/2 rejects at K+ >= 2/alpha', so
            # alpha' = 0.1 gives each side at 0.05; the bets use alpha = 0.05 (fn above)
            low, high = betting.betting_cs(x, lambdas_fns_positive=[fn], lambdas_fns_negative=[fn], alpha=0.1,
                                           breaks=2000, running_intersection=True, theta=0.5, convex_comb=False,
                                           trunc_scale=0.9, m_trunc=True)
            intervals.append({"sample": name, "horizon": horizon, "breaks": 2000,
                              "lower": float(low[-1]), "upper": float(high[-1])})
    out = {"source": "confseq 0.0.11 sdist (gostevehoward/confseq), betting.betting_mart / betting_cs and "
                     "betting_strategies.lambda_predmix_eb; trunc_scale 0.9, m_trunc True",
           "stride": STRIDE,
           "samples": {k: [float(f"{v:.17g}") for v in x] for k, x in samples.items()},
           "capital": cases, "intervals": intervals}
    path = Path(__file__).resolve().parents[2] / "tests" / "data" / "confseq_reference.json"
    path.write_text(json.dumps(out))
    print(f"wrote {path} ({len(cases)} capital paths, {len(intervals)} intervals)")


if __name__ == "__main__":
    main()
