"""The evaluate stage, ``scorer`` engine: one task, one side, against an OpenAI-compatible endpoint.

Every finished sample is appended (and flushed) to a JSONL file at once, so a killed run loses at most the
samples in flight; a re-run reuses every record whose prompt hash matches and that has no error, and sends
only the rest. Errors never abort the task: they become per-sample records the run gate counts.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from pytest_day0.failures import Day0Error, FailureClass
from pytest_day0.scoring.client import OpenAIClient, Reply, RetryPolicy
from pytest_day0.scoring.metrics import (
    aggregate,
    exact_match,
    extract_answer,
    is_scored,
    mc_decision,
    prompt_hash,
    score_continuation,
    truncate_at_stop,
)
from pytest_day0.scoring.records import SampleRecord, TaskResult
from pytest_day0.scoring.tasks import Sample, Task
from pytest_day0.serving.endpoint import Endpoint
from pytest_day0.signals import run_stoppable
from pytest_day0.workspace import DISK_ERRNOS, replace_file

Progress = Callable[[int, int], None]


@dataclass
class EvalStats:
    """What TaskResult has no field for, filled in when the caller passes one: how much resume saved."""

    reused: int = 0  # samples taken from an earlier run's records, not re-requested
    requested: int = 0  # samples sent to the server in this run
    requests: int = 0  # HTTP attempts, retries included
    retries: int = 0
    unreadable_lines: int = 0  # corrupt or torn lines skipped in the existing records file


# ---------------------------------------------------------------- records file


def read_records(path: Path) -> tuple[dict[str, SampleRecord], int]:
    """Records by sample id (the last one wins) and the count of lines that could not be read.

    A torn last line (the process was killed mid-write) or a corrupt line is skipped, never fatal."""
    records: dict[str, SampleRecord] = {}
    bad = 0
    if not path.exists():
        return records, bad
    with path.open("rb") as fh:
        for raw in fh:
            if not raw.strip():
                continue
            try:
                rec = SampleRecord.model_validate_json(raw)
            except (ValidationError, ValueError):
                bad += 1
                continue
            records[rec.id] = rec
    return records, bad


def _drop_torn_tail(path: Path) -> None:
    """Cut a partial last line so the next append starts on a fresh line instead of gluing onto garbage."""
    if not path.exists():
        return
    with path.open("rb+") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        if size == 0:
            return
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return
        # scan back for the previous newline, in blocks so a large file is not read whole
        pos = size
        keep = 0
        while pos > 0:
            step = min(65536, pos)
            pos -= step
            fh.seek(pos)
            block = fh.read(step)
            i = block.rfind(b"\n")
            if i != -1:
                keep = pos + i + 1
                break
        fh.truncate(keep)


def _write_compacted(path: Path, records: Sequence[SampleRecord]) -> None:
    """Leave exactly one record per sample, in task order, replaced atomically (readers never see half a file)."""
    replace_file(path, "".join(rec.model_dump_json() + "\n" for rec in records))


class _Appender:
    """Appends whole lines or nothing. A failed write (disk full) cuts the file back to its last complete line
    and refuses every later write, so neither a torn line nor a straggler's line after the cut is left."""

    def __init__(self, path: Path) -> None:
        self._fh = path.open("ab", buffering=0)  # unbuffered: nothing pending that close() could half-write
        self.error: OSError | None = None

    def append(self, line: str) -> None:
        if self.error is not None:
            raise self.error
        start = os.fstat(self._fh.fileno()).st_size
        view = memoryview((line + "\n").encode())
        try:
            while view:
                view = view[self._fh.write(view) or 0:]
        except OSError as exc:
            self.error = exc
            with contextlib.suppress(OSError):
                self._fh.truncate(start)  # freeing space always works, even on a full disk
            raise

    def close(self) -> None:
        self._fh.close()


