"""Paired per-sample statistics: how sure are we that the candidate lost (or did not lose) quality?

Pure and deterministic: plain numbers in, a frozen ``PairedStats`` out; the bootstrap uses a fixed seed so a
re-run reproduces every digit. All values are in the per-item unit (a sample's correctness, 0..1, already
averaged over its repeats); ``compare.py`` maps them onto the task's declared scale.

Why paired: baseline and candidate answer the *same* items, and a quantized model agrees with its source on
most of them. The variance of the per-item difference is then far smaller than that of two independent means
(lm-eval #3831 applied an unpaired test to such data and lost most of its power).

Methods, chosen by the data:

* **0/1 items** (every per-item value is 0 or 1): Tango's score interval for a difference of paired
  proportions (Tango 1998, Stat. Med. 17:891) and the exact two-sided McNemar p-value. A score interval stays
  honest where a bootstrap or t interval collapses: 20 items that all agree give a bootstrap interval of
  [0, 0] ("certain"), the score interval ±12 points. With few discordant items the asymptotic score bound can
  exclude 0 where the exact test cannot (3 of 20 items lost, none gained: Tango says "at least 1.3 points",
  exact McNemar one-sided p = 0.125), so the interval is *guarded*: a side that the exact one-sided McNemar
  test cannot establish at the same confidence is extended to 0. The guarded interval contains Tango's, so it
  is never less conservative; no verdict rests on a handful of flipped items.
* **anything else** (avg-of-N fractions, graded metrics): a paired percentile bootstrap over items, seeded.
  When every paired difference is identical the resamples cannot show variation they never saw, so the
  interval is widened to the score interval for zero disagreements among n items.

``confidence`` is the one-sided confidence of each bound (default 0.95): a PASS ("the drop is at most the
threshold") and a REGRESSION ("the drop exceeds it") are each claimed at 95%, the two one-sided tests of
equivalence testing (Schuirmann's TOST); the pair of bounds is a two-sided 90% interval.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from statistics import NormalDist

from pydantic import BaseModel, ConfigDict

from pytest_day0.failures import Day0Error, FailureClass
from pytest_day0.scoring.records import SampleRecord

DEFAULT_CONFIDENCE = 0.95
DEFAULT_POWER = 0.80
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 20240601
MAX_SAMPLES_NEEDED = 10_000_000
TEST_BINARY = "paired score CI (Tango, exact-guarded) + exact McNemar"
TEST_BOOTSTRAP = "paired bootstrap"
TEST_POINT = "point estimate"
_EPS = 1e-12
_MAX_NAMED = 5


class PairedStats(BaseModel):
    """The paired comparison of one task: means, the delta and its interval, in the per-item unit (0..1)."""

    model_config = ConfigDict(frozen=True)

    n: int  # paired items
    binary: bool
    mean_baseline: float
    mean_candidate: float
    delta: float  # candidate - baseline
    ci_low: float  # of delta
    ci_high: float
    confidence: float  # one-sided, of each bound
    test: str
    p_value: float | None = None  # exact McNemar (0/1 items only)
    gains: int | None = None  # 0/1 items: baseline wrong, candidate right
    losses: int | None = None  # 0/1 items: baseline right, candidate wrong
    sd: float  # per-item standard deviation of the differences
    resamples: int | None = None  # bootstrap only
    seed: int | None = None
    left_out: int = 0  # pairs where a side has no score (errored); the run gate reports those

    @property
    def interval_level(self) -> float:
        """Two-sided coverage of [ci_low, ci_high]."""
        return 2 * self.confidence - 1

    @property
    def z(self) -> float:
        return z_value(self.confidence)

    @property
    def se(self) -> float:
        """Effective standard error: half the interval over z (never 0 for a finite n, see the guard)."""
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


# ---------------------------------------------------------------------------------------------- 0/1 items


def _tango_z(gains: float, losses: float, n: float, d0: float) -> float:
    """Tango's score statistic for H0: delta = d0 (delta = (gains - losses) / n)."""
    w = -gains - losses + (2 * n - gains + losses) * d0
    q = (math.sqrt(max(w * w + 8 * n * losses * d0 * (1 - d0), 0.0)) - w) / (4 * n)  # restricted MLE of P(loss)
    var = n * (2 * q + d0 - d0 * d0)
    num = gains - losses - n * d0
    if var <= _EPS * n:
        return 0.0 if abs(num) <= _EPS * n else math.copysign(math.inf, num)
    return num / math.sqrt(var)


