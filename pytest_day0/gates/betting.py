"""Betting confidence sequences for the mean of a variable in [0, 1] (Waudby-Smith & Ramdas 2024).

Why betting: it is the one family we found whose intervals are valid at *every* n for *any* distribution on
[0, 1] (avg-of-N fractions, graded scores, 0/1 items alike), adapt to the variance (a quantized model agrees
with its source on most items, so the paired differences have a small spread), and stay valid under optional
stopping, which the sequential comparison (``sequential.py``) needs. Score, Wald and bootstrap intervals are
only asymptotically right and fail exactly where a day-0 release decides: a handful of items, or rare losses.

Source: I. Waudby-Smith and A. Ramdas, "Estimating means of bounded random variables by betting", JRSS-B 86(1)
2024 (arXiv 2010.09686); reference code ``confseq`` 0.0.11 (``betting.betting_mart``,
``betting_strategies.lambda_predmix_eb``), which ``tests/test_betting.py`` reproduces number for number.

The construction, for x_1, x_2, ... in [0, 1] with mean mu and a candidate mean m:

* capital processes ("hedged capital", one side each)::

      K+_t(m) = prod_{i<=t} (1 + lam+_i(m) (x_i - m)),   lam+_i(m) = min(lam_i, c / m)
      K-_t(m) = prod_{i<=t} (1 - lam-_i(m) (x_i - m)),   lam-_i(m) = min(lam_i, c / (1 - m))

  Under H0: mu <= m, K+(m) is a nonnegative supermartingale (each factor has mean <= 1), so by Ville's
  inequality P(sup_t K+_t(m) >= 1/alpha) <= alpha: rejecting H0 whenever the capital *ever* reaches 1/alpha is an
  alpha-level test at any stopping time; K- mirrors it for H0: mu >= m.
* predictable plug-in bets (the paper's PrPl choice; "predictable": lam_i uses x_1..x_{i-1} only)::

      mu^_t  = (1/2 + sum_{i<=t} x_i) / (t + 1)
      var^_t = (1/4 + sum_{i<=t} (x_i - mu^_i)^2) / (t + 1)
      lam_t  = sqrt(2 log(1/alpha) / (var^_{t-1} h_t)),   h_t = n (a horizon n: the fixed-n interval)
                                                          h_t = t log(1 + t) (no horizon: the anytime sequence)

* interval: {m : sup_{s<=t} K_s(m) < 1/alpha} for each side. ``lam+_i(m)(m - x_i)`` increases with m for the
  truncation c / m (and ``lam+_i(m)(x_i - m)`` decreases), so K+_t(m) is nonincreasing in m and K-_t(m)
  nondecreasing: each one-sided set is a half-line and its end is found by bisection.

Departures from the paper's defaults, each only a choice of predictable bets (validity does not depend on it):
one-sided log(1/alpha) instead of the two-sided log(2/alpha) (each of our claims is one-sided, the two one-sided
tests of equivalence testing); the truncation c = 0.9 (the paper uses 1/2 or 3/4): paired differences of a
quantized model sit mostly at 0, where the growth-optimal bet is near the 1/m limit; measured on the decision
grid of ``bench/sim_fixed_n.py`` it decides more often at 99% agreement and needs 347 instead of 410 agreeing
items to show a drop under 1 point; and the horizon-tuned bets are read with the running maximum over the
sequence (still valid by Ville, and more powerful than the capital at n alone).

Everything here works on the last axis of an array, so the simulations run thousands of tasks at once.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.float64]
Side = Literal[1, -1]  # +1: evidence that the mean is above m; -1: below

BET_CAP = 0.9  # c: the fraction of the largest bet that keeps the capital nonnegative
PRIOR_MEAN = 0.5
PRIOR_VARIANCE = 0.25
PRIOR_WEIGHT = 1.0
BISECTION_TOL = 1e-10


def log_threshold(alpha: float) -> float:
    """log(1/alpha): the log-capital at which a claim is made."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    return -math.log(alpha)


