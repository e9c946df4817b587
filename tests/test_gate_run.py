"""The run gate: which class a broken evaluation gets, when the floor abstains, and record alignment."""

from __future__ import annotations

from typing import Any

import pytest

from pytest_day0.failures import Day0Error, FailureClass, GateFailure, Tier
from pytest_day0.gates.run import (
    align_records,
    assert_run,
    check_run,
    check_task_sets,
    first_difference,
    run_outcome,
    task_set_outcome,
)
from pytest_day0.scoring.records import SampleRecord, TaskResult


def result(**kw: Any) -> TaskResult:
    d: dict[str, Any] = dict(
        task="arc_like",
        side="candidate",
        status="SUCCESS",
        expected_samples=100,
        scored_samples=100,
        errored_samples=0,
        score=84.0,
        scale=(0, 100),
        metric="acc",
        records_path="/tmp/x.jsonl",
    )
    d.update(kw)
    return TaskResult(**d)


def rec(i: str, prompt_hash: str = "h", task: str = "arc_like", prompt: str | None = None) -> SampleRecord:
    return SampleRecord(id=i, task=task, prompt_hash=prompt_hash + i, prompt=prompt, target=0, correct=1.0)


def test_clean_result_passes_and_does_not_abstain() -> None:
    check = check_run(result())
    assert check.passed and check.failure_class is None and not check.abstain
    assert check.numbers["score"] == 84.0
    assert_run(check)  # does not raise
    out = run_outcome(check, result(), recipe="fp8")
    assert (out.gate, out.status, out.side, out.recipe) == ("run", "passed", "candidate", "fp8")


@pytest.mark.parametrize("status", ["RUNNING", "PENDING", "TIMEOUT", "RESUMING", "INCOMPLETE", "incomplete"])
def test_non_terminal_status_is_infra_transient(status: str) -> None:
    check = check_run(result(status=status, scored_samples=40, errored_samples=0, first_error="connection reset"))
    assert not check.passed
    assert check.failure_class is FailureClass.INFRA_TRANSIENT
    assert "connection reset" in check.message


@pytest.mark.parametrize(
    "error",
    [
        "[EVAL_JUDGE_FAILED] grader returned nothing",
        "judge model timed out",
        "HTTP 429: rate limit exceeded",
        "401 Unauthorized",
        "auth token expired",
    ],
)
def test_judge_and_auth_errors_are_eval_judge_failed(error: str) -> None:
    check = check_run(result(scored_samples=90, errored_samples=10, first_error=error, status="FAILED"))
    assert check.failure_class is FailureClass.EVAL_JUDGE_FAILED
    # even under a non-terminal status: waiting for the judge beats re-running the stage
    pending = check_run(result(status="INCOMPLETE", scored_samples=90, errored_samples=10, first_error=error))
    assert pending.failure_class is FailureClass.EVAL_JUDGE_FAILED


def test_author_in_an_error_is_not_auth() -> None:
    check = check_run(result(scored_samples=99, errored_samples=1, first_error="the author field is malformed"))
    assert check.failure_class is FailureClass.UNKNOWN


def test_a_recovered_error_on_a_clean_result_is_not_a_failure() -> None:
    check = check_run(result(first_error="[INFRA_TRANSIENT] retried after connection reset"))
    assert check.passed


def test_known_class_prefix_in_error_is_used() -> None:
    check = check_run(
        result(scored_samples=97, errored_samples=3, first_error="[DEPLOYMENT_HEALTH_FAILED] server died mid-run")
    )
    assert check.failure_class is FailureClass.DEPLOYMENT_HEALTH_FAILED
    assert "server died" in check.message


def test_failed_status_without_cause_is_unknown() -> None:
    assert check_run(result(status="FAILED")).failure_class is FailureClass.UNKNOWN


def test_vanished_samples_are_sample_accounting_failed() -> None:
    check = check_run(result(scored_samples=98, errored_samples=0))
    assert check.failure_class is FailureClass.SAMPLE_ACCOUNTING_FAILED
    assert "98 scored + 0 errored != 100 expected" in check.message
    over = check_run(result(scored_samples=101))
    assert over.failure_class is FailureClass.SAMPLE_ACCOUNTING_FAILED


def test_unexplained_errored_samples_are_unknown() -> None:
    check = check_run(result(scored_samples=95, errored_samples=5, first_error="ValueError: bad token"))
    assert check.failure_class is FailureClass.UNKNOWN and not check.abstain
    assert "ValueError: bad token" in check.message


@pytest.mark.parametrize(
    ("score", "scale", "why"),
    [
        (None, (0, 100), "no score"),
        (float("nan"), (0, 100), "not finite"),
        (float("inf"), (0, 100), "not finite"),
        (100.5, (0, 100), "outside the task's declared scale [0, 100]"),
        (1.5, (0, 1), "outside the task's declared scale [0, 1]"),
        (-101.0, (-100, 100), "outside"),
    ],
)
def test_invalid_scores_are_sample_accounting_failed(score: float | None, scale: tuple[float, float], why: str) -> None:
    check = check_run(result(score=score, scale=scale))
    assert check.failure_class is FailureClass.SAMPLE_ACCOUNTING_FAILED
    assert why in check.message


def test_negative_score_on_signed_scale_is_fine() -> None:
    assert check_run(result(score=-42.0, scale=(-100, 100))).passed


def test_bool_and_string_scores_are_rejected() -> None:
    # pydantic coerces on validation; a constructed record (as a backend might build) keeps the raw value
    for bad in (True, "84"):
        r = TaskResult.model_construct(**{**result().model_dump(), "score": bad})
        check = check_run(r)
        assert check.failure_class is FailureClass.SAMPLE_ACCOUNTING_FAILED
        assert "not a number" in check.message


