"""The compare gate on declared scales: 0–1, 0–100, −100..100, lower-is-better, relative mode, anomalies."""

from __future__ import annotations

from typing import Any

import pytest

from pytest_day0.failures import Day0Error, FailureClass, GateFailure, Tier
from pytest_day0.gates.compare import (
    Decision,
    GateSkipped,
    ScoreDelta,
    TaskComparison,
    assert_floor,
    assert_no_anomaly,
    assert_quality,
    compare_task,
    comparison_outcomes,
    format_scale,
    format_score,
    missing_comparison,
)
from pytest_day0.scoring.records import TaskResult
from pytest_day0.scoring.tasks import TaskSpec


def spec(scale: tuple[float, float] = (0, 100), name: str = "arc_like", higher: bool = True) -> TaskSpec:
    return TaskSpec(name=name, kind="generate", metric="acc", scale=scale, samples="x.jsonl", higher_is_better=higher)


def res(side: str, score: float | None, s: TaskSpec, **kw: Any) -> TaskResult:
    d: dict[str, Any] = dict(
        task=s.name,
        side=side,
        status="SUCCESS",
        expected_samples=100,
        scored_samples=100,
        errored_samples=0,
        score=score,
        scale=s.scale,
        metric=s.metric,
        records_path="/tmp/x.jsonl",
    )
    d.update(kw)
    return TaskResult(**d)


def cmp(s: TaskSpec, b: float | None, c: float | None, **kw: Any) -> TaskComparison:
    return compare_task(s, res("baseline", b, s), res("candidate", c, s), **kw)


def test_signed_scale_half_percent_drop_is_within_one_percent() -> None:
    s = spec((-100, 100), "omniscience")
    c = cmp(s, 20, 19)
    assert c.delta == -1
    assert c.drop_fraction == pytest.approx(0.005)
    assert c.quality.passed and c.floor.passed and c.anomaly.passed
    assert c.threshold_points == pytest.approx(2.0) and c.floor_points == pytest.approx(20.0)
    # a 0-1 reading would call this a 100% drop; a 0-100 reading 1%: neither
    assert "on -100..100" in c.quality.message


def test_hundred_scale_scored_below_one_is_not_read_as_zero_one() -> None:
    c = cmp(spec((0, 100)), 0.8, 0.7)
    assert c.drop_fraction == pytest.approx(0.001)  # 0.1 points of 100, not 10%
    assert c.quality.passed and c.floor.passed


def test_zero_one_scale_threshold_is_one_hundredth() -> None:
    s = spec((0, 1), "tau_like")
    assert cmp(s, 0.50, 0.49).quality.passed  # exactly 1%: within (float slack)
    c = cmp(s, 0.50, 0.48)
    assert not c.quality.passed and c.quality.failure_class is FailureClass.REGRESSION
    assert c.quality.tier is Tier.WARN and c.floor.passed
    assert "candidate 0.480 vs baseline 0.500 (Δ -0.020 on 0–1)" in c.quality.message


def test_exact_threshold_on_hundred_scale_is_within() -> None:
    c = cmp(spec(), 84.0, 83.0)
    assert c.quality.passed
    assert not cmp(spec(), 84.0, 82.9).quality.passed


def test_catastrophic_floor_message_and_assertions() -> None:
    c = cmp(spec(), 84.0, 71.3)
    assert not c.floor.passed and c.floor.failure_class is FailureClass.CATASTROPHIC_REGRESSION
    assert c.floor.message == "arc_like: candidate 71.3 vs baseline 84.0 (Δ -12.7 points on 0–100), floor 10.0 points"
    with pytest.raises(GateFailure) as info:
        assert_floor(c)
    assert info.value.tier is Tier.HARD
    assert str(info.value).startswith("[CATASTROPHIC_REGRESSION] arc_like: candidate 71.3")
    with pytest.raises(GateFailure) as warn:
        assert_quality(c)
    assert warn.value.tier is Tier.WARN and warn.value.failure_class is FailureClass.REGRESSION
    assert_no_anomaly(c)


