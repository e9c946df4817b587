"""Paired per-sample statistics: how sure are we that the candidate lost (or did not lose) quality?

Pure and deterministic: plain numbers in, a frozen ``PairedStats`` out. All values are in the per-item unit (a
sample's correctness, 0..1, already averaged over its repeats); ``compare.py`` maps them onto the task's scale.

Why paired: baseline and candidate answer the *same* items, and a quantized model agrees with its source on
most of them. The variance of the per-item difference d = candidate - baseline is then far smaller than that of
two independent means (lm-eval #3831 applied an unpaired test to such data and lost most of its power).

Why betting (``betting.py``): the interval of the mean of d must be right at *every* n, for *every* kind of
per-item value (0/1, avg-of-N fractions, graded scores, pass@k). Asymptotic intervals are not: the paired
bootstrap turned 20 agreeing avg-of-2 items plus one gain into "the candidate is not worse" and 3 items with 2
lost into a certain 33-100 point drop; Tango's score interval (the old 0/1 path) claims a drop of at most 1 point
after 268 agreeing items, where the exact one-sided bound needs 299 (a true 1-point drop shows no loss in 268
items 6.8% of the time, more than the 5% claimed). The betting interval of Waudby-Smith & Ramdas (2024) holds
for any distribution on [0, 1] at any n, and under optional stopping. d in [-1, 1] is mapped to (d + 1) / 2 in
[0, 1]; the bets are tuned for the n at hand and the capital is read with its running maximum (Ville's
inequality covers both). The cost of exactness is width: at large n the interval is about sqrt(2 ln 20) / 1.645
= 1.49 times the normal-approximation one, so the same decision needs about 2.2 times the items; 347 agreeing
items resolve a 1-point threshold (the exact minimum for any valid test is 299).

Items are processed in a fixed pseudo-random order (``evaluation_order``: a keyed hash of the item id, the order
the sequential chain evaluates them in). The capital process is a supermartingale only if the items arrive in
an order unrelated to their values; a task file sorted by difficulty would otherwise put all losses first.
The estimand is the superpopulation mean: the task's items are taken as an iid sample of the items that could
have been asked, the same view any interval of a benchmark score takes.

``confidence`` is the one-sided confidence of each bound (default 0.95): a PASS ("the drop is at most the
threshold") and a REGRESSION ("the drop exceeds it") are each claimed at 95%, the two one-sided tests of
equivalence testing (Schuirmann's TOST); the pair of bounds is a two-sided 90% interval. ``one_sided_p`` gives
the p-value of each claim at an exact limit (what the family-wise control in ``family.py`` reads).

For 0/1 items the two-sided exact McNemar p-value (evidence of *any* change) is kept as a descriptive number;
no decision reads it.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from statistics import NormalDist

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from pytest_day0.failures import Day0Error, FailureClass
from pytest_day0.gates import betting
from pytest_day0.gates.betting import Array, Side
from pytest_day0.scoring.records import SampleRecord

DEFAULT_CONFIDENCE = 0.95
DEFAULT_POWER = 0.80
ORDER_SEED = 20240601
MAX_SAMPLES_NEEDED = 10_000_000
TEST_BETTING = "paired betting CI (Waudby-Smith & Ramdas 2024)"
TEST_BINARY = f"{TEST_BETTING} + exact McNemar"
TEST_POINT = "point estimate"
_EPS = 1e-12
_MAX_NAMED = 5
_PLANNING_GRID = 2048  # the empirical distribution is binned this finely when projecting to more items


class PairedStats(BaseModel):
    """The paired comparison of one task: means, the delta and its interval, in the per-item unit (0..1)."""

    model_config = ConfigDict(frozen=True)

    n: int  # paired items
    binary: bool
    mean_baseline: float
    mean_candidate: float
    delta: float  # candidate - baseline
    ci_low: float  # of delta, one-sided ``confidence`` lower bound
    ci_high: float
    confidence: float  # one-sided, of each bound
    test: str
    p_value: float | None = None  # exact two-sided McNemar (0/1 items only; descriptive, no decision reads it)
    gains: int | None = None  # 0/1 items: baseline wrong, candidate right
    losses: int | None = None  # 0/1 items: baseline right, candidate wrong
    sd: float  # per-item standard deviation of the differences
    horizon: int = 0  # the n the bets were tuned for (the number of pairs, or the sequential plan's size)
    seed: int = ORDER_SEED  # of the evaluation order
    left_out: int = 0  # pairs where a side has no score (errored); the run gate reports those
    # the per-item differences in evaluation order: what the p-values and the planning numbers are computed from
    differences: tuple[float, ...] = Field(default=(), exclude=True, repr=False)

    @property
    def interval_level(self) -> float:
        """Two-sided coverage of [ci_low, ci_high]."""
        return 2 * self.confidence - 1

    @property
    def z(self) -> float:
        return z_value(self.confidence)

    @property
    def se(self) -> float:
        """Effective standard error: half the interval over z (for plots and reports; no decision reads it)."""
        return (self.ci_high - self.ci_low) / (2 * self.z)


# ---------------------------------------------------------------------------------------------- helpers


def z_value(confidence: float) -> float:
    if not 0.5 < confidence < 1:
        raise Day0Error(FailureClass.USER_CONFIG_ERROR, f"confidence must be in (0.5, 1), got {confidence!r}")
    return float(NormalDist().inv_cdf(confidence))


def _name_some(ids: Iterable[str]) -> str:
    ids = sorted(ids)
    more = len(ids) - _MAX_NAMED
    return ", ".join(ids[:_MAX_NAMED]) + (f" (+{more} more)" if more > 0 else "")


def item_means(values: Iterable[tuple[str, float]]) -> dict[str, float]:
    """Avg-of-N: several values for one item id become their mean, so an item counts once when paired."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for item, value in values:
        sums[item] = sums.get(item, 0.0) + float(value)
        counts[item] = counts.get(item, 0) + 1
    return {item: sums[item] / counts[item] for item in sums}