def test_empty_task_is_user_config_error_and_abstains() -> None:
    check = check_run(result(expected_samples=0, scored_samples=0))
    assert check.failure_class is FailureClass.USER_CONFIG_ERROR
    assert check.abstain


def test_abstain_at_error_rate() -> None:
    assert check_run(result(scored_samples=50, errored_samples=50, first_error="x")).abstain
    assert not check_run(result(scored_samples=51, errored_samples=49, first_error="x")).abstain
    assert check_run(result(scored_samples=80, errored_samples=20, first_error="x"), abstain_error_rate=0.2).abstain


def test_assert_run_raises_hard_gate_failure_with_numbers() -> None:
    check = check_run(result(scored_samples=98))
    with pytest.raises(GateFailure) as info:
        assert_run(check)
    assert info.value.failure_class is FailureClass.SAMPLE_ACCOUNTING_FAILED
    assert info.value.tier is Tier.HARD
    assert str(info.value).startswith("[SAMPLE_ACCOUNTING_FAILED] candidate/arc_like:")
    assert info.value.detail["scored_samples"] == 98
    out = run_outcome(check, result(scored_samples=98))
    assert out.status == "failed" and out.failure_class is FailureClass.SAMPLE_ACCOUNTING_FAILED


def test_task_sets() -> None:
    same = check_task_sets({"a", "b"}, {"b", "a"})
    assert same.passed
    diff = check_task_sets({"a", "b", "c"}, {"a", "d"})
    assert not diff.passed and diff.failure_class is FailureClass.ANOMALOUS
    assert diff.numbers["detail_class"] == "SAMPLE_ACCOUNTING_FAILED"
    assert diff.numbers["missing"] == "b,c" and diff.numbers["extra"] == "d"
    assert "candidate lacks b, c" in diff.message and "extra d" in diff.message
    out = task_set_outcome(diff, recipe="fp8")
    assert (out.gate, out.status, out.failure_class) == ("task_set", "failed", FailureClass.ANOMALOUS)


def test_align_records_pairs_by_id_in_baseline_order() -> None:
    base = [rec("1"), rec("2"), rec("3")]
    cand = [rec("3"), rec("1"), rec("2")]
    pairs = align_records(base, cand)
    assert [(b.id, c.id) for b, c in pairs] == [("1", "1"), ("2", "2"), ("3", "3")]


def test_align_records_names_missing_and_extra_ids() -> None:
    base = [rec(str(i)) for i in range(10)]
    cand = [rec(str(i)) for i in range(3, 12)]
    with pytest.raises(Day0Error) as info:
        align_records(base, cand)
    err = info.value
    assert err.failure_class is FailureClass.SAMPLE_ACCOUNTING_FAILED
    assert "candidate lacks 3 ids: 0, 1, 2" in err.message
    assert "candidate has 2 extra ids: 10, 11" in err.message
    assert err.detail["missing"] == ["0", "1", "2"] and err.detail["extra"] == ["10", "11"]


def test_align_records_caps_named_ids_but_keeps_all_in_detail() -> None:
    with pytest.raises(Day0Error) as info:
        align_records([rec(f"{i:02d}") for i in range(20)], [])
    assert "(+15 more)" in info.value.message
    assert len(info.value.detail["missing"]) == 20


def test_align_records_rejects_duplicates_changed_prompts_and_mixed_tasks() -> None:
    with pytest.raises(Day0Error, match="duplicate candidate ids 1"):
        align_records([rec("1")], [rec("1"), rec("1")])
    with pytest.raises(Day0Error, match="1 ids were sent different prompts: 1"):
        align_records([rec("1")], [rec("1", prompt_hash="other")])
    assert align_records([rec("1")], [rec("1", prompt_hash="other")], require_same_prompt=False)
    with pytest.raises(Day0Error, match="several tasks"):
        align_records([rec("1")], [rec("1", task="gsm_like")])


def test_align_records_names_where_two_prompts_part() -> None:
    """5-shot vs 0-shot: every doc was asked differently; the message names ids and the first differing text."""
    shots = "Q: 1+1=\nA: 2\n\n" * 5
    base = [rec(str(i), prompt_hash=f"b{i}", prompt=f"{shots}Q: {i}+3=\nA:") for i in range(12)]
    cand = [rec(str(i), prompt_hash=f"c{i}", prompt=f"Q: {i}+3=\nA:") for i in range(12)]
    with pytest.raises(Day0Error) as info:
        align_records(base, cand)
    err = info.value
    assert err.failure_class is FailureClass.SAMPLE_ACCOUNTING_FAILED and "\n" not in str(err)
    assert "12 ids were sent different prompts: 0, 1, 10, 11, 2 (+7 more)" in err.message
    assert "id 0: at character 3: baseline 'Q: 1+1=" in err.message and "candidate 'Q: 0+3=" in err.message
    assert err.detail["prompt_changed"] == sorted(str(i) for i in range(12))


def test_first_difference_handles_a_prefix_and_equal_texts() -> None:
    assert first_difference("abc", "abcdef") == "at character 3: baseline 'abc' (ends there) vs candidate 'abcdef'"
    long = first_difference("x" * 40 + "a" + "z" * 40, "x" * 40 + "b" + "z" * 40)
    assert long.startswith("at character 40: baseline …'xxxxxxxxa") and long.endswith("z'…")
    newline = first_difference("line\none", "line\ntwo")
    assert newline == "at character 5: baseline 'line\\none' vs candidate 'line\\ntwo'"
