"""The compare gate: did the candidate lose quality on a task, on that task's own declared scale?

Pure: takes a TaskSpec and two TaskResults, returns a TaskComparison; never reads files.

Thresholds are fractions of the task's declared range (``spec.scale_range``): 0.01 is 1 point on 0–100,
0.01 on 0–1 and 2 points on −100..100. The scale is never inferred from the values — the ModelOpt gate's
"1.0 if all values <= 1 else 100" reads a 0–100 task scored 0.8 -> 0.7 as a 10% drop, and flags
Omniscience (−100..100) as ANOMALOUS; both are wrong.

Three decisions per task (the bicameral two-tier gate plus the ModelOpt anomaly check):

* floor   — hard tier: drop fraction > ``floor``      -> CATASTROPHIC_REGRESSION (skips when the run gate abstains)
* quality — warn tier: drop fraction > ``threshold``  -> REGRESSION (``decide_quality``; paired statistics can
  replace it through ``compare_task(quality=...)``)
* anomaly — hard tier: gain fraction > ``implausible_gain`` -> ANOMALOUS (a quantized model that got much better
  more likely means the baseline is broken than that quantization helped)

With paired statistics (``compare_task(paired=PairedStats)``, the default of a release session, see
``stats.py``) every rule reads the interval instead of the point estimate, so no decision rests on noise:

* quality — PASS when the whole interval of the drop is within the threshold, REGRESSION when it is wholly
  beyond it, else INCONCLUSIVE (warn tier), stating the minimum detectable effect at this n and the samples
  that would decide
* floor   — CATASTROPHIC_REGRESSION only when the interval's smallest drop exceeds the floor (evidence)
* anomaly — ANOMALOUS only when the interval's smallest gain exceeds ``implausible_gain``

Comparisons allow a 1e-9 slack so 84.0 -> 83.0 at a 1-point threshold is "within" despite float rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from pytest_day0.failures import Day0Error, FailureClass, GateFailure, Tier
from pytest_day0.gates.betting import Side
from pytest_day0.gates.outcome import GateOutcome, Status, breach_status
from pytest_day0.gates.stats import (
    TEST_POINT,
    PairedStats,
    interval_side,
    minimum_detectable_effect,
    one_sided_p,
    samples_needed,
)
from pytest_day0.scoring.records import TaskResult
from pytest_day0.scoring.tasks import TaskSpec

_EPS = 1e-9


class GateSkipped(Exception):
    """A gate that could not judge (abstained, or its input failed upstream).

    Raised by the ``assert_*`` helpers instead of returning quietly, so a caller that forgets to turn it into
    ``pytest.skip(str(exc))`` gets an error, never a silent pass.
    """

    def __init__(self, reason: str, failure_class: FailureClass | None = None) -> None:
        self.reason = " ".join(reason.split())
        self.failure_class = failure_class
        prefix = f"[{failure_class}] " if failure_class else ""
        super().__init__(prefix + self.reason)


# ---------------------------------------------------------------------------------------------- formatting


def format_scale(scale: tuple[float, float]) -> str:
    lo, hi = scale
    return f"{lo:g}..{hi:g}" if lo < 0 else f"{lo:g}–{hi:g}"


def score_decimals(scale: tuple[float, float]) -> int:
    """0–1 scores need 3 decimals to show a 1% move; 0–100 and wider need 1."""
    width = scale[1] - scale[0]
    return 3 if width <= 1 else 2 if width < 10 else 1


def format_score(value: float | None, scale: tuple[float, float], *, signed: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    text = f"{value:+.{score_decimals(scale)}f}" if signed else f"{value:.{score_decimals(scale)}f}"
    return text


def _unit(scale: tuple[float, float]) -> str:
    return " points" if scale[1] - scale[0] > 1 else ""


# ---------------------------------------------------------------------------------------------- records


class ScoreDelta(BaseModel):
    """The numbers every decision is taken from, in the task's own units and as fractions."""

    model_config = ConfigDict(frozen=True)

    task: str
    scale: tuple[float, float]
    higher_is_better: bool
    baseline: float
    candidate: float
    delta: float  # candidate - baseline, own units
    drop: float  # positive when the candidate is worse, own units
    reference: float  # what a fraction is a fraction of: the range, or (relative) the baseline's distance from worst
    relative: bool
    drop_fraction: float
    gain_fraction: float  # improvement / range, always absolute (as the ModelOpt gate)
    paired: PairedStats | None = None  # with it, every decision reads the interval below
    drop_low: float | None = None  # own units: the interval of the drop (smallest, largest)
    drop_high: float | None = None

    @property
    def drop_low_fraction(self) -> float:
        return self.drop_fraction if self.drop_low is None else self.drop_low / self.reference

    @property
    def drop_high_fraction(self) -> float:
        return self.drop_fraction if self.drop_high is None else self.drop_high / self.reference

    @property
    def gain_low_fraction(self) -> float:
        """The smallest gain the interval allows, as a fraction of the range (anomaly rule)."""
        return self.gain_fraction if self.drop_high is None else -self.drop_high / (self.scale[1] - self.scale[0])

    def describe(self) -> str:
        unit = _unit(self.scale)
        interval = ""
        if self.paired is not None and self.drop_low is not None and self.drop_high is not None:
            p = self.paired
            width = self.scale[1] - self.scale[0]
            low = format_score(p.ci_low * width, self.scale, signed=True)
            high = format_score(p.ci_high * width, self.scale, signed=True)
            interval = f" [{low}, {high}] {p.interval_level:.0%} CI, n={p.n}"
        return (
            f"{self.task}: candidate {format_score(self.candidate, self.scale)} vs baseline "
            f"{format_score(self.baseline, self.scale)} (Δ {format_score(self.delta, self.scale, signed=True)}"
            f"{unit}{interval} on {format_scale(self.scale)})"
        )

    def test_text(self) -> str:
        if self.paired is None:
            return TEST_POINT
        p = f", p={self.paired.p_value:.3g}" if self.paired.p_value is not None else ""
        return f"{self.paired.test}{p}"

    def limit_text(self, name: str, fraction: float) -> str:
        """``floor 10.0 points`` or, relative, ``floor 10% of baseline (8.4 points)``."""
        points = format_score(fraction * self.reference, self.scale)
        unit = _unit(self.scale)
        if self.relative:
            return f"{name} {fraction:.0%} of baseline ({points}{unit})"
        return f"{name} {points}{unit}"


