"""Scoring decisions, kept free of I/O so every rule the scorer applies can be tested on plain data.

The rules follow lm-evaluation-harness (loglikelihood multiple choice, exact-match generation) so our
numbers are comparable with what peers publish. One deliberate difference: a server that cannot give
prompt log-probabilities makes a sample *fail* instead of silently scoring at chance (lm-eval #1411/#1949).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Any

from pytest_day0.failures import Day0Error, FailureClass
from pytest_day0.scoring.records import SampleRecord, TaskResult
from pytest_day0.scoring.tasks import Sample, TaskSpec

NO_PROMPT_LOGPROBS = "server returned no prompt logprobs; MC scoring impossible"
MEMBER_SEPARATOR = "/"  # a record id of an aggregate task (an lm-eval group): <member task>/<its record id>
# JSON round-trips of the same float are exact, but some servers re-serialise top_logprobs separately.
GREEDY_TOLERANCE = 1e-6


def prompt_hash(spec: TaskSpec, sample: Sample) -> str:
    """Identity of a sample's request+scoring, so a changed prompt or spec never reuses an old record."""
    payload = {
        "prompt": sample.prompt,
        "choices": list(sample.choices) if sample.choices is not None else None,
        "target": sample.target,
        "kind": spec.kind,
        "max_tokens": spec.max_tokens,
        "stop": list(spec.stop),
        "answer_pattern": spec.answer_pattern,
        "chat": spec.chat,
        "repeats": spec.repeats,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


# ---------------------------------------------------------------- generation


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """Cut at the earliest stop string: servers that ignore ``stop`` must not score differently (lm-eval does this)."""
    cut = len(text)
    for s in stop:
        if s:
            i = text.find(s)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]


def extract_answer(text: str, pattern: str | None) -> str | None:
    """The answer a generation commits to: the pattern's first group (or whole match), else the stripped text."""
    if pattern is None:
        return text.strip()
    m = re.search(pattern, text)
    if m is None:
        return None
    return m.group(1) if m.re.groups else m.group(0)


def exact_match(extracted: str | None, target: int | str) -> bool:
    return extracted is not None and extracted == str(target)


# ---------------------------------------------------------------- multiple choice


@dataclass(frozen=True)
class ContinuationScore:
    logprob: float  # sum over the continuation's tokens
    greedy: bool  # every continuation token was the argmax
    n_tokens: int


def _judge(message: str) -> Day0Error:
    return Day0Error(FailureClass.EVAL_JUDGE_FAILED, message)


def score_continuation(
    logprobs: Any,
    prompt: str,
    context_len: int,
    generated_tokens: int,
    prompt_tokens: int | None = None,
) -> ContinuationScore:
    """Sum the log-probabilities of the tokens after ``prompt[:context_len]`` in an echo=true completion.

    ``logprobs`` is the OpenAI ``choices[0].logprobs`` object. The last ``generated_tokens`` entries are
    the server's own generation (max_tokens=1 fallback) and are excluded. Offsets are re-based on where the
    echoed prompt ends, because servers disagree on whether a BOS token occupies text (vLLM counts "<s>").
    Raises EVAL_JUDGE_FAILED when the server did not actually score the prompt.
    """
    if not isinstance(logprobs, Mapping):
        raise _judge(NO_PROMPT_LOGPROBS)
    # the whole-prompt scans run once per request (tens of thousands per evaluation): C-level count/map, not
    # generator expressions, which were a tenth of the scorer's CPU in a profile of the request loop
    token_lps = logprobs.get("token_logprobs")
    if not isinstance(token_lps, list) or token_lps.count(None) == len(token_lps):
        raise _judge(NO_PROMPT_LOGPROBS)
    offsets = logprobs.get("text_offset")
    if (not isinstance(offsets, list) or len(offsets) != len(token_lps)
            or not all(map(isinstance, offsets, repeat(int)))):
        raise _judge("malformed response: logprobs.text_offset missing or not aligned with token_logprobs")
    n_prompt = len(token_lps) - generated_tokens
    if n_prompt <= 0 or (prompt_tokens is not None and n_prompt < prompt_tokens):
        raise _judge(f"{NO_PROMPT_LOGPROBS} (got {max(n_prompt, 0)} prompt tokens back)")
    tokens = logprobs.get("tokens")
    base = 0
    if isinstance(tokens, list) and len(tokens) == len(token_lps) and isinstance(tokens[n_prompt - 1], str):
        base = offsets[n_prompt - 1] + len(tokens[n_prompt - 1]) - len(prompt)
        if base < 0 or offsets[0] > base:
            raise _judge(f"{NO_PROMPT_LOGPROBS} (echoed tokens do not cover the prompt)")
    start = base + context_len
    picked = [i for i in range(n_prompt) if offsets[i] >= start]
    if not picked:
        raise _judge("continuation has no token of its own: the server merged it into the context")
    lps = [token_lps[i] for i in picked]
    if any(not isinstance(lp, int | float) or isinstance(lp, bool) for lp in lps):
        raise _judge(f"{NO_PROMPT_LOGPROBS} (null logprob inside the continuation)")
    tops = logprobs.get("top_logprobs")
    greedy = True
    for i in picked:
        top = tops[i] if isinstance(tops, list) and i < len(tops) else None
        values = [v for v in top.values() if isinstance(v, int | float)] if isinstance(top, Mapping) else []
        if not values or float(token_lps[i]) < max(values) - GREEDY_TOLERANCE:
            greedy = False
    total = math.fsum(float(lp) for lp in lps)
    return ContinuationScore(logprob=total, greedy=greedy, n_tokens=len(picked))


