"""End of session: outcomes -> verdicts -> verdict.json, terminal lines, GitHub summary, JSON report block.

Runs once, on the controller (or the only process), after every gate test has reported. Other plugins read the
verdict (and annotate it) through the ``pytest_day0_verdict`` hook and add reports through ``pytest_day0_report``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from pytest_day0.gates.outcome import GateOutcome
from pytest_day0.release.comparisons import load_comparisons
from pytest_day0.release.state import SessionState
from pytest_day0.report import github, terminal
from pytest_day0.report.plot import recipes_not_compared, write_delta_svg
from pytest_day0.report.verdict_json import verdict_document, write_verdict_json
from pytest_day0.verdict import SessionVerdict, decide, decide_session


def _size_ratio(state: SessionState, recipe: str) -> float | None:
    for o in state.outcomes:
        ratio = o.numbers.get("size_ratio")
        if o.gate == "ptq.size" and o.recipe == recipe and isinstance(ratio, (int, float)):
            return float(ratio)
    return None


def chain_order(state: SessionState) -> list[GateOutcome]:
    """Outcomes in chain order (gate, then task, then side), whatever order the xdist workers reported them in:
    the reasons and task lists of every verdict read the same from run to run and from recipe to recipe."""
    from pytest_day0.release.suite import GATES

    gates = {g: i for i, g in enumerate(GATES.values())}
    tasks = {t: i for i, t in enumerate(state.task_names)}
    sides = {s: i for i, s in enumerate(("baseline", *state.config.recipes))}
    return sorted(state.outcomes, key=lambda o: (gates.get(o.gate, len(gates)), tasks.get(o.task or "", -1),
                                                 sides.get(o.side or "", -1), o.nodeid or ""))


def finish(state: SessionState, config: pytest.Config) -> SessionVerdict:
    run = state.config
    state.outcomes = chain_order(state)
    verdicts = [decide(r, state.outcomes, _size_ratio(state, r), source_label="bf16" if run.model == "demo"
                       else "source") for r in run.recipes]
    session = decide_session(verdicts)
    state.comparisons = load_comparisons(run.workdir, state.session_id, run.recipes, tuple(state.task_names))
    annotations: dict[str, Any] = {}
    for extra in config.hook.pytest_day0_verdict(session_verdict=session, comparisons=list(state.comparisons),
                                                 outcomes=list(state.outcomes), config=config):
        if isinstance(extra, dict):
            annotations.update(extra)
    if annotations:
        session = session.model_copy(update={"annotations": {**session.annotations, **annotations}})
    state.session_verdict = session
    run_dir = run.workdir / "runs" / state.session_id
    extra = {"config": run.public_dict(), "session_id": state.session_id,
             "outcomes": [o.model_dump(mode="json") for o in state.outcomes]}
    write_verdict_json(run_dir / "verdict.json", session, state.comparisons, extra)
    write_verdict_json(run.workdir / "verdict.json", session, state.comparisons, extra)
    failed = recipes_not_compared(session, state.comparisons)  # listed in the plot, not left out
    write_delta_svg(run_dir / "delta.svg", state.comparisons, failed_recipes=failed)
    state.plot_path = write_delta_svg(run.workdir / "delta.svg", state.comparisons, failed_recipes=failed)
    summary_path = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary_path:
        github.write_step_summary(summary_path, github.step_summary_markdown(
            session, state.comparisons, state.outcomes, plot=str(state.plot_path)))
    state.extra_reports = [Path(p) for p in config.hook.pytest_day0_report(
        session_verdict=session, comparisons=list(state.comparisons), outcomes=list(state.outcomes),
        run_dir=run_dir, config=config) if p]
    return session


def terminal_lines(state: SessionState) -> list[str]:
    assert state.session_verdict is not None
    lines = ["", "=" * 30 + " pytest-day0 release " + "=" * 30]
    lines += terminal.session_lines(state.session_verdict, state.comparisons)
    for key, value in state.session_verdict.annotations.items():
        lines.append(f"note {key}: {value}")
    lines.append(f"verdict.json: {state.config.workdir / 'verdict.json'}")
    if state.plot_path is not None:
        lines.append(f"plot (Δ with its interval per task): {state.plot_path}")
    lines += [f"report: {path}" for path in state.extra_reports]
    if os.environ.get("GITHUB_ACTIONS") == "true":
        lines = github.annotation_lines(state.outcomes) + lines
    return lines


def json_summary(state: SessionState) -> dict[str, Any]:
    assert state.session_verdict is not None
    doc = verdict_document(state.session_verdict, state.comparisons, {"session_id": state.session_id})
    return json.loads(json.dumps(doc, default=str))  # type: ignore[no-any-return]
