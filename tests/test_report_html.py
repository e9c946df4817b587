"""report.html without a browser: what the flip details hold, what the page embeds, what it escapes and masks.

The page's behaviour in a browser (filters, paging, offline) is tests/test_report_browser.py; here the pure parts:
``flip_detail`` (records -> flipped items), ``flip_payload`` / ``encode_payload`` (what the viewer inflates) and
``render_report`` (the page's markup and its references).
"""

from __future__ import annotations

import base64
import gzip
import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from pytest_day0.config import RunConfig
from pytest_day0.gates.compare import compare_task, comparison_outcomes, flips_of
from pytest_day0.gates.flip_items import flip_detail
from pytest_day0.release.comparisons import load_flip_details, save_flip_detail
from pytest_day0.report.html_report import encode_payload, flip_payload, render_report
from pytest_day0.scoring.records import SampleRecord, TaskResult
from pytest_day0.scoring.tasks import Sample, TaskSpec
from pytest_day0.verdict import decide, decide_session

SPEC = TaskSpec(name="arc", kind="multiple_choice", metric="acc", scale=(0, 1), samples="a.jsonl")
EVIL = "</script><script>alert('x')</script>"


def _record(i: int, correct: float, response: str, side: str) -> SampleRecord:
    return SampleRecord(id=f"q{i}", task=SPEC.name, prompt_hash="h", prompt=f"Q{i}: which?", target=1,
                        response=response, choice_logprobs=[-2.0, -0.5 if correct else -3.0], correct=correct,
                        latency_s=0.1 if side == "baseline" else 0.2)


def _sides() -> tuple[list[SampleRecord], list[SampleRecord]]:
    # q0, q1 lost (right -> wrong), q2 gained, q3 unchanged; the candidate's q1 answer is markup
    base = [_record(0, 1, "B", "baseline"), _record(1, 1, "B", "baseline"), _record(2, 0, "A", "baseline"),
            _record(3, 1, "B", "baseline")]
    cand = [_record(0, 0, "A", "c"), _record(1, 0, EVIL, "c"), _record(2, 1, "B", "c"), _record(3, 1, "B", "c")]
    return base, cand


def _comparison(base: list[SampleRecord], cand: list[SampleRecord]) -> Any:
    from pytest_day0.gates.stats import item_pairs

    r: dict[str, Any] = dict(task=SPEC.name, status="SUCCESS", expected_samples=4, scored_samples=4,
                             errored_samples=0, scale=(0, 1), metric="acc", records_path="x")
    flips = flips_of(item_pairs(base, cand))
    return compare_task(SPEC, TaskResult(side="baseline", score=0.75, **r),
                        TaskResult(side="candidate", score=0.5, **r), recipe="fp8", flips=flips), flips


def _page(api_key: str | None = None, model: str = "demo") -> tuple[str, Any]:
    base, cand = _sides()
    comparison, flips = _comparison(base, cand)
    samples = [Sample(id=f"q{i}", prompt=f"Q{i}: which?", target=1, choices=("A", "B")) for i in range(4)]
    detail = flip_detail(flips, base, cand, recipe="fp8", task=SPEC.name, samples=samples,
                         records={"baseline": "/b.jsonl", "candidate": "/c.jsonl"})
    session = decide_session([decide("fp8", comparison_outcomes(comparison), 0.5)])
    config = RunConfig(model="demo", api_key=api_key) if api_key else RunConfig(model="demo")
    html = render_report(session, [comparison], comparison_outcomes(comparison), [detail],
                         public_config=config.public_dict(), session_id="s1", model=model)
    return html, detail


def _payload(html: str) -> dict[str, Any]:
    blob = re.search(r'<script type="application/octet-stream" id="flip-data">([^<]*)</script>', html)
    assert blob is not None
    data: dict[str, Any] = json.loads(gzip.decompress(base64.b64decode(blob.group(1))))
    return data


