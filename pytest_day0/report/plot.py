"""delta.svg: per task, the quality change with its interval against the threshold and floor lines.

Pure string building, no plotting library. The x axis is the change in quality as a percentage of what the
limits are fractions of (the task's range, or with ``--day0-relative`` the baseline's distance from the worst
score), so tasks on 0–1, 0–100 and −100..100 share one axis and one pair of limit lines; left is worse. A dot
is the estimate, a bar its interval; colour is the decision. A row without an interval (``--day0-stat point``)
is a dot alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from pathlib import Path

from pytest_day0.gates.compare import TaskComparison, comparison_decision, format_score
from pytest_day0.workspace import atomic_write_text

COLOURS = {
    "PASS": "#1a7f37",
    "INCONCLUSIVE": "#bf8700",
    "REGRESSION": "#cf222e",
    "CATASTROPHIC_REGRESSION": "#82071e",
    "ANOMALOUS": "#8250df",
}
GREY = "#8c959f"
ROW = 30
LEFT = 190
PLOT_W = 420
RIGHT = 300
TOP = 58
BOTTOM = 60


def _change(c: TaskComparison) -> tuple[float, float, float] | None:
    """(estimate, low, high) of the quality change in percent; None when the task was not compared."""
    if c.drop_fraction is None:
        return None
    point = -100 * c.drop_fraction
    if c.drop_fraction_low is None or c.drop_fraction_high is None:
        return point, point, point
    return point, -100 * c.drop_fraction_high, -100 * c.drop_fraction_low


def _label(c: TaskComparison) -> str:
    if c.delta is None:
        return "not compared"
    text = f"Δ {format_score(c.delta, c.scale, signed=True)}"
    if c.ci_low is not None and c.ci_high is not None:
        text += f" [{format_score(c.ci_low, c.scale, signed=True)}, {format_score(c.ci_high, c.scale, signed=True)}]"
    if c.n is not None:
        text += f" n={c.n}"
    return f"{text} {comparison_decision(c)}"


def delta_svg(comparisons: Sequence[TaskComparison], title: str = "pytest-day0: quality change per task") -> str:
    rows = list(comparisons)
    height = TOP + max(len(rows), 1) * ROW + BOTTOM
    width = LEFT + PLOT_W + RIGHT
    changes = [ch for ch in (_change(c) for c in rows) if ch is not None]
    floor = max((c.floor_fraction for c in rows), default=0.10) * 100
    threshold = max((c.threshold for c in rows), default=0.01) * 100
    lo = min([-floor * 1.25, *(ch[1] for ch in changes)])
    hi = max([floor * 0.5, *(ch[2] for ch in changes)])
    lo, hi = max(lo, -100.0), min(hi, 100.0)
    span = hi - lo or 1.0

    def x(v: float) -> float:
        return LEFT + (min(max(v, lo), hi) - lo) / span * PLOT_W

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{LEFT}" y="20" font-size="14" font-weight="bold">{escape(title)}</text>',
        f'<text x="{LEFT}" y="38" fill="#57606a">quality change, % of the range (left is worse); '
        "bar = interval, dot = estimate</text>",
    ]
    plot_top, plot_bottom = TOP - 6, TOP + len(rows) * ROW
    # labels on their own lines under the plot (zero, threshold, floor), so close lines never overprint
    for row, (value, name, dash, colour) in enumerate(((0.0, "0", "", "#57606a"),
                                                       (-threshold, f"threshold −{threshold:g}%", "4,3", "#bf8700"),
                                                       (-floor, f"floor −{floor:g}%", "8,3", "#cf222e"))):
        if lo <= value <= hi:
            out.append(f'<line x1="{x(value):.1f}" y1="{plot_top}" x2="{x(value):.1f}" y2="{plot_bottom}" '
                       f'stroke="{colour}" stroke-width="1"' + (f' stroke-dasharray="{dash}"' if dash else "") + "/>")
            out.append(f'<text x="{x(value) - 3:.1f}" y="{plot_bottom + 13 + 12 * row}" fill="{colour}" '
                       f'text-anchor="end" font-size="11">{escape(name)}</text>')
    for tick in (lo, hi):
        out.append(f'<text x="{x(tick):.1f}" y="{plot_bottom + 50}" fill="#57606a" text-anchor="middle" '
                   f'font-size="10">{tick:+.1f}%</text>')
    for i, c in enumerate(rows):
        y = TOP + i * ROW + ROW / 2
        name = f"{c.recipe} / {c.task}" if c.recipe else c.task
        out.append(f'<text x="{LEFT - 8}" y="{y + 4:.1f}" text-anchor="end">{escape(name)}</text>')
        ch = _change(c)
        decision = comparison_decision(c)
        colour = COLOURS.get(decision, GREY)
        if ch is not None:
            point, low, high = ch
            out.append(f'<line x1="{x(low):.1f}" y1="{y:.1f}" x2="{x(high):.1f}" y2="{y:.1f}" stroke="{colour}" '
                       'stroke-width="3" stroke-linecap="round"/>')
            out.append(f'<circle cx="{x(point):.1f}" cy="{y:.1f}" r="4.5" fill="{colour}"/>')
        out.append(f'<text x="{LEFT + PLOT_W + 10}" y="{y + 4:.1f}" fill="{colour}">{escape(_label(c))}</text>')
    if not rows:
        out.append(f'<text x="{LEFT}" y="{TOP + 18}" fill="{GREY}">no task was compared</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def write_delta_svg(path: Path, comparisons: Sequence[TaskComparison]) -> Path:
    atomic_write_text(path, delta_svg(comparisons))
    return path
