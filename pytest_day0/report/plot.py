"""delta.svg / delta.png: per task, the quality change with its interval against the threshold and floor lines.

Drawn with matplotlib (imported only when a plot is written: ~0.3–2 s, never paid by a session that writes no
report). The x axis is the change in quality as a percentage of what the limits are fractions of (the task's range,
or with ``--day0-relative`` the baseline's distance from the worst score), so tasks on 0–1, 0–100 and −100..100
share one axis and one pair of limit lines; left is worse. The axis is linear out to the floor and logarithmic
beyond it (symlog), so one −100% row does not squeeze every other interval into a few pixels. A dot is the
estimate, a bar its interval; colour is the decision. A row without an interval (``--day0-stat point``) is a dot
alone; a task or recipe that was not compared is a row with its reason and no dot. The figure grows with the rows
and is saved to the extent of its text, so no label is cut.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import io
import json
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pytest_day0.failures import Day0Error
from pytest_day0.gates.compare import TaskComparison, comparison_decision, format_score
from pytest_day0.workspace import atomic_write_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from pytest_day0.verdict import SessionVerdict

COLOURS = {
    "PASS": "#1a7f37",
    "INCONCLUSIVE": "#bf8700",
    "REGRESSION": "#cf222e",
    "CATASTROPHIC_REGRESSION": "#82071e",
    "ANOMALOUS": "#8250df",
}
GREY = "#8c959f"
TEXT = "#24292f"
MUTED = "#57606a"
ZERO_COLOUR, THRESHOLD_COLOUR, FLOOR_COLOUR = MUTED, "#bf8700", "#cf222e"
TITLE = "pytest-day0: quality change per task"
ROW_IN = 0.27  # inches per row: 9 pt labels with room between them
WIDTH_IN = 7.0  # the plotting area; labels left and right add to it
PNG_DPI = 110
CANDIDATE_TICKS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
MIN_TICK_GAP_IN = 0.45  # closer tick labels would overprint


@dataclass(frozen=True)
class Row:
    """One line of the plot: what is drawn (plain data, so tests read it without a figure)."""

    name: str
    label: str  # right-hand text: delta, interval, n, decision (or why there is nothing to draw)
    colour: str
    change: tuple[float, float, float] | None  # (estimate, low, high) in percent; None: no dot
    group: str  # the recipe: rows of one recipe share a band


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
        decision = comparison_decision(c)
        why = c.quality.message.removeprefix(f"{c.task}: ")
        return f"not compared: {why}" + ("" if decision == "SKIPPED" else f" {decision}")
    text = f"Δ {format_score(c.delta, c.scale, signed=True)}"
    if c.ci_low is not None and c.ci_high is not None:
        text += f" [{format_score(c.ci_low, c.scale, signed=True)}, {format_score(c.ci_high, c.scale, signed=True)}]"
    if c.n is not None:
        text += f" n={c.n}"
    return f"{text} {comparison_decision(c)}"


def recipes_not_compared(session: SessionVerdict, comparisons: Sequence[TaskComparison]) -> dict[str, str]:
    """Recipes with no comparison at all (PTQ, serving or evaluation failed upstream) -> their verdict and classes,
    so a plot lists them instead of leaving them out."""
    compared = {c.recipe for c in comparisons}
    out = {}
    for v in session.verdicts:
        if v.recipe not in compared:
            classes = ", ".join(dict.fromkeys(str(f) for f in v.failure_classes))
            out[v.recipe] = f"{v.decision}" + (f" ({classes})" if classes else "")
    return out


def plot_rows(comparisons: Sequence[TaskComparison], failed_recipes: Mapping[str, str] | None = None) -> list[Row]:
    rows = []
    for c in comparisons:
        decision = comparison_decision(c)
        name = f"{c.recipe} / {c.task}" if c.recipe else c.task
        rows.append(Row(name, _label(c), COLOURS.get(decision, GREY), _change(c), c.recipe or ""))
    for recipe, why in (failed_recipes or {}).items():
        rows.append(Row(f"{recipe} (every task)", f"not compared: {why}", GREY, None, recipe))
    return rows


def _limits(comparisons: Sequence[TaskComparison]) -> tuple[float, float]:
    """(threshold, floor) in percent, the strictest the session used."""
    floor = max((c.floor_fraction for c in comparisons), default=0.10) * 100
    threshold = max((c.threshold for c in comparisons), default=0.01) * 100
    return threshold, floor


def _ticks(lo: float, hi: float, threshold: float, floor: float, to_inches: Callable[[float], float]) -> list[float]:
    """Round values inside the axis, dropped where a label would overprint a kept one: zero, the two limits and
    the outermost round value on each side (a -100% row's tick) first, then the rest from the middle out."""
    rounds = [s * v for v in CANDIDATE_TICKS for s in (-1, 1) if lo <= s * v <= hi]
    ends = [min(rounds, default=0.0), max(rounds, default=0.0)]
    wanted = [0.0, -threshold, -floor, *ends, *rounds]
    kept: list[float] = []
    for v in wanted:
        if not lo <= v <= hi:
            continue
        x = to_inches(v)
        if all(abs(x - to_inches(k)) >= MIN_TICK_GAP_IN for k in kept):
            kept.append(v)
    return sorted(kept)


def _percent(v: float) -> str:
    return "0" if v == 0 else f"{v:+g}%".replace("-", "−")


def delta_figure(comparisons: Sequence[TaskComparison], title: str = TITLE, *,
                 failed_recipes: Mapping[str, str] | None = None) -> Figure:
    """The plot as a matplotlib Figure (no pyplot: no global state, safe off the main thread)."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullLocator

    rows = plot_rows(comparisons, failed_recipes)
    n = max(len(rows), 1)
    threshold, floor = _limits(comparisons)
    changes = [r.change for r in rows if r.change is not None]
    lo = min([-floor * 1.25, *(ch[1] for ch in changes)])
    hi = max([floor * 0.5, *(ch[2] for ch in changes)])

    fig = Figure(figsize=(WIDTH_IN + 8, 1.6 + ROW_IN * n), layout="constrained")  # width set below
    ax = fig.add_subplot()
    ax.set_xscale("symlog", linthresh=floor * 1.25, linscale=2.5)
    scale = ax.xaxis.get_transform()
    s_lo, s_hi = scale.transform([lo, hi])
    pad = 0.03 * (s_hi - s_lo)  # a dot at either end keeps its whole disc
    lo, hi = (float(v) for v in scale.inverted().transform([s_lo - pad, s_hi + pad]))
    ax.set_xlim(lo, hi)
    ax.set_ylim(n - 0.5, -0.5)  # first row on top
    ax.set_yticks(range(len(rows)), [r.name for r in rows], fontsize=9, color=TEXT)
    right = ax.secondary_yaxis("right")
    right.set_yticks(range(len(rows)), [r.label for r in rows], fontsize=9)
    for text, row in zip(right.get_yticklabels(), rows, strict=True):
        text.set_color(row.colour)
    right.tick_params(length=0)
    right.spines["right"].set_visible(False)
    ax.tick_params(axis="y", length=0)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    ax.set_xlabel("quality change, % of the range (left is worse; linear to the floor, logarithmic beyond)",
                  fontsize=9, color=MUTED)
    ax.set_title(f"{title}\nbar = interval, dot = estimate", loc="left", fontsize=10, color=TEXT)
    fig.legend(handles=[Line2D([], [], color=ZERO_COLOUR, linewidth=1, label="no change"),
                        Line2D([], [], color=THRESHOLD_COLOUR, linewidth=1, linestyle=(0, (4, 3)),
                               label=f"threshold {_percent(-threshold)}"),
                        Line2D([], [], color=FLOOR_COLOUR, linewidth=1, linestyle=(0, (8, 3)),
                               label=f"floor {_percent(-floor)}")],
               loc="outside lower center", ncol=3, fontsize=8, frameon=False)

    group, shade = None, False
    for i, row in enumerate(rows):  # alternate bands per recipe: 13 recipes x 3 tasks read as 13 blocks
        if row.group != group:
            group, shade = row.group, not shade
        if shade:
            ax.axhspan(i - 0.5, i + 0.5, color="#f6f8fa", zorder=0, linewidth=0)
    for value, colour, style in ((0.0, ZERO_COLOUR, "-"), (-threshold, THRESHOLD_COLOUR, (0, (4, 3))),
                                 (-floor, FLOOR_COLOUR, (0, (8, 3)))):
        ax.axvline(value, color=colour, linestyle=style, linewidth=1, zorder=1)
    for i, row in enumerate(rows):
        if row.change is None:
            continue
        point, low, high = row.change
        ax.plot([low, high], [i, i], color=row.colour, linewidth=3, solid_capstyle="round", zorder=2)
        ax.plot([point], [i], marker="o", markersize=6, color=row.colour, zorder=3)
    if not rows:
        ax.text(0.5, 0.5, "no task was compared", transform=ax.transAxes, ha="center", va="center", color=GREY)

    # constrained layout fits the labels inside the figure by narrowing the axis: widen the figure by what the
    # labels took, so the plotting area is WIDTH_IN whatever the names' lengths, then space the x ticks on it
    fig.draw_without_rendering()
    fig.set_size_inches(fig.get_figwidth() + WIDTH_IN - ax.get_window_extent().width / fig.dpi, fig.get_figheight())
    width_in = WIDTH_IN  # what the resize gives (a second layout pass to measure it cost a third of the plot)
    s_lo, s_hi = scale.transform([lo, hi])

    def to_inches(v: float) -> float:
        return float((scale.transform([v])[0] - s_lo) / (s_hi - s_lo) * width_in)

    ticks = _ticks(lo, hi, threshold, floor, to_inches)
    ax.set_xticks(ticks, [_percent(t) for t in ticks], fontsize=8, color=MUTED)
    ax.xaxis.set_minor_locator(NullLocator())
    return fig


def _render(fig: Figure, fmt: str) -> bytes:
    from matplotlib import rc_context

    buf = io.BytesIO()
    # text stays text in the SVG (searchable, selectable, what the tests read); ids and metadata are fixed so
    # the same comparisons give the same bytes
    with rc_context({"svg.fonttype": "none", "svg.hashsalt": "pytest-day0"}):
        fig.savefig(buf, format=fmt, dpi=PNG_DPI, bbox_inches="tight", pad_inches=0.15, facecolor="white",
                    metadata={"Date": None} if fmt == "svg" else {"Software": None})
    return buf.getvalue()


PLOT_CACHE_KEEP = 64  # files in a workspace's plot cache: every plot of the last few sessions, a few MB at most


def delta_svg(comparisons: Sequence[TaskComparison], title: str = TITLE, *,
              failed_recipes: Mapping[str, str] | None = None, cache_dir: Path | None = None) -> str:
    """Memoized per process (the end of a session draws the same plot for delta.svg, report.html and each
    recipe's page) and, with ``cache_dir``, across sessions: a re-run of a finished session has the same
    comparisons, and matplotlib's import and drawing (1-2 s, bench/bench_session.py) were most of its time."""
    key = json.dumps([[c.model_dump(mode="json") for c in comparisons], title, dict(failed_recipes or {})],
                     sort_keys=True)
    if cache_dir is None:
        return _svg_of(key)
    path = cache_dir / f"{hashlib.sha256((_drawing_identity() + key).encode()).hexdigest()[:32]}.svg"
    try:
        cached = path.read_text(encoding="utf-8")
        if cached.rstrip().endswith("</svg>"):
            return cached
    except OSError:
        pass
    svg = _svg_of(key)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, svg)
        _prune(cache_dir, PLOT_CACHE_KEEP)
    except (OSError, Day0Error):  # a cache that cannot be written costs a redraw next time, nothing else
        pass
    return svg


@functools.cache
def prewarm() -> None:
    """Import matplotlib and load its fonts in a daemon thread, once per process. The chain calls it when it
    starts a stage that waits on a child (PTQ, a server start), so the 1-2 s this costs (bench/bench_session.py)
    is spent while the process idles, not after the last stage, when the reports are all that is left."""
    threading.Thread(target=_warm_matplotlib, name="day0-plot-prewarm", daemon=True).start()


def _warm_matplotlib() -> None:
    try:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(1, 1))
        fig.add_subplot().set_title("warm", fontsize=9)
        _render(fig, "svg")
    except Exception:  # a plot drawn later reports its own error; this only saves time
        return


