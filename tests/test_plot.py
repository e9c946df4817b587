"""delta.svg / delta.png (matplotlib): one row per task, the interval drawn against the threshold and floor lines,
every label whole, a -100% row that leaves the others readable, failed recipes listed."""

from __future__ import annotations

import itertools
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.transforms import Bbox

from pytest_day0.failures import FailureClass
from pytest_day0.gates.compare import TaskComparison, compare_task, missing_comparison
from pytest_day0.gates.stats import paired_stats
from pytest_day0.report.plot import (
    COLOURS,
    FLOOR_COLOUR,
    GREY,
    THRESHOLD_COLOUR,
    WIDTH_IN,
    ZERO_COLOUR,
    delta_figure,
    delta_png,
    delta_svg,
    plot_rows,
    recipes_not_compared,
    write_delta_png,
    write_delta_svg,
)
from pytest_day0.scoring.records import TaskResult
from pytest_day0.scoring.tasks import TaskSpec
from pytest_day0.verdict import ReleaseDecision, SessionVerdict, Verdict

NS = "{http://www.w3.org/2000/svg}"
ROOT = Path(__file__).resolve().parent.parent


def spec(name: str, scale: tuple[float, float] = (0, 100)) -> TaskSpec:
    return TaskSpec(name=name, kind="generate", metric="acc", scale=scale, samples="x.jsonl")


def comp(name: str, base: list[float], cand: list[float], *, paired: bool = True,
         scale: tuple[float, float] = (0, 100), recipe: str = "fp8") -> TaskComparison:
    s = spec(name, scale)

    def res(side: str, v: list[float]) -> TaskResult:
        r: dict[str, Any] = dict(task=name, side=side, status="SUCCESS", expected_samples=len(v),
                                 scored_samples=len(v), errored_samples=0, scale=s.scale, metric="acc",
                                 records_path="x")
        return TaskResult(score=s.to_scale(sum(v) / len(v)), **r)

    stats = paired_stats(list(zip(base, cand, strict=True))) if paired else None
    return compare_task(s, res("baseline", base), res("candidate", cand), recipe=recipe, paired=stats)


def drawn(fig: Figure) -> tuple[Axes, FigureCanvasAgg]:
    canvas = FigureCanvasAgg(fig)
    canvas.draw()  # type: ignore[no-untyped-call]
    return fig.axes[0], canvas


def x_pixels(ax: Axes, value: float) -> float:
    return float(ax.transData.transform((value, 0))[0])


def xs(line: Line2D) -> list[float]:
    return [float(v) for v in np.asarray(line.get_xdata(), dtype=float)]


def dots(ax: Axes) -> list[Line2D]:
    return [ln for ln in ax.lines if ln.get_marker() == "o"]


def bars(ax: Axes) -> list[Line2D]:
    return [ln for ln in ax.lines if ln.get_linewidth() == 3]


def limit_lines(ax: Axes) -> dict[str, float]:
    """The three vertical lines (axvline: data x, axes y 0..1) by colour, as their x in data units."""
    out = {}
    for ln in ax.lines:
        if ln.get_linewidth() == 1 and list(np.asarray(ln.get_ydata())) == [0, 1]:
            out[str(ln.get_color())] = xs(ln)[0]
    return out


def svg_texts(svg: str) -> list[str]:
    return [t.text or "" for t in ET.fromstring(svg).iter(f"{NS}text")]


def test_rows_colours_and_limit_lines() -> None:
    rows = [
        comp("ok", [1.0] * 400, [1.0] * 400),  # PASS at 0 (347 agreeing items is the least that can)
        comp("few", [1.0] * 20, [1.0] * 20),  # INCONCLUSIVE
        comp("worse", [1.0] * 1000, [0.0] * 80 + [1.0] * 920),  # REGRESSION, 8 points
        comp("tau", [1.0] * 400, [1.0] * 400, scale=(0, 1)),  # another scale, same axis
    ]
    labels = [r.label for r in plot_rows(rows)]
    assert [r.name for r in plot_rows(rows)] == ["fp8 / ok", "fp8 / few", "fp8 / worse", "fp8 / tau"]
    assert labels[0].endswith("PASS") and "n=400" in labels[0] and "[-0.9, +0.9]" in labels[0]
    assert labels[1].endswith("INCONCLUSIVE") and "n=20" in labels[1] and labels[2].endswith("REGRESSION")

    ax, _ = drawn(delta_figure(rows))
    assert [d.get_color() for d in dots(ax)] == [COLOURS["PASS"], COLOURS["INCONCLUSIVE"], COLOURS["REGRESSION"],
                                                 COLOURS["PASS"]]
    right = ax.child_axes[0] if ax.child_axes else None
    assert right is not None  # the right-hand labels, coloured by decision
    assert [t.get_color() for t in right.get_yticklabels()] == [d.get_color() for d in dots(ax)]
    lines = limit_lines(ax)
    zero_x, threshold_x, floor_x = (x_pixels(ax, lines[c]) for c in (ZERO_COLOUR, THRESHOLD_COLOUR, FLOOR_COLOUR))
    assert floor_x < threshold_x < zero_x  # left is worse
    dot_x = [x_pixels(ax, xs(d)[0]) for d in dots(ax)]
    assert dot_x[0] == zero_x == dot_x[3]
    assert floor_x < dot_x[2] < threshold_x  # an 8-point drop: past the threshold, short of the floor
    few = bars(ax)[1]
    low, high = (x_pixels(ax, v) for v in xs(few))
    assert low < threshold_x and high > zero_x  # straddles: inconclusive