def score_interval(
    gains: float, losses: float, n: float, confidence: float = DEFAULT_CONFIDENCE
) -> tuple[float, float]:
    """Lower and upper one-sided ``confidence`` bounds of (gains - losses) / n; counts may be fractional."""
    if n <= 0:
        return (-1.0, 1.0)
    z = z_value(confidence)
    point = (gains - losses) / n

    def solve(lo: float, hi: float, target: float) -> float:
        # Z is decreasing in d0: find d0 with Z(d0) = target between lo and hi
        for _ in range(60):  # 2 / 2**60: below float resolution of a proportion
            mid = (lo + hi) / 2
            if _tango_z(gains, losses, n, mid) > target:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    low = -1.0 if point <= -1 + _EPS else solve(-1.0, point, z)
    high = 1.0 if point >= 1 - _EPS else solve(point, 1.0, -z)
    return (max(-1.0, min(low, point)), min(1.0, max(high, point)))


def binomial_upper_tail(k: int, m: int) -> float:
    """P(X >= k) for X ~ Binomial(m, 1/2), exact."""
    if k <= 0:
        return 1.0
    return min(1.0, sum(math.comb(m, i) for i in range(k, m + 1)) / (1 << m))


def mcnemar_exact(gains: int, losses: int) -> float:
    """Two-sided exact McNemar p-value: the discordant pairs under H0 are Binomial(gains + losses, 1/2)."""
    m = gains + losses
    if m == 0:
        return 1.0
    k = min(gains, losses)
    tail = sum(math.comb(m, i) for i in range(k + 1))
    return min(1.0, 2 * tail / (1 << m))


def _binary_stats(pairs: Sequence[tuple[float, float]], confidence: float) -> PairedStats:
    gains = sum(1 for b, c in pairs if b == 0 and c == 1)
    losses = sum(1 for b, c in pairs if b == 1 and c == 0)
    return binary_stats(gains, losses, len(pairs), int(sum(b for b, _ in pairs)), confidence)


def binary_stats(
    gains: int, losses: int, n: int, baseline_right: int, confidence: float = DEFAULT_CONFIDENCE
) -> PairedStats:
    """The 0/1 comparison from its counts alone (what the simulation tests drive directly)."""
    delta = (gains - losses) / n
    low, high = score_interval(gains, losses, n, confidence)
    alpha = 1 - confidence
    if binomial_upper_tail(losses, gains + losses) > alpha:  # the exact test cannot show the candidate is lower
        high = max(high, 0.0)
    if binomial_upper_tail(gains, gains + losses) > alpha:  # ... nor that it is higher
        low = min(low, 0.0)
    return PairedStats(
        n=n,
        binary=True,
        mean_baseline=baseline_right / n,
        mean_candidate=(baseline_right - losses + gains) / n,
        delta=delta,
        ci_low=low,
        ci_high=high,
        confidence=confidence,
        test=TEST_BINARY,
        p_value=mcnemar_exact(gains, losses),
        gains=gains,
        losses=losses,
        sd=math.sqrt(max((gains + losses) / n - delta * delta, 0.0)),
    )


# ---------------------------------------------------------------------------------------------- other items


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default)."""
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def bootstrap_mean_interval(
    values: Sequence[float], confidence: float, *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> tuple[float, float]:
    """Percentile bootstrap of a mean, one-sided ``confidence`` bounds, widened where no variation was seen."""
    n = len(values)
    mean = sum(values) / n
    rng = random.Random(seed)
    means = sorted(math.fsum(rng.choices(values, k=n)) / n for _ in range(resamples))
    low = min(_percentile(means, 1 - confidence), mean)
    high = max(_percentile(means, confidence), mean)
    guard = zero_variation_halfwidth(n, confidence)
    if high - low < _EPS:  # every value identical: no resample can show the spread an unseen item could have
        low, high = mean - guard, mean + guard
    return (max(low, -1.0), min(high, 1.0))


def zero_variation_halfwidth(n: int, confidence: float) -> float:
    """The score bound when none of n items disagreed: z² / (n + z²) (the 'rule of three' of score intervals)."""
    z2 = z_value(confidence) ** 2
    return z2 / (n + z2)


def _bootstrap_stats(
    pairs: Sequence[tuple[float, float]], confidence: float, resamples: int, seed: int
) -> PairedStats:
    n = len(pairs)
    deltas = [c - b for b, c in pairs]
    delta = math.fsum(deltas) / n
    low, high = bootstrap_mean_interval(deltas, confidence, resamples=resamples, seed=seed)
    sd = math.sqrt(math.fsum((d - delta) ** 2 for d in deltas) / (n - 1)) if n > 1 else 0.0
    return PairedStats(
        n=n,
        binary=False,
        mean_baseline=math.fsum(b for b, _ in pairs) / n,
        mean_candidate=math.fsum(c for _, c in pairs) / n,
        delta=delta,
        ci_low=low,
        ci_high=high,
        confidence=confidence,
        test=f"{TEST_BOOTSTRAP} ({resamples} resamples, seed {seed})",
        sd=sd,
        resamples=resamples,
        seed=seed,
    )


# ---------------------------------------------------------------------------------------------- entry points


def paired_stats(
    pairs: Sequence[tuple[float, float]],
    confidence: float = DEFAULT_CONFIDENCE,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    left_out: int = 0,
    task: str = "?",
) -> PairedStats:
    """The paired comparison of (baseline, candidate) per-item values in [0, 1]; see the module docstring."""
    z_value(confidence)
    if not pairs:
        raise Day0Error(FailureClass.SAMPLE_ACCOUNTING_FAILED, f"{task}: no item was scored on both sides")
    _check_values(pairs)
    if all(b in (0, 1) and c in (0, 1) for b, c in pairs):
        stats = _binary_stats(pairs, confidence)
    else:
        stats = _bootstrap_stats(pairs, confidence, resamples, seed)
    return stats.model_copy(update={"left_out": left_out}) if left_out else stats


def paired_from_records(
    baseline: Sequence[SampleRecord],
    candidate: Sequence[SampleRecord],
    confidence: float = DEFAULT_CONFIDENCE,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> PairedStats:
    """Records -> per-item means (repeats averaged) -> pairs by id -> PairedStats.

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
    pairs = [(b, c) for b, c in ((base[i], cand[i]) for i in base) if b is not None and c is not None]
    left_out = len(base) - len(pairs)
    return paired_stats(
        pairs,
        confidence,
        resamples=resamples,
        seed=seed,
        left_out=left_out,
        task=task,
    )


