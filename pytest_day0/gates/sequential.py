"""Anytime-valid adaptive comparison: evaluate a task's items in rounds and stop as soon as the evidence decides.

Pure: a frozen ``SequentialState`` (the per-item differences seen so far, in evaluation order) in,
``update(state, pairs) -> state`` and ``decide(state, ...) -> SequentialDecision`` out; the chain owns the I/O
(evaluating both sides of the next round of items, in ``stats.evaluation_order``).

Why betting and not a group-sequential design: the per-item values are bounded but otherwise arbitrary (0/1,
avg-of-N, graded), the discordance rate is unknown in advance and the rounds are whatever the serving stack
delivers; an alpha-spending design needs a variance model and a fixed look schedule, the betting confidence
sequence needs neither. It is the *same* capital process as the fixed-n interval in ``stats.py`` (bets tuned
for the planned number of items, the task size or ``--day0-limit``), read after every round instead of once at
the end: Ville's inequality makes every claim valid at whatever round it is made, and when nothing stops it early
it ends exactly where the fixed-n rule would. So the adaptive rule decides whenever the fixed-n rule does (on the
same item order), except where futility stops it first, and evaluates fewer items whenever the evidence is clear.

Claims, each one-sided at its own level (drop = baseline - candidate for a higher-is-better task):

* REGRESSION — H0 "drop <= threshold" rejected; CATASTROPHIC — H0 "drop <= floor" rejected (the chain stops the
  whole recipe); both at ``regression_confidence`` (default ``confidence``; ``family.per_task_confidence`` makes
  a per-task stop on them a session-wide claim).
* PASS — H0 "drop >= threshold" rejected; ANOMALOUS — H0 "gain <= implausible_gain" rejected.
* INCONCLUSIVE — the task is exhausted (``task_size`` items, or ``--day0-limit``), or *futile*: even an
  optimistic future could not reach either quality claim by the task's end. Futility stops cost no error (no claim
  is made), only decisions: ``bench/sim_adaptive.py`` measures how many.

A REGRESSION whose estimate is past the floor keeps going until the floor is decided (or futile), and a PASS
whose estimate is past the implausible gain until the anomaly is: the hard-tier claims are not given up for an
early warn-tier stop. A claim also needs the current estimate on its side (the interval always holds the
estimate), so PASS and REGRESSION can never both stand.

Estimand: the items are an iid sample of the population of items the benchmark stands for (the superpopulation
view, the same one the fixed-n interval takes); the seeded evaluation order makes the task's items arrive in an
order unrelated to their values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import StrEnum

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict

from pytest_day0.failures import Day0Error, FailureClass
from pytest_day0.gates import betting
from pytest_day0.gates.betting import Array, Side
from pytest_day0.gates.stats import DEFAULT_CONFIDENCE, z_value

Mask = npt.NDArray[np.bool_]
DEFAULT_FIRST_ROUND = 64
DEFAULT_GROWTH = 1.5
FUTILITY_PROBABILITY = 0.05  # stop when every claim's predictive probability of being reached is below this


class Outcome(StrEnum):
    CONTINUE = "CONTINUE"
    PASS = "PASS"
    REGRESSION = "REGRESSION"
    CATASTROPHIC = "CATASTROPHIC"
    ANOMALOUS = "ANOMALOUS"
    INCONCLUSIVE = "INCONCLUSIVE"


# integer codes for the vectorised kernel (simulations decide thousands of tasks at once)
_CODES = [Outcome.CONTINUE, Outcome.PASS, Outcome.REGRESSION, Outcome.CATASTROPHIC, Outcome.ANOMALOUS,
          Outcome.INCONCLUSIVE]
CONTINUE, PASS, REGRESSION, CATASTROPHIC, ANOMALOUS, INCONCLUSIVE = range(6)
REASONS = {0: "decided", 1: "exhausted", 2: "futile", 4: "continue", 5: "watching the floor",
           6: "watching the anomaly"}


class SequentialState(BaseModel):
    """What the confidence sequence needs: the plan and every per-item difference so far, in evaluation order."""

    model_config = ConfigDict(frozen=True)

    horizon: int  # planned items (task size or --day0-limit): the bets are tuned for it
    confidence: float = DEFAULT_CONFIDENCE
    differences: tuple[float, ...] = ()  # candidate - baseline per item, per-item unit

    @property
    def n(self) -> int:
        return len(self.differences)


class SequentialDecision(BaseModel):
    """The decision after a round, with the anytime-valid interval of delta and each claim's p-value."""

    model_config = ConfigDict(frozen=True)

    outcome: Outcome
    reason: str  # decided / exhausted / futile / continue / watching the floor / watching the anomaly
    n: int
    delta: float  # candidate - baseline, per-item unit
    ci_low: float  # running-intersection bounds of delta (the PASS side at confidence, the drop side at
    ci_high: float  # regression_confidence), always holding the estimate
    p_regression: float  # anytime-valid: 1 / the largest capital reached (1 when the estimate is on the other side)
    p_pass: float
    p_floor: float
    p_anomaly: float

    @property
    def stop(self) -> bool:
        return self.outcome is not Outcome.CONTINUE


