"""End of session: outcomes -> verdicts -> verdict.json, terminal lines, GitHub summary, JSON report block.

Runs once, on the controller (or the only process), after every gate test has reported.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from pytest_day0.gates.compare import TaskComparison
from pytest_day0.report import github, terminal
from pytest_day0.report.plot import write_delta_svg
from pytest_day0.report.verdict_json import verdict_document, write_verdict_json
from pytest_day0.verdict import SessionVerdict, decide, decide_session
from pytest_day0.workspace import atomic_write_json


def comparisons_dir(workdir: Path, session_id: str) -> Path:
    return workdir / "runs" / session_id / "comparisons"


def save_comparison(workdir: Path, session_id: str, comparison: TaskComparison) -> None:
    """Written by whichever process computed it; the controller reads them all for the reports."""
    path = comparisons_dir(workdir, session_id) / f"{comparison.recipe}-{comparison.task}.json"
    atomic_write_json(path, comparison.model_dump(mode="json"))


def load_comparisons(workdir: Path, session_id: str, recipes: tuple[str, ...]) -> list[TaskComparison]:
    out = []
    for path in sorted(comparisons_dir(workdir, session_id).glob("*.json")):
        try:
            out.append(TaskComparison.model_validate_json(path.read_text()))
        except ValueError:
            continue
    order = {r: i for i, r in enumerate(recipes)}
    return sorted(out, key=lambda c: (order.get(c.recipe or "", 99), c.task))


def _size_ratio(state: Any, recipe: str) -> float | None:
    for o in state.outcomes:
        if o.gate == "ptq.size" and o.recipe == recipe and isinstance(o.numbers.get("size_ratio"), (int, float)):
            return float(o.numbers["size_ratio"])
    return None


def finish(state: Any, config: pytest.Config) -> SessionVerdict:
    run = state.config
    verdicts = [decide(r, state.outcomes, _size_ratio(state, r), source_label="bf16" if run.model == "demo"
                       else "source") for r in run.recipes]
    session = decide_session(verdicts)
    state.comparisons = load_comparisons(run.workdir, state.session_id, run.recipes)
    run_dir = run.workdir / "runs" / state.session_id
    extra = {"config": run.public_dict(), "session_id": state.session_id,
             "outcomes": [o.model_dump(mode="json") for o in state.outcomes]}
    write_verdict_json(run_dir / "verdict.json", session, state.comparisons, extra)
    write_verdict_json(run.workdir / "verdict.json", session, state.comparisons, extra)
    write_delta_svg(run_dir / "delta.svg", state.comparisons)
    state.plot_path = write_delta_svg(run.workdir / "delta.svg", state.comparisons)
    summary_path = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary_path:
        github.write_step_summary(summary_path, github.step_summary_markdown(
            session, state.comparisons, state.outcomes, plot=str(state.plot_path)))
    return session


def terminal_lines(state: Any, config: pytest.Config) -> list[str]:
    lines = ["", "=" * 30 + " pytest-day0 release " + "=" * 30]
    lines += terminal.session_lines(state.session_verdict, state.comparisons)
    lines.append(f"verdict.json: {state.config.workdir / 'verdict.json'}")
    if getattr(state, "plot_path", None):
        lines.append(f"plot (Δ with its interval per task): {state.plot_path}")
    if os.environ.get("GITHUB_ACTIONS") == "true":
        lines = github.annotation_lines(state.outcomes) + lines
    return lines


def json_summary(state: Any) -> dict[str, Any]:
    doc = verdict_document(state.session_verdict, state.comparisons, {"session_id": state.session_id})
    return json.loads(json.dumps(doc, default=str))  # type: ignore[no-any-return]