def _disk_error(path: Path, exc: OSError, doing: str, kept: int | None = None) -> Day0Error:
    """A full or failing disk is SYSTEMIC (nothing later can write either; retrying the stage refills it);
    anything else about the records file (permissions, a file where a directory should be) is the user's."""
    full = exc.errno in DISK_ERRNOS
    where = f"records file {path}: {doing}: {exc.strerror or exc}"
    if kept is not None:
        where += f" ({kept} finished samples kept intact; free space and re-run: they are reused)"
    return Day0Error(FailureClass.SYSTEMIC if full else FailureClass.USER_CONFIG_ERROR, where)


# ---------------------------------------------------------------- one sample


def _malformed(where: str, what: str) -> Day0Error:
    return Day0Error(FailureClass.EVAL_JUDGE_FAILED, f"malformed response from {where}: {what}")


def _first_choice(reply: Reply, where: str) -> dict[str, Any]:
    choices = reply.body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise _malformed(where, "no choices[0]")
    choice: dict[str, Any] = choices[0]
    return choice


def _usage(reply: Reply, key: str) -> int | None:
    usage = reply.body.get("usage")
    value = usage.get(key) if isinstance(usage, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


async def _score_choice(client: OpenAIClient, context: str, continuation: str) -> tuple[float, bool, int]:
    prompt = context + continuation
    reply, max_tokens = await client.echo_logprobs(prompt)
    choice = _first_choice(reply, "POST /v1/completions")
    generated = _usage(reply, "completion_tokens")
    # vLLM 0.32 answers max_tokens=0 + echo with the prompt alone but counts completion_tokens=1: trust the cap
    generated = max_tokens if generated is None else min(generated, max_tokens)
    scored = score_continuation(
        choice.get("logprobs"), prompt, len(context), generated, prompt_tokens=_usage(reply, "prompt_tokens")
    )
    return scored.logprob, scored.greedy, reply.attempts


async def _multiple_choice(client: OpenAIClient, task: Task, sample: Sample, base: SampleRecord) -> SampleRecord:
    choices = sample.choices or ()
    outcomes = await asyncio.gather(*(_score_choice(client, sample.prompt, c) for c in choices), return_exceptions=True)
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    done = [o for o in outcomes if not isinstance(o, BaseException)]
    attempts = max(
        [1, *(a for _, _, a in done), *(int(f.detail.get("attempts", 1)) for f in failures if isinstance(f, Day0Error))]
    )
    if failures:
        raise _with_attempts(failures[0], attempts)
    scores = [s for s, _, _ in done]
    greedy = [g for _, g, _ in done]
    assert isinstance(sample.target, int)  # Sample validates that choices come with an int target
    decision = mc_decision(scores, choices, sample.target)
    return base.model_copy(
        update={
            "response": choices[decision.pred],
            "choice_logprobs": scores,
            "choice_greedy": greedy,
            "correct": decision.correct,
            "correct_norm": decision.correct_norm,
            "attempts": attempts,
        }
    )


def _with_attempts(exc: BaseException, attempts: int) -> BaseException:
    if isinstance(exc, Day0Error):
        exc.detail["attempts"] = attempts
    return exc


async def _generate_once(client: OpenAIClient, task: Task, sample: Sample) -> tuple[str, int | None, int]:
    spec = task.spec
    if spec.chat:
        reply = await client.chat(sample.prompt, spec.max_tokens, spec.stop)
        where = "POST /v1/chat/completions"
        message = _first_choice(reply, where).get("message")
        text = message.get("content") if isinstance(message, dict) else None
    else:
        reply = await client.complete(sample.prompt, spec.max_tokens, spec.stop)
        where = "POST /v1/completions"
        text = _first_choice(reply, where).get("text")
    if not isinstance(text, str):
        raise _malformed(where, "choices[0] has no text")
    return text, _usage(reply, "completion_tokens"), reply.attempts


async def _generate(client: OpenAIClient, task: Task, sample: Sample, base: SampleRecord) -> SampleRecord:
    spec = task.spec
    outcomes = await asyncio.gather(
        *(_generate_once(client, task, sample) for _ in range(spec.repeats)), return_exceptions=True
    )
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    if failures:
        raise failures[0]
    done = [o for o in outcomes if not isinstance(o, BaseException)]
    texts = [truncate_at_stop(text, spec.stop) for text, _, _ in done]
    correct = [float(exact_match(extract_answer(t, spec.answer_pattern), sample.target)) for t in texts]
    tokens = [n for _, n, _ in done if n is not None]
    return base.model_copy(
        update={
            "response": texts[0],
            "correct": sum(correct) / len(correct),
            "completion_tokens": round(sum(tokens) / len(tokens)) if tokens else None,
            "attempts": max(a for _, _, a in done),
        }
    )


async def _run_sample(client: OpenAIClient, task: Task, sample: Sample, phash: str) -> SampleRecord:
    """Never raises (except cancellation): a failure becomes the record's one-line, class-prefixed error."""
    base = SampleRecord(id=sample.id, task=task.name, prompt_hash=phash, prompt=sample.prompt, target=sample.target)
    t0 = time.perf_counter()
    try:
        if task.spec.kind == "multiple_choice":
            rec = await _multiple_choice(client, task, sample, base)
        else:
            rec = await _generate(client, task, sample, base)
    except Day0Error as exc:
        rec = base.model_copy(update={"error": str(exc), "attempts": int(exc.detail.get("attempts", 1))})
    except Exception as exc:  # a scorer bug must show up in the record, not kill the other 299 samples
        msg = " ".join(f"{type(exc).__name__}: {exc}".split())
        rec = base.model_copy(update={"error": f"[{FailureClass.UNKNOWN}] {msg}"})
    return rec.model_copy(update={"latency_s": round(time.perf_counter() - t0, 6)})


# ---------------------------------------------------------------- the stage


async def evaluate_task(
    task: Task,
    endpoint: Endpoint,
    records_path: str | os.PathLike[str],
    side: str,
    concurrency: int = 16,
    progress: Progress | None = None,
    max_retries: int = 3,
    *,
    timeout_s: float = 120.0,
    backoff_base_s: float = 0.5,
    backoff_cap_s: float = 8.0,
    retry_after_cap_s: float = 30.0,
    seed: int = 0,
    stats: EvalStats | None = None,
    deadline_s: float | None = None,
) -> TaskResult:
    """Score ``task`` on ``endpoint``, resuming from ``records_path``; per-sample failures land in records.

    ``deadline_s`` bounds the whole evaluation (the stage timeout): past it the samples in flight are cancelled,
    every finished record is kept, and the stage raises INFRA_TRANSIENT so a retry resumes where this one stopped.
    """
    t0 = time.perf_counter()
    path = Path(records_path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        existing, unreadable = read_records(path)
        _drop_torn_tail(path)
    except OSError as exc:
        raise Day0Error(FailureClass.USER_CONFIG_ERROR, f"records file {path}: {exc.strerror or exc}") from None
    hashes = {s.id: prompt_hash(task.spec, s) for s in task.samples}
    final: dict[str, SampleRecord] = {
        sid: rec
        for sid, rec in existing.items()
        if sid in hashes and rec.task == task.name and rec.prompt_hash == hashes[sid] and is_scored(rec)
    }
    todo = [s for s in task.samples if s.id not in final]
    total = len(task.samples)
    st = stats if stats is not None else EvalStats()
    st.reused, st.requested, st.unreadable_lines = len(final), len(todo), unreadable
    done = len(final)
    if progress is not None:
        progress(done, total)

    policy = RetryPolicy(
        max_retries=max_retries,
        backoff_base_s=backoff_base_s,
        backoff_cap_s=backoff_cap_s,
        retry_after_cap_s=retry_after_cap_s,
        seed=seed,
    )
    timed_out = False
    if todo:
        try:
            out = _Appender(path)
        except OSError as exc:
            raise _disk_error(path, exc, "cannot open") from None
        try:
            async with OpenAIClient(endpoint, concurrency=concurrency, timeout_s=timeout_s, policy=policy) as client:

                async def one(sample: Sample) -> None:
                    nonlocal done
                    rec = await _run_sample(client, task, sample, hashes[sample.id])
                    out.append(rec.model_dump_json())
                    final[sample.id] = rec
                    done += 1
                    if progress is not None:
                        progress(done, total)

                # A fixed pool of workers pulls the samples: memory holds a bounded number of samples in flight, not
                # all of them (10,000 coroutines started at once cost ~7 KB each before their request is even sent).
                # Twice the concurrency, so a sample sleeping in retry backoff leaves its request slot to another.
                pending = iter(todo)

                async def worker() -> None:
                    for sample in pending:
                        await one(sample)

                running = [asyncio.ensure_future(worker()) for _ in range(min(2 * concurrency, len(todo)))]
                try:
                    remaining = None if deadline_s is None else max(deadline_s - (time.perf_counter() - t0), 0.0)
                    await asyncio.wait_for(asyncio.gather(*running), remaining)
                except TimeoutError:
                    await asyncio.gather(*running, return_exceptions=True)
                    timed_out = True
                except OSError as exc:  # disk full, file removed under us: no retry of samples helps
                    for fut in running:
                        fut.cancel()
                    await asyncio.gather(*running, return_exceptions=True)
                    raise _disk_error(path, exc, "cannot append", kept=done) from None
                finally:
                    st.requests, st.retries = client.requests_sent, client.retries
        finally:
            out.close()
    ordered = [final[s.id] for s in task.samples if s.id in final]
    # Records of samples outside this run's set (a --day0-limit run after a full one) are kept, not lost:
    # a later run over more samples reuses them.
    current = {s.id for s in task.samples}
    ordered += [rec for sid, rec in existing.items() if sid not in current and is_scored(rec)]
    try:
        _write_compacted(path, ordered)
    except OSError as exc:
        raise _disk_error(path, exc, "cannot compact", kept=sum(map(is_scored, ordered))) from None
    if timed_out:
        raise Day0Error(FailureClass.INFRA_TRANSIENT,
                        f"eval {side}/{task.name} reached the stage timeout ({deadline_s:g}s) with {done}/{total} "
                        "samples finished; they are kept, a retry resumes from there")
    return aggregate(
        task.spec,
        [s.id for s in task.samples],
        final,
        side=side,
        records_path=str(path),
        wall_s=round(time.perf_counter() - t0, 3),
    )


def cached_result(task: Task, records_path: str | os.PathLike[str], side: str) -> TaskResult | None:
    """The result from an earlier run's records when every sample is reusable, else None (needs a server).

    Read-only, so a re-run whose evaluations are all done never has to start a server at all."""
    path = Path(records_path)
    try:
        existing, _ = read_records(path)
    except OSError as exc:
        raise Day0Error(FailureClass.USER_CONFIG_ERROR, f"records file {path}: {exc.strerror or exc}") from None
    final: dict[str, SampleRecord] = {}
    for sample in task.samples:
        rec = existing.get(sample.id)
        if rec is None or rec.task != task.name or rec.prompt_hash != prompt_hash(task.spec, sample):
            return None
        if not is_scored(rec):
            return None
        final[sample.id] = rec
    return aggregate(task.spec, [s.id for s in task.samples], final, side=side, records_path=str(path))


def run_evaluation(
    task: Task,
    endpoint: Endpoint,
    records_path: str | os.PathLike[str],
    side: str,
    concurrency: int = 16,
    progress: Progress | None = None,
    max_retries: int = 3,
    **kwargs: Any,
) -> TaskResult:
    """Sync entry for fixtures; works even when called from inside a running event loop (runs on a thread)."""
    coro_args = (task, endpoint, records_path, side, concurrency, progress, max_retries)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return run_stoppable(evaluate_task(*coro_args, **kwargs))
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(evaluate_task(*coro_args, **kwargs))).result()


__all__ = ["EvalStats", "cached_result", "evaluate_task", "read_records", "run_evaluation"]