def start(horizon: int, confidence: float = DEFAULT_CONFIDENCE) -> SequentialState:
    """An empty state for a task whose plan is ``horizon`` items."""
    if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
        raise Day0Error(FailureClass.USER_CONFIG_ERROR, f"the planned number of items must be >= 1, got {horizon!r}")
    z_value(confidence)
    return SequentialState(horizon=horizon, confidence=confidence)


def update(state: SequentialState, pairs: Sequence[tuple[float, float]]) -> SequentialState:
    """The state after one more round of (baseline, candidate) per-item values in [0, 1], in evaluation order."""
    new = []
    for b, c in pairs:
        for v in (b, c):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v <= 1:
                raise Day0Error(FailureClass.SAMPLE_ACCOUNTING_FAILED,
                                f"per-item value {v!r} is not a correctness in [0, 1]: cannot pair it")
        new.append(float(c) - float(b))
    return state.model_copy(update={"differences": state.differences + tuple(new)})


def round_schedule(task_size: int, first: int = DEFAULT_FIRST_ROUND, growth: float = DEFAULT_GROWTH) -> list[int]:
    """Cumulative item counts after which to decide: ``first``, then each round ``growth`` times the items so far
    (so stopping overshoots the first decisive count by at most that factor), ending at ``task_size``."""
    if task_size < 1 or first < 1 or growth <= 1:
        raise ValueError("task_size and first must be >= 1 and growth > 1")
    ends: list[int] = []
    n = min(first, task_size)
    while n < task_size:
        ends.append(n)
        n = max(n + 1, math.ceil(n * growth))
    ends.append(task_size)
    return ends


# ---------------------------------------------------------------------------------------------- the kernel


class _Limits:
    """The four claims as (m in [0, 1], side, level), oriented so that a drop is a lower mean."""

    def __init__(self, threshold: float, floor: float, implausible_gain: float, confidence: float,
                 regression_confidence: float) -> None:
        for name, value in (("threshold", threshold), ("floor", floor), ("implausible_gain", implausible_gain)):
            if not (math.isfinite(value) and 0 <= value <= 1):
                raise Day0Error(FailureClass.USER_CONFIG_ERROR,
                                f"{name} must be a fraction of the range in [0, 1], got {value!r}")
        z_value(confidence)
        z_value(regression_confidence)
        self.alpha = 1 - confidence
        self.alpha_regression = 1 - regression_confidence
        self.m_threshold = (1 - threshold) / 2
        self.m_floor = (1 - floor) / 2
        self.m_gain = (1 + implausible_gain) / 2