@dataclass(frozen=True)
class MCDecision:
    pred: int
    pred_norm: int
    correct: float
    correct_norm: float


def _argmax(values: Sequence[float]) -> int:
    # first index wins ties, like numpy.argmax in lm-eval
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def mc_decision(scores: Sequence[float], continuations: Sequence[str], target: int) -> MCDecision:
    """acc: argmax of summed logprob; acc_norm: argmax of logprob per UTF-8 byte of the continuation."""
    if len(scores) != len(continuations) or not scores:
        raise ValueError("one score per continuation is required")
    pred = _argmax(scores)
    norm = [s / max(len(c.encode()), 1) for s, c in zip(scores, continuations, strict=True)]
    pred_norm = _argmax(norm)
    return MCDecision(
        pred=pred, pred_norm=pred_norm, correct=float(pred == target), correct_norm=float(pred_norm == target)
    )


# ---------------------------------------------------------------- aggregation


def _mean(values: Sequence[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def is_scored(record: SampleRecord | None) -> bool:
    return record is not None and record.error is None and record.correct is not None


def aggregate(
    spec: TaskSpec,
    expected_ids: Sequence[str],
    records: Mapping[str, SampleRecord],
    *,
    side: str,
    records_path: str,
    wall_s: float = 0.0,
) -> TaskResult:
    """One side's result for the run gate. SUCCESS needs every expected sample scored; a task where nothing
    was scored and every failure is EVAL_JUDGE_FAILED is FAILED (re-running cannot fix it), else INCOMPLETE."""
    scored = [records[i] for i in expected_ids if is_scored(records.get(i))]
    errors: list[str] = []
    for i in expected_ids:
        rec = records.get(i)
        if rec is None:
            errors.append(f"[{FailureClass.SAMPLE_ACCOUNTING_FAILED}] sample {i} has no record")
        elif not is_scored(rec):
            errors.append(rec.error or f"[{FailureClass.UNKNOWN}] sample {i} has neither a score nor an error")
    expected = len(expected_ids)
    if expected and len(scored) == expected:
        status = "SUCCESS"
    elif expected and not scored and all(e.startswith(f"[{FailureClass.EVAL_JUDGE_FAILED}]") for e in errors):
        status = "FAILED"
    else:
        status = "INCOMPLETE"
    frac = _mean([r.correct for r in scored if r.correct is not None])
    frac_norm = _mean([r.correct_norm for r in scored if r.correct_norm is not None])
    tokens = _mean([float(r.completion_tokens) for r in scored if r.completion_tokens is not None])
    return TaskResult(
        task=spec.name,
        side=side,
        status=status,
        expected_samples=expected,
        scored_samples=len(scored),
        errored_samples=expected - len(scored),
        score=spec.to_scale(frac) if frac is not None else None,
        score_norm=spec.to_scale(frac_norm) if frac_norm is not None and spec.kind == "multiple_choice" else None,
        mean_completion_tokens=tokens,
        scale=spec.scale,
        metric=spec.metric,
        wall_s=wall_s,
        records_path=records_path,
        first_error=errors[0] if errors else None,
    )


# ---------------------------------------------------------------- aggregate tasks (lm-eval groups)


def member_records(task: str, members: Mapping[str, Sequence[SampleRecord]]) -> list[SampleRecord]:
    """An aggregate task's records: every member's, ids prefixed with the member (``<member>/<id>``), in order."""
    return [r.model_copy(update={"id": f"{member}{MEMBER_SEPARATOR}{r.id}", "task": task})
            for member, recs in members.items() for r in recs]


def members_result(spec: TaskSpec, expected_ids: Sequence[str], records: Sequence[SampleRecord],
                   members: Mapping[str, TaskResult], *, side: str, records_path: str) -> TaskResult:
    """An aggregate task's result from its members' records, complete only when every member is. Its score is
    the mean over all members' items: the size-weighted mean of the members' scores, which is how lm-eval
    aggregates MMLU-shaped groups (``weight_by_size``)."""
    result = aggregate(spec, expected_ids, {r.id: r for r in records}, side=side, records_path=records_path,
                       wall_s=round(sum(m.wall_s for m in members.values()), 3))
    bad = [(name, m) for name, m in members.items() if m.status != "SUCCESS"]
    if bad and result.status == "SUCCESS":
        name, m = bad[0]
        return result.model_copy(update={"status": m.status, "first_error": f"{name}: {m.first_error}"})
    return result
