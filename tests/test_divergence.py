"""The divergence pre-check's metric and decision (pure), and the parsing of a server's echo reply.

KL values are computed by hand in the comments; the truncation rule (shared top-k tokens + one rest bucket) is
checked to be exact on full distributions and a lower bound of the full KL on truncated ones.
"""

from __future__ import annotations

import math
import random

import pytest

from pytest_day0.failures import Day0Error, FailureClass, GateFailure, Tier
from pytest_day0.gates.divergence import (
    PROB_FLOOR,
    TextLogprobs,
    assert_divergence,
    check_divergence,
    divergence_outcome,
    divergence_stats,
    not_measured,
    text_set,
    token_kl,
    top1,
)
from pytest_day0.scoring.client import Reply
from pytest_day0.scoring.tasks import Sample, Task, TaskSpec
from pytest_day0.stages.divergence import parse_echo


def lp(probs: dict[str, float]) -> dict[str, float]:
    return {t: math.log(p) for t, p in probs.items()}


def full_kl(p: dict[str, float], q: dict[str, float]) -> float:
    return sum(pv * math.log(pv / q[t]) for t, pv in p.items() if pv > 0)


# ---------------------------------------------------------------------- token KL


def test_identical_distributions_have_zero_kl() -> None:
    p = lp({"a": 0.6, "b": 0.3, "c": 0.1})
    assert token_kl(p, p) == pytest.approx(0.0, abs=1e-12)


def test_kl_of_full_distributions_by_hand() -> None:
    # 0.75 ln(0.75/0.5) + 0.25 ln(0.25/0.5) = 0.304099 - 0.173287 = 0.130812
    assert token_kl(lp({"a": 0.75, "b": 0.25}), lp({"a": 0.5, "b": 0.5})) == pytest.approx(0.130812, abs=1e-6)
    # direction: KL(baseline || candidate), not the reverse (0.5 ln(0.5/0.75) + 0.5 ln(0.5/0.25) = 0.143841)
    assert token_kl(lp({"a": 0.5, "b": 0.5}), lp({"a": 0.75, "b": 0.25})) == pytest.approx(0.143841, abs=1e-6)


def test_truncated_top_k_use_the_shared_tokens_and_one_rest_bucket() -> None:
    # full P = a .5, b .3, c .1, d .1 ; full Q = a .4, c .35, b .15, d .1 ; each side reports its top-2
    p_top, q_top = lp({"a": 0.5, "b": 0.3}), lp({"a": 0.4, "c": 0.35})
    # shared {a}: rest P = .5, rest Q = .6 -> .5 ln(.5/.4) + .5 ln(.5/.6) = .111572 - .091161 = .020411
    coarse = token_kl(p_top, q_top)
    assert coarse == pytest.approx(0.020411, abs=1e-6)
    full = full_kl({"a": 0.5, "b": 0.3, "c": 0.1, "d": 0.1}, {"a": 0.4, "c": 0.35, "b": 0.15, "d": 0.1})
    assert full == pytest.approx(0.194240, abs=1e-6)
    assert coarse <= full  # data-processing inequality: coarsening never adds divergence


def test_the_rule_is_a_lower_bound_on_random_distributions_and_exact_when_nothing_is_cut() -> None:
    rng = random.Random(7)
    for _ in range(200):
        vocab = [f"t{i}" for i in range(12)]
        raw_p, raw_q = [rng.random() ** 3 for _ in vocab], [rng.random() ** 3 + 1e-6 for _ in vocab]  # q over the floor
        p = {t: v / sum(raw_p) for t, v in zip(vocab, raw_p, strict=True)}
        q = {t: v / sum(raw_q) for t, v in zip(vocab, raw_q, strict=True)}
        truth = full_kl(p, q)
        assert token_kl(lp(p), lp(q)) == pytest.approx(truth, rel=1e-9, abs=1e-12)
        k = rng.randint(1, 6)
        p_top = dict(sorted(p.items(), key=lambda x: -x[1])[:k])
        q_top = dict(sorted(q.items(), key=lambda x: -x[1])[:k])
        assert token_kl(lp(p_top), lp(q_top)) <= truth + 1e-12


def test_a_token_the_candidate_gives_no_probability_is_floored_not_infinite() -> None:
    # servers clip log 0 to -9999: the floor keeps the KL finite and large: 0.9 ln(0.9/1e-10) + rest .1 vs 1.0
    value = token_kl(lp({"a": 0.9}), {"a": -9999.0, "b": 0.0})
    expected = 0.9 * math.log(0.9 / PROB_FLOOR) + 0.1 * math.log(0.1 / 1.0)
    assert value == pytest.approx(expected, rel=1e-9)
    assert math.isfinite(value) and value > 20


