"""The run gate: did one side's evaluation of one task produce a score we may compare?

Pure: takes a TaskResult (or records), returns a decision; never reads files. The classification follows the
ModelOpt day0-release ``gate_run`` (judge/auth errors -> EVAL_JUDGE_FAILED, non-terminal status ->
INFRA_TRANSIENT, accounting -> SAMPLE_ACCOUNTING_FAILED, else UNKNOWN, empty -> USER_CONFIG_ERROR) with two
additions: a score outside the task's declared scale is an accounting failure, and the bicameral
``is_inconclusive`` rule sets ``abstain`` so the floor test skips instead of firing on noise.

Order of the rules (first match wins), and why:

====  =========================================================  ============================
 #    condition                                                  class
====  =========================================================  ============================
 1    expected_samples <= 0                                      USER_CONFIG_ERROR
 2    first_error starts with [EVAL_JUDGE_FAILED] or mentions    EVAL_JUDGE_FAILED
      judge / rate limit / unauthorized / auth                   (wait + retry beats re-running)
 3    status RUNNING/PENDING/TIMEOUT/RESUMING/INCOMPLETE         INFRA_TRANSIENT
 4    first_error starts with a known ``[CLASS]``                that class (the stage knew why)
 5    status is anything else but SUCCESS (e.g. FAILED)          UNKNOWN
 6    scored + errored != expected, or scored > expected         SAMPLE_ACCOUNTING_FAILED
      (samples vanished or were counted twice)
 7    errored_samples > 0 with no recognisable cause             UNKNOWN (they are accounted
                                                                 for, but nobody knows why)
 8    score None / bool / non-numeric / non-finite / off-scale   SAMPLE_ACCOUNTING_FAILED
====  =========================================================  ============================
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence

from pydantic import BaseModel, ConfigDict, Field

from pytest_day0.failures import Day0Error, FailureClass, GateFailure, Tier
from pytest_day0.gates.outcome import GateOutcome
from pytest_day0.scoring.records import SampleRecord, TaskResult

NON_TERMINAL_STATUSES = frozenset({"RUNNING", "PENDING", "TIMEOUT", "RESUMING", "INCOMPLETE"})

# The ModelOpt gate's judge markers; "auth" as a word so "author" in a model's output does not match.
_JUDGE = re.compile(r"judge|rate[ _-]?limit|unauthori[sz]ed|\bauth(entication|orization)?\b|\b429\b", re.IGNORECASE)
_CLASS_PREFIX = re.compile(r"^\s*\[([A-Z_]+)\]")

_MAX_NAMED_IDS = 5  # messages stay one readable line; the full lists travel in ``detail``


class RunCheck(BaseModel):
    """The run gate's decision for one (side, task)."""

    model_config = ConfigDict(frozen=True)

    passed: bool
    failure_class: FailureClass | None = None
    message: str = ""
    numbers: dict[str, float | int | str | None] = Field(default_factory=dict)
    abstain: bool = False  # too many errored samples to let the floor fire on this side's score


def _classify_error(text: str | None) -> FailureClass | None:
    if not text:
        return None
    if _JUDGE.search(text):
        return FailureClass.EVAL_JUDGE_FAILED
    m = _CLASS_PREFIX.match(text)
    if m and m.group(1) in FailureClass.__members__:
        return FailureClass(m.group(1))
    return None


def _valid_score(score: object, scale: tuple[float, float]) -> str | None:
    """Why ``score`` cannot be compared, or None when it can."""
    if score is None:
        return "no score"
    if isinstance(score, bool) or not isinstance(score, (int, float)):
        return f"score {score!r} is not a number"
    if not math.isfinite(score):
        return f"score {score!r} is not finite"
    lo, hi = scale
    if not lo <= score <= hi:
        return f"score {score:g} is outside the task's declared scale [{lo:g}, {hi:g}]"
    return None


