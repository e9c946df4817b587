"""The scorer end to end against a real HTTP server on 127.0.0.1 (tests/fakes/openai_server.py).

Each test names the failure it guards against; the server counts every request it receives, so
"retried", "not retried" and "not re-requested" are measured on the wire, not inferred.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakes.openai_server import (
    BOS,
    ToyOpenAIServer,
    expected_continuation_logprob,
    toy_distribution,
)
from pydantic import SecretStr

from pytest_day0.failures import Day0Error, FailureClass
from pytest_day0.scoring.client import OpenAIClient, RetryPolicy, backoff_delay, parse_retry_after
from pytest_day0.scoring.records import SampleRecord
from pytest_day0.scoring.tasks import Task, load_task
from pytest_day0.serving.endpoint import Endpoint
from pytest_day0.stages.evaluate import EvalStats, cached_result, evaluate_task, read_records, run_evaluation

FAST: dict[str, Any] = {"backoff_base_s": 0.01, "backoff_cap_s": 0.05, "timeout_s": 5.0}

MC_SAMPLES: list[dict[str, Any]] = [
    {"id": "mc-0", "prompt": "max(98,64,78,85)=", "choices": ["98", "64", "78", "85"], "target": 0},
    {"id": "mc-1", "prompt": "Q: pick\nA:", "choices": [" yes", " no", " maybe so"], "target": 2},
    {"id": "mc-2", "prompt": "x=", "choices": ["1", "22", "333"], "target": 1},
]
ADD_SAMPLES: list[dict[str, Any]] = [
    {"id": "g-0", "prompt": "25+54=", "target": "79"},
    {"id": "g-1", "prompt": "99+65=", "target": "164"},
    {"id": "g-2", "prompt": "1+1=", "target": "3"},  # the oracle says 2: a genuine miss
    {"id": "g-3", "prompt": "40+2=", "target": "42"},
]


def make_task(tmp_path: Path, name: str, samples: list[dict[str, Any]], **spec: Any) -> Task:
    d = tmp_path / "tasks"
    d.mkdir(exist_ok=True)
    (d / f"{name}.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    full = {"name": name, "samples": f"{name}.jsonl", **spec}
    (d / f"{name}.task.json").write_text(json.dumps(full))
    return load_task(str(d / f"{name}.task.json"))


def mc_task(tmp_path: Path) -> Task:
    return make_task(tmp_path, "mc", MC_SAMPLES, kind="multiple_choice", metric="acc", scale=[0, 100])


def gen_task(tmp_path: Path, **spec: Any) -> Task:
    base = {"kind": "generate", "metric": "exact_match", "scale": [0, 100], "stop": ["\n"], "max_tokens": 8,
            "answer_pattern": r"^\s*(-?\d+)"}
    return make_task(tmp_path, spec.pop("name", "gen"), ADD_SAMPLES, **{**base, **spec})


@pytest.fixture
def server() -> Iterator[ToyOpenAIServer]:
    with ToyOpenAIServer() as srv:
        yield srv


def endpoint(srv: ToyOpenAIServer, key: str | None = None) -> Endpoint:
    return Endpoint(url=srv.url, model="toy", api_key=SecretStr(key) if key else None)


def run(task: Task, srv: ToyOpenAIServer, path: Path, **kw: Any) -> Any:
    return asyncio.run(evaluate_task(task, endpoint(srv), path, "candidate", **{**FAST, **kw}))


def argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


# ---------------------------------------------------------------- multiple choice semantics


@pytest.mark.parametrize("bos_text", [BOS, ""], ids=["bos-has-text-like-vllm", "bos-zero-width"])
def test_mc_scores_only_the_continuation_tokens(tmp_path: Path, server: ToyOpenAIServer, bos_text: str) -> None:
    """Guards against summing context tokens or misplacing the boundary when BOS shifts text_offset."""
    server.faults.bos_text = bos_text
    task = mc_task(tmp_path)
    result = run(task, server, tmp_path / "r.jsonl")
    records, _ = read_records(tmp_path / "r.jsonl")
    hits, hits_norm = 0, 0  # ints: bools are summed below
    for s in MC_SAMPLES:
        rec = records[s["id"]]
        want = [expected_continuation_logprob(s["prompt"], c) for c in s["choices"]]
        assert rec.choice_logprobs == pytest.approx(want, abs=1e-9)
        pred = argmax(want)
        pred_norm = argmax([w / len(c.encode()) for w, c in zip(want, s["choices"], strict=True)])
        assert rec.response == s["choices"][pred]
        assert rec.correct == float(pred == s["target"])
        assert rec.correct_norm == float(pred_norm == s["target"])
        hits += int(pred == s["target"])
        hits_norm += int(pred_norm == s["target"])
    assert result.status == "SUCCESS"
    assert result.score == pytest.approx(100 * hits / 3)
    assert result.score_norm == pytest.approx(100 * hits_norm / 3)
    # one request per choice, in lm-eval's loglikelihood shape
    bodies = [r["body"] for r in server.state.requests]
    assert len(bodies) == sum(len(s["choices"]) for s in MC_SAMPLES)
    b = next(b for b in bodies if b["prompt"] == "x=22")
    assert (b["echo"], b["logprobs"], b["max_tokens"], b["temperature"], b["model"]) == (True, 1, 0, 0.0, "toy")


def test_mc_greedy_flag_matches_the_toy_argmax(tmp_path: Path, server: ToyOpenAIServer) -> None:
    """is_greedy must be true exactly when every continuation char is the model's argmax."""
    prev = "="
    greedy_cont = ""
    for _ in range(2):
        dist = toy_distribution(prev)
        nxt = max(dist, key=lambda c: dist[c])
        greedy_cont += nxt
        prev = nxt
    non_greedy = "@@" if greedy_cont != "@@" else "##"
    samples = [{"id": "s", "prompt": "x=", "choices": [greedy_cont, non_greedy], "target": 0}]
    task = make_task(tmp_path, "greedy", samples, kind="multiple_choice", metric="acc", scale=[0, 1])
    run(task, server, tmp_path / "r.jsonl")
    rec = read_records(tmp_path / "r.jsonl")[0]["s"]
    assert rec.choice_greedy == [True, False]