def test_top1_breaks_ties_by_the_token_text() -> None:
    assert top1({"b": -0.5, "a": -0.5, "c": -2.0}) == "a"
    assert top1({"z": -0.1, "a": -0.5}) == "z"


# ---------------------------------------------------------------------- over a text set


def side(*positions: dict[str, float] | None, tokens: list[str] | None = None) -> TextLogprobs:
    return TextLogprobs(tokens=tokens or [f"x{i}" for i in range(len(positions))], top=list(positions))


def test_stats_are_token_weighted_and_skip_positions_without_a_distribution() -> None:
    same = lp({"a": 0.7, "b": 0.3})
    flipped = lp({"a": 0.3, "b": 0.7})
    base = [side(None, same, same), side(None, same)]
    cand = [side(None, same, flipped), side(None, flipped)]
    stats = divergence_stats(base, cand, top_k=2)
    assert stats.positions == 3 and stats.texts == 2
    assert stats.agreement == pytest.approx(1 / 3)
    one = 0.7 * math.log(0.7 / 0.3) + 0.3 * math.log(0.3 / 0.7)  # 0.338919
    assert stats.mean_kl == pytest.approx(2 * one / 3, abs=1e-9)
    assert stats.max_kl == pytest.approx(one, abs=1e-9)


def test_texts_tokenized_differently_are_anomalous() -> None:
    same = lp({"a": 1.0})
    check = check_divergence("fp8", [side(None, same, tokens=["x", "y"])], [side(None, same, tokens=["x", "z"])],
                             top_k=1, floor=0.5, tolerance=0.05)
    assert not check.passed and check.failure_class is FailureClass.ANOMALOUS and check.tier is Tier.HARD
    assert "tokenized differently" in check.message


def test_no_comparable_position_is_anomalous() -> None:
    check = check_divergence("fp8", [side(None)], [side(None)], top_k=5, floor=0.5, tolerance=0.05)
    assert check.failure_class is FailureClass.ANOMALOUS and "no position" in check.message


# ---------------------------------------------------------------------- the decision


def _pair(agree: int, disagree: int, kl_each: float = 0.0) -> tuple[list[TextLogprobs], list[TextLogprobs]]:
    """agree positions with a given KL (the candidate shifts mass but keeps the top token), then disagreeing ones."""
    p = lp({"a": 0.9, "b": 0.1})
    # find q with the same top token and KL(p||q) = kl_each: q(a) by bisection
    lo, hi = 0.5, 0.9
    for _ in range(100):
        mid = (lo + hi) / 2
        if token_kl(p, lp({"a": mid, "b": 1 - mid})) > kl_each:
            lo = mid
        else:
            hi = mid
    q_same = lp({"a": hi, "b": 1 - hi})
    q_other = lp({"a": 0.1, "b": 0.9})
    base = [side(None, *([p] * (agree + disagree)))]
    cand = [side(None, *([q_same] * agree + [q_other] * disagree))]
    return base, cand


def test_agreement_below_the_floor_is_catastrophic_and_hard() -> None:
    base, cand = _pair(agree=4, disagree=6)  # 40% < 50%
    check = check_divergence("fp8", base, cand, top_k=2, floor=0.5, tolerance=0.05)
    assert check.catastrophic and check.failure_class is FailureClass.CATASTROPHIC_REGRESSION
    assert check.tier is Tier.HARD and "evaluation is skipped" in check.message
    assert "top-2" in check.message and "lower bound" in check.message  # the truncation is stated
    outcome = divergence_outcome(check)
    assert outcome.status == "failed" and outcome.gate == "divergence" and outcome.recipe == "fp8"
    assert outcome.numbers["top1_agreement"] == pytest.approx(0.4)
    with pytest.raises(GateFailure) as err:
        assert_divergence(check)
    assert err.value.failure_class is FailureClass.CATASTROPHIC_REGRESSION and err.value.tier is Tier.HARD


def test_agreement_at_the_floor_is_not_catastrophic() -> None:
    base, cand = _pair(agree=5, disagree=5)
    check = check_divergence("fp8", base, cand, top_k=2, floor=0.5, tolerance=100.0)
    assert check.passed and not check.catastrophic


def test_a_zero_floor_never_blocks() -> None:
    base, cand = _pair(agree=0, disagree=10)
    check = check_divergence("fp8", base, cand, top_k=2, floor=0.0, tolerance=100.0)
    assert check.passed


