"""Gate outcomes -> a publish decision per recipe, and the session's recommendation across recipes.

Pure: takes GateOutcome records, returns pydantic models; the plugin prints and writes them.

How each failure class decides a recipe (the highest row that matches wins: INFEASIBLE > ANOMALOUS > REGRESSION >
INCONCLUSIVE > ACCEPT). A *warned* outcome counts like a
failed one — the tier decides the exit status, not what the release is; a skipped outcome counts when it carries
its upstream cause.

===========  =====================================================  =============================================
decision     classes                                                why
===========  =====================================================  =============================================
INFEASIBLE   MODEL_UNSUPPORTED, QUANT_COVERAGE_FAILURE,             the model+recipe cannot work as asked;
             CHECKPOINT_NOT_SERVABLE (``INFEASIBLE_CLASSES``)       re-running changes nothing
ANOMALOUS    SYSTEMIC, UNKNOWN, ANOMALOUS,                          no trustworthy measurement: a human (or a
             SAMPLE_ACCOUNTING_FAILED, EVAL_JUDGE_FAILED,           re-run) must look first. Outranks REGRESSION:
             INFRA_TRANSIENT, DEPLOYMENT_HEALTH_FAILED,             a broken measurement can fake a regression.
             EXTERNAL_BASELINE_MISMATCH, USER_CONFIG_ERROR;         A floor/quality gate skipped with no cause,
             a classless skipped floor/quality gate; no passed      or no comparison at all, is no evidence of
             floor/quality gate at all (both reported with class    quality.
             INCONCLUSIVE: nothing was measured)
REGRESSION   CATASTROPHIC_REGRESSION, REGRESSION,                   a measured, reproducible defect of this
             VERBOSITY_EXCEEDED, SIZE_NOT_REDUCED,                  candidate: worse scores, longer answers, no
             METADATA_MISMATCH                                      size gain (the only reason to quantize), or a
             (the divergence pre-check: CATASTROPHIC_REGRESSION     tokenizer / chat template / generation config
             when top-1 agreement is below its floor; its warn,     unlike the source's (users would get another
             KL above the tolerance, is advisory: a reason line     model), or next-token distributions so far
             that decides nothing — the evaluation measures what    from the baseline's that the candidate is
             the screen only predicts)                              broken. Not INFEASIBLE: another export of
                                                                    the same recipe may pass.
INCONCLUSIVE INCONCLUSIVE (a quality interval straddles the         measured, but too few samples to tell a drop
             threshold; a published-baseline interval straddles     within the threshold from one beyond it. Below
             the tolerance)                                         REGRESSION: evidence of a defect on another
                                                                    task decides first. Recommendation: "evaluate
                                                                    more samples: N" (the largest N the gates
                                                                    estimated). Warn tier: exit 0.
ACCEPT       (nothing above)                                        publish
===========  =====================================================  =============================================

Suggested session exit status (ModelOpt skill's convention): 2 when any outcome failed USER_CONFIG_ERROR,
1 when any hard-tier outcome failed, else 0 — so a warn-tier REGRESSION is reported but exits 0, as pytest does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pytest_day0.failures import INFEASIBLE_CLASSES, FailureClass
from pytest_day0.gates.outcome import GateOutcome

ReleaseDecision = Literal["ACCEPT", "INCONCLUSIVE", "REGRESSION", "ANOMALOUS", "INFEASIBLE"]

ANOMALOUS_CLASSES = frozenset(
    {
        FailureClass.SYSTEMIC,
        FailureClass.UNKNOWN,
        FailureClass.ANOMALOUS,
        FailureClass.SAMPLE_ACCOUNTING_FAILED,
        FailureClass.EVAL_JUDGE_FAILED,
        FailureClass.INFRA_TRANSIENT,
        FailureClass.DEPLOYMENT_HEALTH_FAILED,
        FailureClass.EXTERNAL_BASELINE_MISMATCH,
        FailureClass.USER_CONFIG_ERROR,
    }
)
REGRESSION_CLASSES = frozenset(
    {
        FailureClass.CATASTROPHIC_REGRESSION,
        FailureClass.REGRESSION,
        FailureClass.VERBOSITY_EXCEEDED,
        FailureClass.SIZE_NOT_REDUCED,
        FailureClass.METADATA_MISMATCH,
    }
)
INCONCLUSIVE_CLASSES = frozenset({FailureClass.INCONCLUSIVE})
# Every class decides something: a class added to failures.py without a row here fails the test suite.
CLASS_DECISION: dict[FailureClass, ReleaseDecision] = {
    **{c: "INFEASIBLE" for c in INFEASIBLE_CLASSES},
    **{c: "ANOMALOUS" for c in ANOMALOUS_CLASSES},
    **{c: "REGRESSION" for c in REGRESSION_CLASSES},
    **{c: "INCONCLUSIVE" for c in INCONCLUSIVE_CLASSES},
}
_RANK: dict[ReleaseDecision, int] = {"INFEASIBLE": 4, "ANOMALOUS": 3, "REGRESSION": 2, "INCONCLUSIVE": 1, "ACCEPT": 0}
COMPARISON_GATES = frozenset({"floor", "quality"})
_TASK_REGRESSIONS = frozenset({FailureClass.CATASTROPHIC_REGRESSION, FailureClass.REGRESSION})


class Verdict(BaseModel):
    model_config = ConfigDict(frozen=True)

    recipe: str
    decision: ReleaseDecision
    reasons: list[str] = Field(default_factory=list)  # one line per outcome that was not a plain pass
    regressed_tasks: list[str] = Field(default_factory=list)
    inconclusive_tasks: list[str] = Field(default_factory=list)
    samples_needed: int | None = None  # the most samples an inconclusive gate asked for (None: none could say)
    failure_classes: list[FailureClass] = Field(default_factory=list)
    size_ratio: float | None = None  # candidate bytes / source bytes
    recommendation: str
    hard_failed: bool = False  # any hard-tier outcome failed: pytest exits 1
    exit_status: int = 0  # suggestion: 2 an outcome failed USER_CONFIG_ERROR, 1 any hard failure, else 0
    counts: dict[str, int] = Field(default_factory=dict)  # outcomes by status


class SessionVerdict(BaseModel):
    model_config = ConfigDict(frozen=True)

    verdicts: list[Verdict]
    recommended: str | None  # the smallest recipe that ACCEPTs
    recommendation: str
    exit_status: int  # suggestion: 0 pass, 1 a hard gate failed, 2 bad input
    annotations: dict[str, Any] = Field(default_factory=dict)  # from other plugins (hook pytest_day0_verdict)


def _label(o: GateOutcome) -> str:
    parts = [p for p in (o.task, o.side) if p]
    where = f"{o.gate}" + (f" {'/'.join(parts)}" if parts else "")
    return where


def _counts(o: GateOutcome) -> bool:
    """Does this outcome say something about the release (beyond 'it passed')?"""
    if o.status in ("failed", "warned"):
        return True
    return o.status == "skipped" and (o.failure_class is not None or o.gate in COMPARISON_GATES)


def _cause(message: str) -> str:
    """What a downstream skip is about: the upstream failure's own message ('upstream PTQ x failed: <cause>')."""
    head, sep, rest = message.partition(" failed: ")
    return rest if sep and head.startswith("upstream ") else message


