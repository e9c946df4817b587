"""The external baseline gate: does our baseline score what its authors published?

Pure. A baseline far from its published number is served or scored differently from how the authors ran it
(chat template, few-shot count, max length, answer extraction); then both sides of every comparison share the
mistake and a "no regression" means nothing. The ModelOpt skill's triage reruns the baseline when
|measured − published| > ~5 points; here that distance is 5% of the task's range (5 points on 0–100, 0.05 on 0–1,
10 on −100..100), and the published score may be on another scale than the task (converted through the
fraction of each range).

Tier **hard**, class EXTERNAL_BASELINE_MISMATCH (the verdict makes it ANOMALOUS: it blocks ACCEPT and CI goes
red) — a mis-served baseline invalidates the whole session, not one task. With an interval of the measured
baseline (paired statistics on) it fires only on evidence: the whole interval is more than the tolerance away.
An interval that reaches across the tolerance is INCONCLUSIVE (warn): too few samples to tell.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from pytest_day0.failures import FailureClass, GateFailure, Tier
from pytest_day0.gates.compare import format_scale, format_score
from pytest_day0.gates.outcome import GateOutcome, breach_status
from pytest_day0.scoring.published import PublishedScore

TOLERANCE = 0.05  # of the task's range
_EPS = 1e-9


class PublishedCheck(BaseModel):
    model_config = ConfigDict(frozen=True)

    task: str
    passed: bool
    failure_class: FailureClass | None = None
    tier: Tier = Tier.HARD
    message: str = ""
    numbers: dict[str, float | int | str | None] = Field(default_factory=dict)


def check_published(
    task: str,
    scale: tuple[float, float],
    measured: float,
    published: PublishedScore,
    *,
    interval: tuple[float, float] | None = None,
    n: int | None = None,
    tolerance: float = TOLERANCE,
) -> PublishedCheck:
    """``measured`` and ``interval`` are on the task's scale; ``interval`` (low, high) makes it evidence-based."""
    lo, hi = scale
    width = hi - lo
    want = lo + published.fraction() * width  # the published score on the task's scale
    tol = tolerance * width
    off = measured - want
    low, high = interval if interval is not None else (measured, measured)
    shown = format_score(measured, scale)
    if interval is not None:
        shown += f" [{format_score(low, scale)}, {format_score(high, scale)}]" + (f" n={n}" if n is not None else "")
    same = tuple(published.scale) == tuple(scale)
    notes = [] if same else [f"{published.score:g} on {format_scale(published.scale)}"]
    notes += [published.source] if published.source else []
    said = f" ({', '.join(notes)})" if notes else ""
    text = (f"{task}: measured baseline {shown} vs published {format_score(want, scale)}{said} on "
            f"{format_scale(scale)}: off by {format_score(off, scale, signed=True)}, tolerance "
            f"±{format_score(tol, scale)}")
    numbers: dict[str, float | int | str | None] = {
        "measured": measured, "published": want, "published_raw": published.score,
        "published_scale": format_scale(published.scale), "off": off, "tolerance_points": tol,
        "measured_low": low if interval is not None else None, "measured_high": high if interval is not None else None,
        "n": n,
    }
    nearest = 0.0 if low <= want <= high else min(abs(low - want), abs(high - want))
    farthest = max(abs(low - want), abs(high - want))
    if nearest > tol + _EPS * width:
        return PublishedCheck(
            task=task, passed=False, failure_class=FailureClass.EXTERNAL_BASELINE_MISMATCH, numbers=numbers,
            message=text + " — the baseline is served or scored unlike the published run (chat template, "
            "few-shot, max length, answer extraction)",
        )
    if farthest > tol + _EPS * width:
        return PublishedCheck(
            task=task, passed=False, failure_class=FailureClass.INCONCLUSIVE, tier=Tier.WARN, numbers=numbers,
            message=text + " — the interval reaches beyond the tolerance: too few samples to tell",
        )
    return PublishedCheck(task=task, passed=True, message=text, numbers=numbers)


def published_outcome(check: PublishedCheck, *, warn_as_error: bool = False) -> GateOutcome:
    """The typed record of one task's published-baseline check (hard; INCONCLUSIVE is warn)."""
    return GateOutcome(gate="published", task=check.task, tier=check.tier,
                       status=breach_status(check.passed, check.tier, warn_as_error=warn_as_error),
                       failure_class=None if check.passed else check.failure_class, message=check.message,
                       numbers=dict(check.numbers))


def assert_published(check: PublishedCheck) -> None:
    if not check.passed:
        raise GateFailure(check.failure_class or FailureClass.EXTERNAL_BASELINE_MISMATCH, check.message,
                          tier=check.tier)