def pair_items(
    baseline: Mapping[str, float], candidate: Mapping[str, float], *, task: str = "?"
) -> list[tuple[float, float]]:
    """Pairs in baseline order; an id on one side only is SAMPLE_ACCOUNTING_FAILED, never silently dropped."""
    missing = baseline.keys() - candidate.keys()
    extra = candidate.keys() - baseline.keys()
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"candidate lacks {len(missing)} ids: {_name_some(missing)}")
        if extra:
            parts.append(f"candidate has {len(extra)} extra ids: {_name_some(extra)}")
        raise Day0Error(FailureClass.SAMPLE_ACCOUNTING_FAILED, f"{task}: items do not pair: " + "; ".join(parts))
    return [(baseline[i], candidate[i]) for i in baseline]


def _check_values(pairs: Sequence[tuple[float, float]]) -> None:
    for b, c in pairs:
        for v in (b, c):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v <= 1:
                raise Day0Error(
                    FailureClass.SAMPLE_ACCOUNTING_FAILED,
                    f"per-item value {v!r} is not a correctness in [0, 1]: cannot pair it",
                )


def order_key(item_id: str, seed: int = ORDER_SEED) -> bytes:
    """A keyed hash of an item id: sorting by it is a fixed pseudo-random order unrelated to any outcome."""
    return hashlib.blake2b(f"{seed}:{item_id}".encode(), digest_size=16).digest()


def evaluation_order(item_ids: Iterable[str], seed: int = ORDER_SEED) -> list[str]:
    """The order items are evaluated (sequential chain) and processed (fixed-n) in; an added id keeps the others'
    relative order."""
    return sorted(item_ids, key=lambda i: order_key(i, seed))


def to_unit(delta: float) -> float:
    """A per-item difference in [-1, 1] as the [0, 1] variable the betting interval is built for."""
    return (delta + 1) / 2


def from_unit(x: float) -> float:
    return 2 * x - 1


def mcnemar_exact(gains: int, losses: int) -> float:
    """Two-sided exact McNemar p-value: the discordant pairs under H0 are Binomial(gains + losses, 1/2)."""
    m = gains + losses
    if m == 0:
        return 1.0
    k = min(gains, losses)
    tail = sum(math.comb(m, i) for i in range(k + 1))
    return min(1.0, 2 * tail / (1 << m))


# ---------------------------------------------------------------------------------------------- the interval


def _units(stats: PairedStats) -> Array:
    return (np.asarray(stats.differences, dtype=np.float64) + 1) / 2


def unit_interval(x: Array, confidence: float, horizon: int | None = None) -> tuple[float, float]:
    """One-sided ``confidence`` lower and upper bounds of the mean of ``x`` in [0, 1] (fixed-n: bets tuned for n)."""
    alpha = 1 - confidence
    bets = betting.plugin_bets(x, alpha, horizon if horizon is not None else len(x))
    mean = float(x.mean())
    low = min(betting.lower_bound(x, bets, alpha), mean)  # the interval always holds the estimate (see p_value)
    high = max(betting.upper_bound(x, bets, alpha), mean)
    return low, high