def test_lower_is_better_drop_is_an_increase() -> None:
    s = spec((0, 100), "error_rate", higher=False)
    worse = cmp(s, 10.0, 25.0)
    assert worse.delta == 15.0 and worse.drop_fraction == pytest.approx(0.15)
    assert not worse.floor.passed
    better = cmp(s, 10.0, 9.5)
    assert better.quality.passed and better.drop_fraction == pytest.approx(-0.005)


def test_relative_mode_divides_by_baseline_distance_from_floor() -> None:
    s = spec((0, 100))
    c = cmp(s, 20.0, 18.0, relative=True, threshold=0.05, floor=0.5)
    assert c.drop_fraction == pytest.approx(0.10)  # 2 of 20, not 2 of 100
    assert not c.quality.passed and c.floor.passed
    assert c.threshold_points == pytest.approx(1.0)  # 5% of this baseline
    assert "threshold 5% of baseline (1.0 points)" in c.quality.message
    # absolute mode on the same numbers: 2% of range, within 5%
    assert cmp(s, 20.0, 18.0, threshold=0.05).quality.passed


def test_relative_mode_on_signed_scale_uses_distance_from_lo() -> None:
    s = spec((-100, 100), "omniscience")
    c = cmp(s, -50.0, -55.0, relative=True)
    assert c.drop_fraction == pytest.approx(5 / 50)


def test_relative_mode_baseline_at_floor_does_not_divide_by_zero() -> None:
    c = cmp(spec((0, 1), "tau_like"), 0.0, 0.0, relative=True)
    assert c.drop_fraction == 0.0 and c.quality.passed


def test_implausible_gain_is_anomalous_and_hard() -> None:
    c = cmp(spec(), 60.0, 66.0)
    assert not c.anomaly.passed and c.anomaly.failure_class is FailureClass.ANOMALOUS
    assert c.anomaly.tier is Tier.HARD and c.quality.passed and c.floor.passed
    assert "implausible gain over 5.0 points" in c.anomaly.message
    with pytest.raises(GateFailure, match=r"^\[ANOMALOUS\]"):
        assert_no_anomaly(c)
    assert cmp(spec(), 60.0, 64.9).anomaly.passed
    # on -100..100 a 6-point gain is 3% of the range: plausible
    assert cmp(spec((-100, 100), "omniscience"), 10.0, 16.0).anomaly.passed


def test_abstain_makes_floor_skip_not_fail() -> None:
    c = cmp(spec(), 84.0, 40.0, abstain=True)
    assert c.floor.skipped and c.floor.failure_class is FailureClass.INCONCLUSIVE
    with pytest.raises(GateSkipped) as info:
        assert_floor(c)
    assert str(info.value).startswith("[INCONCLUSIVE] arc_like")
    assert not c.quality.passed  # the warn-tier signal stays visible


def test_missing_score_gives_skipped_row_not_crash() -> None:
    s = spec()
    c = compare_task(s, res("baseline", 84.0, s), res("candidate", None, s, status="FAILED"), recipe="fp8")
    assert c.baseline == 84.0 and c.candidate is None and c.delta is None
    assert c.floor.skipped and c.quality.skipped and c.anomaly.skipped
    assert "no valid candidate score" in c.floor.message
    assert [o.status for o in comparison_outcomes(c)] == ["skipped", "skipped", "skipped"]
    with pytest.raises(GateSkipped):
        assert_quality(c)


def test_missing_comparison_carries_upstream_class() -> None:
    c = missing_comparison(spec(), "PTQ failed", recipe="nvfp4", failure_class=FailureClass.MODEL_UNSUPPORTED)
    outs = comparison_outcomes(c)
    assert {o.failure_class for o in outs} == {FailureClass.MODEL_UNSUPPORTED}
    assert all(o.status == "skipped" and o.recipe == "nvfp4" for o in outs)


