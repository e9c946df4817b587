"""Verdict priorities, the session recommendation, and verdict.json (schema, atomic write, loader)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pytest_day0.failures import INFEASIBLE_CLASSES, Day0Error, FailureClass, Tier
from pytest_day0.gates.compare import TaskComparison, compare_task, comparison_outcomes
from pytest_day0.gates.outcome import GateOutcome, Status
from pytest_day0.report.verdict_json import SCHEMA, load_verdict_json, write_verdict_json
from pytest_day0.scoring.records import TaskResult
from pytest_day0.scoring.tasks import TaskSpec
from pytest_day0.verdict import CLASS_DECISION, Verdict, decide, decide_session


def passed(recipe: str = "fp8", task: str = "arc_like") -> list[GateOutcome]:
    return [
        GateOutcome(gate="ptq.size", recipe=recipe, status="passed"),
        GateOutcome(gate="floor", recipe=recipe, task=task, status="passed"),
        GateOutcome(gate="quality", recipe=recipe, task=task, status="passed", tier=Tier.WARN),
    ]


def bad(
    cls: FailureClass, status: Status = "failed", gate: str = "x", recipe: str | None = "fp8", **kw: Any
) -> GateOutcome:
    return GateOutcome(gate=gate, recipe=recipe, status=status, failure_class=cls, message=f"{cls} happened", **kw)


def test_all_passed_is_accept_with_size() -> None:
    v = decide("fp8", passed(), 0.52, source_label="bf16")
    assert v.decision == "ACCEPT" and v.reasons == [] and v.exit_status == 0
    assert v.recommendation == "publish fp8 (0.52× of bf16 size)"


def test_every_failure_class_has_a_decision() -> None:
    assert set(CLASS_DECISION) == set(FailureClass)
    assert CLASS_DECISION[FailureClass.SIZE_NOT_REDUCED] == "REGRESSION"
    assert CLASS_DECISION[FailureClass.METADATA_MISMATCH] == "REGRESSION"


@pytest.mark.parametrize("cls", sorted(INFEASIBLE_CLASSES))
def test_infeasible_wins_over_everything(cls: FailureClass) -> None:
    outcomes = [
        *passed(),
        bad(FailureClass.CATASTROPHIC_REGRESSION, gate="floor", task="gsm_like"),
        bad(FailureClass.SYSTEMIC),
        bad(cls, gate="ptq.coverage"),
    ]
    v = decide("fp8", outcomes, 0.5)
    assert v.decision == "INFEASIBLE"
    assert v.recommendation.startswith(f"fp8 cannot be released as asked: {cls} at ptq.coverage")


def test_infeasible_from_skipped_by_upstream() -> None:
    outcomes = [*passed(), bad(FailureClass.CHECKPOINT_NOT_SERVABLE, status="skipped", gate="deploy")]
    assert decide("fp8", outcomes, None).decision == "INFEASIBLE"


@pytest.mark.parametrize(
    "cls",
    [
        FailureClass.SYSTEMIC,
        FailureClass.UNKNOWN,
        FailureClass.SAMPLE_ACCOUNTING_FAILED,
        FailureClass.EVAL_JUDGE_FAILED,
        FailureClass.INFRA_TRANSIENT,
        FailureClass.DEPLOYMENT_HEALTH_FAILED,
        FailureClass.ANOMALOUS,
    ],
)
def test_broken_measurement_is_anomalous_and_outranks_regression(cls: FailureClass) -> None:
    outcomes = [*passed(), bad(FailureClass.REGRESSION, "warned", "quality", task="gsm_like"), bad(cls, gate="run")]
    v = decide("fp8", outcomes, 0.5)
    assert v.decision == "ANOMALOUS"
    assert v.regressed_tasks == ["gsm_like"]
    assert f"needs a human ({cls} at run)" in v.recommendation and "also regressed on gsm_like" in v.recommendation
    assert v.exit_status == 1  # the run gate failed hard


@pytest.mark.parametrize("cls", [FailureClass.SIZE_NOT_REDUCED, FailureClass.METADATA_MISMATCH])
def test_size_and_metadata_block_publishing_as_regression(cls: FailureClass) -> None:
    v = decide("fp8", [*passed(), bad(cls, gate="ptq.size")], 1.01)
    assert v.decision == "REGRESSION"
    assert v.regressed_tasks == []
    assert v.recommendation == f"do not publish fp8: {cls}"


def test_warned_quality_is_regression_but_exit_zero() -> None:
    outcomes = [*passed(), bad(FailureClass.REGRESSION, "warned", "quality", task="gsm_like", tier=Tier.WARN)]
    v = decide("fp8", outcomes, 0.5)
    assert v.decision == "REGRESSION" and v.regressed_tasks == ["gsm_like"]
    assert v.recommendation == "do not publish fp8: quality regressed on gsm_like"
    assert not v.hard_failed and v.exit_status == 0


def test_catastrophic_names_task_once_and_exits_one() -> None:
    outcomes = [
        *passed(),
        bad(FailureClass.CATASTROPHIC_REGRESSION, gate="floor", task="gsm_like"),
        bad(FailureClass.REGRESSION, "warned", "quality", task="gsm_like"),
    ]
    v = decide("fp8", outcomes, 0.5)
    assert v.regressed_tasks == ["gsm_like"] and v.exit_status == 1
    assert set(v.failure_classes) == {FailureClass.REGRESSION, FailureClass.CATASTROPHIC_REGRESSION}
    assert len(v.reasons) == 2


def _inconclusive(task: str, needed: int | None, recipe: str = "fp8") -> GateOutcome:
    numbers: dict[str, float | int | str | None] = {"samples_needed": needed} if needed is not None else {}
    return GateOutcome(gate="quality", recipe=recipe, task=task, status="warned", tier=Tier.WARN,
                       failure_class=FailureClass.INCONCLUSIVE, message="interval straddles", numbers=numbers)


def test_inconclusive_is_its_own_decision_and_asks_for_samples() -> None:
    assert CLASS_DECISION[FailureClass.INCONCLUSIVE] == "INCONCLUSIVE"
    v = decide("fp8", [*passed(), _inconclusive("gsm_like", 268), _inconclusive("tau_like", 380)], 0.5)
    assert v.decision == "INCONCLUSIVE" and v.exit_status == 0 and not v.hard_failed
    assert v.inconclusive_tasks == ["gsm_like", "tau_like"] and v.samples_needed == 380
    assert v.recommendation == "fp8 is not decided yet: evaluate more samples: 380 (inconclusive on gsm_like, tau_like)"
    s = decide_session([v])
    assert s.recommended is None and s.recommendation.startswith("publish none: fp8 is not decided yet")
    # no estimate (the point sits on the threshold): still a recommendation, without a number
    assert decide("fp8", [*passed(), _inconclusive("gsm_like", None)], 0.5).recommendation == (
        "fp8 is not decided yet: evaluate more samples (inconclusive on gsm_like)")


def test_inconclusive_priority_between_accept_and_regression() -> None:
    # INFEASIBLE > ANOMALOUS > REGRESSION > INCONCLUSIVE > ACCEPT
    base = [*passed(), _inconclusive("tau_like", 100)]
    assert decide("fp8", base, 0.5).decision == "INCONCLUSIVE"
    assert decide("fp8", [*base, bad(FailureClass.REGRESSION, "warned", "quality", task="g")], 0.5).decision == \
        "REGRESSION"
    assert decide("fp8", [*base, bad(FailureClass.SAMPLE_ACCOUNTING_FAILED, gate="run")], 0.5).decision == "ANOMALOUS"
    assert decide("fp8", [*base, bad(FailureClass.MODEL_UNSUPPORTED, gate="ptq.coverage")], 0.5).decision == \
        "INFEASIBLE"
    # an inconclusive recipe never wins the session over one that ACCEPTs
    s = decide_session([decide("nvfp4", [*passed("nvfp4"), _inconclusive("t", 10, "nvfp4")], 0.3),
                        decide("fp8", passed(), 0.5)])
    assert s.recommended == "fp8" and "nvfp4: INCONCLUSIVE" in s.recommendation


def test_no_comparison_is_not_accept() -> None:
    v = decide("fp8", [GateOutcome(gate="ptq.size", recipe="fp8", status="passed")], 0.5)
    assert v.decision == "ANOMALOUS"
    assert "no task comparison" in v.reasons[-1]


def test_classless_skipped_comparison_is_inconclusive() -> None:
    outcomes = [*passed(), GateOutcome(gate="floor", recipe="fp8", task="gsm_like", status="skipped", message="?")]
    v = decide("fp8", outcomes, 0.5)
    assert v.decision == "ANOMALOUS" and FailureClass.INCONCLUSIVE in v.failure_classes
    # a classless skip of a non-comparison gate (say, verbosity on a multiple-choice task) is not evidence either way
    other = [*passed(), GateOutcome(gate="verbosity", recipe="fp8", task="arc_like", status="skipped")]
    assert decide("fp8", other, 0.5).decision == "ACCEPT"


def test_shared_outcomes_apply_to_every_recipe_and_others_are_ignored() -> None:
    outcomes = [
        *passed("fp8"),
        *passed("nvfp4"),
        bad(FailureClass.CATASTROPHIC_REGRESSION, gate="floor", recipe="nvfp4", task="arc_like"),
    ]
    assert decide("fp8", outcomes, 0.5).decision == "ACCEPT"
    assert decide("nvfp4", outcomes, 0.3).decision == "REGRESSION"
    shared = [*outcomes, bad(FailureClass.DEPLOYMENT_HEALTH_FAILED, gate="deploy", recipe=None, side="baseline")]
    assert decide("fp8", shared, 0.5).decision == "ANOMALOUS"


def test_user_config_error_suggests_exit_two() -> None:
    v = decide("fp8", [*passed(), bad(FailureClass.USER_CONFIG_ERROR, gate="setup")], None)
    assert v.exit_status == 2
    assert decide_session([v, decide("nvfp4", passed("nvfp4"), 0.3)]).exit_status == 2


def test_session_recommends_smallest_accepting_recipe() -> None:
    verdicts = [
        decide("fp8", passed("fp8"), 0.52, source_label="bf16"),
        decide("int4_awq", passed("int4_awq"), 0.31, source_label="bf16"),
        decide("nvfp4", [*passed("nvfp4"), bad(FailureClass.REGRESSION, "warned", "quality", "nvfp4", task="g")], 0.28),
        decide("nvfp4_mlp_only", passed("nvfp4_mlp_only"), None),
    ]
    s = decide_session(verdicts)
    assert s.recommended == "int4_awq"
    assert s.recommendation.startswith("publish int4_awq (0.31× of bf16 size)")
    assert "nvfp4: REGRESSION" in s.recommendation
    assert s.exit_status == 0
    assert len(s.verdicts) == 4


def test_session_with_no_accept_recommends_none() -> None:
    verdicts = [decide("fp8", [*passed(), bad(FailureClass.SIZE_NOT_REDUCED, gate="ptq.size")], 1.0)]
    s = decide_session(verdicts)
    assert s.recommended is None and s.recommendation.startswith("publish none: do not publish fp8")
    assert s.exit_status == 1
    assert decide_session([]).recommended is None


# ---------------------------------------------------------------------------------------------- verdict.json


def _comparison() -> TaskComparison:
    spec = TaskSpec(name="omni", kind="generate", metric="idx", scale=(-100, 100), samples="x.jsonl")
    r: dict[str, Any] = dict(task="omni", status="SUCCESS", expected_samples=10, scored_samples=10, errored_samples=0,
                             scale=(-100, 100), metric="idx", records_path="x")
    return compare_task(spec, TaskResult(side="baseline", score=20, **r), TaskResult(side="candidate", score=19, **r),
                        recipe="fp8")


def test_verdict_json_round_trip(tmp_path: Path) -> None:
    c = _comparison()
    s = decide_session([decide("fp8", comparison_outcomes(c), 0.52)])
    path = write_verdict_json(tmp_path / "out" / "verdict.json", s, [c], {"model": "demo", "nan": float("nan")})
    raw = json.loads(path.read_text())
    assert raw["schema"] == SCHEMA == "pytest-day0/verdict/v1"
    assert raw["session"]["recommended"] == "fp8"
    assert raw["comparisons"][0]["scale"] == [-100, 100]
    assert raw["extra"] == {"model": "demo", "nan": None}  # JSON has no NaN
    assert [p.name for p in path.parent.iterdir()] == ["verdict.json"]  # no temp file left
    doc = load_verdict_json(path)
    assert doc.session == s and doc.comparisons[0] == c


def test_verdict_json_replaces_atomically_and_cleans_up_on_failure(tmp_path: Path) -> None:
    s = decide_session([Verdict(recipe="fp8", decision="ACCEPT", recommendation="publish fp8")])
    target = tmp_path / "verdict.json"
    write_verdict_json(target, s, [])
    first = target.read_text()
    blocked = tmp_path / "blocked.json"
    blocked.mkdir()
    (blocked / "keep").write_text("x")
    with pytest.raises(OSError):
        write_verdict_json(blocked, s, [])  # os.replace onto a non-empty directory fails
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocked.json", "verdict.json"]
    assert target.read_text() == first


@pytest.mark.parametrize(
    ("content", "needle"),
    [("{not json", "cannot read verdict"), ('{"schema": "other/v9"}', "is not a pytest-day0/verdict/v1 document"),
     ('{"schema": "pytest-day0/verdict/v1", "session": {}}', "session.")],
)
def test_loader_errors_are_one_line_user_config_errors(tmp_path: Path, content: str, needle: str) -> None:
    p = tmp_path / "v.json"
    p.write_text(content)
    with pytest.raises(Day0Error) as info:
        load_verdict_json(p)
    assert info.value.failure_class is FailureClass.USER_CONFIG_ERROR
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_divergence_precheck_names_itself_and_claims_no_task() -> None:
    """A candidate the pre-check stopped: REGRESSION, the gate named in the recommendation, and the evaluation
    gates it skipped (carrying its class) are not reported as tasks that regressed — nothing measured them."""
    outcomes = [
        GateOutcome(gate="ptq.size", recipe="fp8", status="passed"),
        bad(FailureClass.CATASTROPHIC_REGRESSION, gate="divergence"),
        bad(FailureClass.CATASTROPHIC_REGRESSION, "skipped", "run", task="gsm_like", side="fp8"),
        bad(FailureClass.CATASTROPHIC_REGRESSION, "skipped", "floor", task="gsm_like"),
        bad(FailureClass.CATASTROPHIC_REGRESSION, "skipped", "quality", task="arc_like", tier=Tier.WARN),
    ]
    v = decide("fp8", outcomes, 0.5)
    assert v.decision == "REGRESSION" and v.exit_status == 1
    assert v.regressed_tasks == []
    assert v.recommendation == "do not publish fp8: divergence failed (CATASTROPHIC_REGRESSION)"
    # its warn (KL above the tolerance) is a reason line that decides nothing: the evaluation decides (a screen's
    # prediction must not overrule the measurement, nor stand in for a missing one)
    warn = bad(FailureClass.REGRESSION, "warned", "divergence", tier=Tier.WARN, advisory=True)
    warned = decide("fp8", [*passed(), warn], 0.5)
    assert warned.decision == "ACCEPT" and warned.exit_status == 0
    assert any(r.startswith("[REGRESSION] divergence") for r in warned.reasons)
    undecided = decide("fp8", [*passed(), warn, bad(FailureClass.INCONCLUSIVE, "warned", "quality", task="gsm_like",
                                                     tier=Tier.WARN)], 0.5)
    assert undecided.decision == "INCONCLUSIVE"
    alone = decide("fp8", [GateOutcome(gate="ptq.size", recipe="fp8", status="passed"), warn], 0.5)
    assert alone.decision == "ANOMALOUS"  # nothing compared: no evidence of quality either way
    # the same breach not marked advisory (``--day0-warn-as-error`` makes the pre-check's warn a failure) decides
    assert decide("fp8", [*passed(), warn.model_copy(update={"advisory": False})], 0.5).decision == "REGRESSION"


def test_a_session_without_comparison_gates_says_so_instead_of_blaming_a_stage() -> None:
    """`-k test_ptq`: every gate that ran passed, but nothing measured quality; the reason must not claim a failure."""
    ptq_only = [GateOutcome(gate=g, recipe="fp8", status="passed") for g in ("ptq.size", "ptq.coverage")]
    v = decide("fp8", ptq_only, 0.56)
    assert v.decision == "ANOMALOUS" and v.exit_status == 0  # nothing failed; nothing to publish on either
    assert v.reasons == ["[INCONCLUSIVE] no task comparison was in this session (deselected with -k/-m or node "
                         "ids?): nothing shows the quality"]
    skipped = decide("fp8", [*ptq_only, GateOutcome(gate="floor", recipe="fp8", task="gsm_like", status="skipped")],
                     0.56)
    assert skipped.decision == "ANOMALOUS"
    assert not any("was in this session" in r for r in skipped.reasons)