def test_mc_falls_back_to_max_tokens_1_and_excludes_the_generated_token(
    tmp_path: Path, server: ToyOpenAIServer
) -> None:
    """A server that rejects max_tokens=0 (vLLM) still gives identical scores; the generated token is not summed."""
    server.faults.reject_zero_max_tokens = True
    task = mc_task(tmp_path)
    result = run(task, server, tmp_path / "r.jsonl", concurrency=1)
    records, _ = read_records(tmp_path / "r.jsonl")
    for s in MC_SAMPLES:
        want = [expected_continuation_logprob(s["prompt"], c) for c in s["choices"]]
        assert records[s["id"]].choice_logprobs == pytest.approx(want, abs=1e-9)
    assert result.status == "SUCCESS"
    assert server.state.statuses.count(400) == 1  # learnt once, not re-probed for every request
    assert sum(1 for r in server.state.requests if r["body"].get("max_tokens") == 1) == 10


@pytest.mark.parametrize("mode", ["missing", "null", "truncated", "no_echo"])
@pytest.mark.parametrize("zero_ok", [True, False])
def test_no_prompt_logprobs_fails_the_task_instead_of_scoring_chance(
    tmp_path: Path, server: ToyOpenAIServer, mode: str, zero_ok: bool
) -> None:
    """lm-eval #1411: a server without prompt logprobs gave chance-level MC silently. Here: FAILED, no score."""
    server.faults.logprobs_mode = mode
    server.faults.reject_zero_max_tokens = not zero_ok
    result = run(mc_task(tmp_path), server, tmp_path / "r.jsonl")
    records, _ = read_records(tmp_path / "r.jsonl")
    assert result.status == "FAILED"
    assert result.score is None and result.score_norm is None and result.scored_samples == 0
    assert result.errored_samples == 3
    for rec in records.values():
        assert rec.error is not None
        assert rec.error.startswith("[EVAL_JUDGE_FAILED] server returned no prompt logprobs; MC scoring impossible")
        assert rec.correct is None
    assert result.first_error is not None and result.first_error.startswith("[EVAL_JUDGE_FAILED]")


