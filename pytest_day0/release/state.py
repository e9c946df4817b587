"""What a release session keeps between pytest's phases: stash keys and the typed session state.

Its own module so that the plugin and the suite both import it and neither imports the other's internals (the
plugin imports the suite; the suite never imports the plugin). Everything lives in ``config.stash`` or an item's
``stash``, never in module globals: pytester runs several sessions in one process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from pytest_day0.failures import Tier

if TYPE_CHECKING:  # light at import: the plugin loads this module in every pytest session of the environment
    from pytest_day0.config import RunConfig
    from pytest_day0.gates.compare import TaskComparison
    from pytest_day0.gates.outcome import GateOutcome
    from pytest_day0.release.chain import ReleaseChain
    from pytest_day0.verdict import SessionVerdict


@dataclass(frozen=True)
class GateIdentity:
    """Which gate an item is, known at collection (so even a skip in setup says which gate it was)."""

    gate: str
    tier: Tier
    recipe: str | None = None
    task: str | None = None
    side: str | None = None

    def outcome_recipe(self) -> str | None:
        """The recipe an outcome counts for: a candidate side's name is its recipe."""
        return self.recipe or (self.side if self.side and self.side != "baseline" else None)


@dataclass
class SessionState:
    """One per pytest session and process; the controller's copy accumulates the outcomes and the verdict."""

    config: RunConfig
    session_id: str
    task_names: list[str]
    owner_pid: int  # the process that lives as long as the session (xdist: the controller)
    controller: bool
    chain: ReleaseChain | None = None
    outcomes: list[GateOutcome] = field(default_factory=list)
    comparisons: list[TaskComparison] = field(default_factory=list)
    session_verdict: SessionVerdict | None = None
    plot_path: Path | None = None
    stopped_servers: list[str] = field(default_factory=list)
    extra_reports: list[Path] = field(default_factory=list)  # paths other plugins' pytest_day0_report wrote
    report_path: Path | None = None  # report.html in the workspace
    tracker_lines: list[str] = field(default_factory=list)  # MLflow: the run ids, or the one warning line


CONFIG_KEY = pytest.StashKey["RunConfig"]()
STATE_KEY = pytest.StashKey[SessionState]()
IDENTITY_KEY = pytest.StashKey[GateIdentity]()  # per item
OUTCOME_KEY = pytest.StashKey["GateOutcome"]()  # per item: what the test itself built with the typed builders
COMPARISON_KEY = pytest.StashKey["TaskComparison"]()  # per item: the comparison a floor/quality/anomaly gate read
