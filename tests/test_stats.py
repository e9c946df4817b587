"""Paired statistics and the three-outcome gate: the numbers, the properties, the error rates, ModelOpt's cases.

The simulation tests are the claim of the statistics section of the README: for two identical models the gate
says REGRESSION at most 5% of the time, and a true 5-point drop at n=1,000 is found at least 80% of the time.
"""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_day0.failures import Day0Error, FailureClass, Tier
from pytest_day0.gates.compare import (
    TaskComparison,
    compare_task,
    comparison_decision,
    comparison_numbers,
    decide_quality_paired,
    score_delta,
)
from pytest_day0.gates.run import check_task_sets
from pytest_day0.gates.stats import (
    TEST_BINARY,
    PairedStats,
    binary_stats,
    interval_side,
    item_means,
    mcnemar_exact,
    mean_interval,
    minimum_detectable_effect,
    pair_items,
    paired_from_records,
    paired_stats,
    samples_needed,
    score_interval,
    zero_variation_halfwidth,
)
from pytest_day0.scoring.records import SampleRecord, TaskResult
from pytest_day0.scoring.tasks import TaskSpec

Z95 = 1.6448536269514722


def spec(scale: tuple[float, float] = (0, 100), name: str = "arc_like", higher: bool = True) -> TaskSpec:
    return TaskSpec(name=name, kind="generate", metric="acc", scale=scale, samples="x.jsonl", higher_is_better=higher)


def result(side: str, s: TaskSpec, values: list[float]) -> TaskResult:
    mean = sum(values) / len(values)
    return TaskResult(task=s.name, side=side, status="SUCCESS", expected_samples=len(values),
                      scored_samples=len(values), errored_samples=0, score=s.to_scale(mean), scale=s.scale,
                      metric=s.metric, records_path="x")


def paired_compare(base: list[float], cand: list[float], s: TaskSpec | None = None, **kw: Any) -> TaskComparison:
    s = s or spec()
    stats = paired_stats(list(zip(base, cand, strict=True)))
    return compare_task(s, result("baseline", s, base), result("candidate", s, cand), paired=stats, **kw)


def outcomes(gains: int, losses: int, same: int, base_right: bool = True) -> tuple[list[float], list[float]]:
    """Per-item 0/1 outcomes with the given discordant counts; concordant items are all right (or all wrong)."""
    b = [0.0] * gains + [1.0] * losses + [1.0 if base_right else 0.0] * same
    c = [1.0] * gains + [0.0] * losses + [1.0 if base_right else 0.0] * same
    return b, c


def rec(i: int | str, correct: float | None, error: str | None = None, task: str = "t") -> SampleRecord:
    return SampleRecord(id=str(i), task=task, prompt_hash="h", target="x", correct=correct, error=error)


# ---------------------------------------------------------------------------------------------- the numbers


def test_zero_disagreement_interval_is_the_score_bound_not_zero_width() -> None:
    for n in (20, 300, 1000):
        low, high = score_interval(0, 0, n)
        assert high == pytest.approx(Z95**2 / (n + Z95**2), abs=1e-9) == pytest.approx(-low, abs=1e-9)
        assert zero_variation_halfwidth(n, 0.95) == pytest.approx(high)
    # 300 agreeing items resolve a 1-point threshold (0.89 < 1), 20 cannot (11.9 points)
    assert score_interval(0, 0, 300)[1] < 0.01 < score_interval(0, 0, 20)[1]


def test_score_interval_matches_wald_for_large_counts() -> None:
    # n = 10,000 with 10% losses and 5% gains: the score interval converges to delta ± z·sd/√n
    low, high = score_interval(500, 1000, 10_000)
    sd = math.sqrt(0.15 - 0.05**2)
    assert low == pytest.approx(-0.05 - Z95 * sd / 100, abs=5e-4)
    assert high == pytest.approx(-0.05 + Z95 * sd / 100, abs=5e-4)


