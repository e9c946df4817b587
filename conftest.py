"""Repository-level conftest: keep the project's own tests out of a release run started here.

``pytest --day0-model demo --recipe fp8`` in this checkout is the demo release, not the plugin's test
suite; ``pytest tests`` (no --day0-model) is the test suite.
"""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if config.getoption("day0_model", default=None) and collection_path.resolve() == HERE / "tests":
        return True
    return None