def _plugin_variance(x: Array) -> Array:
    """var^_t of the plug-in bets (prior included), along the last axis."""
    t = np.arange(1, x.shape[-1] + 1, dtype=np.float64)
    mu = (betting.PRIOR_WEIGHT * betting.PRIOR_MEAN + np.cumsum(x, axis=-1)) / (t + betting.PRIOR_WEIGHT)
    var: Array = (betting.PRIOR_WEIGHT * betting.PRIOR_VARIANCE + np.cumsum((x - mu) ** 2, axis=-1)) / (
        t + betting.PRIOR_WEIGHT)
    return var


class _Paths:
    """Capital paths of the four claims for R tasks at once (rows), bets tuned for ``horizon``."""

    def __init__(self, x: Array, horizon: int, limits: _Limits) -> None:
        self.x = x
        self.horizon = horizon
        self.limits = limits
        bets = betting.plugin_bets(x, limits.alpha, horizon)
        bets_drop = bets if limits.alpha_regression == limits.alpha else betting.plugin_bets(
            x, limits.alpha_regression, horizon)
        self.claims: dict[str, tuple[float, Side, float]] = {
            "regression": (limits.m_threshold, -1, limits.alpha_regression),
            "floor": (limits.m_floor, -1, limits.alpha_regression),
            "pass": (limits.m_threshold, 1, limits.alpha),
            "anomaly": (limits.m_gain, 1, limits.alpha),
        }
        self.log_k: dict[str, Array] = {}
        self.best: dict[str, Array] = {}
        for name, (m, side, alpha) in self.claims.items():
            path = betting.log_capital(x, m, side, bets_drop if alpha == limits.alpha_regression else bets)
            self.log_k[name] = path
            self.best[name] = np.maximum(np.maximum.accumulate(path, axis=-1), 0.0)
        self.mean = np.cumsum(x, axis=-1) / np.arange(1, x.shape[-1] + 1)
        self.var = _plugin_variance(x)


def _futile(paths: _Paths, name: str, at: int, task_size: int) -> Mask:
    """Rows where the claim is out of reach: the predictive probability that the mean after ``task_size`` items is
    past the gap the rule then needs is below ``FUTILITY_PROBABILITY``.

    The predictive distribution of the final mean given the items so far (flat prior on the mean, the plug-in
    variance as the per-item variance) is normal with the current mean and variance (R/N)^2 (var/R + var/t)
    (R items to come, N in all, t seen); the gap the capital needs at N with bets tuned for the horizon is
    sqrt(2 var log(1/alpha) / N) when the horizon is N. A rule that stops only
    when nothing is claimed makes no false claim; it can only lose decisions the full task would have made,
    which bench/sim_adaptive.py counts.
    """
    m, side, alpha = paths.claims[name]
    level = betting.log_threshold(alpha)
    remaining = max(task_size - at, 0)
    var = paths.var[..., at - 1]
    mean = paths.mean[..., at - 1]
    reached = paths.best[name][..., at - 1] >= level
    if remaining == 0:
        done: Mask = ~reached
        return done
    total = at + remaining
    spread = np.sqrt(var * (remaining / total) ** 2 * (1 / remaining + 1 / at))
    # the gap from m the final mean needs: log K_N ~ lam N gap - lam^2 N var / 2 >= log(1/alpha) at the bet
    # lam = sqrt(2 log(1/alpha) / (H var)) tuned for the horizon H (= sqrt(2 var log(1/alpha) / N) when H = N)
    horizon = paths.horizon
    target = m + side * np.sqrt(level * var / 2) * (math.sqrt(horizon) / total + 1 / math.sqrt(horizon))
    z = (mean - target) * side / spread
    probability = 0.5 * (1 + _erf(z / math.sqrt(2)))
    result: Mask = ~reached & (probability < FUTILITY_PROBABILITY)
    return result


def _erf(z: Array) -> Array:
    out: Array = np.vectorize(math.erf, otypes=[np.float64])(z)
    return out