def paired_stats(
    pairs: Sequence[tuple[float, float]],
    confidence: float = DEFAULT_CONFIDENCE,
    *,
    ids: Sequence[str] | None = None,
    seed: int = ORDER_SEED,
    in_order: bool = False,
    horizon: int | None = None,
    left_out: int = 0,
    task: str = "?",
) -> PairedStats:
    """The paired comparison of (baseline, candidate) per-item values in [0, 1]; see the module docstring.

    ``ids`` name the items (default: their positions) and set the evaluation order; ``in_order`` takes the pairs
    as already in evaluation order (a seeded permutation the caller drew, as the sequential chain does).
    ``horizon`` is the n the bets are tuned for (default: the number of pairs; the sequential chain's plan).
    """
    z_value(confidence)
    if not pairs:
        raise Day0Error(FailureClass.SAMPLE_ACCOUNTING_FAILED, f"{task}: no item was scored on both sides")
    _check_values(pairs)
    if in_order:
        ordered = list(pairs)
    else:
        names = list(ids) if ids is not None else [str(i) for i in range(len(pairs))]
        if len(names) != len(pairs) or len(set(names)) != len(names):
            raise Day0Error(FailureClass.SAMPLE_ACCOUNTING_FAILED,
                            f"{task}: item ids are not one distinct id per pair")
        position = {name: i for i, name in enumerate(names)}
        ordered = [pairs[position[name]] for name in evaluation_order(names, seed)]
    n = len(ordered)
    horizon = horizon or n
    d = np.array([c - b for b, c in ordered], dtype=np.float64)
    low, high = unit_interval((d + 1) / 2, confidence, horizon)
    delta = float(d.mean())
    binary = all(b in (0, 1) and c in (0, 1) for b, c in ordered)
    gains = losses = None
    if binary:
        gains = sum(1 for b, c in ordered if b == 0 and c == 1)
        losses = sum(1 for b, c in ordered if b == 1 and c == 0)
    return PairedStats(
        n=n,
        binary=binary,
        mean_baseline=math.fsum(b for b, _ in ordered) / n,
        mean_candidate=math.fsum(c for _, c in ordered) / n,
        delta=delta,
        ci_low=max(-1.0, from_unit(low)),
        ci_high=min(1.0, from_unit(high)),
        confidence=confidence,
        test=TEST_BINARY if binary else TEST_BETTING,
        p_value=mcnemar_exact(gains, losses) if gains is not None and losses is not None else None,
        gains=gains,
        losses=losses,
        sd=float(d.std(ddof=1)) if n > 1 else 0.0,
        horizon=horizon,
        seed=seed,
        left_out=left_out,
        differences=tuple(float(v) for v in d),
    )


def paired_from_records(
    baseline: Sequence[SampleRecord],
    candidate: Sequence[SampleRecord],
    confidence: float = DEFAULT_CONFIDENCE,
    *,
    seed: int = ORDER_SEED,
    horizon: int | None = None,
) -> PairedStats:
    """Records -> per-item means (repeats averaged) -> pairs by id -> PairedStats.

    ``horizon``: the n the bets are tuned for when these records are a prefix of a longer planned evaluation (the
    sequential chain: the task's size), so the interval is the confidence sequence's at this n.

    An id on one side only is SAMPLE_ACCOUNTING_FAILED. A pair where either side errored is left out of the
    statistics and counted in ``left_out`` (the run gate already fails such a side, so nothing hides).
    """
    task = next((r.task for r in [*baseline, *candidate]), "?")
    sides: list[dict[str, float | None]] = []
    for records in (baseline, candidate):
        ids = list(dict.fromkeys(r.id for r in records))
        scored = item_means((r.id, r.correct) for r in records if r.error is None and r.correct is not None)
        sides.append({i: scored.get(i) for i in ids})  # None: the item errored on this side
    base, cand = sides
    pair_items({i: 0.0 for i in base}, {i: 0.0 for i in cand}, task=task)  # accounting first: ids, then errors
    kept = [i for i in base if base[i] is not None and cand[i] is not None]
    pairs = [(float(base[i]), float(cand[i])) for i in kept]  # type: ignore[arg-type]
    return paired_stats(pairs, confidence, ids=kept, seed=seed, horizon=horizon, left_out=len(base) - len(kept),
                        task=task)