def test_mcnemar_exact_values() -> None:
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)  # 2 · P(X ≤ 0), X ~ Bin(5, 1/2)
    assert mcnemar_exact(2, 8) == pytest.approx(2 * (1 + 10 + 45) / 1024)
    assert mcnemar_exact(8, 2) == mcnemar_exact(2, 8)
    assert mcnemar_exact(500, 500) == 1.0
    assert 0 < mcnemar_exact(0, 2000) < 1e-300 or mcnemar_exact(0, 2000) == 0.0  # no overflow


def test_binary_stats_fields() -> None:
    b, c = outcomes(gains=5, losses=10, same=85)
    s = paired_stats(list(zip(b, c, strict=True)))
    assert s.binary and s.test == TEST_BINARY and s.n == 100 and (s.gains, s.losses) == (5, 10)
    assert s.delta == pytest.approx(-0.05) and s.ci_low < -0.05 < s.ci_high
    assert s.p_value == pytest.approx(mcnemar_exact(5, 10))
    assert s.interval_level == pytest.approx(0.90) and s.se > 0


def test_bootstrap_for_fractional_items_is_seeded_and_guarded() -> None:
    pairs = [(1.0, 0.5)] * 10 + [(0.25, 1.0)] * 5 + [(0.75, 0.75)] * 85
    a, b = paired_stats(pairs), paired_stats(pairs)
    assert not a.binary and a.test.startswith("paired bootstrap") and a == b  # deterministic
    assert a.ci_low < a.delta < a.ci_high and a.p_value is None
    flat = paired_stats([(0.5, 0.5)] * 40)  # no variation seen: widened, never [0, 0]
    assert flat.ci_high == pytest.approx(zero_variation_halfwidth(40, 0.95))


def test_avg_of_n_repeats_are_one_item_each() -> None:
    assert item_means([("a", 1), ("a", 0), ("a", 1), ("a", 1), ("b", 0)]) == {"a": 0.75, "b": 0.0}
    base = [rec("a", 1.0), rec("a", 1.0), rec("b", 0.0), rec("b", 1.0)]
    cand = [rec("a", 1.0), rec("a", 0.0), rec("b", 0.0), rec("b", 0.0)]
    s = paired_from_records(base, cand)
    assert s.n == 2 and not s.binary  # 2 items, not 4 rows: repeats averaged before pairing
    assert s.mean_baseline == pytest.approx(0.75) and s.mean_candidate == pytest.approx(0.25)


def test_missing_or_extra_ids_are_sample_accounting_failures() -> None:
    with pytest.raises(Day0Error) as info:
        paired_from_records([rec(1, 1.0), rec(2, 1.0)], [rec(1, 1.0), rec(3, 1.0)])
    assert info.value.failure_class is FailureClass.SAMPLE_ACCOUNTING_FAILED
    assert "candidate lacks 1 ids: 2" in info.value.message and "1 extra ids: 3" in info.value.message
    with pytest.raises(Day0Error, match="do not pair"):
        pair_items({"a": 1.0}, {})


def test_errored_pairs_are_left_out_and_counted() -> None:
    s = paired_from_records([rec(1, 1.0), rec(2, 1.0), rec(3, 0.0)],
                            [rec(1, 1.0), rec(2, None, "[INFRA_TRANSIENT] x"), rec(3, 0.0)])
    assert s.n == 2 and s.left_out == 1


def test_values_outside_unit_interval_are_rejected() -> None:
    with pytest.raises(Day0Error) as info:
        paired_stats([(1.0, 2.0)])
    assert info.value.failure_class is FailureClass.SAMPLE_ACCOUNTING_FAILED
    with pytest.raises(Day0Error, match="confidence"):
        paired_stats([(1.0, 1.0)], confidence=0.4)


def test_mean_interval_wilson_and_bootstrap() -> None:
    low, high = mean_interval([1.0] * 20)
    assert high == 1.0 and low == pytest.approx(1 - Z95**2 / (20 + Z95**2))
    low, high = mean_interval([0.5, 0.25, 0.75, 1.0] * 10)
    assert low < 0.625 < high


