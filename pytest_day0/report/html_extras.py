"""pytest-html: each day0 test shows its numbers (and a comparison its plot) in pytest-html's report, and the
report's summary shows the verdict, the plot and where report.html is.

Optional: pytest-html is never imported unless the session writes its report (``--html``); its ``extras`` are
plain dicts (``pytest_html.extras``), built here so the plugin only attaches them. Everything that comes from a
run (messages, task names) is escaped: pytest-html inserts an HTML extra as markup.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import Any

from pytest_day0.gates.compare import TaskComparison
from pytest_day0.gates.outcome import GateOutcome
from pytest_day0.report.plot import delta_svg
from pytest_day0.verdict import SessionVerdict

LONG = 300  # a property longer than this (the flipped ids) is cut in the table: verdict.json has it whole


def numbers_html(outcome: GateOutcome) -> str:
    rows = [("gate", outcome.gate), ("status", outcome.status), ("tier", str(outcome.tier)),
            ("failure class", str(outcome.failure_class or "")), ("message", outcome.message)]
    rows += [(k, "" if v is None else str(v)) for k, v in outcome.numbers.items()]
    cells = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v if len(v) <= LONG else v[:LONG] + '…')}</td></tr>"
                    for k, v in rows)
    return f'<table class="day0-numbers">{cells}</table>'


def svg_base64(comparisons: Sequence[TaskComparison]) -> str:
    return base64.b64encode(delta_svg(comparisons).encode("utf-8")).decode("ascii")


def gate_extras(outcome: GateOutcome, comparison: TaskComparison | None) -> list[dict[str, Any]]:
    """The extras of one gate test: its numbers, and for a comparison gate the task's plot."""
    from pytest_html import extras

    out = [extras.html(numbers_html(outcome))]
    if comparison is not None:
        out.append(extras.svg(svg_base64([comparison]), name=f"delta {comparison.recipe} / {comparison.task}"))
    return out


def summary_html(session: SessionVerdict, comparisons: Sequence[TaskComparison], report: Path | None) -> str:
    """The verdict, one line per recipe, the plot, and the path of report.html."""
    lines = [f"<p><b>pytest-day0: {escape(session.recommendation)}</b></p>", "<ul>"]
    lines += [f"<li>{escape(v.recipe)}: <b>{escape(v.decision)}</b> — {escape(v.recommendation)}</li>"
              for v in session.verdicts]
    lines.append("</ul>")
    if comparisons:
        lines.append(f'<img alt="quality change per task" src="data:image/svg+xml;base64,{svg_base64(comparisons)}">')
    if report is not None:
        lines.append(f'<p>Tasks, gates and every flipped item with both answers: <a href="{escape(report.as_uri())}">'
                     f"{escape(str(report))}</a></p>")
    return "\n".join(lines)
