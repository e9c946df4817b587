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

Comparisons allow a 1e-9 slack so 84.0 -> 83.0 at a 1-point threshold is "within" despite float rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict

from pytest_day0.failures import Day0Error, FailureClass, GateFailure, Tier
from pytest_day0.gates.outcome import GateOutcome, Status
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

    def describe(self) -> str:
        unit = _unit(self.scale)
        return (
            f"{self.task}: candidate {format_score(self.candidate, self.scale)} vs baseline "
            f"{format_score(self.baseline, self.scale)} (Δ {format_score(self.delta, self.scale, signed=True)}"
            f"{unit} on {format_scale(self.scale)})"
        )

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


QualityDecider = Callable[[ScoreDelta, float], Decision]


# ---------------------------------------------------------------------------------------------- decisions


def score_delta(spec: TaskSpec, baseline: float, candidate: float, *, relative: bool = False) -> ScoreDelta:
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


def decide_anomaly(d: ScoreDelta, implausible_gain: float) -> Decision:
    limit = format_score(implausible_gain * (d.scale[1] - d.scale[0]), d.scale)
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
    quality: QualityDecider = decide_quality,
) -> TaskComparison:
    """Compare one task's two sides on ``spec.scale``; ``abstain`` (from the run gate) makes the floor skip."""
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
    d = score_delta(spec, float(baseline.score), float(candidate.score), relative=relative)
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
        quality=quality(d, threshold),
        anomaly=decide_anomaly(d, implausible_gain),
    )


# ---------------------------------------------------------------------------------------------- outputs


def decision_status(decision: Decision, *, warn_as_error: bool = False) -> Status:
    """passed / skipped, or a breach: failed for the hard tier, warned for the warn tier."""
    if decision.skipped:
        return "skipped"
    if decision.passed:
        return "passed"
    return "warned" if decision.tier is Tier.WARN and not warn_as_error else "failed"


def comparison_numbers(c: TaskComparison) -> dict[str, float | int | str | None]:
    return {
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
    }


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
