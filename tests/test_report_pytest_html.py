"""pytest-html: with it, each day0 test shows its numbers (a comparison also its plot) and the summary shows the
verdict; without it nothing changes and nothing of it is imported (it is a test tool here, not a requirement).

Sessions are lm-eval folder pairs (tests/test_lm_eval_source.py's fixtures): a REGRESSION in seconds. pytest-html
4 keeps each test's results, extras included, as JSON in the page's ``data-jsonblob`` attribute; that is what
these tests read back.
"""

from __future__ import annotations

import base64
import html
import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from test_lm_eval_source import sides

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]


def _session(pytester: pytest.Pytester, tmp_path: Path, *extra: str) -> Any:
    base, cand = sides(tmp_path, gsm_lost=25)
    return pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--day0-model=org/Model-8B", "--recipe", "fp8",
        f"--day0-lm-eval-baseline={base}", f"--day0-lm-eval-candidate={cand}",
        f"--day0-workdir={pytester.path / 'ws'}", *extra)


def _blob(page: str) -> dict[str, Any]:
    found = re.search(r'data-jsonblob="([^"]*)"', page)
    assert found is not None, "no data-jsonblob in pytest-html's page"
    data: dict[str, Any] = json.loads(html.unescape(found.group(1)))
    return data


def _extras(blob: dict[str, Any], nodeid: str) -> list[dict[str, Any]]:
    results = blob["tests"][nodeid]
    return [e for r in results for e in r.get("extras", [])]


@pytest.mark.parametrize("workers", [(), ("-n", "2")], ids=["one-process", "xdist"])
def test_day0_tests_carry_their_numbers_and_plot_into_pytest_html(pytester: pytest.Pytester, tmp_path: Path,
                                                                  workers: tuple[str, ...]) -> None:
    page_path = pytester.path / "pytest-report.html"
    result = _session(pytester, tmp_path, f"--html={page_path}", "--self-contained-html", *workers)
    assert result.ret == 0, result.stdout.str()[-3000:]
    page = page_path.read_text(encoding="utf-8")
    blob = _blob(page)
    quality = _extras(blob, "day0::test_quality[fp8-gsm8k]")
    tables = [e["content"] for e in quality if e["format_type"] == "html"]
    assert len(tables) == 1 and "<th>decision</th><td>REGRESSION</td>" in tables[0]
    assert "<th>flips_lost</th><td>25</td>" in tables[0] and "<th>n</th><td>300</td>" in tables[0]
    plots = [e for e in quality if e["format_type"] == "image"]
    assert len(plots) == 1 and plots[0]["content"].startswith("data:image/svg+xml;base64,")
    svg = base64.b64decode(plots[0]["content"].split(",", 1)[1]).decode()
    assert "<svg" in svg and "fp8 / gsm8k" in svg and "REGRESSION" in svg
    run_gate = _extras(blob, "day0::test_eval_complete[fp8-arc_easy]")
    assert [e["format_type"] for e in run_gate] == ["html"]  # numbers, no plot: not a comparison
    assert "<th>gate</th><td>run</td>" in run_gate[0]["content"]
    # the summary: the verdict per recipe, the plot and where report.html is
    report = pytester.path / "ws" / "report.html"
    assert "pytest-day0: publish none: do not publish fp8: quality regressed on gsm8k" in page
    assert "fp8: <b>REGRESSION</b>" in page and f'href="{report.as_uri()}"' in page


def test_without_pytest_html_nothing_of_it_is_loaded(pytester: pytest.Pytester, tmp_path: Path) -> None:
    pytester.makeconftest('''
import sys

def pytest_unconfigure(config):
    with open("loaded.txt", "w") as fh:
        fh.write(",".join(sorted(m for m in sys.modules if m.startswith("pytest_html"))))
''')
    result = _session(pytester, tmp_path, "-p", "no:html", "-p", "no:html_fixtures")  # its two entry points
    assert result.ret == 0, result.stdout.str()[-3000:]
    assert (pytester.path / "loaded.txt").read_text() == ""
    assert (pytester.path / "ws" / "report.html").is_file()  # our own report does not need it
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("pytest-html") for d in project["dependencies"])
    assert any(d.startswith("pytest-html") for d in project["optional-dependencies"]["dev"])
