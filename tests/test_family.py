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
