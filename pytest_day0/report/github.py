"""GitHub Actions output: the step summary (Markdown) and workflow-command annotations.

Pure builders plus one append. GitHub's limits shape everything here: a step summary over 1 MiB makes the whole
upload fail (so the Markdown is cut, with a note, well before that), the file is shared by every writer in the
step (append, never truncate), and only 10 error + 10 warning annotations per step are shown (the rest are
dropped silently, so we cap and say so in a notice, which has its own quota).
"""

# no ``from __future__ import annotations``: it would bind the name ``annotations`` this module defines

import os
from collections.abc import Sequence
from pathlib import Path

from pytest_day0.gates.compare import TaskComparison, format_scale, format_score
from pytest_day0.gates.outcome import GateOutcome
from pytest_day0.report.terminal import comparison_cells, decision_cell, decision_word
from pytest_day0.verdict import SessionVerdict

SUMMARY_CAP_BYTES = 1024 * 1024 - 16 * 1024  # GitHub's 1 MiB, less room for whatever else this step appends
MAX_ERRORS = 10
MAX_WARNINGS = 10
_ICON = {"ACCEPT": "✅", "INCONCLUSIVE": "❔", "REGRESSION": "❌", "ANOMALOUS": "⚠️", "INFEASIBLE": "⛔"}


def escape_cell(text: object) -> str:
    """A value that cannot break its Markdown table row."""
    s = str(text).replace("\\", "\\\\").replace("|", "\\|")
    return " ".join(s.replace("\r\n", "\n").replace("\r", "\n").split("\n")).strip() or " "


def _row(cells: Sequence[object]) -> str:
    return "| " + " | ".join(escape_cell(c) for c in cells) + " |"


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    return [_row(header), "|" + "|".join("---" for _ in header) + "|", *(_row(r) for r in rows)]


def _task_rows(comparisons: Sequence[TaskComparison]) -> list[list[str]]:
    rows = []
    for c in comparisons:
        cells = comparison_cells(c)
        limits = (
            f"{format_score(c.floor_points, c.scale)} / {format_score(c.threshold_points, c.scale)}"
            if c.floor_points is not None and c.threshold_points is not None
            else "—"
        )
        rows.append(
            [
                c.task,
                format_scale(c.scale),
                cells["baseline"],
                cells["candidate"],
                cells["delta"],
                limits,
                decision_cell(c.floor),
                decision_cell(c.quality),
                decision_cell(c.anomaly),
                cells["interval"] or "—",
                cells["n"] or "—",
                (c.test + (f", p={c.p_value:.3g}" if c.p_value is not None else "")) if c.delta is not None else "—",
                decision_word(c) or "—",
            ]
        )
    return rows


def truncate_utf8(markdown: str, max_bytes: int) -> str:
    """Cut at a line boundary so the result (with its note) fits ``max_bytes`` of UTF-8."""
    data = markdown.encode("utf-8")
    if len(data) <= max_bytes:
        return markdown
    note = "\n\n> **Truncated**: {} more bytes did not fit GitHub's 1 MiB step-summary limit; see verdict.json.\n"
    room = max_bytes - len(note.format(len(data)).encode("utf-8"))
    if room <= 0:
        return ""  # not even the note fits: writing anything would break the upload
    head = data[:room].decode("utf-8", errors="ignore")
    if "\n" in head:
        head = head[: head.rindex("\n")]
    dropped = len(data) - len(head.encode("utf-8"))
    return head + note.format(dropped)


