"""One joint verdict across a session's tasks: family-wise control of the claims that something got worse.

With k tasks each claimed at one-sided 5%, two identical models draw a false REGRESSION on *some* task far more
often than 5% (up to 1 - 0.95^k: 40% at k = 10). The session verdict therefore reads the per-task one-sided
p-values (``TaskComparison.p_regression`` etc. for the fixed-n rule, ``SequentialDecision.p_regression`` for the
sequential one; both valid p-values, the sequential ones at any stopping time) through Holm's step-down
procedure (Holm 1979), which keeps the probability of *any* false claim in the family at most alpha under any
dependence between the tasks (they share the two models, so independence cannot be assumed). Each of the three
families of "worse" claims is controlled on its own: REGRESSION, CATASTROPHIC (the floor) and ANOMALOUS.

Holm and not a combined test (Fisher, Stouffer, or the combinations of Kübler et al. 2026, "When LLMs get
significantly worse", arXiv 2602.10144): a combined test answers "is the candidate worse on the suite as a whole",
more powerful against small drops spread over many tasks, but it names no task and needs independence or a
known dependence; a release verdict names the tasks that regressed, and Holm does so with no assumption.

PASS across all tasks needs no adjustment: the session claims "every task's drop is within its threshold",
whose null hypothesis "some task's drop exceeds it" is a union; rejecting it only when every task's own null is
rejected at alpha is an intersection-union test of level alpha (Berger 1982). More tasks make an all-PASS harder,
never easier to get wrong.

Per-task decisions stay as they are (each at its own 5%, shown per task); ``family_decision`` is what the session
verdict uses. For the sequential rule, ``per_task_confidence(k)`` is the level at which a task should stop on a
REGRESSION or the floor so that the stop itself survives the family control (Bonferroni, Holm's first step).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from pydantic import BaseModel, ConfigDict

from pytest_day0.failures import Day0Error, FailureClass
from pytest_day0.gates.compare import Decision, TaskComparison
from pytest_day0.gates.stats import DEFAULT_CONFIDENCE, z_value

METHOD = "Holm step-down on per-task one-sided p-values (family-wise error <= alpha per claim, any dependence)"
CLAIMS = ("regression", "catastrophic", "anomalous")


class TaskEvidence(BaseModel):
    """A task's one-sided p-values (None: the task made no such test, e.g. a failed stage or the point rule)."""

    model_config = ConfigDict(frozen=True)

    task: str
    p_regression: float | None = None  # H0: drop <= threshold
    p_pass: float | None = None  # H0: drop >= threshold
    p_floor: float | None = None  # H0: drop <= floor
    p_anomaly: float | None = None  # H0: gain <= implausible gain


class FamilyResult(BaseModel):
    """The session-level claims, each family-wise controlled at ``alpha``, and which control was used."""

    model_config = ConfigDict(frozen=True)

    method: str
    alpha: float
    tasks: list[str]
    regression: list[str]  # tasks whose REGRESSION claim survives Holm
    catastrophic: list[str]
    anomalous: list[str]
    all_pass: bool  # every task PASSes at alpha: the intersection-union test, no adjustment
    adjusted: dict[str, dict[str, float]]  # task -> claim -> Holm-adjusted p-value (tested claims only)


def holm(p_values: Mapping[str, float]) -> dict[str, float]:
    """Holm-adjusted p-values: reject a hypothesis at family-wise level alpha exactly when its value is <= alpha.

    Sorted ascending p_(1) <= ... <= p_(k): adjusted p_(i) = max_{j <= i} min(1, (k - j + 1) p_(j)).
    """
    for name, p in p_values.items():
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or not 0 <= p <= 1:
            raise Day0Error(FailureClass.SAMPLE_ACCOUNTING_FAILED, f"{name}: p-value {p!r} is not in [0, 1]")
    ordered = sorted(p_values.items(), key=lambda item: (item[1], item[0]))
    k = len(ordered)
    adjusted: dict[str, float] = {}
    running = 0.0
    for j, (name, p) in enumerate(ordered):
        running = max(running, min(1.0, (k - j) * p))
        adjusted[name] = running
    return adjusted


def per_task_confidence(tasks: int, confidence: float = DEFAULT_CONFIDENCE) -> float:
    """The one-sided confidence a task's own REGRESSION / floor stop needs so that it is a family-wise claim."""
    z_value(confidence)
    if tasks < 1:
        raise ValueError("a session has at least one task")
    return 1 - (1 - confidence) / tasks