# ---------------------------------------------------------------- generation


def test_generate_exact_match_with_stop_and_pattern(tmp_path: Path, server: ToyOpenAIServer) -> None:
    """The server stops at '\\n'; exact match on the extracted number; usage tokens recorded."""
    result = run(gen_task(tmp_path), server, tmp_path / "r.jsonl")
    records, _ = read_records(tmp_path / "r.jsonl")
    assert [records[s["id"]].correct for s in ADD_SAMPLES] == [1.0, 1.0, 0.0, 1.0]
    assert records["g-0"].response == "79"
    assert records["g-1"].completion_tokens == 3
    assert result.status == "SUCCESS"
    assert result.score == pytest.approx(75.0)
    assert result.mean_completion_tokens == pytest.approx((2 + 3 + 1 + 2) / 4)
    body = server.state.requests[0]["body"]
    assert body["stop"] == ["\n"] and body["max_tokens"] == 8 and body["temperature"] == 0.0


def test_generate_truncates_at_stop_when_the_server_ignores_it(tmp_path: Path, server: ToyOpenAIServer) -> None:
    """Without an answer_pattern the whole text is the answer: junk after an ignored stop must not count."""
    server.faults.ignore_stop = True
    result = run(gen_task(tmp_path, answer_pattern=None, max_tokens=64), server, tmp_path / "r.jsonl")
    records, _ = read_records(tmp_path / "r.jsonl")
    assert records["g-0"].response == "79"
    assert result.score == pytest.approx(75.0)


def test_zero_one_scale_task_reports_a_zero_one_score(tmp_path: Path, server: ToyOpenAIServer) -> None:
    """tau-like tasks are [0, 1]: 3 of 4 right is 0.75, never 75."""
    result = run(gen_task(tmp_path, name="tau", metric="pass@1", scale=[0, 1]), server, tmp_path / "r.jsonl")
    assert result.score == pytest.approx(0.75)
    assert result.scale == (0.0, 1.0)
    assert result.metric == "pass@1"


def test_chat_task_uses_chat_completions(tmp_path: Path, server: ToyOpenAIServer) -> None:
    result = run(gen_task(tmp_path, chat=True), server, tmp_path / "r.jsonl")
    assert result.score == pytest.approx(75.0)
    assert server.request_count("/v1/chat/completions") == 4 and server.request_count("/v1/completions") == 0
    assert server.state.requests[0]["body"]["messages"][0]["role"] == "user"


def test_repeats_issue_n_requests_and_record_the_mean(tmp_path: Path) -> None:
    calls: dict[str, int] = {}

    def flaky_oracle(prompt: str) -> str:  # right on the 1st and 3rd call per prompt, wrong on the 2nd
        calls[prompt] = calls.get(prompt, 0) + 1
        a, b = prompt.rstrip("=").split("+")
        return str(int(a) + int(b) + (1 if calls[prompt] == 2 else 0))

    with ToyOpenAIServer(oracle=flaky_oracle) as srv:
        task = make_task(tmp_path, "rep", ADD_SAMPLES[:2], kind="generate", metric="em", scale=[0, 1], repeats=3)
        result = run(task, srv, tmp_path / "r.jsonl", concurrency=1)
        assert srv.request_count() == 6
    records, _ = read_records(tmp_path / "r.jsonl")
    assert sorted(records) == ["g-0", "g-1"]
    assert records["g-0"].correct == pytest.approx(2 / 3)
    assert result.score == pytest.approx(2 / 3)


# ---------------------------------------------------------------- retries and failure classes


