"""The terminal summary: per-recipe task tables, then the verdicts, the recommendation last (where eyes land).

Pure: returns lists of lines; the plugin writes them with ``terminalreporter.write_line``. Scores are printed on
each task's own scale (0–1 with 3 decimals, 0–100 with 1), and "—" stands for a value a failed stage never made.
The table fits 100 columns: one decision per task (a hard breach first, then the quality outcome; the floor and
quality gates' own words are in the verdict lines and every other report), the test named once in the caption,
and a row too wide for that (long task names) wraps under itself instead of losing a digit.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

from pytest_day0.failures import FailureClass
from pytest_day0.gates.compare import Decision, TaskComparison, comparison_decision, format_scale, format_score
from pytest_day0.verdict import SessionVerdict, Verdict

MISSING = "—"
WIDTH = 100  # the table and its caption fit a 100-column terminal: too wide a row wraps, no cell is ever cut
COLUMNS = ("task", "scale", "base", "cand", "delta", "interval", "n", "flips", "decision")
_RIGHT = frozenset({"base", "cand", "baseline", "candidate", "delta", "interval", "n", "flips"})
_WRAP_INDENT = "      "  # a wrapped row's further lines, under its task name


def decision_cell(d: Decision) -> str:
    if d.skipped:
        return "skip"
    if d.passed:
        return "pass"
    if d.failure_class is FailureClass.INCONCLUSIVE:
        return "inconclusive"
    return "WARN" if d.tier == "warn" else "FAIL"


def interval_cell(c: TaskComparison) -> str:
    """``[-1.2, +0.3]``: the interval of delta on the task's scale; empty without one (point rule)."""
    if c.ci_low is None or c.ci_high is None:
        return ""
    return f"[{format_score(c.ci_low, c.scale, signed=True)}, {format_score(c.ci_high, c.scale, signed=True)}]"


def test_cell(c: TaskComparison) -> str:
    """The test in a few characters; the full name is in verdict.json and the JUnit properties."""
    if c.delta is None:
        return ""
    if c.stat == "point":
        return "point"
    return "betting" if "betting" in c.test else c.test


def flips_cell(c: TaskComparison) -> str:
    """``3↓ 1↑``: items the candidate lost and gained (right -> wrong, wrong -> right)."""
    if c.flips is None or c.delta is None:
        return ""
    return f"{len(c.flips.lost)}↓ {len(c.flips.gained)}↑"


def decision_word(c: TaskComparison) -> str:
    """PASS / INCONCLUSIVE / REGRESSION / a hard breach's class; a skipped row shows its cause, else SKIPPED."""
    word = comparison_decision(c)
    return (row_class(c) or word) if word == "SKIPPED" else word


def row_class(c: TaskComparison) -> str:
    """The one class worth showing for a task: the hard breaches first, then the warn one, then a skip's cause."""
    for d in (c.floor, c.anomaly, c.quality):
        if not d.passed and not d.skipped and d.failure_class:
            return str(d.failure_class)
    for d in (c.floor, c.anomaly, c.quality):
        if d.skipped and d.failure_class:
            return str(d.failure_class)
    return ""


def comparison_cells(c: TaskComparison) -> dict[str, str]:
    """Every cell a report may show for one task (the terminal table shows ``COLUMNS`` of them)."""
    cells = {
        "task": c.task,
        "scale": format_scale(c.scale),
        "baseline": format_score(c.baseline, c.scale),
        "candidate": format_score(c.candidate, c.scale),
        "delta": format_score(c.delta, c.scale, signed=True),
        "interval": interval_cell(c),
        "n": str(c.n) if c.n is not None and c.delta is not None else "",
        "flips": flips_cell(c),
        "test": test_cell(c),
        "floor": decision_cell(c.floor),
        "quality": decision_cell(c.quality),
        "decision": decision_word(c),
        "class": row_class(c),
    }
    return {**cells, "base": cells["baseline"], "cand": cells["candidate"]}


def _bands(widths: Sequence[int], indent: int, width: int) -> list[tuple[int, int]]:
    """Split the columns into consecutive runs that each fit ``width``; every run after the first starts under
    the wrap indent. A single column wider than the line gets a line of its own (never cut)."""
    bands: list[tuple[int, int]] = []
    start, used = 0, indent
    for i, w in enumerate(widths):
        need = w if i == start else w + 2
        if i > start and used + need > width:
            bands.append((start, i))
            start, used = i, len(_WRAP_INDENT) + w
        else:
            used += need
    bands.append((start, len(widths)))
    return bands