def test_point_mode_and_missing_rows_and_escaping(tmp_path: Path) -> None:
    odd = comp("plain", [1.0] * 10, [1.0] * 10, paired=False).model_copy(update={"recipe": "a<b&c"})
    rows = [odd, missing_comparison(spec("gone"), "PTQ failed", recipe="fp8")]
    path = write_delta_svg(tmp_path / "d" / "delta.svg", rows)
    texts = svg_texts(path.read_text())
    assert "a<b&c / plain" in texts and "not compared: PTQ failed" in texts  # escaped in the file, intact parsed
    ax, _ = drawn(delta_figure(rows))
    assert len(dots(ax)) == 1  # the missing row has no dot
    (bar,) = bars(ax)
    assert xs(bar)[0] == xs(bar)[1]  # no interval: a bar of zero length


def test_no_comparisons_still_draws() -> None:
    assert "no task was compared" in svg_texts(delta_svg([]))


def test_a_minus_100_percent_row_leaves_the_others_readable() -> None:
    rows = [comp("gone", [1.0] * 300, [0.0] * 300),  # -100%
            comp("small", [1.0] * 1000, [0.0] * 20 + [1.0] * 980)]  # -2 points, interval about 1.5 points wide
    ax, _ = drawn(delta_figure(rows))
    gone, small = bars(ax)
    box = ax.get_window_extent()
    assert xs(gone)[0] == -100.0
    assert box.x0 < x_pixels(ax, -100.0) < box.x0 + 0.1 * box.width  # on the axis, at its left end
    low_v, high_v = xs(small)
    lo, hi = ax.get_xlim()
    share = (x_pixels(ax, high_v) - x_pixels(ax, low_v)) / box.width
    assert share >= 4 * (high_v - low_v) / (hi - lo)  # at least 4x the width a linear axis would leave it


def thirteen_by_three() -> tuple[list[TaskComparison], dict[str, str]]:
    rows = []
    for i in range(13):
        recipe = f"recipe-{i:02d}" + ("-with-a-long-name-from-a-config-file" if i % 4 == 0 else "")
        for j, task in enumerate(("arc_like", "gsm_like", "kendall_tau")):
            lost = 300 if (i, j) == (5, 1) else (i * 3 + j) % 25
            rows.append(comp(task, [1.0] * 300, [0.0] * lost + [1.0] * (300 - lost), recipe=recipe,
                             scale=(-1, 1) if task == "kendall_tau" else (0, 100)))
    return rows, {"nvfp4_awq_lite": "INFEASIBLE (USER_CONFIG_ERROR)", "int4_awq": "INFEASIBLE (MODEL_UNSUPPORTED)"}


def test_thirteen_recipes_keep_every_label_whole_and_list_the_failed_ones(tmp_path: Path) -> None:
    rows, failed = thirteen_by_three()
    fig = delta_figure(rows, failed_recipes=failed)
    ax, canvas = drawn(fig)
    renderer = canvas.get_renderer()  # type: ignore[no-untyped-call]
    saved = fig.get_tightbbox(renderer)  # what savefig(bbox_inches="tight") keeps, in inches
    assert saved is not None
    left, right = ax.get_yticklabels(), ax.child_axes[0].get_yticklabels()
    assert len(left) == len(right) == 39 + 2
    texts = [*left, *right, *ax.get_xticklabels(), ax.xaxis.label, ax.title]
    for text in texts:
        box = Bbox(text.get_window_extent(renderer).get_points() / fig.dpi)
        assert saved.x0 <= box.x0 + 1e-6 and box.x1 <= saved.x1 + 1e-6, text.get_text()  # nothing cut
    for column in (left, right):  # rows never overprint each other
        extents = [t.get_window_extent(renderer) for t in column]
        assert all(a.y0 >= b.y1 or b.y0 >= a.y1 for a, b in itertools.pairwise(extents))
    ticks = [t.get_window_extent(renderer) for t in ax.get_xticklabels()]
    assert all(a.x1 < b.x0 for a, b in itertools.pairwise(ticks))  # tick labels apart
    assert abs(ax.get_window_extent().width / fig.dpi - WIDTH_IN) < 0.05  # long names widen the figure, not
    names = [t.get_text() for t in left]  # squeeze the plot
    assert "recipe-00-with-a-long-name-from-a-config-file / kendall_tau" in names
    assert names[-2:] == ["nvfp4_awq_lite (every task)", "int4_awq (every task)"]
    assert right[-1].get_text() == "not compared: INFEASIBLE (MODEL_UNSUPPORTED)" and right[-1].get_color() == GREY
    svg = delta_svg(rows, failed_recipes=failed)
    assert {t.get_text() for t in texts} - {""} <= set(svg_texts(svg))  # the same strings, whole, in the file