def _size_text(size_ratio: float | None, source_label: str) -> str:
    return f" ({size_ratio:.2f}× of {source_label} size)" if size_ratio is not None else ""


def decide(
    recipe: str, outcomes: Sequence[GateOutcome], size_ratio: float | None, *, source_label: str = "source"
) -> Verdict:
    """One recipe's decision from its outcomes (outcomes of other recipes are ignored); see the module table."""
    mine = [o for o in outcomes if o.recipe in (recipe, None)]
    decision: ReleaseDecision = "ACCEPT"
    reasons: list[str] = []
    classes: set[FailureClass] = set()
    regressed: list[str] = []
    untasked: list[str] = []
    inconclusive: list[str] = []
    needed: list[int] = []
    first: dict[ReleaseDecision, GateOutcome] = {}
    seen_causes: set[tuple[FailureClass | None, str]] = set()
    downstream: dict[FailureClass | None, int] = {}
    for o in mine:
        if not _counts(o):
            continue
        cls = o.failure_class
        cause = _cause(o.message)
        if o.status == "skipped" and (cls, cause) in seen_causes:
            downstream[cls] = downstream.get(cls, 0) + 1  # said once already: counted, not repeated
        elif cls is None:  # only a classless skipped comparison gate gets here
            reasons.append(f"[{FailureClass.INCONCLUSIVE}] {_label(o)} skipped: {o.message or 'no reason recorded'}")
        else:
            verb = {"failed": "failed", "warned": "warned", "skipped": "skipped"}[o.status]
            reasons.append(f"[{cls}] {_label(o)} {verb}: {o.message}".rstrip(": "))
        seen_causes.add((cls, cause))
        if o.advisory:
            continue  # a screen's prediction (KL above a tolerance): said, never decided on; the evaluation decides
        if cls is None:
            d: ReleaseDecision = "ANOMALOUS"
            classes.add(FailureClass.INCONCLUSIVE)
        else:
            d = CLASS_DECISION.get(cls, "ANOMALOUS")
            classes.add(cls)
            # measured regressions only: a gate skipped because the candidate was stopped upstream measured nothing
            if cls in _TASK_REGRESSIONS and o.status != "skipped":
                if o.task and o.task not in regressed:
                    regressed.append(o.task)
                elif not o.task and (breach := f"{_label(o)} {o.status} ({cls})") not in untasked:
                    untasked.append(breach)  # a whole-recipe gate (the divergence pre-check)
            if cls in INCONCLUSIVE_CLASSES and o.status != "skipped":
                if o.task and o.task not in inconclusive:
                    inconclusive.append(o.task)
                n = o.numbers.get("samples_needed")
                if isinstance(n, int) and not isinstance(n, bool):
                    needed.append(n)
        first.setdefault(d, o)
        if _RANK[d] > _RANK[decision]:
            decision = d
    for cls, n in downstream.items():
        reasons.append(f"[{cls or FailureClass.INCONCLUSIVE}] {n} more gate{'s' if n > 1 else ''} downstream "
                       "skipped for the same reason")
    if decision == "ACCEPT" and not any(o.gate in COMPARISON_GATES and o.status == "passed" for o in mine):
        decision = "ANOMALOUS"
        if any(o.gate in COMPARISON_GATES for o in mine):
            reasons.append(f"[{FailureClass.INCONCLUSIVE}] no task comparison passed: nothing shows the quality")
        else:  # every comparison gate leaves an outcome, even skipped: none at all means none was selected
            reasons.append(f"[{FailureClass.INCONCLUSIVE}] no task comparison was in this session (deselected with "
                           "-k/-m or node ids?): nothing shows the quality")
        classes.add(FailureClass.INCONCLUSIVE)

    size = _size_text(size_ratio, source_label)
    if decision == "ACCEPT":
        recommendation = f"publish {recipe}{size}"
    elif decision == "REGRESSION":
        what = []
        if regressed:
            what.append(f"quality regressed on {', '.join(regressed)}")
        what += untasked
        what += [str(c) for c in sorted(classes & (REGRESSION_CLASSES - _TASK_REGRESSIONS))]
        recommendation = f"do not publish {recipe}: {'; '.join(what)}"
    elif decision == "INCONCLUSIVE":
        more = f"evaluate more samples: {max(needed)}" if needed else "evaluate more samples"
        on = f" (inconclusive on {', '.join(inconclusive)})" if inconclusive else ""
        recommendation = f"{recipe} is not decided yet: {more}{on}"
    elif decision == "ANOMALOUS":
        an = first.get("ANOMALOUS")
        why = f"{an.failure_class or FailureClass.INCONCLUSIVE} at {_label(an)}" if an else "no comparison ran"
        also = f"; also regressed on {', '.join(regressed)}" if regressed else ""
        recommendation = f"do not publish {recipe}: needs a human ({why}){also}"
    else:
        inf = first["INFEASIBLE"]
        recommendation = f"{recipe} cannot be released as asked: {inf.failure_class} at {_label(inf)}: {inf.message}"
    hard_failed = any(o.status == "failed" for o in mine)
    bad_input = any(o.status == "failed" and o.failure_class is FailureClass.USER_CONFIG_ERROR for o in mine)
    counts: dict[str, int] = {}
    for o in mine:
        counts[o.status] = counts.get(o.status, 0) + 1
    return Verdict(
        recipe=recipe,
        decision=decision,
        reasons=reasons,
        regressed_tasks=regressed,
        inconclusive_tasks=inconclusive,
        samples_needed=max(needed) if needed else None,
        failure_classes=sorted(classes),
        size_ratio=size_ratio,
        recommendation=" ".join(recommendation.split()),
        hard_failed=hard_failed,
        exit_status=2 if bad_input else 1 if hard_failed else 0,
        counts=counts,
    )


def decide_session(verdicts: Sequence[Verdict]) -> SessionVerdict:
    """The recommendation across recipes: the smallest one that ACCEPTs (unknown size sorts last)."""
    accepted = sorted(
        (v for v in verdicts if v.decision == "ACCEPT"),
        key=lambda v: (v.size_ratio is None, v.size_ratio if v.size_ratio is not None else 0.0, v.recipe),
    )
    best = accepted[0] if accepted else None
    others = [f"{v.recipe}: {v.decision}" for v in verdicts if v is not best]
    if best is not None:
        recommendation = best.recommendation + (f"; {', '.join(others)}" if others else "")
    elif verdicts:
        recommendation = "publish none: " + "; ".join(v.recommendation for v in verdicts)
    else:
        recommendation = "publish none: no recipe was evaluated"
    statuses = {v.exit_status for v in verdicts}
    exit_status = 2 if 2 in statuses else max(statuses, default=0)
    return SessionVerdict(
        verdicts=list(verdicts),
        recommended=best.recipe if best else None,
        recommendation=recommendation,
        exit_status=exit_status,
    )