def test_planning_numbers() -> None:
    s = paired_stats([(1.0, 1.0)] * 20)
    # z²(1 - t)/t items: the smallest n whose zero-disagreement bound is within a 1-point threshold
    assert samples_needed(s, -0.01) == math.ceil(Z95**2 * 0.99 / 0.01)
    assert minimum_detectable_effect(s) == pytest.approx((Z95 + 0.8416212335729143) * s.se)
    b, c = outcomes(gains=5, losses=10, same=85)
    drop = paired_stats(list(zip(b, c, strict=True)))
    needed = samples_needed(drop, -0.01)
    sd = math.sqrt(0.15 - 0.05**2)
    assert needed == pytest.approx((Z95 * sd / 0.04) ** 2, rel=0.05)  # the normal-approximation answer
    assert samples_needed(drop, -0.05) is None  # the estimate sits on the limit: no n decides
    assert interval_side(0.0, 0.005, 0.01) == "within" and interval_side(0.02, 0.03, 0.01) == "beyond"
    assert interval_side(0.0, 0.03, 0.01) == "straddles"


# ---------------------------------------------------------------------------------------------- the decision rule


def test_pass_regression_inconclusive() -> None:
    ok = paired_compare(*outcomes(0, 0, 300))
    assert ok.quality.passed and ok.floor.passed and comparison_decision(ok) == "PASS"
    assert ok.stat == "paired" and ok.n == 300 and ok.test == TEST_BINARY and ok.p_value == 1.0
    assert ok.ci_low == pytest.approx(-0.894, abs=1e-3) and ok.ci_high == pytest.approx(0.894, abs=1e-3)
    bad = paired_compare(*outcomes(10, 80, 910))  # a 7-point drop on 1,000 items
    assert bad.quality.failure_class is FailureClass.REGRESSION and bad.quality.tier is Tier.WARN
    assert "the whole interval is beyond threshold 1.0 points" in bad.quality.message
    assert bad.floor.passed  # 7 points: not catastrophic
    small = paired_compare(*outcomes(0, 0, 20))
    q = small.quality
    assert q.failure_class is FailureClass.INCONCLUSIVE and q.tier is Tier.WARN and not q.passed
    assert "straddles threshold 1.0 points" in q.message and "minimum detectable effect is 18.0 points" in q.message
    assert "about 268 samples would decide" in q.message and small.samples_needed == 268
    assert comparison_numbers(small)["decision"] == "INCONCLUSIVE"


def test_floor_fires_only_on_evidence() -> None:
    # 3 of 20 items lost: a 15-point point estimate (the point rule fires); Tango's bound alone would say "at
    # least 1.3 points", but exact McNemar cannot even show a drop (one-sided p = 1/8): the guard keeps 0 in
    base, cand = outcomes(0, 3, 17)
    s = spec()
    point = compare_task(s, result("baseline", s, base), result("candidate", s, cand))
    assert point.floor.failure_class is FailureClass.CATASTROPHIC_REGRESSION
    paired = paired_compare(base, cand)
    assert paired.floor.passed and paired.quality.failure_class is FailureClass.INCONCLUSIVE
    sure = paired_compare(*outcomes(0, 300, 700))  # 30 points on 1,000 items: evidence
    assert sure.floor.failure_class is FailureClass.CATASTROPHIC_REGRESSION and sure.floor.tier is Tier.HARD
    assert "even the smallest drop in the interval" in sure.floor.message


def test_anomaly_fires_only_on_evidence() -> None:
    assert paired_compare(*outcomes(2, 0, 18, base_right=False)).anomaly.passed  # +10 points on 20 items
    big = paired_compare(*outcomes(200, 0, 800, base_right=False))
    assert big.anomaly.failure_class is FailureClass.ANOMALOUS


def test_lower_is_better_and_relative_modes() -> None:
    s = spec(higher=False, name="error_rate")
    worse = paired_compare(*outcomes(80, 0, 920, base_right=False), s=s)  # candidate errs more: a drop
    assert worse.quality.failure_class is FailureClass.REGRESSION
    assert worse.drop_fraction == pytest.approx(0.08)
    rel = paired_compare(*outcomes(0, 0, 1000, base_right=True), relative=True)
    assert rel.quality.passed