def check_run(result: TaskResult, abstain_error_rate: float = 0.5) -> RunCheck:
    """Judge one side's TaskResult; see the module table for the rule order."""
    expected, scored, errored = result.expected_samples, result.scored_samples, result.errored_samples
    status = str(result.status).strip().upper()
    numbers: dict[str, float | int | str | None] = {
        "expected_samples": expected,
        "scored_samples": scored,
        "errored_samples": errored,
        "score": result.score if _valid_score(result.score, (-math.inf, math.inf)) is None else None,
        "status": status,
    }
    abstain = expected <= 0 or errored / expected >= abstain_error_rate
    where = f"{result.side}/{result.task}"
    err = f"; first error: {' '.join(result.first_error.split())}" if result.first_error else ""
    counts = f"{scored}/{expected} scored, {errored} errored"

    def fail(cls: FailureClass, why: str) -> RunCheck:
        return RunCheck(
            passed=False, failure_class=cls, message=f"{where}: {why}", numbers=numbers, abstain=abstain
        )

    if expected <= 0:
        return fail(FailureClass.USER_CONFIG_ERROR, "the task has no samples to evaluate")
    troubled = status != "SUCCESS" or errored > 0 or scored != expected  # a retried-then-fine error is no failure
    known = _classify_error(result.first_error) if troubled else None
    if known is FailureClass.EVAL_JUDGE_FAILED:
        return fail(known, f"status {status}, {counts}{err}")
    if status in NON_TERMINAL_STATUSES:
        return fail(FailureClass.INFRA_TRANSIENT, f"evaluation not finished (status {status}), {counts}{err}")
    if known is not None and (status != "SUCCESS" or errored > 0):
        return fail(known, f"status {status}, {counts}{err}")
    if status != "SUCCESS":
        return fail(FailureClass.UNKNOWN, f"status {status}, {counts}{err}")
    if scored + errored != expected or scored > expected:
        return fail(
            FailureClass.SAMPLE_ACCOUNTING_FAILED,
            f"{scored} scored + {errored} errored != {expected} expected samples{err}",
        )
    if errored > 0:
        return fail(FailureClass.UNKNOWN, f"{counts}{err or '; no error text recorded'}")
    why = _valid_score(result.score, result.scale)
    if why is not None:
        return fail(FailureClass.SAMPLE_ACCOUNTING_FAILED, why)
    return RunCheck(passed=True, message=f"{where}: {counts}, score {result.score:g}", numbers=numbers)


def run_outcome(
    check: RunCheck, result: TaskResult, recipe: str | None = None, nodeid: str | None = None
) -> GateOutcome:
    """The common record of a run gate (always a hard gate: a side without a valid score cannot be compared)."""
    return GateOutcome(
        gate="run",
        recipe=recipe,
        task=result.task,
        side=result.side,
        status="passed" if check.passed else "failed",
        tier=Tier.HARD,
        failure_class=check.failure_class,
        message=check.message,
        numbers={**check.numbers, "abstain": int(check.abstain)},
        nodeid=nodeid,
    )


def assert_run(check: RunCheck) -> None:
    """Raise the GateFailure a pytest test reports when the run gate did not pass."""
    if not check.passed:
        raise GateFailure(
            check.failure_class or FailureClass.UNKNOWN, check.message, tier=Tier.HARD, **check.numbers
        )


def _name_some(ids: Iterable[str]) -> str:
    ids = sorted(ids)
    shown = ", ".join(ids[:_MAX_NAMED_IDS])
    more = len(ids) - _MAX_NAMED_IDS
    return f"{shown} (+{more} more)" if more > 0 else shown


def check_task_sets(baseline_tasks: set[str], candidate_tasks: set[str]) -> RunCheck:
    """Both sides must have evaluated the same tasks; a difference means nobody can say what was compared.

    The decision is ANOMALOUS (needs a human, as in the ModelOpt gate); ``numbers["detail_class"]`` says the
    underlying cause is SAMPLE_ACCOUNTING_FAILED so reports can show both.
    """
    missing = baseline_tasks - candidate_tasks
    extra = candidate_tasks - baseline_tasks
    numbers: dict[str, float | int | str | None] = {
        "baseline_tasks": ",".join(sorted(baseline_tasks)),
        "candidate_tasks": ",".join(sorted(candidate_tasks)),
    }
    if not missing and not extra:
        return RunCheck(passed=True, message=f"both sides evaluated {len(baseline_tasks)} tasks", numbers=numbers)
    parts = []
    if missing:
        parts.append(f"candidate lacks {_name_some(missing)}")
    if extra:
        parts.append(f"candidate has extra {_name_some(extra)}")
    return RunCheck(
        passed=False,
        failure_class=FailureClass.ANOMALOUS,
        message=f"task sets differ ({FailureClass.SAMPLE_ACCOUNTING_FAILED}): " + "; ".join(parts),
        numbers={
            **numbers,
            "missing": ",".join(sorted(missing)),
            "extra": ",".join(sorted(extra)),
            "detail_class": str(FailureClass.SAMPLE_ACCOUNTING_FAILED),
        },
    )