def step_summary_markdown(
    session: SessionVerdict,
    comparisons: Sequence[TaskComparison],
    outcomes: Sequence[GateOutcome],
    *,
    max_bytes: int = SUMMARY_CAP_BYTES,
    plot: str | None = None,
    report: str | None = None,
) -> str:
    """Verdict heading, one task table per recipe, then what failed and why; ``plot`` names delta.svg, ``report``
    report.html (the flipped items with both sides' answers)."""
    order = ["ACCEPT", "INCONCLUSIVE", "REGRESSION", "ANOMALOUS", "INFEASIBLE"]
    head = "ACCEPT" if session.recommended else max((v.decision for v in session.verdicts), key=order.index,
                                                     default="ANOMALOUS")
    lines = [f"## {_ICON.get(head, '')} pytest-day0: {escape_cell(session.recommendation)}", ""]
    lines += _table(
        ["recipe", "decision", "size", "regressed tasks", "recommendation"],
        [
            [
                v.recipe,
                f"{_ICON.get(v.decision, '')} {v.decision}",
                f"{v.size_ratio:.2f}×" if v.size_ratio is not None else "—",
                ", ".join(v.regressed_tasks) or "—",
                v.recommendation,
            ]
            for v in session.verdicts
        ],
    )
    header = ["task", "scale", "baseline", "candidate", "Δ", "floor / quality limit", "floor", "quality", "anomaly",
              "interval of Δ", "n", "test", "decision"]
    for v in session.verdicts:
        mine = [c for c in comparisons if c.recipe in (v.recipe, None)]
        lines += ["", f"### {escape_cell(v.recipe)} — {v.decision}", ""]
        lines += _table(header, _task_rows(mine)) if mine else ["_no task was compared (the reasons say why)_"]
    paired = next((c for c in comparisons if c.stat == "paired" and c.confidence is not None), None)
    if paired is not None and paired.confidence is not None:
        lines += ["", f"Intervals: paired by sample id, two one-sided {paired.confidence:.0%} bounds (a "
                  f"{2 * paired.confidence - 1:.0%} interval); PASS needs the whole interval within the quality "
                  "limit, REGRESSION wholly beyond it, else INCONCLUSIVE."]
    if plot:
        lines += ["", f"Plot of Δ with its interval per task: `{escape_cell(plot)}` (in the workspace artifact)."]
    if report:
        lines += ["", f"Report with the flipped items and both sides' answers: `{escape_cell(report)}` (one "
                  "self-contained page in the workspace artifact: open it in a browser, no network needed)."]
    bad = [o for o in outcomes if o.status in ("failed", "warned")]
    lines += ["", "### What failed and why", ""]
    if not bad:
        lines.append("Nothing: every gate passed.")
    for o in bad:
        where = " / ".join(p for p in (o.recipe, o.task, o.side) if p)
        tier = "hard" if o.status == "failed" else "warn"
        msg = " ".join(o.message.split())
        lines.append(f"- **[{o.failure_class or 'UNKNOWN'}]** `{o.gate}`{' ' + where if where else ''} ({tier}): {msg}")
    return truncate_utf8("\n".join(lines) + "\n", max_bytes)


def escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def annotation(level: str, title: str, message: str) -> str:
    return f"::{level} title={escape_property(title)}::{escape_data(message)}"


def annotation_lines(
    outcomes: Sequence[GateOutcome], *, max_errors: int = MAX_ERRORS, max_warnings: int = MAX_WARNINGS
) -> list[str]:
    """``::error`` for failed gates, ``::warning`` for warned ones; what does not fit is counted in a notice."""
    errors: list[str] = []
    warnings: list[str] = []
    for o in outcomes:
        if o.status not in ("failed", "warned"):
            continue
        where = "/".join(p for p in (o.recipe, o.task, o.side) if p)
        title = f"[{o.failure_class or 'UNKNOWN'}] {o.gate}" + (f" {where}" if where else "")
        message = f"[{o.failure_class or 'UNKNOWN'}] {o.message}"
        (errors if o.status == "failed" else warnings).append(annotation(
            "error" if o.status == "failed" else "warning", title, message
        ))
    lines = errors[:max_errors] + warnings[:max_warnings]
    more_e, more_w = len(errors) - max_errors, len(warnings) - max_warnings
    if more_e > 0 or more_w > 0:
        lines.append(annotation(
            "notice",
            "pytest-day0",
            f"{max(more_e, 0)} more errors and {max(more_w, 0)} more warnings not annotated "
            "(GitHub shows 10 of each per step); see the step summary",
        ))
    return lines


# The brief's name. Callers with ``from __future__ import annotations`` should use ``github.annotations(...)`` or
# ``annotation_lines``: importing this name would clash with the __future__ feature.
annotations = annotation_lines


def write_step_summary(path: str | os.PathLike[str], markdown: str, *, cap_bytes: int = SUMMARY_CAP_BYTES) -> None:
    """Append to ``$GITHUB_STEP_SUMMARY``, keeping the file (shared by the whole step) under the cap."""
    p = Path(path)
    used = p.stat().st_size if p.exists() else 0
    text = truncate_utf8(markdown, max(cap_bytes - used, 0))
    with p.open("a", encoding="utf-8") as fh:
        fh.write(text)
