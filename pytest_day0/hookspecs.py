"""Hooks pytest-day0 calls, for other plugins (and conftest.py files) to read or extend a release session.

Registered through ``pytest_addhooks``, the pytest-xdist ``newhooks.py`` way. Both run on the controller (or the
only process), once, after every gate test has reported and the verdict is decided.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from pytest_day0.gates.compare import TaskComparison
    from pytest_day0.gates.outcome import GateOutcome
    from pytest_day0.verdict import SessionVerdict


@pytest.hookspec()
def pytest_day0_verdict(session_verdict: SessionVerdict, comparisons: list[TaskComparison],
                        outcomes: list[GateOutcome], config: pytest.Config) -> dict[str, Any] | None:
    """Read the session's verdict before any report is written; return annotations to add to it.

    Every returned dict is merged into ``session_verdict.annotations`` (later plugins win on equal keys), which
    verdict.json, the JSON report and the terminal show. Example (conftest.py)::

        def pytest_day0_verdict(session_verdict, comparisons, outcomes, config):
            worst = min((c.delta for c in comparisons if c.delta is not None), default=None)
            return {"ticket": "REL-123", "worst_delta": worst}
    """


@pytest.hookspec()
def pytest_day0_report(session_verdict: SessionVerdict, comparisons: list[TaskComparison],
                       outcomes: list[GateOutcome], run_dir: Path, config: pytest.Config) -> Path | None:
    """Write a report of your own after the built-in ones; return its path to have it listed at the end.

    ``run_dir`` is this session's folder in the workspace (``runs/<session>/``). Example::

        def pytest_day0_report(session_verdict, comparisons, outcomes, run_dir, config):
            path = run_dir / "release-notes.md"
            path.write_text(f"# {session_verdict.recommendation}\\n")
            return path
    """