class _Refs(HTMLParser):
    """Every URL-valued attribute and every tag, to see what the page would load."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[tuple[str, str, str]] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href", "action", "poster", "data") and value is not None:
                self.refs.append((tag, name, value))


def test_flip_detail_lists_lost_first_with_both_answers_and_the_choices() -> None:
    _, detail = _page()
    assert [(i.id, i.direction) for i in detail.items] == [("q0", "lost"), ("q1", "lost"), ("q2", "gained")]
    assert (detail.lost, detail.gained, detail.n, detail.tolerance) == (2, 1, 4, 0.5)
    q1 = detail.items[1]
    assert (q1.prompt, q1.target, q1.choices) == ("Q1: which?", 1, ["A", "B"])
    assert (q1.baseline.response, q1.baseline.correct, q1.candidate.response, q1.candidate.correct) == ("B", 1, EVIL, 0)
    assert q1.baseline.choice_logprobs == [-2.0, -0.5] and q1.candidate.choice_logprobs == [-2.0, -3.0]


def test_a_record_missing_on_one_side_is_an_empty_answer_not_an_error() -> None:
    base, cand = _sides()
    flips = flips_of([("q0", 1.0, 0.0)])
    detail = flip_detail(flips, base, cand[1:], recipe="fp8", task=SPEC.name, records={})
    assert detail.items[0].candidate.response is None and detail.items[0].baseline.response == "B"


def test_details_round_trip_through_the_session_folder(tmp_path: Path) -> None:
    base, cand = _sides()
    comparison, _ = _comparison(base, cand)
    _, detail = _page()
    save_flip_detail(tmp_path, "s1", detail)
    assert load_flip_details(tmp_path, "s1", [comparison]) == [detail]
    (tmp_path / "runs" / "s1" / "flips" / f"fp8-{SPEC.name}.json").write_text("{torn")
    assert load_flip_details(tmp_path, "s1", [comparison]) == []  # unreadable: left out, the report still renders


def test_the_embedded_document_is_the_payload_and_holds_markup_as_data() -> None:
    html, detail = _page()
    data = _payload(html)
    assert data == json.loads(json.dumps(flip_payload([detail])))
    assert data["groups"] == [{"recipe": "fp8", "task": SPEC.name, "n": 4, "tolerance": 0.5, "lost": 2, "gained": 1}]
    assert [(i["id"], i["d"], i["c"]["r"]) for i in data["items"]] == [("q0", "lost", "A"), ("q1", "lost", EVIL),
                                                                        ("q2", "gained", "B")]
    assert "alert(" not in html  # the markup answer is inside the base64 document, nowhere as markup
    assert data == json.loads(gzip.decompress(base64.b64decode(encode_payload(flip_payload([detail])))))


def test_the_page_references_nothing_outside_itself() -> None:
    html, _ = _page()
    parser = _Refs()
    parser.feed(html)
    outside = [r for r in parser.refs if not r[2].startswith(("data:", "#"))]
    assert outside == [] and any(r[0] == "img" and r[2].startswith("data:image/svg+xml;base64,") for r in parser.refs)
    assert "link" in parser.tags and "@import" not in html and "url(" not in html
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', html)
    assert csp is not None and "default-src 'none'" in csp.group(1) and "img-src data:" in csp.group(1)
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "") and "https://" not in html


def test_names_from_the_run_are_escaped_and_secrets_masked() -> None:
    html, _ = _page(api_key="sk-never-in-a-report-1234", model="org/<img src=x onerror=alert(1)>")
    assert "org/&lt;img src=x onerror=alert(1)&gt;" in html and "<img src=x" not in html
    assert "sk-never-in-a-report-1234" not in html
    assert re.search(r"<th>api_key</th><td><code>\*{10}</code></td>", html)
    assert 'id="head-decision">REGRESSION<' in html and 'data-decision="REGRESSION"' in html