def test_kl_above_the_tolerance_warns_and_at_it_passes() -> None:
    base, cand = _pair(agree=10, disagree=0, kl_each=0.08)
    warned = check_divergence("fp8", base, cand, top_k=2, floor=0.5, tolerance=0.05)
    assert not warned.passed and warned.failure_class is FailureClass.REGRESSION and warned.tier is Tier.WARN
    assert divergence_outcome(warned).status == "warned" and divergence_outcome(warned).advisory
    strict = divergence_outcome(warned, warn_as_error=True)
    assert strict.status == "failed" and not strict.advisory  # the user asked for warns to count
    with pytest.raises(GateFailure) as err:
        assert_divergence(warned)
    assert err.value.tier is Tier.WARN
    assert warned.stats is not None
    exactly = check_divergence("fp8", base, cand, top_k=2, floor=0.5, tolerance=warned.stats.mean_kl)
    assert exactly.passed
    passed = divergence_outcome(exactly)
    assert passed.status == "passed" and passed.failure_class is None


# ---------------------------------------------------------------------- the text set


def _task(name: str, kind: str, samples: list[Sample]) -> Task:
    spec = TaskSpec(name=name, kind=kind, metric="acc", scale=(0, 100), samples=f"{name}.jsonl")  # type: ignore
    return Task(spec=spec, samples=tuple(samples), source="test")


def test_text_set_takes_tasks_in_turn_with_their_answers_and_ignores_file_order() -> None:
    mc = [Sample(id=f"m{i}", prompt=f"q{i}=", target=1, choices=("no", f"yes{i}")) for i in range(5)]
    gen = [Sample(id=f"g{i}", prompt=f"{i}+1=", target=str(i + 1)) for i in range(2)]
    tasks = [_task("mc", "multiple_choice", mc), _task("gen", "generate", gen)]
    texts = text_set(tasks, 6)
    assert len(texts) == 6
    assert [t.startswith("q") for t in texts] == [True, False, True, False, True, True]  # gen runs out after 2
    assert all(t.endswith(f"yes{t[1]}") for t in texts if t.startswith("q"))  # the right choice appended
    assert {t for t in texts if not t.startswith("q")} == {"0+1=1", "1+1=2"}
    shuffled = [_task("mc", "multiple_choice", list(reversed(mc))), _task("gen", "generate", gen)]
    assert text_set(shuffled, 6) == texts
    assert text_set(tasks, 100) == text_set(tasks, 7) and len(text_set(tasks, 100)) == 7
    assert text_set(tasks, 3) == texts[:3]


# ---------------------------------------------------------------------- the echo reply


def _reply(tokens: list[str], top: list[object], completion_tokens: int | None) -> Reply:
    usage = {"prompt_tokens": len(tokens), "completion_tokens": completion_tokens} if completion_tokens is not None \
        else None
    return Reply({"choices": [{"logprobs": {"tokens": tokens, "top_logprobs": top,
                                            "token_logprobs": [None] * len(tokens)}}], "usage": usage}, 1)


def test_parse_echo_keeps_the_prompt_positions_only() -> None:
    top = [None, {"b": -0.1}, {"c": -0.2}, {"z": -0.3}]
    got = parse_echo(_reply(["a", "b", "c", "z"], top, completion_tokens=1), max_tokens=1)  # z was generated
    assert got.tokens == ["a", "b", "c"] and got.top == [None, {"b": -0.1}, {"c": -0.2}]
    # vLLM counts completion_tokens=1 for echo + max_tokens=0: the cap decides
    assert parse_echo(_reply(["a", "b", "c"], top[:3], completion_tokens=1), max_tokens=0).tokens == ["a", "b", "c"]


@pytest.mark.parametrize("body", [
    {"choices": []},
    {"choices": [{"logprobs": None}]},
    {"choices": [{"logprobs": {"tokens": ["a", "b"], "top_logprobs": [None]}}]},
    {"choices": [{"logprobs": {"tokens": ["a", "b"], "top_logprobs": [None, None]}}]},
    {"choices": [{"logprobs": {"tokens": ["a", "b"], "top_logprobs": [None, {"b": "high"}]}}]},
])
def test_a_reply_without_prompt_logprobs_is_eval_judge_failed(body: dict[str, object]) -> None:
    with pytest.raises(Day0Error) as err:
        parse_echo(Reply(body, 1), max_tokens=0)
    assert err.value.failure_class is FailureClass.EVAL_JUDGE_FAILED
    assert "divergence pre-check" in str(err.value)


def test_an_endpoint_without_top_k_logprobs_skips_the_precheck_and_blocks_nothing() -> None:
    check = not_measured("fp8", "HTTP 400: logprobs must be at most 5", floor=0.5, tolerance=0.25)
    assert check.skipped and not check.catastrophic and check.failure_class is None
    outcome = divergence_outcome(check)
    assert outcome.status == "skipped" and outcome.failure_class is None
    assert outcome.message.startswith("pre-check not possible, the evaluation decides: HTTP 400")
    assert_divergence(check)  # no breach to raise