class Decision(BaseModel):
    """One gate's verdict on one task; ``skipped`` means it could not judge (and says why in ``message``)."""

    model_config = ConfigDict(frozen=True)

    gate: Literal["floor", "quality", "anomaly"]
    tier: Tier
    passed: bool
    skipped: bool = False
    failure_class: FailureClass | None = None
    message: str = ""


FLIP_TOLERANCE = 0.5  # per-item unit: 0/1 items flip at 1; an avg-of-2 item when one of its two repeats flips


class Flips(BaseModel):
    """Which items changed answer between the two sides, in the per-item unit (ids in the task's order)."""

    model_config = ConfigDict(frozen=True)

    n: int  # paired items
    tolerance: float
    lost: list[str]  # baseline better than candidate by at least ``tolerance`` (right -> wrong on 0/1 items)
    gained: list[str]

    @property
    def rate(self) -> float:
        return (len(self.lost) + len(self.gained)) / self.n if self.n else 0.0

    def describe(self) -> str:
        return f"{len(self.lost)} lost, {len(self.gained)} gained of {self.n} ({self.rate:.1%})"


def flips_of(pairs: Sequence[tuple[str, float, float]], tolerance: float = FLIP_TOLERANCE,
             higher_is_better: bool = True) -> Flips:
    """(id, baseline, candidate) per-item values -> the items that flipped, each way."""
    if not 0 < tolerance <= 1:
        raise Day0Error(FailureClass.USER_CONFIG_ERROR, f"flip tolerance must be in (0, 1], got {tolerance!r}")
    sign = 1.0 if higher_is_better else -1.0
    lost = [i for i, b, c in pairs if sign * (b - c) >= tolerance - _EPS]
    gained = [i for i, b, c in pairs if sign * (c - b) >= tolerance - _EPS]
    return Flips(n=len(pairs), tolerance=tolerance, lost=lost, gained=gained)


