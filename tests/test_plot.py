"""delta.svg: valid SVG, one row per task, the interval drawn against the threshold and floor lines."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from pytest_day0.gates.compare import TaskComparison, compare_task, missing_comparison
from pytest_day0.gates.stats import paired_stats
from pytest_day0.report.plot import COLOURS, delta_svg, write_delta_svg
from pytest_day0.scoring.records import TaskResult
from pytest_day0.scoring.tasks import TaskSpec

NS = "{http://www.w3.org/2000/svg}"


def spec(name: str, scale: tuple[float, float] = (0, 100)) -> TaskSpec:
    return TaskSpec(name=name, kind="generate", metric="acc", scale=scale, samples="x.jsonl")


def comp(name: str, base: list[float], cand: list[float], *, paired: bool = True,
         scale: tuple[float, float] = (0, 100)) -> TaskComparison:
    s = spec(name, scale)

    def res(side: str, v: list[float]) -> TaskResult:
        r: dict[str, Any] = dict(task=name, side=side, status="SUCCESS", expected_samples=len(v),
                                 scored_samples=len(v), errored_samples=0, scale=s.scale, metric="acc",
                                 records_path="x")
        return TaskResult(score=s.to_scale(sum(v) / len(v)), **r)

    stats = paired_stats(list(zip(base, cand, strict=True))) if paired else None
    return compare_task(s, res("baseline", base), res("candidate", cand), recipe="fp8", paired=stats)


def parse(svg: str) -> ET.Element:
    return ET.fromstring(svg)


def test_rows_colours_and_limit_lines() -> None:
    rows = [
        comp("ok", [1.0] * 400, [1.0] * 400),  # PASS at 0 (347 agreeing items is the least that can)
        comp("few", [1.0] * 20, [1.0] * 20),  # INCONCLUSIVE
        comp("worse", [1.0] * 1000, [0.0] * 80 + [1.0] * 920),  # REGRESSION, 8 points
        comp("tau", [1.0] * 400, [1.0] * 400, scale=(0, 1)),  # another scale, same axis
    ]
    root = parse(delta_svg(rows))
    assert root.tag == f"{NS}svg"
    texts = [t.text or "" for t in root.iter(f"{NS}text")]
    assert {"fp8 / ok", "fp8 / few", "fp8 / worse", "fp8 / tau"} <= set(texts)
    labels = {t: next(x for x in texts if x.startswith("Δ") and x.endswith(t)) for t in
              ("PASS", "INCONCLUSIVE", "REGRESSION")}
    assert "n=400" in labels["PASS"] and "[-0.9, +0.9]" in labels["PASS"] and "n=20" in labels["INCONCLUSIVE"]
    circles = list(root.iter(f"{NS}circle"))
    assert [c.get("fill") for c in circles] == [COLOURS["PASS"], COLOURS["INCONCLUSIVE"], COLOURS["REGRESSION"],
                                               COLOURS["PASS"]]
    lines = {ln.get("stroke-dasharray"): ln for ln in root.iter(f"{NS}line") if ln.get("stroke-width") == "1"}
    zero_x = float(lines[None].get("x1", "0"))
    threshold_x = float(lines["4,3"].get("x1", "0"))
    floor_x = float(lines["8,3"].get("x1", "0"))
    assert floor_x < threshold_x < zero_x  # left is worse
    assert float(circles[0].get("cx", "0")) == zero_x == float(circles[3].get("cx", "0"))
    regression_cx = float(circles[2].get("cx", "0"))
    assert floor_x < regression_cx < threshold_x  # an 8-point drop: past the threshold, short of the floor
    bars = [ln for ln in root.iter(f"{NS}line") if ln.get("stroke-width") == "3"]
    assert len(bars) == 4
    few = bars[1]
    assert float(few.get("x1", "0")) < threshold_x and float(few.get("x2", "0")) > zero_x  # straddles


def test_point_mode_and_missing_rows_and_escaping(tmp_path: Path) -> None:
    odd = comp("plain", [1.0] * 10, [1.0] * 10, paired=False).model_copy(update={"recipe": "a<b&c"})
    rows = [odd,
            missing_comparison(spec("gone"), "PTQ failed", recipe="fp8")]
    path = write_delta_svg(tmp_path / "d" / "delta.svg", rows)
    root = parse(path.read_text())
    texts = [t.text or "" for t in root.iter(f"{NS}text")]
    assert "a<b&c / plain" in texts and "not compared" in texts  # escaped in the file, intact when parsed
    assert len(list(root.iter(f"{NS}circle"))) == 1  # the missing row has no dot
    bar = next(ln for ln in root.iter(f"{NS}line") if ln.get("stroke-width") == "3")
    assert bar.get("x1") == bar.get("x2")  # no interval: a bar of zero length under the dot


def test_no_comparisons_still_draws() -> None:
    root = parse(delta_svg([]))
    assert any((t.text or "") == "no task was compared" for t in root.iter(f"{NS}text"))