def plugin_bets(x: Array, alpha: float, horizon: int | None = None) -> Array:
    """The predictable plug-in bets lam_t (before truncation), one per item, along the last axis.

    ``horizon`` tunes them for a fixed n (h_t = n); None gives the anytime bets (h_t = t log(1 + t)).
    """
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[-1]
    t = np.arange(1, n + 1, dtype=np.float64)
    mu = (PRIOR_WEIGHT * PRIOR_MEAN + np.cumsum(x, axis=-1)) / (t + PRIOR_WEIGHT)
    var = (PRIOR_WEIGHT * PRIOR_VARIANCE + np.cumsum((x - mu) ** 2, axis=-1)) / (t + PRIOR_WEIGHT)
    previous = np.concatenate([np.full((*x.shape[:-1], 1), PRIOR_VARIANCE), var[..., :-1]], axis=-1)
    h = float(horizon) if horizon is not None else t * np.log1p(t)
    with np.errstate(divide="ignore"):
        bets: Array = np.sqrt(2 * log_threshold(alpha) / (previous * h))
    return bets


def truncated(bets: Array, m: float, side: Side, cap: float = BET_CAP) -> Array:
    """lam+_i(m) = min(lam_i, c/m) or lam-_i(m) = min(lam_i, c/(1 - m)): the capital stays positive."""
    limit = (1 - m) if side < 0 else m
    if limit <= 0:
        return bets
    return np.minimum(bets, cap / limit)


def log_capital(x: Array, m: float, side: Side, bets: Array, cap: float = BET_CAP) -> Array:
    """log K+_t(m) (side +1) or log K-_t(m) (side -1) for every t, along the last axis."""
    lam = truncated(bets, m, side, cap)
    factor = lam * (np.asarray(x, dtype=np.float64) - m) * side
    path: Array = np.cumsum(np.log1p(factor), axis=-1)
    return path


def max_log_capital(x: Array, m: float, side: Side, bets: Array, cap: float = BET_CAP) -> Array:
    """sup_{t<=n} log K_t(m) (0 at t = 0 included): what Ville's inequality bounds."""
    path = log_capital(x, m, side, bets, cap)
    best: Array = np.maximum(path.max(axis=-1), 0.0)
    return best


def _bound(x: Array, bets: Array, alpha: float, side: Side, cap: float) -> float:
    """The end of the one-sided set {m : sup_t K_t(m) < 1/alpha} (1-D x), by bisection on its monotone edge.

    K+ is nonincreasing in m, so the rejected m form [0, L); K- is nondecreasing, so they form (U, 1]. Either way
    the bisection keeps one end rejected and the other not, and returns the end that is not."""
    level = log_threshold(alpha)

    def rejected(m: float) -> bool:
        return float(max_log_capital(x, m, side, bets, cap)) >= level

    rejected_end, kept_end = (0.0, 1.0) if side > 0 else (1.0, 0.0)
    if not rejected(rejected_end):
        return rejected_end
    while abs(kept_end - rejected_end) > BISECTION_TOL:
        mid = (rejected_end + kept_end) / 2
        if rejected(mid):
            rejected_end = mid
        else:
            kept_end = mid
    return kept_end


def lower_bound(x: Array, bets: Array, alpha: float, cap: float = BET_CAP) -> float:
    """One-sided (1 - alpha) lower confidence bound of the mean of 1-D ``x`` (with the running maximum)."""
    return _bound(np.asarray(x, dtype=np.float64), bets, alpha, 1, cap)


def upper_bound(x: Array, bets: Array, alpha: float, cap: float = BET_CAP) -> float:
    """One-sided (1 - alpha) upper confidence bound of the mean of 1-D ``x``."""
    return _bound(np.asarray(x, dtype=np.float64), bets, alpha, -1, cap)


def p_value(x: Array, m: float, side: Side, bets: Array, cap: float = BET_CAP) -> float:
    """The p-value 1 / sup_t K_t(m) (capped at 1) of H0 "mean <= m" (side +1) or "mean >= m" (side -1).

    Valid at any stopping time (Ville), so also for the sequential rule; it is 1 when the point estimate is not
    on the claimed side, matching the reported interval, which always contains the estimate.
    """
    x = np.asarray(x, dtype=np.float64)
    mean = float(x.mean()) if x.size else 0.5
    if (mean - m) * side <= 0:
        return 1.0
    return float(min(1.0, math.exp(-float(max_log_capital(x, m, side, bets, cap)))))
