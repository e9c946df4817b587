"""End of session: outcomes -> verdicts -> verdict.json, report.html, terminal lines, GitHub summary, JSON report
block, and (``--day0-mlflow``) the MLflow runs.

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
from pytest_day0.release.comparisons import load_comparisons, load_flip_details
from pytest_day0.release.state import SessionState
from pytest_day0.report import github, html_report, terminal
from pytest_day0.report.plot import recipes_not_compared, write_delta_svg
from pytest_day0.report.verdict_json import verdict_document, write_verdict_json
from pytest_day0.verdict import SessionVerdict, decide, decide_session
from pytest_day0.workspace import atomic_write_text


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
    for note in config.hook.pytest_day0_verdict(session_verdict=session, comparisons=list(state.comparisons),
                                                outcomes=list(state.outcomes), config=config):
        if isinstance(note, dict):
            annotations.update(note)
    if annotations:
        session = session.model_copy(update={"annotations": {**session.annotations, **annotations}})
    state.session_verdict = session
    run_dir = run.workdir / "runs" / state.session_id
    details = load_flip_details(run.workdir, state.session_id, state.comparisons)
    tracker = None
    if run.mlflow:  # the runs first, so their ids are in verdict.json and report.html
        from pytest_day0.report import mlflow_log

        tracker, warning = mlflow_log.start_runs(session, session_id=state.session_id, model=run.model,
                                                 experiment=run.mlflow_experiment)
        state.tracker_lines = [tracker.line() if tracker is not None else str(warning)]
    extra: dict[str, Any] = {"config": run.public_dict(), "session_id": state.session_id,
                             "outcomes": [o.model_dump(mode="json") for o in state.outcomes]}
    if run.mlflow:
        extra["mlflow"] = tracker.ids() if tracker is not None else {"error": state.tracker_lines[0]}
    write_verdict_json(run_dir / "verdict.json", session, state.comparisons, extra)
    write_verdict_json(run.workdir / "verdict.json", session, state.comparisons, extra)
    failed = recipes_not_compared(session, state.comparisons)  # listed in the plot, not left out
    plot_cache = run.workdir / "cache" / "plots"  # a re-run of a finished session draws nothing
    state.plot_path = write_delta_svg(run.workdir / "delta.svg", state.comparisons, failed_recipes=failed,
                                      cache_dir=plot_cache)
    atomic_write_text(run_dir / "delta.svg", state.plot_path.read_text(encoding="utf-8"))  # drawn once
    page = html_report.render_report(
        session, state.comparisons, state.outcomes, details, public_config=run.public_dict(),
        session_id=state.session_id, model=run.model, links={"mlflow": tracker.line()} if tracker else None,
        plot_cache=plot_cache)
    html_report.write_report(run_dir / "report.html", page)
    state.report_path = html_report.write_report(run.workdir / "report.html", page)
    summary_path = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary_path:
        github.write_step_summary(summary_path, github.step_summary_markdown(
            session, state.comparisons, state.outcomes, plot=str(state.plot_path), report=str(state.report_path)))
    if tracker is not None:
        from pytest_day0.report import mlflow_log

        files = {r: mlflow_log.RecipeFiles(
            plot=write_delta_svg(run_dir / "plots" / r / "delta.svg", [c for c in state.comparisons if c.recipe == r],
                                 cache_dir=plot_cache),
            records={d.task: dict(d.records) for d in details if d.recipe == r}) for r in run.recipes}
        warning = mlflow_log.finish_runs(tracker, session, state.comparisons, public_config=run.public_dict(),
                                         session_files=[run_dir / "verdict.json", run_dir / "report.html",
                                                        run_dir / "delta.svg"], recipe_files=files)
        if warning:
            state.tracker_lines.append(warning)
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
    if state.report_path is not None:
        lines.append(f"report.html (tasks, gates, flipped items with both answers): {state.report_path}")
    lines += state.tracker_lines
    lines += [f"report: {path}" for path in state.extra_reports]
    if os.environ.get("GITHUB_ACTIONS") == "true":
        lines = github.annotation_lines(state.outcomes) + lines
    return lines


def json_summary(state: SessionState) -> dict[str, Any]:
    assert state.session_verdict is not None
    doc = verdict_document(state.session_verdict, state.comparisons, {"session_id": state.session_id})
    return json.loads(json.dumps(doc, default=str))  # type: ignore[no-any-return]
