"""The sequential comparison: state and decisions, the round schedule, the vectorised kernel the simulations use,
and a fast subset of bench/sim_adaptive.py (error rates per cell and the items saved)."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_day0.failures import Day0Error, FailureClass
from pytest_day0.gates import sequential as seq
from pytest_day0.gates.sequential import Outcome, decide, round_schedule, start, update
from pytest_day0.gates.stats import paired_stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from simdata import draw, feasible


def pairs_of(differences: list[float]) -> list[tuple[float, float]]:
    return [(max(0.0, -d), max(0.0, -d) + d) for d in differences]


def test_state_is_pure_and_validated() -> None:
    s0 = start(300)
    s1 = update(s0, [(1.0, 1.0), (1.0, 0.0)])
    assert s0.n == 0 and s1.n == 2 and s1.differences == (0.0, -1.0) and s1.horizon == 300
    with pytest.raises(ValueError):
        s1.differences = ()  # type: ignore[misc]
    with pytest.raises(Day0Error) as info:
        update(s0, [(1.0, 1.5)])
    assert info.value.failure_class is FailureClass.SAMPLE_ACCOUNTING_FAILED
    with pytest.raises(Day0Error, match="planned number"):
        start(0)
    with pytest.raises(Day0Error, match="no item"):
        decide(s0, threshold=0.01, floor=0.1, task_size=300)
    with pytest.raises(Day0Error, match="threshold"):
        decide(s1, threshold=-0.01, floor=0.1, task_size=300)


def test_round_schedule() -> None:
    assert round_schedule(300) == [64, 96, 144, 216, 300]
    assert round_schedule(50) == [50]
    ends = round_schedule(10_000)
    assert ends[0] == 64 and ends[-1] == 10_000 and all(b > a for a, b in itertools.pairwise(ends))
    assert all(b <= 1.5 * a + 1 for a, b in itertools.pairwise(ends))
    with pytest.raises(ValueError):
        round_schedule(100, growth=1.0)


def test_agreeing_items_pass_and_the_interval_narrows() -> None:
    state = start(3000)
    decisions = []
    for end in round_schedule(3000):
        state = update(state, [(1.0, 1.0)] * (end - state.n))
        d = decide(state, threshold=0.01, floor=0.10, task_size=3000)
        decisions.append(d)
        if d.stop:
            break
    last = decisions[-1]
    assert last.outcome is Outcome.PASS and last.reason == "decided" and last.n < 3000
    assert last.p_pass <= 0.05 and last.p_regression == 1.0 and last.ci_low >= -0.01
    assert [d.outcome for d in decisions[:-1]] == [Outcome.CONTINUE] * (len(decisions) - 1)
    widths = [d.ci_high - d.ci_low for d in decisions]
    assert widths == sorted(widths, reverse=True)


def test_a_clear_drop_stops_early_and_the_floor_is_watched() -> None:
    rng = np.random.default_rng(2)
    drop = rng.choice([-1.0, 0.0], size=2000, p=[0.06, 0.94]).tolist()  # 6 points, clearly past 1, not 10
    state = start(2000)
    for end in round_schedule(2000):
        state = update(state, pairs_of(drop[state.n:end]))
        d = decide(state, threshold=0.01, floor=0.10, task_size=2000)
        if d.stop:
            break
    assert d.outcome is Outcome.REGRESSION and d.n < 2000 and d.p_regression <= 0.05 and d.ci_high < -0.01
    collapse = rng.choice([-1.0, 0.0], size=2000, p=[0.3, 0.7]).tolist()  # 30 points: past the floor
    state = update(start(2000), pairs_of(collapse[:64]))
    d = decide(state, threshold=0.01, floor=0.10, task_size=2000)
    if d.outcome is Outcome.CONTINUE:  # the drop is established first, the floor is watched, not given up
        assert d.reason in ("watching the floor", "continue")
    for end in round_schedule(2000)[1:]:
        state = update(state, pairs_of(collapse[state.n:end]))
        d = decide(state, threshold=0.01, floor=0.10, task_size=2000)
        if d.stop:
            break
    assert d.outcome is Outcome.CATASTROPHIC and d.p_floor <= 0.05


def test_exhausted_and_futile_tasks_are_inconclusive() -> None:
    state = update(start(100), [(1.0, 1.0)] * 100)  # 100 agreeing items cannot show < 1 point (347 can)
    d = decide(state, threshold=0.01, floor=0.10, task_size=100)
    assert d.outcome is Outcome.INCONCLUSIVE and d.reason == "exhausted"
    # a 1-point drop (exactly the threshold) with half the items disagreeing: 2,000 items cannot decide it
    rng = np.random.default_rng(4)
    block = np.array([-1.0] * 51 + [1.0] * 49 + [0.0] * 100)
    boundary = np.concatenate([rng.permutation(block) for _ in range(10)]).tolist()
    state = update(start(2000), pairs_of(boundary[:600]))
    assert decide(state, threshold=0.01, floor=0.10, task_size=2000).outcome is Outcome.CONTINUE
    state = update(state, pairs_of(boundary[600:1000]))
    d = decide(state, threshold=0.01, floor=0.10, task_size=2000)
    assert d.outcome is Outcome.INCONCLUSIVE and d.reason == "futile" and d.n == 1000


def test_lower_is_better_orientation() -> None:
    rng = np.random.default_rng(6)
    worse = rng.choice([0.0, 1.0], size=1000, p=[0.93, 0.07])  # error rate up 7 points
    d = decide(update(start(1000), [(0.0, float(v)) for v in worse]), threshold=0.01, floor=0.10, task_size=1000,
               higher_is_better=False)
    assert d.outcome is Outcome.REGRESSION and d.delta > 0 and d.ci_low > 0.01


def test_decide_is_the_kernel_of_run_many() -> None:
    rng = np.random.default_rng(8)
    for delta, agreement, size in ((-0.03, 0.9, 1000), (0.0, 0.99, 600), (-0.01, 0.7, 500)):
        d = draw(rng, "avg-of-4", 6, size, agreement, delta)
        schedule = round_schedule(size)
        codes, used, p = seq.run_many(d, threshold=0.01, floor=0.10, task_size=size, schedule=schedule)
        for row in range(6):
            state = start(size)
            for end in schedule:
                state = update(state, pairs_of(d[row, state.n:end].tolist()))
                one = decide(state, threshold=0.01, floor=0.10, task_size=size)
                if one.stop:
                    break
            assert one.n == used[row] and seq._CODES[int(codes[row])] is one.outcome
            assert one.p_regression == pytest.approx(float(p["regression"][row]), rel=1e-9)


def test_the_fixed_rule_is_the_same_capital_read_at_the_end() -> None:
    rng = np.random.default_rng(9)
    d = draw(rng, "0/1", 30, 400, 0.9, -0.02)
    codes = seq.fixed_many(d, threshold=0.01, floor=0.10)
    for row in range(30):
        s = paired_stats(pairs_of(d[row].tolist()), in_order=True)
        final = decide(update(start(400), pairs_of(d[row].tolist())), threshold=0.01, floor=0.10, task_size=400)
        assert final.ci_low == pytest.approx(s.ci_low, abs=1e-9) and final.ci_high == pytest.approx(s.ci_high, abs=1e-9)
        assert seq._CODES[int(codes[row])] is final.outcome


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(differences=st.lists(st.sampled_from([-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0]), min_size=1, max_size=150),
       threshold=st.sampled_from([0.0, 0.01, 0.05]), extra=st.integers(1, 5))
def test_more_agreeing_items_never_create_a_drop_or_anomaly_claim(differences: list[float], threshold: float,
                                                                  extra: int) -> None:
    size = len(differences) + extra
    before = decide(update(start(size), pairs_of(differences)), threshold=threshold, floor=0.10, task_size=size)
    after = decide(update(start(size), pairs_of(differences + [0.0] * extra)), threshold=threshold, floor=0.10,
                   task_size=size)
    for field in ("p_regression", "p_floor", "p_anomaly"):
        assert getattr(after, field) >= getattr(before, field) - 1e-12, field
    if after.outcome in (Outcome.REGRESSION, Outcome.CATASTROPHIC, Outcome.ANOMALOUS):
        assert before.outcome is after.outcome or (
            before.outcome is Outcome.CONTINUE and before.reason.startswith("watching"))


# ---------------------------------------------------------------------------------------------- simulation


def test_adaptive_rule_error_rates_and_items_on_a_small_grid() -> None:
    """A fast subset of bench/sim_adaptive.py: at the boundary cells both one-sided error rates within the nominal
    5% (plus the cell's sampling error), and over the benchmark's grid in miniature (16 tasks a cell) the adaptive
    rule evaluating less than half the items of the fixed-n rule (the bench: 2.3x)."""
    rng = np.random.default_rng(10)
    for kind in ("0/1", "avg-of-4"):
        for agreement in (0.7, 0.95, 0.99):
            d = draw(rng, kind, 300, 1000, agreement, -0.01)
            codes, _, _ = seq.run_many(d, threshold=0.01, floor=0.10, task_size=1000, schedule=round_schedule(1000))
            for made in ((seq.REGRESSION, seq.CATASTROPHIC), (seq.PASS, seq.ANOMALOUS)):
                rate = float(np.isin(codes, made).mean())
                assert rate <= 0.05 + 0.025, (kind, agreement, made, rate)  # 0.025: two standard errors at 300
    items_adaptive = items_fixed = 0
    for kind in ("0/1", "avg-of-4"):
        for agreement in (0.5, 0.7, 0.9, 0.95, 0.99):
            for delta in (-0.05, -0.04, -0.03, -0.02, -0.01, 0.0, 0.01):
                if not feasible(agreement, delta):
                    continue
                for size in (300, 1000, 3000, 10_000):
                    d = draw(rng, kind, 16, size, agreement, delta)
                    _, used, _ = seq.run_many(d, threshold=0.01, floor=0.10, task_size=size,
                                              schedule=round_schedule(size))
                    items_adaptive += int(used.sum())
                    items_fixed += 16 * size
    assert items_fixed / items_adaptive >= 2.0, items_fixed / items_adaptive