def test_5xx_429_and_dropped_connections_are_retried_to_success(tmp_path: Path, server: ToyOpenAIServer) -> None:
    server.faults.fail_first = 2
    server.faults.rate_limit_first = 1
    server.faults.close_first = 1
    stats = EvalStats()
    result = run(gen_task(tmp_path), server, tmp_path / "r.jsonl", concurrency=1, stats=stats)
    assert result.status == "SUCCESS" and result.score == pytest.approx(75.0)
    assert server.state.statuses[:4] == [500, 500, 429, 0]  # 0: connection closed without a response
    assert server.request_count() == 4 + 4 and stats.retries == 4 and stats.requests == 8
    records, _ = read_records(tmp_path / "r.jsonl")
    # the semaphore is held per attempt, so other samples proceed while one backs off: 4 retries spread out
    assert sum(r.attempts - 1 for r in records.values()) == 4


def test_retry_after_is_honoured_but_capped(tmp_path: Path, server: ToyOpenAIServer) -> None:
    server.faults.rate_limit_first = 1
    server.faults.retry_after = "30"
    t0 = time.perf_counter()
    result = run(gen_task(tmp_path), server, tmp_path / "r.jsonl", concurrency=1, retry_after_cap_s=0.3)
    elapsed = time.perf_counter() - t0
    assert result.status == "SUCCESS"
    assert 0.3 <= elapsed < 15  # waited for the (capped) Retry-After, not the server's 30 s


def test_exhausted_retries_become_infra_transient_records_and_incomplete(
    tmp_path: Path, server: ToyOpenAIServer
) -> None:
    server.faults.status_always = 503
    result = run(gen_task(tmp_path), server, tmp_path / "r.jsonl", max_retries=2)
    records, _ = read_records(tmp_path / "r.jsonl")
    assert result.status == "INCOMPLETE" and result.score is None and result.errored_samples == 4
    assert server.request_count() == 4 * 3
    for rec in records.values():
        assert rec.error is not None and rec.error.startswith("[INFRA_TRANSIENT] POST /v1/completions: HTTP 503")
        assert rec.attempts == 3
    # the outage ends: a re-run retries exactly the errored samples and completes
    server.faults.status_always = None
    server.state.reset_counts()
    stats = EvalStats()
    result = run(gen_task(tmp_path), server, tmp_path / "r.jsonl", stats=stats)
    assert result.status == "SUCCESS" and stats.reused == 0 and server.request_count() == 4


def test_timeouts_are_transient(tmp_path: Path, server: ToyOpenAIServer) -> None:
    server.faults.slow_s = 1.0
    task = make_task(tmp_path, "one", ADD_SAMPLES[:1], kind="generate", metric="em", scale=[0, 100])
    result = run(task, server, tmp_path / "r.jsonl", timeout_s=0.2, max_retries=1)
    rec = read_records(tmp_path / "r.jsonl")[0]["g-0"]
    assert result.status == "INCOMPLETE"
    assert rec.error is not None and rec.error.startswith("[INFRA_TRANSIENT]") and "timed out" in rec.error
    assert rec.attempts == 2


@pytest.mark.parametrize("status", [400, 401, 403, 404])
def test_client_errors_are_judge_failures_without_retry(tmp_path: Path, server: ToyOpenAIServer, status: int) -> None:
    server.faults.status_always = status
    result = run(gen_task(tmp_path), server, tmp_path / "r.jsonl")
    assert server.request_count() == 4  # no retry: re-sending cannot fix a 4xx
    assert result.status == "FAILED"
    assert result.first_error is not None
    assert result.first_error.startswith(f"[EVAL_JUDGE_FAILED] POST /v1/completions: HTTP {status}")