def mean_interval(values: Sequence[float], confidence: float = DEFAULT_CONFIDENCE) -> tuple[float, float]:
    """One-sided bounds of a single side's mean (Wilson score for 0/1 items, bootstrap otherwise)."""
    n = len(values)
    if n == 0:
        return (0.0, 1.0)
    mean = math.fsum(values) / n
    if all(v in (0, 1) for v in values):
        z = z_value(confidence)
        centre = (mean + z * z / (2 * n)) / (1 + z * z / n)
        half = z / (1 + z * z / n) * math.sqrt(mean * (1 - mean) / n + z * z / (4 * n * n))
        return (max(0.0, min(centre - half, mean)), min(1.0, max(centre + half, mean)))
    low, high = bootstrap_mean_interval(list(values), confidence)
    return (max(low, 0.0), min(high, 1.0))


# ---------------------------------------------------------------------------------------------- planning


def minimum_detectable_effect(stats: PairedStats, power: float = DEFAULT_POWER) -> float:
    """The distance from a limit that this n resolves with ``power`` (per-item unit): (z_conf + z_power) · SE."""
    return (stats.z + NormalDist().inv_cdf(power)) * stats.se


def _decides(stats: PairedStats, n: float, limit: float) -> bool:
    """Would the interval at ``n`` items (same observed rates) lie wholly on one side of ``limit``?"""
    if stats.binary:
        k = n / stats.n
        low, high = score_interval((stats.gains or 0) * k, (stats.losses or 0) * k, n, stats.confidence)
    else:
        half = (stats.z * stats.sd / math.sqrt(n) if stats.sd > 0
                else zero_variation_halfwidth(round(n), stats.confidence))
        low, high = stats.delta - half, stats.delta + half
    return low >= limit or high <= limit  # boundary ties do not matter for a planning estimate


def samples_needed(stats: PairedStats, limit: float) -> int | None:
    """Items needed for the interval to exclude ``limit`` (a delta, per-item unit) if the observed rates held.

    None when no finite number decides: the estimate sits on the limit. Capped at ``MAX_SAMPLES_NEEDED``.
    """
    if abs(stats.delta - limit) <= _EPS:
        return None
    if _decides(stats, stats.n, limit):
        return stats.n
    # start from the normal approximation (n · (z·SE / gap)²), then bracket and bisect on the real interval
    gap = abs(stats.delta - limit)
    guess = stats.n * (stats.z * max(stats.se, _EPS) / gap) ** 2
    lo = max(stats.n, min(int(guess / 2), MAX_SAMPLES_NEEDED // 2))
    while lo > stats.n and _decides(stats, lo, limit):
        lo = max(stats.n, lo // 2)
    hi = max(lo * 2, stats.n + 1)
    while not _decides(stats, hi, limit):
        if hi >= MAX_SAMPLES_NEEDED:
            return MAX_SAMPLES_NEEDED
        lo, hi = hi, min(hi * 2, MAX_SAMPLES_NEEDED)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _decides(stats, mid, limit):
            hi = mid
        else:
            lo = mid
    return hi


def interval_side(low: float, high: float, limit: float, eps: float = 1e-9) -> str:
    """'within' when the whole interval is at or under ``limit``, 'beyond' when wholly over it, else 'straddles'."""
    if high <= limit + eps:
        return "within"
    if low > limit + eps:
        return "beyond"
    return "straddles"