def test_records_that_do_not_reproduce_the_score_are_accounting_failures() -> None:
    s = spec()
    stats = paired_stats([(1.0, 1.0)] * 10)
    with pytest.raises(Day0Error) as info:
        compare_task(s, result("baseline", s, [0.5] * 10), result("candidate", s, [1.0] * 10), paired=stats)
    assert info.value.failure_class is FailureClass.SAMPLE_ACCOUNTING_FAILED and "stale" in info.value.message


def test_point_mode_reports_n_and_test() -> None:
    s = spec()
    c = compare_task(s, result("baseline", s, [1.0] * 10), result("candidate", s, [1.0] * 10))
    assert c.stat == "point" and c.n == 10 and c.test == "point estimate" and c.ci_low is None


# ---------------------------------------------------------------------------------------------- properties

RANK = {"PASS": 0, "INCONCLUSIVE": 1, "REGRESSION": 2}
binary_pairs = st.lists(st.tuples(st.sampled_from([0.0, 1.0]), st.sampled_from([0.0, 1.0])), min_size=1,
                        max_size=400)
threshold_st = st.sampled_from([0.0, 0.01, 0.02, 0.05])


def quality_word(pairs: list[tuple[float, float]], threshold: float, s: TaskSpec | None = None) -> str:
    s = s or spec()
    stats = paired_stats(pairs)
    d = score_delta(s, s.to_scale(stats.mean_baseline), s.to_scale(stats.mean_candidate), paired=stats)
    decision = decide_quality_paired(d, threshold)
    return "PASS" if decision.passed else str(decision.failure_class)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pairs=binary_pairs, threshold=threshold_st, data=st.data())
def test_lowering_candidate_scores_never_turns_regression_into_pass(
    pairs: list[tuple[float, float]], threshold: float, data: st.DataObject
) -> None:
    before = quality_word(pairs, threshold)
    right = [i for i, (_, c) in enumerate(pairs) if c == 1.0]
    if not right:
        return
    lowered = list(pairs)
    for i in data.draw(st.lists(st.sampled_from(right), min_size=1, unique=True)):
        lowered[i] = (lowered[i][0], 0.0)
    after = quality_word(lowered, threshold)
    assert RANK[after] >= RANK[before], (before, after)


@settings(max_examples=150, deadline=None)
@given(pairs=binary_pairs, threshold=threshold_st, floor=st.sampled_from([0.05, 0.10, 0.3]),
       relative=st.booleans())
def test_reexpressing_the_scale_never_changes_a_decision(
    pairs: list[tuple[float, float]], threshold: float, floor: float, relative: bool
) -> None:
    base = [b for b, _ in pairs]
    cand = [c for _, c in pairs]
    words = set()
    for scale in ((0, 1), (0, 100), (-100, 100)):
        if relative and scale[0] < 0:
            continue  # relative mode divides by the distance from the worst end: not scale-free on a shifted range
        c = paired_compare(base, cand, s=spec(scale), threshold=threshold, floor=max(floor, threshold),
                           relative=relative)
        words.add((c.floor.passed, c.quality.passed, c.quality.failure_class, c.anomaly.passed))
    assert len(words) == 1


@settings(max_examples=150, deadline=None)
@given(values=st.lists(st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]), min_size=1, max_size=200),
       threshold=threshold_st)
def test_identical_sides_never_regress(values: list[float], threshold: float) -> None:
    c = paired_compare(values, values, threshold=threshold)
    assert c.quality.failure_class is not FailureClass.REGRESSION and c.floor.passed and c.anomaly.passed
    assert c.ci_low is not None and c.ci_high is not None and c.ci_low < 0 < c.ci_high


@settings(max_examples=150, deadline=None)
@given(pairs=binary_pairs)
def test_swapping_sides_negates_the_interval(pairs: list[tuple[float, float]]) -> None:
    a = paired_stats(pairs)
    b = paired_stats([(c, b) for b, c in pairs])
    assert b.delta == pytest.approx(-a.delta)
    assert b.ci_low == pytest.approx(-a.ci_high, abs=1e-9) and b.ci_high == pytest.approx(-a.ci_low, abs=1e-9)
    assert -1 <= a.ci_low <= a.delta <= a.ci_high <= 1
    assert b.p_value == a.p_value


# ---------------------------------------------------------------------------------------------- simulation