def test_invalid_json_is_a_malformed_response(tmp_path: Path, server: ToyOpenAIServer) -> None:
    server.faults.invalid_json = True
    result = run(gen_task(tmp_path), server, tmp_path / "r.jsonl")
    records, _ = read_records(tmp_path / "r.jsonl")
    assert server.request_count() == 4
    errors = [r.error or "" for r in records.values()]
    assert len(errors) == 4 and all(e.startswith("[EVAL_JUDGE_FAILED] malformed response") for e in errors)
    assert result.status == "FAILED"


def test_api_key_is_sent_as_bearer(tmp_path: Path, server: ToyOpenAIServer) -> None:
    asyncio.run(evaluate_task(gen_task(tmp_path), endpoint(server, "sk-secret"), tmp_path / "r.jsonl", "baseline"))
    assert {r["auth"] for r in server.state.requests} == {"Bearer sk-secret"}


def test_concurrency_is_bounded(tmp_path: Path, server: ToyOpenAIServer) -> None:
    server.faults.slow_s = 0.05
    samples = [{"id": f"g-{i}", "prompt": f"{i}+1=", "target": str(i + 1)} for i in range(12)]
    task = make_task(tmp_path, "many", samples, kind="generate", metric="em", scale=[0, 100], stop=["\n"])
    result = run(task, server, tmp_path / "r.jsonl", concurrency=3)
    assert result.status == "SUCCESS" and result.score == pytest.approx(100.0)
    assert 1 <= server.state.max_in_flight <= 3


# ---------------------------------------------------------------- records and resume


def test_resume_re_requests_zero_finished_samples(tmp_path: Path, server: ToyOpenAIServer) -> None:
    path = tmp_path / "r.jsonl"
    first = run(mc_task(tmp_path), server, path)
    assert server.request_count() == 10  # one per choice: 4 + 3 + 3
    server.state.reset_counts()
    stats = EvalStats()
    again = run(mc_task(tmp_path), server, path, stats=stats)
    assert server.request_count() == 0 and stats.reused == 3 and stats.requested == 0
    assert again.score == first.score and again.status == "SUCCESS"


def test_resume_re_requests_only_missing_and_changed_samples(tmp_path: Path, server: ToyOpenAIServer) -> None:
    path = tmp_path / "r.jsonl"
    run(gen_task(tmp_path), server, path)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:3]) + "\n")  # g-3 never finished
    server.state.reset_counts()
    stats = EvalStats()
    run(gen_task(tmp_path), server, path, stats=stats)
    assert stats.reused == 3 and server.request_count() == 1
    assert server.state.requests[0]["body"]["prompt"] == "40+2="
    # a spec change that alters requests (max_tokens) invalidates every record's prompt hash
    server.state.reset_counts()
    stats = EvalStats()
    run(gen_task(tmp_path, max_tokens=7), server, path, stats=stats)
    assert stats.reused == 0 and server.request_count() == 4


def test_torn_last_line_is_tolerated(tmp_path: Path, server: ToyOpenAIServer) -> None:
    """A kill mid-write leaves half a JSON line: it is skipped, cut off, and only that sample is redone."""
    path = tmp_path / "r.jsonl"
    first = run(gen_task(tmp_path), server, path)
    text = path.read_text()
    last_start = text.rstrip("\n").rfind("\n") + 1
    path.write_text(text[: last_start + 25])  # the last record is now half a line, no newline
    server.state.reset_counts()
    stats = EvalStats()
    again = run(gen_task(tmp_path), server, path, stats=stats)
    assert stats.unreadable_lines == 1 and stats.reused == 3 and server.request_count() == 1
    assert again.status == "SUCCESS" and again.score == first.score
    lines = path.read_text().splitlines()
    assert len(lines) == 4
    assert [SampleRecord.model_validate_json(ln).id for ln in lines] == ["g-0", "g-1", "g-2", "g-3"]