def item_pairs(baseline: Sequence[SampleRecord], candidate: Sequence[SampleRecord]) -> list[tuple[str, float, float]]:
    """(id, baseline, candidate) per-item means (repeats averaged), in baseline order, for items both sides scored."""
    base = item_means((r.id, r.correct) for r in baseline if r.error is None and r.correct is not None)
    cand = item_means((r.id, r.correct) for r in candidate if r.error is None and r.correct is not None)
    return [(i, base[i], cand[i]) for i in dict.fromkeys(r.id for r in baseline) if i in base and i in cand]


def mean_interval(values: Sequence[float], confidence: float = DEFAULT_CONFIDENCE) -> tuple[float, float]:
    """One-sided bounds of a single side's mean of values in [0, 1], exact at every n: Clopper-Pearson for 0/1
    values (the tightest exact bounds of a proportion), the betting interval (fixed n) for any other values."""
    n = len(values)
    if n == 0:
        return (0.0, 1.0)
    z_value(confidence)
    if all(v in (0, 1) for v in values):
        return clopper_pearson(int(sum(values)), n, confidence)
    names = [str(i) for i in range(n)]
    x = np.array([values[int(i)] for i in evaluation_order(names)], dtype=np.float64)
    low, high = unit_interval(np.clip(x, 0.0, 1.0), confidence)
    return (max(0.0, low), min(1.0, high))


def _binomial_cdf(k: int, n: int, p: float, log_choose: Array) -> float:
    """P(X <= k), X ~ Binomial(n, p), summed in log space (``log_choose[j]`` = log C(n, j))."""
    if k < 0:
        return 0.0
    if p <= 0:
        return 1.0
    if p >= 1:
        return 1.0 if k >= n else 0.0
    j = np.arange(k + 1, dtype=np.float64)
    log_pmf = log_choose[: k + 1] + j * math.log(p) + (n - j) * math.log1p(-p)
    top = float(log_pmf.max())
    return min(1.0, math.exp(top) * float(np.exp(log_pmf - top).sum()))


def clopper_pearson(successes: int, n: int, confidence: float = DEFAULT_CONFIDENCE) -> tuple[float, float]:
    """One-sided ``confidence`` Clopper-Pearson bounds of a proportion: the p at which observing at most (at
    least) ``successes`` has probability 1 - confidence."""
    alpha = 1 - confidence
    log_factorial = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n + 1, dtype=np.float64)))])
    log_choose = log_factorial[n] - log_factorial - log_factorial[::-1]

    def solve(target: int, upper: bool) -> float:
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            # upper bound: P(X <= k; p) = alpha; lower bound: P(X >= k; p) = 1 - P(X <= k - 1; p) = alpha
            tail = (_binomial_cdf(target, n, mid, log_choose) if upper
                    else 1 - _binomial_cdf(target - 1, n, mid, log_choose))
            if (tail > alpha) == upper:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    low = 0.0 if successes == 0 else solve(successes, upper=False)
    high = 1.0 if successes == n else solve(successes, upper=True)
    return (low, high)


# ---------------------------------------------------------------------------------------------- claims


def one_sided_p(stats: PairedStats, limit: float, side: Side) -> float:
    """The p-value of a claim about delta at an exact ``limit`` (per-item unit), from the interval's own capital.

    side -1: H0 "delta >= limit", whose rejection says the candidate is below the limit (REGRESSION at
    -threshold, CATASTROPHIC at -floor for a higher-is-better task); side +1: H0 "delta <= limit" (PASS at
    -threshold, ANOMALOUS at +implausible_gain). p <= 1 - confidence exactly when the interval is wholly past
    the limit. Needs ``stats.differences`` (set by ``paired_stats``).
    """
    if not stats.differences:
        raise ValueError("one_sided_p needs the per-item differences (a PairedStats from paired_stats)")
    x = _units(stats)
    bets = betting.plugin_bets(x, 1 - stats.confidence, stats.horizon or len(x))
    return betting.p_value(x, to_unit(limit), side, bets)


def _decides_now(stats: PairedStats, limit: float, eps: float = 1e-9) -> bool:
    """Wholly past ``limit`` by more than ``interval_side``'s slack, whichever way the task's scale runs."""
    return stats.ci_low > limit + eps or stats.ci_high < limit - eps


# ---------------------------------------------------------------------------------------------- planning


def minimum_detectable_effect(stats: PairedStats, power: float = DEFAULT_POWER) -> float:
    """The distance from a limit this n resolves with ``power`` (per-item unit), read off the rule's own interval:
    half its width (the gap it decides at) plus z_power standard errors of the mean difference."""
    return (stats.ci_high - stats.ci_low) / 2 + NormalDist().inv_cdf(power) * stats.sd / math.sqrt(stats.n)