def _simulate_task(rng: random.Random, n: int, p: float, q: float, agreement: float) -> tuple[int, int, int]:
    """Paired Bernoulli outcomes: the candidate repeats the baseline's outcome with probability ``agreement``,
    else answers on its own with the accuracy that makes its marginal accuracy ``q``.

    Returns (gains, losses, baseline right)."""
    own = (q - agreement * p) / (1 - agreement)
    gains = losses = right = 0
    for _ in range(n):
        b = rng.random() < p
        c = b if rng.random() < agreement else rng.random() < own
        gains += c and not b
        losses += b and not c
        right += b
    return gains, losses, right


SIM_SPEC = spec((0, 100), "simulated")


def _regression(gains: int, losses: int, n: int, right: int, threshold: float) -> bool:
    """The shipped gate, end to end from the counts: paired stats -> ScoreDelta -> the quality decision."""
    stats = binary_stats(gains, losses, n, right)
    d = score_delta(SIM_SPEC, SIM_SPEC.to_scale(stats.mean_baseline), SIM_SPEC.to_scale(stats.mean_candidate),
                    paired=stats)
    return decide_quality_paired(d, threshold).failure_class is FailureClass.REGRESSION


def false_regression_rate(tasks: int, threshold: float, seed: int = 7) -> float:
    """Identical models: same accuracy p on both sides; n, p and the agreement vary per task."""
    rng = random.Random(seed)
    hits = 0
    for i in range(tasks):
        n = (20, 50, 100, 300, 1000)[i % 5]
        p = rng.uniform(0.2, 0.95)
        g, ls, right = _simulate_task(rng, n, p, p, rng.uniform(0.0, 0.95))
        hits += _regression(g, ls, n, right, threshold)
    return hits / tasks


def power(tasks: int, agreement: tuple[float, float], n: int = 1000, drop: float = 0.05, seed: int = 11) -> float:
    rng = random.Random(seed)
    hits = 0
    for _ in range(tasks):
        p = rng.uniform(0.3, 0.9)
        g, ls, right = _simulate_task(rng, n, p, p - drop, rng.uniform(*agreement))
        hits += _regression(g, ls, n, right, 0.01)
    return hits / tasks


def test_simulation_identical_models_false_regression_at_most_nominal() -> None:
    rate = false_regression_rate(2000, threshold=0.01)
    assert rate <= 0.05, rate
    # the hardest case, threshold 0 (any drop is a regression), sits at the nominal one-sided 5%; allow two
    # binomial standard errors of simulation noise
    worst = false_regression_rate(2000, threshold=0.0, seed=8)
    assert worst <= 0.05 + 2 * math.sqrt(0.05 * 0.95 / 2000), worst


def test_simulation_five_point_drop_at_n_1000_is_found() -> None:
    # a quantized model agrees with its source on most items (the measured demo: all 300 of each task)
    assert power(1000, agreement=(0.5, 0.95)) >= 0.80
    # no agreement at all (independent outcomes) is the worst case for any paired test: reported, not promised
    assert power(300, agreement=(0.0, 0.0)) >= 0.5


# ---------------------------------------------------------------------------------------------- ModelOpt's cases
# Ported from NVIDIA/Model-Optimizer plugins/modelopt/skills/day0-release/tests/test_gates.py (gate_compare).
# Its gate compares two means against the threshold; ours does the same under --day0-stat point, so the cases
# run in point mode. Deliberate differences are noted case by case.


def point(task: str, b: float, c: float, scale: tuple[float, float] = (0, 100), **kw: Any) -> TaskComparison:
    s = spec(scale, task)
    r: dict[str, Any] = dict(task=task, status="SUCCESS", expected_samples=300, scored_samples=300,
                             errored_samples=0, scale=scale, metric="acc", records_path="x")
    return compare_task(s, TaskResult(side="baseline", score=b, **r), TaskResult(side="candidate", score=c, **r), **kw)


def test_modelopt_accept_within_threshold() -> None:
    assert point("gpqa", 50.0, 49.5).quality.passed and point("scicode", 30.0, 29.8).quality.passed


