"""Paired per-item differences (candidate - baseline, per-item unit) with an exactly known mean, for simulations.

Only the difference d of an item enters the paired statistics, so the generators draw d directly, from models
of how a quantized model's answers move against its source's:

* ``flips(k, agreement, delta)``: k repeats per item (k = 1: 0/1 items; k = 2, 4, 8: avg-of-k). On each repeat the
  pair either agrees, or flips to a gain (baseline wrong, candidate right) or a loss, with per-repeat rates
  g + l = 1 - agreement and g - l = delta. Flips cluster on *fragile* items (a fraction 2 (1 - agreement) of them,
  each flipping half its repeats), as low-margin items do in quantized models (Dutta et al. 2024); with k = 1 this
  is the trinomial of 0/1 items, gains, losses and ties.
* ``continuous(agreement, delta)``: graded scores. A fraction ``agreement`` of items score the same on both
  sides; the others differ by 2 Beta(2 mu, 2 (1 - mu)) - 1 with mu set so the mean is exactly ``delta``.

``feasible`` says whether a model can have that mean at that agreement (|delta| <= 1 - agreement: a 5-point
drop cannot come from 1% of items flipping).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.float64]
KINDS = {"0/1": 1, "avg-of-2": 2, "avg-of-4": 4, "avg-of-8": 8, "continuous": 0}


def feasible(agreement: float, delta: float) -> bool:
    return abs(delta) <= 1 - agreement + 1e-12


def flips(rng: np.random.Generator, rows: int, n: int, k: int, agreement: float, delta: float) -> Array:
    disagree = 1 - agreement
    gain, loss = (disagree + delta) / 2, (disagree - delta) / 2
    if min(gain, loss) < -1e-12:
        raise ValueError(f"delta {delta} is impossible at agreement {agreement}")
    fragile = min(1.0, 2 * disagree) if k > 1 else 1.0
    g, lo = gain / fragile, max(loss, 0.0) / fragile  # per-repeat flip rates on a fragile item
    is_fragile = rng.random((rows, n)) < fragile
    if k == 1:
        u = rng.random((rows, n))
        d = np.where(u < g, 1.0, np.where(u < g + lo, -1.0, 0.0))
        return np.where(is_fragile, d, 0.0)
    total = np.zeros((rows, n))
    for _ in range(k):  # one repeat at a time: gain, loss or agree
        u = rng.random((rows, n))
        total += (u < g).astype(np.float64) - ((u >= g) & (u < g + lo)).astype(np.float64)
    result: Array = np.where(is_fragile, total / k, 0.0)
    return result


def continuous(rng: np.random.Generator, rows: int, n: int, agreement: float, delta: float) -> Array:
    disagree = 1 - agreement
    mu = (1 + delta / disagree) / 2
    mu = min(max(mu, 1e-6), 1 - 1e-6)
    d = 2 * rng.beta(2 * mu, 2 * (1 - mu), size=(rows, n)) - 1
    result: Array = np.where(rng.random((rows, n)) < disagree, d, 0.0)
    return result


def draw(rng: np.random.Generator, kind: str, rows: int, n: int, agreement: float, delta: float) -> Array:
    k = KINDS[kind]
    if k == 0:
        return continuous(rng, rows, n, agreement, delta)
    return flips(rng, rows, n, k, agreement, delta)


def clopper_pearson_upper(hits: int, trials: int, confidence: float = 0.95) -> float:
    """One-sided upper confidence bound of a rate (exact): how high the true error rate of a cell could be."""
    if hits >= trials:
        return 1.0
    lo, hi = hits / trials, 1.0
    for _ in range(60):  # P(Bin(trials, p) <= hits) decreases in p: bisect for 1 - confidence
        mid = (lo + hi) / 2
        if _binom_cdf(hits, trials, mid) > 1 - confidence:
            lo = mid
        else:
            hi = mid
    return hi


def _binom_cdf(k: int, n: int, p: float) -> float:
    from math import exp, lgamma, log

    if p <= 0:
        return 1.0
    if p >= 1:
        return 0.0 if k < n else 1.0
    total = 0.0
    for i in range(k + 1):
        total += exp(lgamma(n + 1) - lgamma(i + 1) - lgamma(n - i + 1) + i * log(p) + (n - i) * log(1 - p))
    return min(1.0, total)
