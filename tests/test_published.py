"""The external baseline gate and its file: scales converted, evidence-based with an interval, bad files rejected."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_day0.config import build_config
from pytest_day0.failures import Day0Error, FailureClass, GateFailure, Tier
from pytest_day0.gates.published import assert_published, check_published
from pytest_day0.scoring.published import PublishedScore, load_published, parse_published


def pub(score: float, scale: tuple[float, float] = (0, 100), source: str = "") -> PublishedScore:
    return PublishedScore(task="t", score=score, scale=scale, source=source)


def test_point_rule_within_and_beyond_five_points() -> None:
    assert check_published("t", (0, 100), 80.0, pub(84.9)).passed
    bad = check_published("t", (0, 100), 80.0, pub(85.1, source="model card"))
    assert bad.failure_class is FailureClass.EXTERNAL_BASELINE_MISMATCH and bad.tier is Tier.HARD
    assert "off by -5.1, tolerance ±5.0" in bad.message and "(model card)" in bad.message
    with pytest.raises(GateFailure) as info:
        assert_published(bad)
    assert info.value.tier is Tier.HARD


def test_published_on_another_scale_is_converted() -> None:
    c = check_published("t", (0, 1), 0.80, pub(92.0))  # model card in percent, task on 0-1
    assert c.failure_class is FailureClass.EXTERNAL_BASELINE_MISMATCH
    assert "vs published 0.920 (92 on 0–100)" in c.message and c.numbers["tolerance_points"] == pytest.approx(0.05)
    omni = check_published("omni", (-100, 100), 20.0, pub(0.55, (0, 1)))  # 0.55 of the range = +10 on -100..100
    assert omni.passed and omni.numbers["published"] == pytest.approx(10.0)  # within 10 points (5% of 200)


def test_with_an_interval_it_needs_evidence() -> None:
    # 20 samples at 80%: [66, 90] reaches within 5 points of 84 and beyond it -> INCONCLUSIVE (warn)
    c = check_published("t", (0, 100), 80.0, pub(84.0), interval=(66.0, 90.0), n=20)
    assert c.failure_class is FailureClass.INCONCLUSIVE and c.tier is Tier.WARN and "n=20" in c.message
    sure = check_published("t", (0, 100), 70.0, pub(84.0), interval=(66.0, 74.0), n=400)
    assert sure.failure_class is FailureClass.EXTERNAL_BASELINE_MISMATCH
    assert check_published("t", (0, 100), 82.0, pub(84.0), interval=(80.0, 84.0)).passed


def test_file_formats_and_errors(tmp_path: Path) -> None:
    y = tmp_path / "p.yaml"
    y.write_text("arc_like: {score: 84.2, scale: [0, 100], source: card}\ntau_like: {score: 0.5, scale: 1}\n")
    got = load_published(y)
    assert got["tau_like"].scale == (0.0, 1.0) and got["arc_like"].source == "card"
    j = tmp_path / "p.json"
    j.write_text('{"omni": {"score": -12, "scale": [-100, 100]}}')
    assert load_published(j)["omni"].fraction() == pytest.approx(0.44)
    for data, needle in [([], "non-empty mapping"), ({"t": 3}, "expected {score, scale}"),
                         ({"t": {"score": "84"}}, "finite number"), ({"t": {"score": 1, "scale": "x"}}, "scale must"),
                         ({"t": {"score": 150, "scale": 100}}, "outside its scale"),
                         ({"t": {"score": 1, "scale": 1, "url": "x"}}, "unknown keys")]:
        with pytest.raises(Day0Error) as info:
            parse_published(data)
        assert info.value.failure_class is FailureClass.USER_CONFIG_ERROR and needle in info.value.message
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(Day0Error) as err:
        build_config({"model": "demo", "published": str(bad)}, lambda k: None, {})
    assert str(err.value).startswith("[USER_CONFIG_ERROR] --day0-published") and "\n" not in str(err.value)