class AdaptiveStop(BaseModel):
    """How an adaptive (sequential) evaluation of a task ended: how many of its items, and why it stopped there."""

    model_config = ConfigDict(frozen=True)

    evaluated: int  # items both sides scored, a prefix of the seeded evaluation order
    task_size: int  # the task's items (or --day0-limit)
    outcome: str  # PASS / REGRESSION / CATASTROPHIC / ANOMALOUS / INCONCLUSIVE (sequential.Outcome)
    reason: str  # decided / exhausted / futile / watching the floor / stopped: <why>
    rounds: int

    def describe(self) -> str:
        return (f"adaptive: {self.evaluated} of {self.task_size} items in {self.rounds} round"
                f"{'s' if self.rounds != 1 else ''}, stopped {self.outcome} ({self.reason})")


class TaskComparison(BaseModel):
    """Everything the reports and the verdict need about one task of one recipe."""

    model_config = ConfigDict(frozen=True)

    task: str
    recipe: str | None = None
    scale: tuple[float, float]
    higher_is_better: bool = True
    metric: str = ""
    baseline: float | None
    candidate: float | None
    delta: float | None  # candidate - baseline, own units
    drop_fraction: float | None
    gain_fraction: float | None
    relative: bool = False
    threshold: float
    floor_fraction: float
    threshold_points: float | None  # own units, for reports (relative: of this baseline)
    floor_points: float | None
    abstain: bool = False
    floor: Decision
    quality: Decision
    anomaly: Decision
    # statistics (own units; None where a failed stage made no numbers). ``stat`` "point" is the plain rule.
    stat: Literal["paired", "point"] = "point"
    n: int | None = None  # paired items (point: the smaller side's scored samples)
    ci_low: float | None = None  # interval of delta (candidate - baseline)
    ci_high: float | None = None
    confidence: float | None = None  # one-sided, of each bound; the interval is two-sided 2c-1
    test: str = TEST_POINT
    p_value: float | None = None
    drop_fraction_low: float | None = None  # the interval of drop_fraction (for the plot and the rules)
    drop_fraction_high: float | None = None
    mde_points: float | None = None  # minimum detectable effect at this n (80% power), own units
    samples_needed: int | None = None  # samples that would decide the quality gate if the observed rates held
    # one-sided p-values of each claim at its exact limit (paired only; what family.py's session control reads):
    # REGRESSION (H0: drop <= threshold), PASS (H0: drop >= threshold), the floor and the anomaly
    p_regression: float | None = None
    p_pass: float | None = None
    p_floor: float | None = None
    p_anomaly: float | None = None
    # flips (Dutta et al. 2024: equal accuracy can hide many changed answers): items the candidate lost
    # (right -> wrong) and gained (wrong -> right); for graded values, a change of at least ``flip_tolerance``
    flips: Flips | None = None
    # the session-level control (gates/family.py): which one, and each gate's own per-task word where the
    # family-wise claim differs from it (a per-task REGRESSION that does not survive Holm is INCONCLUSIVE here)
    family: str | None = None
    task_decisions: dict[str, str] = Field(default_factory=dict)
    adjusted_p: dict[str, float] = Field(default_factory=dict)
    adaptive: AdaptiveStop | None = None  # --day0-adaptive: where the task's evaluation stopped, and why


QualityDecider = Callable[[ScoreDelta, float], Decision]


# ---------------------------------------------------------------------------------------------- decisions


def score_delta(
    spec: TaskSpec, baseline: float, candidate: float, *, relative: bool = False, paired: PairedStats | None = None
) -> ScoreDelta:
    lo, hi = spec.scale
    width = spec.scale_range
    delta = candidate - baseline
    drop = -delta if spec.higher_is_better else delta
    reference = width
    if relative:
        # distance of the baseline from the worst end of the scale; at the worst end nothing can be lost, so the
        # range is used instead of dividing by zero
        distance = abs(baseline - lo) if spec.higher_is_better else abs(hi - baseline)
        reference = distance if distance > _EPS else width
    drop_low = drop_high = None
    if paired is not None:
        # the interval of delta on the task's scale (per-item 0..1 times the range), then as a drop
        d_low, d_high = paired.ci_low * width, paired.ci_high * width
        drop_low, drop_high = (-d_high, -d_low) if spec.higher_is_better else (d_low, d_high)
    return ScoreDelta(
        task=spec.name,
        scale=spec.scale,
        higher_is_better=spec.higher_is_better,
        baseline=baseline,
        candidate=candidate,
        delta=delta,
        drop=drop,
        reference=reference,
        relative=relative,
        drop_fraction=drop / reference,
        gain_fraction=-drop / width,
        paired=paired,
        drop_low=drop_low,
        drop_high=drop_high,
    )