def test_recipes_without_any_comparison_come_from_the_verdict() -> None:
    rows, _ = thirteen_by_three()

    def verdict(recipe: str, decision: ReleaseDecision, *classes: FailureClass) -> Verdict:
        return Verdict(recipe=recipe, decision=decision, failure_classes=list(classes), recommendation="-")

    session = SessionVerdict(verdicts=[verdict("recipe-01", "ACCEPT"),
                                       verdict("int4_awq", "INFEASIBLE", FailureClass.QUANT_COVERAGE_FAILURE,
                                               FailureClass.QUANT_COVERAGE_FAILURE),
                                       verdict("w4a8", "ANOMALOUS")],
                             recommended=None, recommendation="-", exit_status=1)
    assert recipes_not_compared(session, rows) == {"int4_awq": "INFEASIBLE (QUANT_COVERAGE_FAILURE)",
                                                   "w4a8": "ANOMALOUS"}


def test_png_and_svg_are_written_and_repeatable(tmp_path: Path) -> None:
    rows = [comp("ok", [1.0] * 400, [1.0] * 400)]
    png = write_delta_png(tmp_path / "delta.png", rows).read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert delta_png(rows) == png and delta_svg(rows) == delta_svg(rows)  # no dates or random ids in the files


def test_matplotlib_is_imported_only_when_a_plot_is_drawn() -> None:
    code = ("import sys, pytest_day0.plugin, pytest_day0.report.session_report, pytest_day0.report.plot; "
            "print('matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"


def test_the_workspace_cache_serves_a_plot_drawn_before_and_redraws_what_changed(tmp_path: Path) -> None:
    cache = tmp_path / "cache" / "plots"
    rows = [comp("ok", [1.0] * 400, [1.0] * 400)]
    first = delta_svg(rows, cache_dir=cache)
    assert first == delta_svg(rows)  # the same bytes as a plot drawn without the cache
    (cached,) = cache.glob("*.svg")
    cached.write_text(first.replace("</svg>", "<!-- served from the cache --></svg>"), encoding="utf-8")
    assert "served from the cache" in delta_svg(rows, cache_dir=cache)  # read back, not redrawn
    other = [comp("ok", [1.0] * 400, [0.0] * 8 + [1.0] * 392)]
    assert "served from the cache" not in delta_svg(other, cache_dir=cache)  # other comparisons: another file
    assert len(list(cache.glob("*.svg"))) == 2
    cached.write_text(first[: len(first) // 2], encoding="utf-8")  # a torn file is redrawn, never served
    assert delta_svg(rows, cache_dir=cache) == first


def test_a_rerun_of_a_finished_session_reads_its_plots_without_importing_matplotlib(tmp_path: Path) -> None:
    rows = [comp("ok", [1.0] * 400, [1.0] * 400)]
    cache = tmp_path / "plots"
    delta_svg(rows, cache_dir=cache)
    code = ("import sys, json; from pytest_day0.report.plot import delta_svg; "
            "from pytest_day0.gates.compare import TaskComparison; "
            f"rows = [TaskComparison.model_validate_json({rows[0].model_dump_json()!r})]; "
            f"svg = delta_svg(rows, cache_dir=__import__('pathlib').Path({str(cache)!r})); "
            "print(svg.rstrip().endswith('</svg>'), 'matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.split() == ["True", "False"]


def test_prewarm_loads_matplotlib_in_the_background_once() -> None:
    code = ("import sys, threading; from pytest_day0.report.plot import prewarm; prewarm(); prewarm(); "
            "warmers = [t for t in threading.enumerate() if t.name == 'day0-plot-prewarm']; "
            "[t.join(60) for t in warmers]; print(len(warmers), 'matplotlib.figure' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.split() == ["1", "True"]
