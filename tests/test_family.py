"""One joint verdict across tasks: Holm's step-down, the intersection-union PASS, and a fast subset of
bench/sim_family.py (10 tasks, no task truly regressed: false REGRESSION verdicts per session)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from pytest_day0.failures import Day0Error
from pytest_day0.gates import sequential as seq
from pytest_day0.gates.family import METHOD, TaskEvidence, family_decision, holm, per_task_confidence

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from simdata import draw


def test_holm_adjusted_values() -> None:
    # p sorted 0.01, 0.02, 0.03, 0.5 -> 4 x 0.01, 3 x 0.02, max(0.06, 2 x 0.03), max(0.06, 0.5)
    adjusted = holm({"a": 0.02, "b": 0.01, "c": 0.5, "d": 0.03})
    assert adjusted == pytest.approx({"b": 0.04, "a": 0.06, "d": 0.06, "c": 0.5})
    assert holm({"x": 0.04}) == {"x": 0.04} and holm({}) == {}
    assert holm({"a": 0.6, "b": 0.7})["a"] == 1.0  # capped at 1
    with pytest.raises(Day0Error):
        holm({"a": float("nan")})


def test_family_decision_names_the_surviving_tasks() -> None:
    evidence = [
        TaskEvidence(task="gsm", p_regression=0.001, p_pass=1.0, p_floor=0.2, p_anomaly=1.0),
        TaskEvidence(task="arc", p_regression=0.03, p_pass=1.0, p_floor=1.0, p_anomaly=1.0),  # 5% alone, not jointly
        TaskEvidence(task="tau", p_regression=1.0, p_pass=0.01, p_floor=1.0, p_anomaly=1.0),
        TaskEvidence(task="failed"),  # no test: not in the family
    ]
    r = family_decision(evidence)
    assert r.method == METHOD and r.alpha == pytest.approx(0.05)
    assert r.regression == ["gsm"] and r.catastrophic == [] and r.anomalous == [] and not r.all_pass
    assert r.adjusted["arc"]["regression"] == pytest.approx(0.06) and r.adjusted["failed"] == {}
    with pytest.raises(Day0Error, match="twice"):
        family_decision([TaskEvidence(task="a"), TaskEvidence(task="a")])


def test_all_pass_is_an_intersection_union_test_without_adjustment() -> None:
    # every task's own PASS at 5% is the session's PASS at 5%: no correction, however many tasks
    evidence = [TaskEvidence(task=f"t{i}", p_regression=1.0, p_pass=0.049) for i in range(20)]
    assert family_decision(evidence).all_pass
    evidence[3] = TaskEvidence(task="t3", p_regression=1.0, p_pass=0.051)
    assert not family_decision(evidence).all_pass
    assert not family_decision([]).all_pass


def test_per_task_confidence_is_bonferroni() -> None:
    assert per_task_confidence(10) == pytest.approx(0.995) and per_task_confidence(1) == pytest.approx(0.95)
    with pytest.raises(ValueError):
        per_task_confidence(0)


def _sessions(rng: np.random.Generator, delta: float, sessions: int) -> tuple[np.ndarray, np.ndarray]:
    """p_regression of 10 tasks per session: fixed-n and sequential (anytime, at the stop)."""
    fixed = np.ones((sessions, 10))
    sequential = np.ones((sessions, 10))
    for task in range(10):
        agreement = (0.7, 0.9, 0.95, 0.99)[task % 4]
        size = (300, 1000)[task % 2]
        d = draw(rng, "0/1" if task % 3 else "avg-of-4", sessions, size, agreement, delta)
        x = (d + 1) / 2
        limits = seq._Limits(0.01, 0.10, 0.05, 0.95, 0.95)
        paths = seq._Paths(x, size, limits)
        fixed[:, task] = np.where(paths.mean[:, -1] < limits.m_threshold,
                                  np.exp(-paths.best["regression"][:, -1]), 1.0)
        _, _, p = seq.run_many(d, threshold=0.01, floor=0.10, task_size=size, schedule=seq.round_schedule(size))
        sequential[:, task] = p["regression"]
    return fixed, sequential


def test_simulated_sessions_false_regression_verdicts() -> None:
    rng = np.random.default_rng(3)
    for delta in (0.0, -0.01):  # identical models; every task's drop exactly at the threshold
        fixed, sequential = _sessions(rng, delta, 300)
        for p in (fixed, sequential):
            per_task = float((p <= 0.05).any(axis=1).mean())
            joint = float(np.mean([bool(family_decision(
                [TaskEvidence(task=f"t{j}", p_regression=float(v)) for j, v in enumerate(row)]).regression)
                for row in p]))
            assert joint <= 0.05, (delta, joint)
            if delta < 0:
                assert per_task > 0.10, per_task  # what the per-task claims alone would have said (bench: ~0.23)


def _comparison(name: str, lost: int, n: int = 400):  # type: ignore[no-untyped-def]
    """A 0/1 task where the candidate lost ``lost`` of n items (the baseline right on all of them)."""
    from pytest_day0.gates.compare import compare_task
    from pytest_day0.gates.stats import paired_stats
    from pytest_day0.scoring.records import TaskResult
    from pytest_day0.scoring.tasks import TaskSpec

    spec = TaskSpec(name=name, kind="generate", metric="exact_match", scale=(0, 100), samples="x.jsonl")
    base, cand = [1.0] * n, [0.0] * lost + [1.0] * (n - lost)

    def result(side: str, values: list[float]) -> TaskResult:
        return TaskResult(task=name, side=side, status="SUCCESS", expected_samples=n, scored_samples=n,
                          errored_samples=0, score=100 * sum(values) / n, scale=(0, 100), metric="exact_match",
                          records_path="x")

    return compare_task(spec, result("baseline", base), result("candidate", cand), recipe="fp8",
                        paired=paired_stats(list(zip(base, cand, strict=True))))


def test_family_adjusted_keeps_only_the_regressions_that_survive_holm() -> None:
    from pytest_day0.failures import FailureClass
    from pytest_day0.gates.family import family_adjusted

    tasks = [_comparison("clear", 60), _comparison("weak-a", 0), _comparison("weak-b", 0)]
    weak = [_comparison("w1", 11), _comparison("w2", 12), _comparison("w3", 11)]
    assert all(c.quality.failure_class is FailureClass.REGRESSION for c in weak), [c.p_regression for c in weak]
    for c in weak:  # per task, each is a REGRESSION at its own 5%; three of them are not, family-wise
        assert c.p_regression is not None and 0.05 / 3 < c.p_regression <= 0.05
    adjusted = family_adjusted(weak)
    for c in adjusted:
        assert c.quality.failure_class is FailureClass.INCONCLUSIVE and not c.quality.passed
        assert c.task_decisions == {"quality": "REGRESSION"} and c.adjusted_p["regression"] > 0.05
        assert "not family-wise: Holm over 3 tasks" in c.quality.message and c.family and "Holm over 3" in c.family
    strong = family_adjusted(tasks)
    assert strong[0].quality.failure_class is FailureClass.REGRESSION and strong[0].task_decisions == {}
    assert [c.quality.passed for c in strong[1:]] == [True, True]  # PASS untouched (intersection-union)
    single = family_adjusted(weak[:1])  # one task: Holm is the task's own test
    assert single[0].quality.failure_class is FailureClass.REGRESSION