def decide_floor(d: ScoreDelta, floor: float, *, abstain: bool = False) -> Decision:
    limit = d.limit_text("floor", floor)
    if abstain:
        return Decision(
            gate="floor",
            tier=Tier.HARD,
            passed=False,
            skipped=True,
            failure_class=FailureClass.INCONCLUSIVE,
            message=f"{d.describe()}: too many errored samples to judge the floor ({limit})",
        )
    if d.paired is not None:  # evidence only: the smallest drop the interval allows must exceed the floor
        smallest = format_score(d.drop_low, d.scale)
        if d.drop_low_fraction > floor + _EPS:
            return Decision(
                gate="floor",
                tier=Tier.HARD,
                passed=False,
                failure_class=FailureClass.CATASTROPHIC_REGRESSION,
                message=f"{d.describe()}: even the smallest drop in the interval ({smallest}) exceeds {limit}",
            )
        return Decision(gate="floor", tier=Tier.HARD, passed=True,
                        message=f"{d.describe()}: no evidence of a drop beyond {limit}")
    if d.drop_fraction > floor + _EPS:
        return Decision(
            gate="floor",
            tier=Tier.HARD,
            passed=False,
            failure_class=FailureClass.CATASTROPHIC_REGRESSION,
            message=f"{d.describe()}, {limit}",
        )
    return Decision(gate="floor", tier=Tier.HARD, passed=True, message=f"{d.describe()}, within {limit}")


def decide_quality(d: ScoreDelta, threshold: float) -> Decision:
    """The point-estimate quality decision; a paired-statistics decider has the same signature."""
    limit = d.limit_text("threshold", threshold)
    if d.drop_fraction > threshold + _EPS:
        return Decision(
            gate="quality",
            tier=Tier.WARN,
            passed=False,
            failure_class=FailureClass.REGRESSION,
            message=f"{d.describe()}, {limit}",
        )
    return Decision(gate="quality", tier=Tier.WARN, passed=True, message=f"{d.describe()}, within {limit}")


def delta_limit(d: ScoreDelta, fraction: float) -> float:
    """A drop limit (fraction of the reference) as a delta in the per-item unit (0..1), for planning."""
    width = d.scale[1] - d.scale[0]
    drop_items = fraction * d.reference / width
    return -drop_items if d.higher_is_better else drop_items


def planning(d: ScoreDelta, threshold: float) -> tuple[float | None, int | None]:
    """(minimum detectable effect in own units at this n, samples that would decide the threshold)."""
    if d.paired is None:
        return None, None
    width = d.scale[1] - d.scale[0]
    return minimum_detectable_effect(d.paired) * width, samples_needed(d.paired, delta_limit(d, threshold))


def claim_p_values(d: ScoreDelta, threshold: float, floor: float, implausible_gain: float) -> dict[str, float | None]:
    """The one-sided p-value of each claim at its exact limit, read from the same capital as the interval.

    p <= 1 - confidence exactly when the interval is wholly past that limit, so a per-task decision and its
    p-value never disagree; ``family.py`` adjusts them across the session's tasks.
    """
    if d.paired is None or not d.paired.differences:
        return {"p_regression": None, "p_pass": None, "p_floor": None, "p_anomaly": None}
    worse: Side = -1 if d.higher_is_better else 1  # the side of delta a drop lies on
    better: Side = 1 if d.higher_is_better else -1
    return {
        "p_regression": one_sided_p(d.paired, delta_limit(d, threshold), worse),
        "p_pass": one_sided_p(d.paired, delta_limit(d, threshold), better),
        "p_floor": one_sided_p(d.paired, delta_limit(d, floor), worse),
        "p_anomaly": one_sided_p(d.paired, better * implausible_gain, better),  # a gain fraction of the range
    }


