"""report.html: one self-contained page per session, the answer to "which items, and what did each side answer?".

The verdict and recommendation, per recipe the task table and the plot, the gates with their classes and messages,
the run's configuration (secrets masked) and a flip viewer: per task the items that flipped, right -> wrong first,
with the prompt, the target, both responses and the per-choice log-likelihoods, filterable by task and direction.

Self-contained: no request at view time. Styles and script are inline, the plot is a ``data:`` image, and the
flipped items are one gzip'd JSON document in base64 that the page's script inflates with the browser's own
``DecompressionStream`` (a few-shot preamble repeated in 100,000 prompts costs its bytes once) and shows a page of
at a time, so 100k items load without freezing. A Content-Security-Policy in the page forbids every load but
``data:`` images, so a later change that reaches for a CDN fails visibly instead of working online only.

Rendered with Jinja2 (autoescaped) from ``templates/``; every model output reaches the DOM through
``textContent`` in the script, never as markup.
"""

from __future__ import annotations

import base64
import gzip
import json
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic_core import to_json

from pytest_day0.gates.compare import TaskComparison, comparison_decision, format_score
from pytest_day0.gates.flip_items import FlipDetail
from pytest_day0.gates.outcome import GateOutcome
from pytest_day0.report.plot import delta_svg
from pytest_day0.report.terminal import comparison_cells
from pytest_day0.verdict import SessionVerdict
from pytest_day0.workspace import atomic_write_text

DECISION_ORDER = ("ACCEPT", "INCONCLUSIVE", "REGRESSION", "ANOMALOUS", "INFEASIBLE")
GZIP_LEVEL = 3  # 100k items (134 MB of JSON): level 6 took 4x as long for 9% fewer bytes


def head_decision(session: SessionVerdict) -> str:
    """The word the banner shows: ACCEPT when a recipe is recommended, else the worst recipe's decision."""
    if session.recommended:
        return "ACCEPT"
    return max((v.decision for v in session.verdicts), key=DECISION_ORDER.index, default="ANOMALOUS")


def plot_data_uri(comparisons: Sequence[TaskComparison], *, failed_recipes: Mapping[str, str] | None = None,
                  cache_dir: Path | None = None) -> str:
    """delta.svg as an ``<img>`` source: isolated from the page's markup whatever the plotting code emits."""
    svg = delta_svg(comparisons, failed_recipes=failed_recipes, cache_dir=cache_dir)
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode("utf-8")).decode("ascii")


def _flips_text(c: TaskComparison) -> str:
    if c.flips is None or c.delta is None:
        return ""
    return f"{len(c.flips.lost)}↓ {len(c.flips.gained)}↑ ({c.flips.rate:.1%} of {c.flips.n})"


def task_rows(comparisons: Sequence[TaskComparison]) -> list[dict[str, str]]:
    rows = []
    for c in comparisons:
        cells = comparison_cells(c)
        cells["flips"] = _flips_text(c)
        cells["test"] = (cells["test"] + (f", p={c.p_value:.3g}" if c.p_value is not None else "")) \
            if c.delta is not None else ""
        cells["test_full"] = c.test if c.delta is not None else ""
        cells["decision_word"] = comparison_decision(c)
        cells["limits"] = (f"{format_score(c.floor_points, c.scale)} / {format_score(c.threshold_points, c.scale)}"
                           if c.floor_points is not None and c.threshold_points is not None else "")
        rows.append(cells)
    return rows


def recipe_sections(session: SessionVerdict, comparisons: Sequence[TaskComparison], *,
                    plot_cache: Path | None = None) -> list[dict[str, Any]]:
    """One section per decided recipe, then any recipe compared but never decided (its numbers still show)."""
    decided = {v.recipe for v in session.verdicts}
    orphans = sorted({c.recipe for c in comparisons if c.recipe and c.recipe not in decided})
    sections = []
    for recipe, verdict in [*((v.recipe, v) for v in session.verdicts), *((r, None) for r in orphans)]:
        mine = [c for c in comparisons if c.recipe in (recipe, None)]
        sections.append({"recipe": recipe, "verdict": verdict, "rows": task_rows(mine),
                         "plot": plot_data_uri(mine, cache_dir=plot_cache) if mine else None})
    return sections