def _established(paths: _Paths, name: str, at: int) -> Mask:
    m, side, alpha = paths.claims[name]
    on_side = (paths.mean[..., at - 1] - m) * side > 0
    result: Mask = on_side & (paths.best[name][..., at - 1] >= betting.log_threshold(alpha))
    return result


def _decide_at(paths: _Paths, at: int, task_size: int) -> tuple[Array, Array]:
    """Outcome and reason codes of every row after ``at`` items."""
    est = {name: _established(paths, name, at) for name in paths.claims}
    exhausted = at >= task_size
    rows = paths.x.shape[:-1]
    outcome = np.full(rows, CONTINUE)
    reason = np.full(rows, 4)
    futile: dict[str, Mask] = {
        name: (np.ones(rows, dtype=bool) if exhausted else _futile(paths, name, at, task_size))
        for name in paths.claims}
    floor_pending = est["regression"] & ~est["floor"] & ~futile["floor"] & (
        paths.mean[..., at - 1] < paths.claims["floor"][0])
    anomaly_pending = est["pass"] & ~est["anomaly"] & ~futile["anomaly"] & (
        paths.mean[..., at - 1] > paths.claims["anomaly"][0])
    quality_futile = futile["regression"] & futile["pass"] & futile["floor"] & futile["anomaly"]
    # later assignments win: the order is the precedence, lowest first
    choices = [
        (np.ones(rows, dtype=bool), CONTINUE, 4),
        (quality_futile, INCONCLUSIVE, 2),
        (np.full(rows, exhausted), INCONCLUSIVE, 1),
        (est["pass"], PASS, 0),
        (anomaly_pending, CONTINUE, 6),
        (est["anomaly"], ANOMALOUS, 0),
        (est["regression"], REGRESSION, 0),
        (floor_pending, CONTINUE, 5),
        (est["floor"], CATASTROPHIC, 0),
    ]
    for mask, code, why in choices:
        outcome = np.where(mask, code, outcome)
        reason = np.where(mask, why, reason)
    return outcome, reason


def _oriented(differences: Array, higher_is_better: bool) -> Array:
    """Per-item differences as [0, 1] values where a drop is a lower mean."""
    d = differences if higher_is_better else -differences
    x: Array = (d + 1) / 2
    return x


# ---------------------------------------------------------------------------------------------- the decision


def decide(
    state: SequentialState,
    *,
    threshold: float,
    floor: float,
    task_size: int,
    implausible_gain: float = 0.05,
    higher_is_better: bool = True,
    regression_confidence: float | None = None,
) -> SequentialDecision:
    """The decision after the items seen so far; limits are fractions of the task's range (per-item unit).

    ``task_size``: items the task can still give in all (its size or ``--day0-limit``); at it the task is
    exhausted. Stop on any outcome but CONTINUE.
    """
    if state.n == 0:
        raise Day0Error(FailureClass.SAMPLE_ACCOUNTING_FAILED, "no item was scored on both sides yet")
    limits = _Limits(threshold, floor, implausible_gain, state.confidence,
                     regression_confidence if regression_confidence is not None else state.confidence)
    x = _oriented(np.asarray(state.differences, dtype=np.float64), higher_is_better)
    paths = _Paths(x[np.newaxis, :], state.horizon, limits)
    outcome, reason = _decide_at(paths, state.n, task_size)
    p = {}
    for name in paths.claims:
        on_side = bool(_on_side(paths, name, state.n))
        p[name] = math.exp(-float(paths.best[name][0, -1])) if on_side else 1.0
    low, high = _interval(x, state.horizon, limits)
    mean = float(x.mean())
    low, high = min(low, mean), max(high, mean)
    d_low, d_high = 2 * low - 1, 2 * high - 1
    if not higher_is_better:
        d_low, d_high = -d_high, -d_low
    return SequentialDecision(
        outcome=_CODES[int(outcome[0])],
        reason=REASONS[int(reason[0])],
        n=state.n,
        delta=float(np.mean(state.differences)),
        ci_low=d_low,
        ci_high=d_high,
        p_regression=p["regression"],
        p_pass=p["pass"],
        p_floor=p["floor"],
        p_anomaly=p["anomaly"],
    )