def test_outcomes_statuses_per_tier() -> None:
    c = cmp(spec(), 84.0, 71.3, recipe="fp8")
    floor, quality, anomaly = comparison_outcomes(c)
    assert (floor.gate, floor.status, floor.tier) == ("floor", "failed", Tier.HARD)
    assert (quality.gate, quality.status, quality.tier) == ("quality", "warned", Tier.WARN)
    assert (anomaly.gate, anomaly.status) == ("anomaly", "passed")
    assert quality.numbers["delta"] == pytest.approx(-12.7) and quality.numbers["scale"] == "0–100"
    assert comparison_outcomes(c, warn_as_error=True)[1].status == "failed"


def test_mismatched_scale_or_task_is_a_one_line_day0_error() -> None:
    s = spec((0, 100))
    with pytest.raises(Day0Error) as info:
        compare_task(s, res("baseline", 0.8, s, scale=(0, 1)), res("candidate", 70.0, s))
    assert info.value.failure_class is FailureClass.SAMPLE_ACCOUNTING_FAILED
    assert "scale 0–1" in info.value.message and "\n" not in str(info.value)
    with pytest.raises(Day0Error, match="is for task 'gsm_like'"):
        compare_task(s, res("baseline", 80.0, s, task="gsm_like"), res("candidate", 70.0, s))


@pytest.mark.parametrize("bad", [-0.01, float("nan"), float("inf")])
def test_bad_thresholds_are_user_config_errors(bad: float) -> None:
    with pytest.raises(Day0Error) as info:
        cmp(spec(), 80.0, 79.0, threshold=bad)
    assert info.value.failure_class is FailureClass.USER_CONFIG_ERROR


def test_quality_decider_is_replaceable() -> None:
    seen: list[ScoreDelta] = []

    def strict(d: ScoreDelta, threshold: float) -> Decision:
        seen.append(d)
        return Decision(gate="quality", tier=Tier.WARN, passed=False, failure_class=FailureClass.REGRESSION,
                        message="significant by a paired test")

    c = cmp(spec(), 84.0, 83.9, quality=strict)
    assert c.quality.message == "significant by a paired test"
    assert seen and seen[0].drop == pytest.approx(0.1)


def test_formatting_follows_declared_scale() -> None:
    assert format_score(0.5, (0, 1)) == "0.500"
    assert format_score(84.04, (0, 100)) == "84.0"
    assert format_score(-3.0, (-100, 100), signed=True) == "-3.0"
    assert format_score(None, (0, 1)) == "—"
    assert format_scale((-100, 100)) == "-100..100" and format_scale((0, 1)) == "0–1"


def test_flips_count_each_way_with_a_stated_tolerance() -> None:
    from pytest_day0.gates.compare import FLIP_TOLERANCE, flip_numbers, flips_of

    binary = flips_of([("a", 1.0, 0.0), ("b", 0.0, 1.0), ("c", 1.0, 1.0), ("d", 1.0, 0.0)])
    assert (binary.lost, binary.gained, binary.n, binary.rate) == (["a", "d"], ["b"], 4, 0.75)
    assert binary.describe() == "2 lost, 1 gained of 4 (75.0%)"
    graded = flips_of([("a", 1.0, 0.5), ("b", 0.5, 0.375), ("c", 0.0, 0.5)])  # avg-of-2 / avg-of-8 items
    assert (graded.lost, graded.gained, graded.tolerance) == (["a"], ["c"], FLIP_TOLERANCE)
    assert flips_of([("a", 1.0, 0.875)], tolerance=0.125).lost == ["a"]
    lower = flips_of([("a", 0.0, 1.0), ("b", 1.0, 0.0)], higher_is_better=False)  # an error rate: up is worse
    assert (lower.lost, lower.gained) == (["a"], ["b"])
    numbers = flip_numbers(flips_of([(str(i), 1.0, 0.0) for i in range(60)]))
    assert numbers["flips_lost"] == 60 and numbers["flip_rate"] == 1.0
    assert str(numbers["flipped_lost_ids"]).endswith(",49,... (+10 more)")
    with pytest.raises(Day0Error):
        flips_of([], tolerance=0)