def family_decision(evidence: Sequence[TaskEvidence], confidence: float = DEFAULT_CONFIDENCE) -> FamilyResult:
    """The session's claims from its tasks' p-values; see the module docstring."""
    z_value(confidence)
    alpha = 1 - confidence
    names = [e.task for e in evidence]
    if len(set(names)) != len(names):
        raise Day0Error(FailureClass.SAMPLE_ACCOUNTING_FAILED, "family_decision: a task is listed twice")
    fields = {"regression": "p_regression", "catastrophic": "p_floor", "anomalous": "p_anomaly"}
    adjusted: dict[str, dict[str, float]] = {name: {} for name in names}
    survivors: dict[str, list[str]] = {}
    for claim, field in fields.items():
        tested = {e.task: getattr(e, field) for e in evidence if getattr(e, field) is not None}
        holm_p = holm(tested)
        for name, p in holm_p.items():
            adjusted[name][claim] = p
        survivors[claim] = [name for name in names if name in holm_p and holm_p[name] <= alpha]
    all_pass = bool(evidence) and all(e.p_pass is not None and e.p_pass <= alpha for e in evidence)
    return FamilyResult(method=METHOD, alpha=alpha, tasks=names, regression=survivors["regression"],
                        catastrophic=survivors["catastrophic"], anomalous=survivors["anomalous"],
                        all_pass=all_pass, adjusted=adjusted)


def _evidence(c: TaskComparison) -> TaskEvidence:
    return TaskEvidence(task=c.task, p_regression=c.p_regression, p_pass=c.p_pass, p_floor=c.p_floor,
                        p_anomaly=c.p_anomaly)


def family_adjusted(comparisons: Sequence[TaskComparison], confidence: float = DEFAULT_CONFIDENCE
                    ) -> list[TaskComparison]:
    """One recipe's task comparisons with their "worse" claims controlled family-wise (Holm over its tasks).

    A per-task REGRESSION, floor breach or implausible gain stands only when it survives Holm; one that does not
    becomes what the evidence supports for the family — INCONCLUSIVE for the quality gate, a pass (no family-wise
    evidence) for the floor and the anomaly gates — and the per-task word is kept in ``task_decisions`` with the
    adjusted p-value, so nothing is hidden. PASS is left as it is (intersection-union). Comparisons without
    p-values (the point rule, a failed stage) are passed through.
    """
    tested = [c for c in comparisons if c.p_regression is not None or c.p_floor is not None
              or c.p_anomaly is not None]
    if not tested:
        return list(comparisons)
    result = family_decision([_evidence(c) for c in tested], confidence)
    k = len(tested)
    method = (f"Holm over {k} task{'s' if k > 1 else ''} (REGRESSION, floor and anomaly claims, family-wise "
              f"{1 - result.alpha:.0%}); PASS on every task as an intersection-union test")
    out = []
    for c in comparisons:
        if c not in tested:
            out.append(c)
            continue
        adjusted = result.adjusted.get(c.task, {})
        changes: dict[str, Decision] = {}
        words: dict[str, str] = {}
        checks = (("quality", c.quality, "regression", result.regression, FailureClass.REGRESSION),
                  ("floor", c.floor, "catastrophic", result.catastrophic, FailureClass.CATASTROPHIC_REGRESSION),
                  ("anomaly", c.anomaly, "anomalous", result.anomalous, FailureClass.ANOMALOUS))
        for gate, decision, claim, survivors, cls in checks:
            if decision.passed or decision.skipped or decision.failure_class is not cls or c.task in survivors:
                continue
            p = adjusted.get(claim, 1.0)
            why = (f"; per task {cls}, but not family-wise: Holm over {k} tasks gives adjusted p={p:.3g} > "
                   f"{result.alpha:g}")
            words[gate] = str(cls)
            if gate == "quality":
                changes[gate] = decision.model_copy(update={"failure_class": FailureClass.INCONCLUSIVE,
                                                            "message": decision.message + why})
            else:
                changes[gate] = decision.model_copy(update={"passed": True, "failure_class": None,
                                                            "message": decision.message + why})
        out.append(c.model_copy(update={**changes, "family": method, "task_decisions": words,
                                        "adjusted_p": {k2: round(v, 6) for k2, v in adjusted.items()}}))
    return out