def _on_side(paths: _Paths, name: str, at: int) -> Mask:
    m, side, _ = paths.claims[name]
    result: Mask = (paths.mean[..., at - 1] - m) * side > 0
    return result


def _interval(x: Array, horizon: int, limits: _Limits) -> tuple[float, float]:
    """Running-intersection bounds of the mean of x: the PASS side at confidence, the drop side at its own level."""
    low = betting.lower_bound(x, betting.plugin_bets(x, limits.alpha, horizon), limits.alpha)
    high = betting.upper_bound(x, betting.plugin_bets(x, limits.alpha_regression, horizon), limits.alpha_regression)
    return low, high


def run_many(
    differences: Array,
    *,
    threshold: float,
    floor: float,
    task_size: int,
    schedule: Sequence[int],
    implausible_gain: float = 0.05,
    higher_is_better: bool = True,
    confidence: float = DEFAULT_CONFIDENCE,
    regression_confidence: float | None = None,
    horizon: int | None = None,
) -> tuple[Array, Array, dict[str, Array]]:
    """The adaptive rule on R tasks at once (rows of per-item differences in evaluation order, at least
    ``task_size`` columns): each row stops at the first schedule point whose decision is not CONTINUE.

    Returns (outcome codes, items evaluated, each claim's anytime p-value at the stop). The same kernel as
    ``decide``; the simulations call this.
    """
    limits = _Limits(threshold, floor, implausible_gain, confidence,
                     regression_confidence if regression_confidence is not None else confidence)
    x = _oriented(np.asarray(differences, dtype=np.float64)[..., :task_size], higher_is_better)
    paths = _Paths(x, horizon or task_size, limits)
    rows = x.shape[:-1]
    outcome = np.full(rows, CONTINUE)
    used = np.full(rows, task_size)
    running = np.ones(rows, dtype=bool)
    for at in schedule:
        if at > task_size:
            break
        codes, _ = _decide_at(paths, at, task_size)
        stop = running & (codes != CONTINUE)
        outcome = np.where(stop, codes, outcome)
        used = np.where(stop, at, used)
        running &= ~stop
        if not running.any():
            break
    index = (used - 1)[..., np.newaxis]
    p: dict[str, Array] = {}
    for name, (m, side, _) in paths.claims.items():
        best = np.take_along_axis(paths.best[name], index, axis=-1)[..., 0]
        mean = np.take_along_axis(paths.mean, index, axis=-1)[..., 0]
        p[name] = np.where((mean - m) * side > 0, np.exp(-best), 1.0)
    return outcome, used, p


def fixed_many(
    differences: Array,
    *,
    threshold: float,
    floor: float,
    implausible_gain: float = 0.05,
    higher_is_better: bool = True,
    confidence: float = DEFAULT_CONFIDENCE,
) -> Array:
    """The fixed-n rule (``stats.paired_stats`` read by ``compare.py``) on R tasks of n items each: the same
    capital, read once after all n. Codes as ``run_many``: PASS, REGRESSION, CATASTROPHIC, ANOMALOUS or
    INCONCLUSIVE (a CATASTROPHIC task is also past the threshold; an ANOMALOUS one also within it)."""
    limits = _Limits(threshold, floor, implausible_gain, confidence, confidence)
    x = _oriented(np.asarray(differences, dtype=np.float64), higher_is_better)
    n = x.shape[-1]
    paths = _Paths(x, n, limits)
    est = {name: _established(paths, name, n) for name in paths.claims}
    outcome = np.full(x.shape[:-1], INCONCLUSIVE)
    for name, code in (("pass", PASS), ("anomaly", ANOMALOUS), ("regression", REGRESSION),
                       ("floor", CATASTROPHIC)):
        outcome = np.where(est[name], code, outcome)
    return outcome