def decide_quality_paired(d: ScoreDelta, threshold: float) -> Decision:
    """The three-outcome rule on the interval of the drop; without an interval it is the point rule."""
    if d.paired is None:
        return decide_quality(d, threshold)
    limit = d.limit_text("threshold", threshold)
    unit = _unit(d.scale)
    side = interval_side(d.drop_low_fraction, d.drop_high_fraction, threshold)
    test = d.test_text()
    if side == "within":
        return Decision(gate="quality", tier=Tier.WARN, passed=True,
                        message=f"{d.describe()}: the whole interval is within {limit} ({test})")
    if side == "beyond":
        return Decision(
            gate="quality",
            tier=Tier.WARN,
            passed=False,
            failure_class=FailureClass.REGRESSION,
            message=f"{d.describe()}: the whole interval is beyond {limit}, a drop of at least "
            f"{format_score(d.drop_low, d.scale)}{unit} ({test})",
        )
    mde, needed = planning(d, threshold)
    decide = (f"about {needed} samples would decide if the observed rates hold" if needed is not None
              else "no sample count decides: the estimate sits on the threshold")
    return Decision(
        gate="quality",
        tier=Tier.WARN,
        passed=False,
        failure_class=FailureClass.INCONCLUSIVE,
        message=f"{d.describe()}: the interval straddles {limit} ({test}); at n={d.paired.n} the minimum "
        f"detectable effect is {format_score(mde, d.scale)}{unit}; {decide}",
    )


def decide_anomaly(d: ScoreDelta, implausible_gain: float) -> Decision:
    limit = format_score(implausible_gain * (d.scale[1] - d.scale[0]), d.scale)
    if d.paired is not None and d.gain_low_fraction > implausible_gain + _EPS:
        return Decision(
            gate="anomaly",
            tier=Tier.HARD,
            passed=False,
            failure_class=FailureClass.ANOMALOUS,
            message=f"{d.describe()}: even the smallest gain in the interval is over {limit}{_unit(d.scale)} "
            "— check the baseline",
        )
    if d.paired is not None:
        return Decision(gate="anomaly", tier=Tier.HARD, passed=True,
                        message=f"{d.describe()}: no evidence of a gain over {limit}")
    if d.gain_fraction > implausible_gain + _EPS:
        return Decision(
            gate="anomaly",
            tier=Tier.HARD,
            passed=False,
            failure_class=FailureClass.ANOMALOUS,
            message=f"{d.describe()}: implausible gain over {limit}{_unit(d.scale)} — check the baseline",
        )
    return Decision(gate="anomaly", tier=Tier.HARD, passed=True, message=f"{d.describe()}, gain within {limit}")


