"""The scorer's decisions on plain data: answer extraction, MC scoring rules, aggregation onto the task's scale."""

from __future__ import annotations

from typing import Any

import pytest

from pytest_day0.failures import Day0Error, FailureClass
from pytest_day0.scoring.metrics import (
    NO_PROMPT_LOGPROBS,
    aggregate,
    exact_match,
    extract_answer,
    mc_decision,
    prompt_hash,
    score_continuation,
    truncate_at_stop,
)
from pytest_day0.scoring.records import SampleRecord
from pytest_day0.scoring.tasks import Sample, TaskSpec


def spec(**kw: Any) -> TaskSpec:
    base: dict[str, Any] = {"name": "t", "kind": "generate", "metric": "em", "scale": (0, 100), "samples": "t.jsonl"}
    return TaskSpec.model_validate({**base, **kw})


def echo(prompt: str, lps: list[float | None], bos: str = "<bos>", gen: str = "") -> dict[str, Any]:
    """A char-level echo=true logprobs object: BOS + one token per prompt char (+ generated chars)."""
    tokens = [bos, *prompt, *gen]
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    tops: list[dict[str, float] | None] = [None] + [{"z": -0.1} for _ in tokens[1:]]
    return {"tokens": tokens, "token_logprobs": lps, "text_offset": offsets, "top_logprobs": tops}


# ---------------------------------------------------------------- generation


def test_extract_answer_uses_first_group_or_stripped_text() -> None:
    assert extract_answer(" 164\nfoo", r"^\s*(-?\d+)") == "164"
    assert extract_answer("-7", r"^\s*(-?\d+)") == "-7"
    assert extract_answer("no number", r"^\s*(-?\d+)") is None
    assert extract_answer("answer 12", r"\d+") == "12"  # no group: the whole match
    assert extract_answer("  79 \n", None) == "79"


def test_exact_match_compares_against_str_target() -> None:
    assert exact_match("79", "79") and exact_match("3", 3)
    assert not exact_match("079", "79") and not exact_match(None, "79") and not exact_match("79 ", "79")


def test_truncate_at_earliest_stop() -> None:
    assert truncate_at_stop("12\n34.", ("\n",)) == "12"
    assert truncate_at_stop("ab.cd\nef", ("\n", ".")) == "ab"
    assert truncate_at_stop("abc", ()) == "abc" and truncate_at_stop("abc", ("",)) == "abc"


# ---------------------------------------------------------------- multiple choice


def test_score_continuation_sums_only_continuation_tokens() -> None:
    prompt = "ab" + "cd"
    lp = score_continuation(echo(prompt, [None, -1.0, -2.0, -0.5, -0.25]), prompt, 2, generated_tokens=0)
    assert lp.logprob == pytest.approx(-0.75) and lp.n_tokens == 2


def test_score_continuation_rebases_offsets_for_zero_width_and_texty_bos() -> None:
    prompt = "xyz"
    lps: list[float | None] = [None, -1.0, -2.0, -4.0]
    texty = score_continuation(echo(prompt, lps, bos="<bos>"), prompt, 1, generated_tokens=0)
    zero = score_continuation(echo(prompt, lps, bos=""), prompt, 1, generated_tokens=0)
    assert texty.logprob == zero.logprob == pytest.approx(-6.0)


def test_score_continuation_excludes_generated_tokens() -> None:
    prompt = "ab"
    obj = echo(prompt, [None, -1.0, -2.0, -9.0], gen="Q")
    assert score_continuation(obj, prompt, 1, generated_tokens=1).logprob == pytest.approx(-2.0)


def test_greedy_needs_every_token_to_be_the_top() -> None:
    prompt = "abc"
    obj = echo(prompt, [None, -1.0, -0.1, -0.1])
    assert score_continuation(obj, prompt, 1, 0).greedy is True  # -0.1 == top -0.1 for both continuation tokens
    obj["top_logprobs"][2] = {"q": -0.05}
    assert score_continuation(obj, prompt, 1, 0).greedy is False
    obj["top_logprobs"] = None
    assert score_continuation(obj, prompt, 1, 0).greedy is False  # unknown is not greedy