def test_records_are_appended_as_samples_finish(tmp_path: Path, server: ToyOpenAIServer) -> None:
    """While the run is in flight the file already holds the finished samples (a kill loses only in-flight ones)."""
    path = tmp_path / "r.jsonl"
    seen: list[tuple[int, int, int]] = []

    def progress(done: int, total: int) -> None:
        lines = path.read_text().splitlines() if path.exists() else []
        seen.append((done, total, len(lines)))

    run(gen_task(tmp_path), server, path, concurrency=1, progress=progress)
    assert [(d, t) for d, t, _ in seen] == [(0, 4), (1, 4), (2, 4), (3, 4), (4, 4)]
    assert [n for _, _, n in seen] == [0, 1, 2, 3, 4]


def test_run_evaluation_is_a_sync_wrapper(tmp_path: Path, server: ToyOpenAIServer) -> None:
    result = run_evaluation(gen_task(tmp_path), endpoint(server), tmp_path / "r.jsonl", "baseline", **FAST)
    assert result.side == "baseline" and result.records_path == str(tmp_path / "r.jsonl")
    assert result.expected_samples == 4 and result.scored_samples == 3 + 1


# ---------------------------------------------------------------- client pure parts


def test_backoff_is_exponential_jittered_seeded_and_capped() -> None:
    policy = RetryPolicy(backoff_base_s=1.0, backoff_cap_s=4.0, retry_after_cap_s=10.0, seed=7)
    a = [backoff_delay(policy, i, random.Random(7)) for i in range(5)]
    b = [backoff_delay(policy, i, random.Random(7)) for i in range(5)]
    assert a == b
    for i, d in enumerate(a):
        ceiling = min(4.0, 2.0**i)
        assert ceiling * 0.5 <= d <= ceiling
    assert backoff_delay(policy, 0, random.Random(0), retry_after=3.0) == 3.0
    assert backoff_delay(policy, 0, random.Random(0), retry_after=3600.0) == 10.0


def test_parse_retry_after() -> None:
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after("0.5") == 0.5
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == pytest.approx(10.0)
    assert parse_retry_after("-3") == 0.0


def test_client_rejects_zero_concurrency() -> None:
    with pytest.raises(Day0Error) as exc:
        OpenAIClient(Endpoint(url="http://127.0.0.1:9", model="m"), concurrency=0)
    assert exc.value.failure_class is FailureClass.USER_CONFIG_ERROR


def test_connection_refused_is_transient(tmp_path: Path) -> None:
    with ToyOpenAIServer() as srv:
        url = srv.url
    # the server is gone: nothing listens on that port any more
    ep = Endpoint(url=url, model="toy")
    task = make_task(tmp_path, "one", ADD_SAMPLES[:1], kind="generate", metric="em", scale=[0, 100])
    result = asyncio.run(evaluate_task(task, ep, tmp_path / "r.jsonl", "candidate", max_retries=1, **FAST))
    assert result.status == "INCOMPLETE"
    assert result.first_error is not None and result.first_error.startswith("[INFRA_TRANSIENT]")
    assert "connection error" in result.first_error


def test_cached_result_needs_no_server_once_every_sample_is_done(tmp_path: Path, server: ToyOpenAIServer) -> None:
    path = tmp_path / "r.jsonl"
    task = gen_task(tmp_path)
    assert cached_result(task, path, "candidate") is None  # nothing yet
    first = run(task, server, path)
    cached = cached_result(task, path, "candidate")
    assert cached is not None and cached.status == "SUCCESS" and cached.score == first.score
    assert cached.scored_samples == 4
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:3]))
    assert cached_result(task, path, "candidate") is None  # one sample missing: a server is needed
    assert cached_result(gen_task(tmp_path, max_tokens=5), path, "candidate") is None  # spec changed


def test_run_evaluation_works_inside_a_running_event_loop(tmp_path: Path, server: ToyOpenAIServer) -> None:
    """Fixtures of async test suites call the sync wrapper with a loop already running in the thread."""

    async def inside() -> Any:
        return run_evaluation(gen_task(tmp_path), endpoint(server), tmp_path / "r.jsonl", "baseline", **FAST)

    result = asyncio.run(inside())
    assert result.status == "SUCCESS" and result.score == pytest.approx(75.0)