def _check_fraction(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise Day0Error(
            FailureClass.USER_CONFIG_ERROR, f"{name} must be a non-negative fraction of the task's range, got {value!r}"
        )


def _usable(score: float | None) -> bool:
    return isinstance(score, (int, float)) and not isinstance(score, bool) and math.isfinite(score)


def _skipped(gate: Literal["floor", "quality", "anomaly"], tier: Tier, why: str, cls: FailureClass | None) -> Decision:
    return Decision(gate=gate, tier=tier, passed=False, skipped=True, failure_class=cls, message=why)


def missing_comparison(
    spec: TaskSpec,
    reason: str,
    *,
    recipe: str | None = None,
    failure_class: FailureClass | None = None,
    baseline: float | None = None,
    candidate: float | None = None,
    threshold: float = 0.01,
    floor: float = 0.10,
) -> TaskComparison:
    """A row for a task that could not be compared (a stage failed upstream), so reports still list it."""
    why = f"{spec.name}: {reason}"
    return TaskComparison(
        task=spec.name,
        recipe=recipe,
        scale=spec.scale,
        higher_is_better=spec.higher_is_better,
        metric=spec.metric,
        baseline=baseline,
        candidate=candidate,
        delta=None,
        drop_fraction=None,
        gain_fraction=None,
        threshold=threshold,
        floor_fraction=floor,
        threshold_points=threshold * spec.scale_range,
        floor_points=floor * spec.scale_range,
        floor=_skipped("floor", Tier.HARD, why, failure_class),
        quality=_skipped("quality", Tier.WARN, why, failure_class),
        anomaly=_skipped("anomaly", Tier.HARD, why, failure_class),
    )


def compare_task(
    spec: TaskSpec,
    baseline: TaskResult,
    candidate: TaskResult,
    *,
    threshold: float = 0.01,
    floor: float = 0.10,
    relative: bool = False,
    implausible_gain: float = 0.05,
    abstain: bool = False,
    recipe: str | None = None,
    quality: QualityDecider | None = None,
    paired: PairedStats | None = None,
    flips: Flips | None = None,
) -> TaskComparison:
    """Compare one task's two sides on ``spec.scale``; ``abstain`` (from the run gate) makes the floor skip.

    ``paired`` (from ``stats.paired_from_records``) switches every rule to its interval; ``quality`` replaces
    the quality rule (default: the interval rule with ``paired``, the point rule without).
    """
    for name, value in (("threshold", threshold), ("floor", floor), ("implausible_gain", implausible_gain)):
        _check_fraction(name, value)
    for side in (baseline, candidate):
        if side.task != spec.name:
            raise Day0Error(
                FailureClass.SAMPLE_ACCOUNTING_FAILED,
                f"{spec.name}: the {side.side} result is for task {side.task!r}",
            )
        if tuple(side.scale) != tuple(spec.scale):
            raise Day0Error(
                FailureClass.SAMPLE_ACCOUNTING_FAILED,
                f"{spec.name}: the {side.side} result is on scale {format_scale(side.scale)}, "
                f"the task declares {format_scale(spec.scale)} (stale records?)",
            )
    if not (_usable(baseline.score) and _usable(candidate.score)):
        sides = [s.side for s in (baseline, candidate) if not _usable(s.score)]
        return missing_comparison(
            spec,
            f"no valid {' and '.join(sides)} score (the run gate failed upstream)",
            recipe=recipe,
            baseline=baseline.score if _usable(baseline.score) else None,
            candidate=candidate.score if _usable(candidate.score) else None,
            threshold=threshold,
            floor=floor,
        )
    assert baseline.score is not None and candidate.score is not None
    if paired is not None and paired.left_out == 0:
        for side, mean in ((baseline, paired.mean_baseline), (candidate, paired.mean_candidate)):
            if abs(spec.to_scale(mean) - float(side.score)) > 1e-6 * spec.scale_range:  # type: ignore[arg-type]
                raise Day0Error(
                    FailureClass.SAMPLE_ACCOUNTING_FAILED,
                    f"{spec.name}: the {side.side} records give {spec.to_scale(mean):g}, its result says "
                    f"{side.score:g} (stale or foreign records?)",
                )
    d = score_delta(spec, float(baseline.score), float(candidate.score), relative=relative, paired=paired)
    decider = quality or (decide_quality_paired if paired is not None else decide_quality)
    mde, needed = planning(d, threshold)
    width = spec.scale_range
    p_values = claim_p_values(d, threshold, floor, implausible_gain)
    return TaskComparison(
        task=spec.name,
        recipe=recipe,
        scale=spec.scale,
        higher_is_better=spec.higher_is_better,
        metric=spec.metric,
        baseline=d.baseline,
        candidate=d.candidate,
        delta=d.delta,
        drop_fraction=d.drop_fraction,
        gain_fraction=d.gain_fraction,
        relative=relative,
        threshold=threshold,
        floor_fraction=floor,
        threshold_points=threshold * d.reference,
        floor_points=floor * d.reference,
        abstain=abstain,
        floor=decide_floor(d, floor, abstain=abstain),
        quality=decider(d, threshold),
        anomaly=decide_anomaly(d, implausible_gain),
        stat="paired" if paired is not None else "point",
        n=paired.n if paired is not None else min(baseline.scored_samples, candidate.scored_samples),
        ci_low=paired.ci_low * width if paired is not None else None,
        ci_high=paired.ci_high * width if paired is not None else None,
        confidence=paired.confidence if paired is not None else None,
        test=paired.test if paired is not None else TEST_POINT,
        p_value=paired.p_value if paired is not None else None,
        drop_fraction_low=d.drop_low_fraction if paired is not None else None,
        drop_fraction_high=d.drop_high_fraction if paired is not None else None,
        mde_points=mde,
        samples_needed=needed,
        flips=flips,
        p_regression=p_values["p_regression"],
        p_pass=p_values["p_pass"],
        p_floor=p_values["p_floor"],
        p_anomaly=p_values["p_anomaly"],
    )


# ---------------------------------------------------------------------------------------------- outputs


def decision_status(decision: Decision, *, warn_as_error: bool = False) -> Status:
    """passed / skipped, or a breach: failed for the hard tier, warned for the warn tier."""
    return breach_status(decision.passed, decision.tier, warn_as_error=warn_as_error, skipped=decision.skipped)


def comparison_decision(c: TaskComparison) -> str:
    """One word per task for tables and plots: the hard breaches first, then the quality outcome."""
    for d in (c.floor, c.anomaly):
        if not d.passed and not d.skipped and d.failure_class:
            return str(d.failure_class)
    q = c.quality
    if q.skipped:
        return "SKIPPED"
    if q.passed:
        return "PASS"
    return str(q.failure_class or FailureClass.UNKNOWN)


def comparison_numbers(c: TaskComparison) -> dict[str, float | int | str | None]:
    return {
        "decision": comparison_decision(c),
        "n": c.n,
        "ci_low": c.ci_low,
        "ci_high": c.ci_high,
        "test": c.test,
        "p_value": c.p_value,
        "stat": c.stat,
        "confidence": c.confidence,
        "mde_points": c.mde_points,
        "samples_needed": c.samples_needed,
        "p_regression": c.p_regression,
        "p_pass": c.p_pass,
        "p_floor": c.p_floor,
        "p_anomaly": c.p_anomaly,
        "baseline": c.baseline,
        "candidate": c.candidate,
        "delta": c.delta,
        "drop_fraction": c.drop_fraction,
        "gain_fraction": c.gain_fraction,
        "threshold": c.threshold,
        "floor": c.floor_fraction,
        "threshold_points": c.threshold_points,
        "floor_points": c.floor_points,
        "scale": format_scale(c.scale),
        "relative": int(c.relative),
        **flip_numbers(c.flips),
        **({"evaluated": c.adaptive.evaluated, "task_size": c.adaptive.task_size,
            "adaptive_stop": f"{c.adaptive.outcome} ({c.adaptive.reason})"} if c.adaptive else {}),
    }


FLIP_IDS_SHOWN = 50  # per direction in test properties; verdict.json and the comparison files keep them all


def flip_numbers(flips: Flips | None) -> dict[str, float | int | str | None]:
    if flips is None:
        return {}
    def ids(items: list[str]) -> str:
        more = len(items) - FLIP_IDS_SHOWN
        return ",".join(items[:FLIP_IDS_SHOWN]) + (f",... (+{more} more)" if more > 0 else "")
    return {"flips_lost": len(flips.lost), "flips_gained": len(flips.gained), "flip_rate": flips.rate,
            "flip_tolerance": flips.tolerance, "flipped_lost_ids": ids(flips.lost),
            "flipped_gained_ids": ids(flips.gained)}


def decision_outcome(
    c: TaskComparison, decision: Decision, *, warn_as_error: bool = False, nodeid: str | None = None
) -> GateOutcome:
    return GateOutcome(
        gate=decision.gate,
        recipe=c.recipe,
        task=c.task,
        status=decision_status(decision, warn_as_error=warn_as_error),
        tier=decision.tier,
        failure_class=decision.failure_class,
        message=decision.message,
        numbers=comparison_numbers(c),
        nodeid=nodeid,
    )


def comparison_outcomes(c: TaskComparison, *, warn_as_error: bool = False) -> list[GateOutcome]:
    """The floor, quality and anomaly outcomes of one task, for the verdict and the reports."""
    return [decision_outcome(c, d, warn_as_error=warn_as_error) for d in (c.floor, c.quality, c.anomaly)]


def assert_decision(decision: Decision) -> None:
    """Raise GateFailure on a breach (with the decision's tier) or GateSkipped when it could not judge."""
    if decision.skipped:
        raise GateSkipped(decision.message, decision.failure_class)
    if not decision.passed:
        raise GateFailure(decision.failure_class or FailureClass.UNKNOWN, decision.message, tier=decision.tier)


def assert_floor(c: TaskComparison) -> None:
    assert_decision(c.floor)


def assert_quality(c: TaskComparison) -> None:
    assert_decision(c.quality)


def assert_no_anomaly(c: TaskComparison) -> None:
    assert_decision(c.anomaly)