@pytest.mark.parametrize(
    "mutate",
    [
        lambda o: None,  # logprobs missing entirely
        lambda o: {**o, "token_logprobs": [None] * len(o["token_logprobs"])},  # all null
        lambda o: {**o, "token_logprobs": []},
        lambda o: {k: v[-2:] for k, v in o.items()},  # echo truncated to the last 2 tokens
        lambda o: {**o, "token_logprobs": [*o["token_logprobs"][:-1], None]},  # null inside the continuation
    ],
    ids=["missing", "all-null", "empty", "truncated", "null-in-continuation"],
)
def test_missing_prompt_logprobs_is_a_judge_failure(mutate: Any) -> None:
    prompt = "abcd"
    obj = mutate(echo(prompt, [None, -1.0, -1.0, -1.0, -1.0]))
    with pytest.raises(Day0Error) as exc:
        score_continuation(obj, prompt, 2, generated_tokens=0)
    assert exc.value.failure_class is FailureClass.EVAL_JUDGE_FAILED
    assert exc.value.message.startswith(NO_PROMPT_LOGPROBS)


def test_fewer_tokens_than_usage_prompt_tokens_is_a_judge_failure() -> None:
    prompt = "abcd"
    obj = echo(prompt, [None, -1.0, -1.0, -1.0, -1.0])
    score_continuation(obj, prompt, 2, 0, prompt_tokens=5)
    with pytest.raises(Day0Error, match="no prompt logprobs"):
        score_continuation(obj, prompt, 2, 0, prompt_tokens=6)
    with pytest.raises(Day0Error, match="no prompt logprobs"):  # only the generated token came back
        score_continuation(obj, prompt, 2, generated_tokens=5)


def test_missing_text_offset_is_malformed() -> None:
    prompt = "ab"
    obj = echo(prompt, [None, -1.0, -1.0])
    del obj["text_offset"]
    with pytest.raises(Day0Error, match="malformed response"):
        score_continuation(obj, prompt, 1, 0)


def test_continuation_merged_into_context_token_is_refused() -> None:
    # one token "abcd" spans context "ab" and continuation "cd": no token of its own
    obj = {"tokens": ["<bos>", "abcd"], "token_logprobs": [None, -1.0], "text_offset": [0, 5], "top_logprobs": None}
    with pytest.raises(Day0Error) as exc:
        score_continuation(obj, "abcd", 2, 0)
    assert exc.value.failure_class is FailureClass.EVAL_JUDGE_FAILED


def test_mc_decision_acc_vs_acc_norm() -> None:
    # raw: "a" (-2.0) beats "bbbb" (-3.0); per byte: -2.0 vs -0.75, so acc_norm picks "bbbb"
    d = mc_decision([-2.0, -3.0], ["a", "bbbb"], target=1)
    assert (d.pred, d.pred_norm, d.correct, d.correct_norm) == (0, 1, 0.0, 1.0)
    # bytes, not chars: "é" is 2 bytes
    d = mc_decision([-2.0, -1.2], ["éé", "a"], target=0)
    assert d.pred == 1 and d.pred_norm == 0
    # ties go to the first index, like numpy.argmax
    assert mc_decision([-1.0, -1.0], ["x", "y"], target=1).pred == 0
    with pytest.raises(ValueError):
        mc_decision([-1.0], ["x", "y"], target=0)


# ---------------------------------------------------------------- identity and aggregation