@functools.lru_cache(maxsize=1)
def _drawing_identity() -> str:
    """Everything besides the comparisons that decides a plot's bytes: this module's code and the installed
    matplotlib (its version read from metadata: importing it is what the cache saves)."""
    try:
        mpl = importlib.metadata.version("matplotlib")
    except importlib.metadata.PackageNotFoundError:
        mpl = "absent"
    return hashlib.sha256(Path(__file__).read_bytes() + mpl.encode()).hexdigest()


def _prune(cache_dir: Path, keep: int) -> None:
    files = sorted(cache_dir.glob("*.svg"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in files[keep:]:
        old.unlink(missing_ok=True)


@functools.lru_cache(maxsize=16)
def _svg_of(key: str) -> str:
    rows, title, failed = json.loads(key)
    comparisons = [TaskComparison.model_validate(row) for row in rows]
    return _render(delta_figure(comparisons, title, failed_recipes=failed), "svg").decode()


def delta_png(comparisons: Sequence[TaskComparison], title: str = TITLE, *,
              failed_recipes: Mapping[str, str] | None = None) -> bytes:
    return _render(delta_figure(comparisons, title, failed_recipes=failed_recipes), "png")


def write_delta_svg(path: Path, comparisons: Sequence[TaskComparison], *,
                    failed_recipes: Mapping[str, str] | None = None, cache_dir: Path | None = None) -> Path:
    atomic_write_text(path, delta_svg(comparisons, failed_recipes=failed_recipes, cache_dir=cache_dir))
    return path


def write_delta_png(path: Path, comparisons: Sequence[TaskComparison], *,
                    failed_recipes: Mapping[str, str] | None = None) -> Path:
    atomic_write_text(path, delta_png(comparisons, failed_recipes=failed_recipes))
    return path
