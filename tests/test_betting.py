"""The betting capital process against the paper's reference code, and the properties the intervals rest on.

tests/data/confseq_reference.json holds capital paths and confidence sequences computed by confseq 0.0.11
(gostevehoward/confseq: the reference implementation of Waudby-Smith & Ramdas 2024) with the same bets
(``lambda_predmix_eb``, truncation 0.9 / m); bench/reference/make_confseq_reference.py regenerates it.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest

from pytest_day0.gates import betting

REFERENCE = json.loads((Path(__file__).parent / "data" / "confseq_reference.json").read_text())


@pytest.mark.parametrize("case", range(len(REFERENCE["capital"])))
def test_capital_matches_confseq(case: int) -> None:
    ref = REFERENCE["capital"][case]
    x = np.array(REFERENCE["samples"][ref["sample"]])
    bets = betting.plugin_bets(x, ref["alpha"], ref["horizon"])
    stride = REFERENCE["stride"]
    ours = betting.log_capital(x, ref["m"], ref["side"], bets, 0.9)[stride - 1::stride]
    assert np.allclose(ours, ref["log_capital"], rtol=0, atol=1e-9)


@pytest.mark.parametrize("case", range(len(REFERENCE["intervals"])))
def test_bounds_match_confseq_grid(case: int) -> None:
    # confseq finds the bounds on a grid of 1/breaks and widens them by one step: ours lie within that step
    ref = REFERENCE["intervals"][case]
    x = np.array(REFERENCE["samples"][ref["sample"]])
    bets = betting.plugin_bets(x, 0.05, ref["horizon"])
    step = 1 / ref["breaks"]
    low, high = betting.lower_bound(x, bets, 0.05), betting.upper_bound(x, bets, 0.05)
    assert ref["lower"] - 1e-12 <= low <= ref["lower"] + 2 * step
    assert ref["upper"] - 2 * step <= high <= ref["upper"] + 1e-12


def test_capital_is_monotone_in_m() -> None:
    rng = np.random.default_rng(0)
    x = rng.beta(0.5, 0.5, 500)
    bets = betting.plugin_bets(x, 0.05, 500)
    grid = np.linspace(0.01, 0.99, 99)
    plus = [float(betting.max_log_capital(x, m, 1, bets)) for m in grid]
    minus = [float(betting.max_log_capital(x, m, -1, bets)) for m in grid]
    assert all(a >= b - 1e-12 for a, b in itertools.pairwise(plus))  # K+ nonincreasing in m
    assert all(a <= b + 1e-12 for a, b in itertools.pairwise(minus))  # K- nondecreasing in m


def test_ville_bound_holds_for_the_running_maximum() -> None:
    # under H0 (mean exactly m) the running maximum reaches 1/alpha in at most alpha of the paths
    rng = np.random.default_rng(1)
    for values, p in (([0.0, 0.5, 1.0], [0.05, 0.9, 0.05]), ([0.0, 1.0], [0.5, 0.5])):
        x = rng.choice(values, size=(4000, 400), p=p)
        m = float(np.dot(values, p))
        for horizon in (None, 400):
            bets = betting.plugin_bets(x, 0.05, horizon)
            for side in (1, -1):
                crossed = betting.max_log_capital(x, m, side, bets) >= betting.log_threshold(0.05)  # type: ignore[arg-type]
                assert crossed.mean() <= 0.05 + 2 * math.sqrt(0.05 * 0.95 / 4000), (values, horizon, side)


def test_p_value_is_one_on_the_wrong_side_and_small_on_the_right() -> None:
    x = np.full(500, 0.4)
    bets = betting.plugin_bets(x, 0.05, 500)
    assert betting.p_value(x, 0.45, 1, bets) == 1.0  # mean below m: no evidence that it is above
    assert betting.p_value(x, 0.45, -1, bets) < 1e-6
    assert betting.log_threshold(0.05) == pytest.approx(math.log(20))
    with pytest.raises(ValueError):
        betting.log_threshold(1.0)