def task_set_outcome(check: RunCheck, recipe: str | None = None, nodeid: str | None = None) -> GateOutcome:
    return GateOutcome(
        gate="task_set",
        recipe=recipe,
        status="passed" if check.passed else "failed",
        tier=Tier.HARD,
        failure_class=check.failure_class,
        message=check.message,
        numbers=check.numbers,
        nodeid=nodeid,
    )


def first_difference(a: str, b: str, context: int = 24) -> str:
    """Where two prompts part: the character offset and a one-line excerpt of each side around it."""
    i = next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    start = max(0, i - 8)

    def excerpt(text: str) -> str:
        shown = repr(text[start:i + context])
        if start:
            shown = "…" + shown
        if len(text) > i + context:
            shown += "…"
        return shown + (" (ends there)" if len(text) <= i else "")

    return f"at character {i}: baseline {excerpt(a)} vs candidate {excerpt(b)}"


def align_records(
    baseline: Sequence[SampleRecord], candidate: Sequence[SampleRecord], *, require_same_prompt: bool = True
) -> list[tuple[SampleRecord, SampleRecord]]:
    """Pair the two sides' records by sample id, in baseline order.

    Paired statistics are only valid on the same samples asked the same way, so any id present on one side only,
    any duplicate, and (by default) any pair whose prompts differ (the exact text or token ids sent, by hash)
    raises SAMPLE_ACCOUNTING_FAILED naming the ids and, where the records carry the text, where the two prompts
    part: nothing is silently dropped, and a 5-shot baseline is never compared with a 0-shot candidate.
    """
    problems: list[str] = []
    detail: dict[str, list[str]] = {}
    for side, recs in (("baseline", baseline), ("candidate", candidate)):
        dups = sorted(i for i, n in Counter(r.id for r in recs).items() if n > 1)
        if dups:
            problems.append(f"duplicate {side} ids {_name_some(dups)}")
            detail[f"duplicate_{side}"] = dups
    tasks = {r.task for r in baseline} | {r.task for r in candidate}
    if len(tasks) > 1:
        problems.append(f"records from several tasks ({', '.join(sorted(tasks))})")
    by_id = {r.id: r for r in candidate}
    base_ids = {r.id for r in baseline}
    missing = base_ids - by_id.keys()
    extra = by_id.keys() - base_ids
    if missing:
        problems.append(f"candidate lacks {len(missing)} ids: {_name_some(missing)}")
        detail["missing"] = sorted(missing)
    if extra:
        problems.append(f"candidate has {len(extra)} extra ids: {_name_some(extra)}")
        detail["extra"] = sorted(extra)
    pairs = [(b, by_id[b.id]) for b in baseline if b.id in by_id]
    if require_same_prompt:
        changed_pairs = [(b, c) for b, c in pairs if b.prompt_hash != c.prompt_hash]
        if changed_pairs:
            changed = [b.id for b, _ in changed_pairs]
            where = ""
            shown = next(((b.id, b.prompt, c.prompt) for b, c in changed_pairs
                          if b.prompt is not None and c.prompt is not None), None)
            if shown is not None:
                where = f" (id {shown[0]}: {first_difference(shown[1], shown[2])})"
            problems.append(f"{len(changed)} ids were sent different prompts: {_name_some(changed)}{where}")
            detail["prompt_changed"] = sorted(changed)
    if problems:
        task = next(iter(sorted(tasks)), "?")
        raise Day0Error(
            FailureClass.SAMPLE_ACCOUNTING_FAILED,
            f"{task}: records do not pair: " + "; ".join(problems),
            **detail,
        )
    return pairs