def test_prompt_hash_changes_with_everything_that_changes_the_score() -> None:
    s = Sample(id="a", prompt="1+1=", target="2")
    h = prompt_hash(spec(), s)
    assert h == prompt_hash(spec(), Sample(id="a", prompt="1+1=", target="2"))
    assert h == prompt_hash(spec(description="other words", metric="renamed"), s)  # presentation only
    assert h != prompt_hash(spec(), Sample(id="a", prompt="1+1= ", target="2"))
    assert h != prompt_hash(spec(), Sample(id="a", prompt="1+1=", target="3"))
    for change in ({"max_tokens": 3}, {"stop": ["\n"]}, {"answer_pattern": "(\\d+)"}, {"chat": True}, {"repeats": 2}):
        assert h != prompt_hash(spec(**change), s), change


def rec(i: str, correct: float | None = 1.0, error: str | None = None, **kw: Any) -> SampleRecord:
    return SampleRecord(id=i, task="t", prompt_hash="h", target="x", correct=correct, error=error, **kw)


@pytest.mark.parametrize(("scale", "expected"), [((0, 100), 50.0), ((0, 1), 0.5), ((-100, 100), 0.0)])
def test_aggregate_maps_to_the_declared_scale(scale: tuple[float, float], expected: float) -> None:
    r = aggregate(spec(scale=scale), ["a", "b"], {"a": rec("a", 1.0), "b": rec("b", 0.0)}, side="c", records_path="p")
    assert r.score == pytest.approx(expected) and r.scale == scale
    assert r.status == "SUCCESS" and r.scored_samples == 2 and r.errored_samples == 0 and r.first_error is None


def test_aggregate_incomplete_scores_only_scored_samples_and_names_first_error() -> None:
    records = {
        "a": rec("a", 1.0, completion_tokens=4),
        "b": rec("b", None, "[INFRA_TRANSIENT] HTTP 503 after 4 attempts"),
        "c": rec("c", 0.0, completion_tokens=2),
    }
    r = aggregate(spec(), ["a", "b", "c", "d"], records, side="candidate", records_path="p", wall_s=1.5)
    assert r.status == "INCOMPLETE"
    assert (r.expected_samples, r.scored_samples, r.errored_samples) == (4, 2, 2)
    assert r.score == pytest.approx(50.0) and r.mean_completion_tokens == pytest.approx(3.0)
    assert r.first_error == "[INFRA_TRANSIENT] HTTP 503 after 4 attempts"
    assert r.side == "candidate" and r.wall_s == 1.5


def test_aggregate_missing_record_is_an_accounting_error() -> None:
    r = aggregate(spec(), ["a", "b"], {"a": rec("a")}, side="c", records_path="p")
    assert r.status == "INCOMPLETE" and r.first_error is not None
    assert r.first_error.startswith("[SAMPLE_ACCOUNTING_FAILED]")


def test_aggregate_all_judge_failures_is_failed_not_chance() -> None:
    err = f"[EVAL_JUDGE_FAILED] {NO_PROMPT_LOGPROBS}"
    records = {i: rec(i, None, err) for i in "ab"}
    r = aggregate(spec(kind="multiple_choice"), ["a", "b"], records, side="c", records_path="p")
    assert r.status == "FAILED" and r.score is None and r.score_norm is None
    # one transient failure among them: a re-run could help, so it is INCOMPLETE
    records["b"] = rec("b", None, "[INFRA_TRANSIENT] timed out")
    assert aggregate(spec(), ["a", "b"], records, side="c", records_path="p").status == "INCOMPLETE"


def test_aggregate_score_norm_only_for_multiple_choice() -> None:
    records = {"a": rec("a", 1.0, correct_norm=0.0), "b": rec("b", 1.0, correct_norm=1.0)}
    mc = aggregate(spec(kind="multiple_choice"), ["a", "b"], records, side="c", records_path="p")
    assert mc.score == pytest.approx(100.0) and mc.score_norm == pytest.approx(50.0)
    gen = aggregate(spec(), ["a", "b"], records, side="c", records_path="p")
    assert gen.score_norm is None
