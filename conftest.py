"""Repository-level conftest: keep the project's own tests out of a release run started here.

``pytest --day0-model demo --recipe fp8`` in this checkout is the demo release, not the plugin's test
suite; ``pytest tests`` (no --day0-model) is the test suite. pyproject's ``testpaths`` would otherwise feed
``tests/`` in as an argument, and pytest never asks ``pytest_ignore_collect`` about its arguments.
"""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
OWN_TESTS = HERE / "tests"


def pytest_configure(config: pytest.Config) -> None:
    if not config.getoption("day0_model", default=None):
        return
    if config.args and all(Path(a.split("::")[0]).resolve() == OWN_TESTS for a in config.args):
        config.args[:] = []  # no user tests here: only the plugin's own release suite runs


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if config.getoption("day0_model", default=None) and collection_path.resolve() == OWN_TESTS:
        return True
    return None