def table_lines(rows: Sequence[dict[str, str]], columns: Sequence[str] = COLUMNS, indent: str = "  ",
                width: int = WIDTH) -> list[str]:
    """Aligned columns, numbers right-aligned; a table wider than ``width`` wraps each row onto more lines (the
    same split for every row and the header, so the columns still align)."""
    widths = {col: max([len(col), *(len(r.get(col, "")) for r in rows)]) for col in columns}
    bands = _bands([widths[c] for c in columns], len(indent), width)

    def lines(cells: dict[str, str]) -> list[str]:
        out = []
        for n, (lo, hi) in enumerate(bands):
            parts = [cells.get(col, "").rjust(widths[col]) if col in _RIGHT else cells.get(col, "").ljust(widths[col])
                     for col in columns[lo:hi]]
            out.append(((indent if n == 0 else _WRAP_INDENT) + "  ".join(parts)).rstrip())
        return out

    rule = {c: "-" * widths[c] for c in columns}
    return [*lines({c: c for c in columns}), *lines(rule), *(line for r in rows for line in lines(r))]


def _limits(comparisons: Sequence[TaskComparison], width: int = WIDTH) -> list[str]:
    c = comparisons[0]
    of = "the baseline's distance from the worst score" if c.relative else "the task's range"
    line = f"floor (hard): drop > {c.floor_fraction:.0%} of {of}; quality (warn): drop > {c.threshold:.0%}"
    paired = next((x for x in comparisons if x.stat == "paired" and x.confidence is not None), None)
    if paired is not None and paired.confidence is not None:
        line += (f"; interval: paired by sample id, two one-sided {paired.confidence:.0%} bounds "
                 f"(a {2 * paired.confidence - 1:.0%} interval) of the {test_cell(paired)} test")
    elif any(x.stat == "point" and x.delta is not None for x in comparisons):
        line += "; point estimates (--day0-stat point): no interval"
    if any(x.flips is not None and x.delta is not None for x in comparisons):
        line += "; flips: items lost↓ (right -> wrong) and gained↑"
    lines = textwrap.wrap(line, width=width, initial_indent="  ", subsequent_indent="  ", break_on_hyphens=False)
    family = next((x.family for x in comparisons if x.family), None)
    if family:
        lines += textwrap.wrap(f"session control: {family}", width=width, initial_indent="  ",
                               subsequent_indent="    ", break_on_hyphens=False)
    stops = [f"{x.task} {x.adaptive.evaluated}/{x.adaptive.task_size} ({x.adaptive.outcome.lower()}: "
             f"{x.adaptive.reason})" for x in comparisons if x.adaptive is not None]
    if stops:
        lines += textwrap.wrap("adaptive, items evaluated: " + "; ".join(stops), width=width, initial_indent="  ",
                               subsequent_indent="    ", break_on_hyphens=False)
    return lines


def recipe_lines(recipe: str, comparisons: Sequence[TaskComparison], verdict: Verdict | None = None) -> list[str]:
    """One recipe's block: heading, task table (or why there is none), limits caption."""
    size = f", {verdict.size_ratio:.2f}× size" if verdict and verdict.size_ratio is not None else ""
    lines = [f"{recipe}{size}"]
    mine = [c for c in comparisons if c.recipe in (recipe, None)]
    if not mine:
        lines.append(f"  {MISSING} no task was compared (the reasons say why)")
        return lines
    lines += table_lines([comparison_cells(c) for c in mine])
    lines += _limits(mine)
    return lines


def verdict_lines(verdict: Verdict) -> list[str]:
    lines = [f"VERDICT {verdict.recipe}: {verdict.decision} — {verdict.recommendation}"]
    lines += [f"    {r}" for r in verdict.reasons]
    return lines


def session_lines(session: SessionVerdict, comparisons: Sequence[TaskComparison]) -> list[str]:
    """Tables for every recipe, then every verdict, then the recommendation as the very last line."""
    lines: list[str] = []
    recipes = [v.recipe for v in session.verdicts]
    for v in session.verdicts:
        lines += recipe_lines(v.recipe, comparisons, v)
        lines.append("")
    orphans = sorted({c.recipe for c in comparisons if c.recipe and c.recipe not in recipes})
    for r in orphans:  # compared but never decided: still show the numbers
        lines += recipe_lines(r, comparisons)
        lines.append("")
    for v in session.verdicts:
        lines += verdict_lines(v)
    lines.append(f"RECOMMENDATION: {session.recommendation}")
    return lines