class _Projection:
    """The decision rule at a larger n if the items seen so far were typical: the same bets, now tuned for the
    larger horizon, replayed on the observed items, then the expected log growth of the items still to come."""

    def __init__(self, stats: PairedStats, limit: float) -> None:
        self.x = _units(stats)
        self.n = len(self.x)
        self.alpha = 1 - stats.confidence
        self.level = betting.log_threshold(self.alpha)
        self.m = to_unit(limit)
        mean = float(self.x.mean())
        self.side: Side = 1 if mean > self.m else -1
        t = np.arange(1, self.n + 1, dtype=np.float64)
        mu = (betting.PRIOR_WEIGHT * betting.PRIOR_MEAN + np.cumsum(self.x)) / (t + betting.PRIOR_WEIGHT)
        self.squares = betting.PRIOR_WEIGHT * betting.PRIOR_VARIANCE + float(np.sum((self.x - mu) ** 2))
        self.spread = float(np.mean((self.x - mean) ** 2))  # what each further item adds to the variance sum
        values, counts = np.unique(np.round(self.x * _PLANNING_GRID) / _PLANNING_GRID, return_counts=True)
        self.values = values.astype(np.float64)
        self.weights = counts / counts.sum()

    def decides(self, total: int) -> bool:
        bets = betting.plugin_bets(self.x, self.alpha, total)
        path = betting.log_capital(self.x, self.m, self.side, bets)
        if max(float(path.max()), 0.0) >= self.level:
            return True
        log_k = float(path[-1])
        start = self.n
        # the future in up to 48 geometric blocks; each block bets like its first item (the bet shrinks with t)
        edges = np.unique(np.geomspace(start + 1, total + 1, num=49).astype(np.int64))
        for a, b in itertools.pairwise(edges.tolist()):
            var = (self.squares + (a - 1 - start) * self.spread) / (a - 1 + betting.PRIOR_WEIGHT)
            lam = math.sqrt(2 * self.level / (max(var, _EPS) * total))
            limit = self.m if self.side > 0 else 1 - self.m
            if limit > 0:
                lam = min(lam, betting.BET_CAP / limit)
            growth = float(np.dot(self.weights, np.log1p(self.side * lam * (self.values - self.m))))
            log_k += (b - a) * growth
            if log_k >= self.level:
                return True
        return False


def samples_needed(stats: PairedStats, limit: float) -> int | None:
    """Items needed for the interval to exclude ``limit`` (a delta, per-item unit) if the observed items are typical.

    The same rule the decision uses, projected (``_Projection``): n when it decides now; otherwise the smallest
    larger count at which it would, so "evaluate N more" is never at or below what was already evaluated. None
    when no count decides (the estimate sits on the limit); capped at ``MAX_SAMPLES_NEEDED``.
    """
    if _decides_now(stats, limit):
        return stats.n
    if abs(stats.delta - limit) <= _EPS or not stats.differences:
        return None
    projection = _Projection(stats, limit)
    lo, step = stats.n, 1
    hi = stats.n + step
    while not projection.decides(hi):
        if hi >= MAX_SAMPLES_NEEDED:
            return MAX_SAMPLES_NEEDED
        lo, step = hi, step * 2
        hi = min(stats.n + step, MAX_SAMPLES_NEEDED)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if projection.decides(mid):
            hi = mid
        else:
            lo = mid
    return hi


def all_agree_bound(threshold: float, confidence: float = DEFAULT_CONFIDENCE) -> int:
    """The fewest items that, all agreeing, show a drop of at most ``threshold`` (> 0): below it no PASS rests on
    agreement alone. 347 for 1 point at 95% (the exact minimum for any valid test: log 20 / -log 0.99 = 299)."""
    if threshold <= 0:
        raise ValueError("with threshold 0 no number of agreeing items shows that nothing was lost")
    limit = to_unit(-threshold)
    alpha = 1 - confidence
    lo, hi = 1, 2
    while not _agree_passes(hi, limit, alpha):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _agree_passes(mid, limit, alpha):
            hi = mid
        else:
            lo = mid
    return hi


def _agree_passes(n: int, limit: float, alpha: float) -> bool:
    x = np.full(n, 0.5)
    return float(betting.max_log_capital(x, limit, 1, betting.plugin_bets(x, alpha, n))) >= betting.log_threshold(alpha)


def interval_side(low: float, high: float, limit: float, eps: float = 1e-9) -> str:
    """'within' when the whole interval is at or under ``limit``, 'beyond' when wholly over it, else 'straddles'."""
    if high <= limit + eps:
        return "within"
    if low > limit + eps:
        return "beyond"
    return "straddles"