def test_modelopt_regression_exceeds_threshold() -> None:
    c = point("gpqa", 50.0, 47.5)  # 2.5-point drop
    assert c.quality.failure_class is FailureClass.REGRESSION and "gpqa" in c.quality.message
    # We differ with paired statistics (the default): at n=300 a 2.5-point drop with 10% disagreement is
    # INCONCLUSIVE, not REGRESSION — the skill's own live trial judged such a drop "~2 SE" by hand.
    paired = paired_compare(*outcomes(gains=11, losses=19, same=270))
    assert paired.quality.failure_class is FailureClass.INCONCLUSIVE


def test_modelopt_anomalous_implausible_gain() -> None:
    assert point("gpqa", 50.0, 60.0).anomaly.failure_class is FailureClass.ANOMALOUS


def test_modelopt_mismatched_task_sets() -> None:
    check = check_task_sets({"gpqa"}, {"scicode"})
    # the skill reports SAMPLE_ACCOUNTING_FAILED as the class; we decide ANOMALOUS and name that cause
    assert check.failure_class is FailureClass.ANOMALOUS and check.numbers["detail_class"] == "SAMPLE_ACCOUNTING_FAILED"


def test_modelopt_relative_threshold() -> None:
    assert point("t", 50.0, 49.6, relative=True).quality.passed
    assert not point("t", 50.0, 49.4, relative=True).quality.passed


def test_modelopt_zero_to_one_full_collapse() -> None:
    c = point("tau2_bench_telecom", 1.0, 0.0, scale=(0, 1))
    assert c.quality.failure_class is FailureClass.REGRESSION
    # we go further: a 100% drop is past the floor, a hard CATASTROPHIC_REGRESSION
    assert c.floor.failure_class is FailureClass.CATASTROPHIC_REGRESSION


def test_modelopt_zero_to_one_within_and_explicit_scale() -> None:
    assert point("t", 0.900, 0.895, scale=(0, 1)).quality.passed
    # the skill's --scales override; our scale is always declared, never inferred from the values
    assert point("t", 0.5, 0.4, scale=(0, 100)).quality.passed


def test_modelopt_mixed_scales_in_one_suite() -> None:
    assert point("gpqa", 50.0, 49.8).quality.passed
    assert point("tau2_bench_telecom", 1.0, 0.0, scale=(0, 1)).quality.failure_class is FailureClass.REGRESSION


def test_modelopt_invalid_scales_rejected() -> None:
    # the skill's USER_CONFIG_ERROR for a bad --scales: here a task spec with lo >= hi does not load
    for bad in ((0, 0), (100, 0)):
        with pytest.raises(ValueError, match="lo < hi"):
            spec(bad)


def test_modelopt_non_numeric_score() -> None:
    # We differ: the skill calls a non-numeric score ANOMALOUS; here the run gate fails it as
    # SAMPLE_ACCOUNTING_FAILED and the comparison reports a skipped row instead of a judgement.
    s = spec()
    r: dict[str, Any] = dict(task=s.name, status="SUCCESS", expected_samples=1, scored_samples=1, errored_samples=0,
                             scale=s.scale, metric="acc", records_path="x")
    c = compare_task(s, TaskResult(side="baseline", score=50.0, **r), TaskResult(side="candidate", score=None, **r))
    assert c.quality.skipped and c.floor.skipped


def test_modelopt_out_of_range_candidate() -> None:
    # We differ: the skill's ANOMALOUS for 50 -> 150 on 0-100 is the run gate's SAMPLE_ACCOUNTING_FAILED here
    # (a score off its declared scale is an accounting error, caught before any comparison).
    from pytest_day0.gates.run import check_run

    s = spec()
    bad = TaskResult(task=s.name, side="candidate", status="SUCCESS", expected_samples=1, scored_samples=1,
                     errored_samples=0, score=150.0, scale=s.scale, metric="acc", records_path="x")
    assert check_run(bad).failure_class is FailureClass.SAMPLE_ACCOUNTING_FAILED


def test_paired_stats_model_is_frozen() -> None:
    s = paired_stats([(1.0, 1.0)])
    assert isinstance(s, PairedStats)
    with pytest.raises(ValueError):
        s.n = 3
