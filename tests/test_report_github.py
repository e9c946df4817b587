"""GitHub step summary and annotations: escaping, the 1 MiB cap, the 10+10 annotation cap, append mode."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pytest_day0.failures import FailureClass, Tier
from pytest_day0.gates.compare import TaskComparison, compare_task, comparison_outcomes
from pytest_day0.gates.outcome import GateOutcome, Status
from pytest_day0.report import github
from pytest_day0.report.github import (
    annotation_lines,
    escape_cell,
    escape_data,
    escape_property,
    step_summary_markdown,
    truncate_utf8,
    write_step_summary,
)
from pytest_day0.scoring.records import TaskResult
from pytest_day0.scoring.tasks import TaskSpec
from pytest_day0.verdict import decide, decide_session


def comp(task: str, b: float, c: float, recipe: str = "fp8", scale: tuple[float, float] = (0, 100)) -> TaskComparison:
    s = TaskSpec(name=task, kind="generate", metric="acc", scale=scale, samples="x.jsonl")
    r: dict[str, Any] = dict(task=task, status="SUCCESS", expected_samples=10, scored_samples=10, errored_samples=0,
                             scale=scale, metric="acc", records_path="x")
    return compare_task(s, TaskResult(side="baseline", score=b, **r), TaskResult(side="candidate", score=c, **r),
                        recipe=recipe)


def outcome(status: Status, i: int = 0, msg: str = "m") -> GateOutcome:
    return GateOutcome(gate="floor", recipe="fp8", task=f"t{i}", status=status,
                       tier=Tier.HARD if status == "failed" else Tier.WARN,
                       failure_class=FailureClass.REGRESSION, message=msg)


def test_summary_has_heading_tables_and_failures() -> None:
    comps = [comp("arc_like", 84.0, 83.8), comp("gsm_like", 50.0, 39.0, "nvfp4"), comp("tau", 0.5, 0.49, "nvfp4",
                                                                                        (0, 1))]
    outs = [o for c in comps for o in comparison_outcomes(c)]
    s = decide_session([decide("fp8", outs, 0.52, source_label="bf16"), decide("nvfp4", outs, 0.3)])
    md = step_summary_markdown(s, comps, outs)
    lines = md.splitlines()
    assert lines[0] == "## ✅ pytest-day0: publish fp8 (0.52× of bf16 size); nvfp4: REGRESSION"
    assert "### fp8 — ACCEPT" in md and "### nvfp4 — REGRESSION" in md
    assert "| arc_like | 0–100 | 84.0 | 83.8 | -0.2 | 10.0 / 1.0 | pass | pass | pass |" in md
    assert "| tau | 0–1 | 0.500 | 0.490 | -0.010 | 0.100 / 0.010 | pass | pass | pass |" in md
    assert "### What failed and why" in md
    assert any(line.startswith("- **[CATASTROPHIC_REGRESSION]** `floor` nvfp4 / gsm_like (hard)") for line in lines)
    assert any(line.startswith("- **[REGRESSION]** `quality` nvfp4 / gsm_like (warn)") for line in lines)
    # every table row has the same number of unescaped cell separators as its header
    rows = [line for line in lines if line.startswith("| gsm_like") or line.startswith("| task")]
    assert len({line.replace("\\|", "").count("|") for line in rows}) == 1


def test_cells_escape_pipes_and_newlines() -> None:
    assert escape_cell("a|b\nc\r\nd") == "a\\|b c d"
    assert escape_cell("") == " "
    v = decide("we|ird\nrecipe", [], None)
    md = step_summary_markdown(decide_session([v]), [], [])
    row = next(line for line in md.splitlines() if line.startswith("| we"))
    assert row.startswith("| we\\|ird recipe | ⚠️ ANOMALOUS |")
    assert row.replace("\\|", "").count("|") == 6


def test_summary_is_capped_under_one_mib_with_a_note() -> None:
    outs = [outcome("failed", i, "x" * 2000 + " é") for i in range(1000)]  # ~2 MB of failures
    md = step_summary_markdown(decide_session([decide("fp8", outs, 0.5)]), [], outs)
    size = len(md.encode("utf-8"))
    assert 1_000_000 < size <= 1024 * 1024 - 16 * 1024
    assert "**Truncated**" in md.splitlines()[-1]
    small = truncate_utf8("héllo\nworld\n", 5 + 200)
    assert small == "héllo\nworld\n"


def test_truncate_cuts_on_line_boundary_and_never_exceeds() -> None:
    text = "".join(f"line {i} ünïcode\n" for i in range(10_000))
    for cap in (300, 1000, 5000):
        out = truncate_utf8(text, cap)
        assert len(out.encode("utf-8")) <= cap
        body = out.split("\n\n> **Truncated**")[0]
        assert body.splitlines()[-1].endswith("ünïcode")
    assert truncate_utf8(text, 10) == ""  # not even the note fits


def test_write_step_summary_appends_and_respects_shared_cap(tmp_path: Path) -> None:
    p = tmp_path / "summary.md"
    p.write_text("# from an earlier step writer\n")
    write_step_summary(p, "## ours\n")
    assert p.read_text() == "# from an earlier step writer\n## ours\n"
    write_step_summary(p, "y\n" * 1000, cap_bytes=600)
    assert p.stat().st_size <= 600
    assert p.read_text().startswith("# from an earlier step writer\n## ours\ny\n")


def test_annotation_escaping() -> None:
    assert escape_data("50% done\r\nnext") == "50%25 done%0D%0Anext"
    assert escape_property("a:b,c%\n") == "a%3Ab%2Cc%25%0A"
    line = annotation_lines([GateOutcome(gate="ptq.size", recipe="fp8", status="failed",
                                    failure_class=FailureClass.SIZE_NOT_REDUCED, message="ratio 1.02: 100%\nbad")])[0]
    assert line == ("::error title=[SIZE_NOT_REDUCED] ptq.size fp8::"
                    "[SIZE_NOT_REDUCED] ratio 1.02: 100%25%0Abad")
    title = line.split("::")[1]
    assert ":" not in title.removeprefix("error title=")  # a raw colon would end the properties early


def test_annotations_levels_and_caps() -> None:
    outs = [outcome("failed", i) for i in range(13)] + [outcome("warned", i) for i in range(12)] + \
        [outcome("passed"), outcome("skipped")]
    lines = annotation_lines(outs)
    errors = [line for line in lines if line.startswith("::error ")]
    warnings = [line for line in lines if line.startswith("::warning ")]
    assert len(errors) == 10 and len(warnings) == 10 and len(lines) == 21
    assert lines[-1].startswith("::notice title=pytest-day0::3 more errors and 2 more warnings not annotated")
    assert "t0" in errors[0] and "t9" in errors[-1]
    few = annotation_lines([outcome("failed"), outcome("warned")])
    assert len(few) == 2 and not any(line.startswith("::notice") for line in few)
    assert annotation_lines([outcome("passed")]) == []
    assert github.annotations(outs) == lines  # the name the plugin calls