def config_rows(public_config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Every setting as text (RunConfig.public_dict has masked the secrets already)."""
    def text(value: Any) -> str:
        if value is None:
            return "—"
        return value if isinstance(value, str) else json.dumps(value)

    return [(k, text(v)) for k, v in public_config.items()]


def _number(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def flip_payload(details: Sequence[FlipDetail]) -> dict[str, Any]:
    """The viewer's document: groups (one per recipe and task) and every item with its group's index.

    Short keys: the document is parsed whole by the page; each item is
    ``{g, d, id, p (prompt), t (target), ch (choices), b / c: {r (response), lp (log-likelihoods), k (correct),
    e (error)}}``.
    """
    groups: list[dict[str, Any]] = []
    items: list[dict[str, Any]] = []
    for g, detail in enumerate(details):
        groups.append({"recipe": detail.recipe, "task": detail.task, "n": detail.n, "tolerance": detail.tolerance,
                       "lost": detail.lost, "gained": detail.gained})
        for item in detail.items:
            items.append({
                "g": g, "d": item.direction, "id": item.id, "p": item.prompt, "t": item.target, "ch": item.choices,
                "b": {"r": item.baseline.response, "lp": item.baseline.choice_logprobs,
                      "k": _number(item.baseline.correct), "e": item.baseline.error},
                "c": {"r": item.candidate.response, "lp": item.candidate.choice_logprobs,
                      "k": _number(item.candidate.correct), "e": item.candidate.error},
            })
    return {"groups": groups, "items": items}


def encode_payload(payload: Mapping[str, Any]) -> str:
    """JSON (pydantic's serializer: 6x faster than json.dumps on 100k items) -> gzip -> base64 (ASCII only:
    nothing in it can close the ``<script>`` element that holds it)."""
    raw = to_json(payload)
    return base64.b64encode(gzip.compress(raw, compresslevel=GZIP_LEVEL, mtime=0)).decode("ascii")


def _template() -> Any:
    from jinja2 import Environment, StrictUndefined
    from markupsafe import Markup

    folder = resources.files("pytest_day0.report") / "templates"
    env = Environment(autoescape=True, undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                      keep_trailing_newline=True)
    # our own stylesheet and script, inlined as they are (autoescaping would turn ``a > b`` into ``a &gt; b``)
    env.globals["inline"] = lambda name: Markup((folder / name).read_text(encoding="utf-8"))
    return env.from_string((folder / "report.html.j2").read_text(encoding="utf-8"))


def render_report(
    session: SessionVerdict,
    comparisons: Sequence[TaskComparison],
    outcomes: Sequence[GateOutcome],
    details: Sequence[FlipDetail],
    *,
    public_config: Mapping[str, Any],
    session_id: str,
    model: str | None = None,
    links: Mapping[str, str] | None = None,
    generated: datetime | None = None,
    plot_cache: Path | None = None,
) -> str:
    """The page as text; ``links`` are extra lines for the header (name -> text, e.g. MLflow run ids)."""
    from pytest_day0 import __version__

    payload = flip_payload(details)
    detailed = {(d.recipe, d.task) for d in details}
    return str(_template().render(
        title=f"pytest-day0: {model or 'release'}",
        model=model,
        session_id=session_id,
        version=__version__,
        generated=(generated or datetime.now(UTC)).strftime("%Y-%m-%d %H:%M:%S UTC"),
        head=head_decision(session),
        session=session,
        verdicts=list(session.verdicts),
        sections=recipe_sections(session, comparisons, plot_cache=plot_cache),
        outcomes=list(outcomes),
        config=config_rows(public_config),
        links=dict(links or {}),
        groups=payload["groups"],
        flip_total=len(payload["items"]),
        undetailed=[c for c in comparisons if c.flips is not None and c.recipe is not None
                    and (c.recipe, c.task) not in detailed],
        flip_data=encode_payload(payload),
    ))


def write_report(path: Path, html: str) -> Path:
    atomic_write_text(path, html)
    return path
