"""The terminal summary: own-scale numbers, "—" for what a failed stage never made, the verdict printed last."""

from __future__ import annotations

from typing import Any

from pytest_day0.failures import FailureClass
from pytest_day0.gates.compare import TaskComparison, compare_task, comparison_outcomes, missing_comparison
from pytest_day0.report.terminal import COLUMNS, session_lines, table_lines
from pytest_day0.scoring.records import TaskResult
from pytest_day0.scoring.tasks import TaskSpec
from pytest_day0.verdict import decide, decide_session

SPECS = {
    "arc_like": TaskSpec(name="arc_like", kind="multiple_choice", metric="acc", scale=(0, 100), samples="a.jsonl"),
    "tau_like": TaskSpec(name="tau_like", kind="generate", metric="pass@1", scale=(0, 1), samples="t.jsonl"),
    "omni": TaskSpec(name="omni", kind="generate", metric="idx", scale=(-100, 100), samples="o.jsonl"),
}


def comp(task: str, b: float, c: float, recipe: str) -> TaskComparison:
    s = SPECS[task]
    r: dict[str, Any] = dict(task=task, status="SUCCESS", expected_samples=10, scored_samples=10, errored_samples=0,
                             scale=s.scale, metric=s.metric, records_path="x")
    return compare_task(s, TaskResult(side="baseline", score=b, **r), TaskResult(side="candidate", score=c, **r),
                        recipe=recipe)


def _session() -> tuple[list[str], list[TaskComparison]]:
    comps = [
        comp("arc_like", 84.0, 83.6, "fp8"),
        comp("tau_like", 0.5, 0.5, "fp8"),
        comp("omni", 20.0, 19.0, "fp8"),
        comp("arc_like", 84.0, 71.3, "nvfp4"),
        missing_comparison(SPECS["tau_like"], "candidate evaluation failed", recipe="nvfp4", baseline=0.5),
    ]
    outs = [o for c in comps for o in comparison_outcomes(c)]
    s = decide_session([decide("fp8", outs, 0.52, source_label="bf16"), decide("nvfp4", outs, 0.3)])
    return session_lines(s, comps), comps


def test_table_prints_each_task_on_its_own_scale() -> None:
    lines, _ = _session()
    text = "\n".join(lines)
    header = next(line for line in lines if line.strip().startswith("task"))
    assert header.split() == list(COLUMNS)
    arc = next(line for line in lines if line.strip().startswith("arc_like") and "83.6" in line)
    assert arc.split()[:5] == ["arc_like", "0–100", "84.0", "83.6", "-0.4"]
    tau = next(line for line in lines if line.strip().startswith("tau_like") and "0.500" in line and "PASS" in line)
    assert tau.split()[:5] == ["tau_like", "0–1", "0.500", "0.500", "+0.000"]
    omni = next(line for line in lines if line.strip().startswith("omni"))
    assert omni.split()[:5] == ["omni", "-100..100", "20.0", "19.0", "-1.0"]
    assert "CATASTROPHIC_REGRESSION" in text


def test_missing_values_show_dash() -> None:
    lines, _ = _session()
    row = next(line for line in lines if line.strip().startswith("tau_like") and "SKIPPED" in line)
    assert row.split() == ["tau_like", "0–1", "0.500", "—", "—", "SKIPPED"]  # a classless skip still says so


def test_every_line_of_the_tables_fits_100_columns() -> None:
    lines, _ = _session()
    verdict_at = next(i for i, line in enumerate(lines) if line.startswith("VERDICT"))
    assert all(len(line) <= 100 for line in lines[:verdict_at]), [ln for ln in lines[:verdict_at] if len(ln) > 100]
    assert any("CATASTROPHIC_REGRESSION" in line for line in lines[:verdict_at])


def test_a_row_too_wide_wraps_under_itself_and_keeps_every_digit() -> None:
    row = {"task": "mmlu_high_school_european_history", "scale": "-100..100", "base": "100.0", "cand": "27.5",
           "delta": "-72.5", "interval": "[-100.0, +100.0]", "n": "100000", "flips": "12345↓ 12345↑",
           "decision": "CATASTROPHIC_REGRESSION"}
    short = {"task": "gsm", "scale": "0–1", "base": "0.500", "cand": "0.400", "delta": "-0.100",
             "interval": "[-0.200, +0.000]", "n": "40", "flips": "1↓ 0↑", "decision": "PASS"}
    lines = table_lines([row, short])
    assert all(len(line) <= 100 for line in lines) and len(lines) == 8  # header, rule and 2 rows, 2 lines each
    first, second = lines[4], lines[5]
    assert first.split() == ["mmlu_high_school_european_history", "-100..100", "100.0", "27.5", "-72.5",
                             "[-100.0,", "+100.0]", "100000"]
    assert second.split() == ["12345↓", "12345↑", "CATASTROPHIC_REGRESSION"] and second.startswith("      ")
    assert lines[1].split() == ["flips", "decision"]  # the header wraps at the same column
    assert lines[7].split() == ["1↓", "0↑", "PASS"]
    # a single cell wider than the line gets a line of its own, whole
    huge = table_lines([{"task": "t" * 150, "n": "7"}], columns=("task", "n"))
    assert any("t" * 150 in line for line in huge) and huge[-1].split() == ["7"]


def test_verdict_lines_come_last_and_recommendation_is_the_final_line() -> None:
    lines, _ = _session()
    assert lines[-1] == "RECOMMENDATION: publish fp8 (0.52× of bf16 size); nvfp4: ANOMALOUS"
    verdict_at = [i for i, line in enumerate(lines) if line.startswith("VERDICT")]
    table_at = [i for i, line in enumerate(lines) if line.strip().startswith("task")]
    assert len(verdict_at) == 2 and max(table_at) < min(verdict_at)
    assert lines[verdict_at[0]] == "VERDICT fp8: ACCEPT — publish fp8 (0.52× of bf16 size)"
    assert lines[verdict_at[1]].startswith("VERDICT nvfp4: ANOMALOUS")  # a classless skipped comparison


def test_recipe_without_comparisons_says_so() -> None:
    outs = [
        *comparison_outcomes(
            missing_comparison(SPECS["arc_like"], "PTQ failed", recipe="nvfp4",
                               failure_class=FailureClass.MODEL_UNSUPPORTED)
        )
    ]
    s = decide_session([decide("nvfp4", outs, None)])
    lines = session_lines(s, [])
    assert any("no task was compared" in line for line in lines)
    verdict = next(line for line in lines if line.startswith("VERDICT"))
    assert verdict.startswith("VERDICT nvfp4: INFEASIBLE — nvfp4 cannot be released as asked: MODEL_UNSUPPORTED")
    assert lines[-1] == "RECOMMENDATION: publish none: " + s.verdicts[0].recommendation


def test_table_columns_align() -> None:
    lines = table_lines([{"task": "a", "baseline": "1.0"}, {"task": "longer_name", "baseline": "100.0"}],
                        columns=("task", "baseline"))
    assert len({len(line) for line in lines}) == 1  # right-aligned numbers end in one column
    assert lines[2].endswith("  1.0") and lines[3].endswith("100.0")
