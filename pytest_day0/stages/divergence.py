"""The divergence pre-check's I/O: one side's top-k next-token logprobs on the pre-check's text set.

Each text is sent as the scorer sends a log-likelihood request (``OpenAIClient.echo_logprobs``: echo, max_tokens 0,
or 1 where the server refuses 0, with the same retries and failure classes), asking for ``top_k`` alternatives per
position. Only the prompt's own positions are kept: a max_tokens=1 reply's generated token is dropped, so two
servers that differ there still pair position by position. The decision is ``gates/divergence.py``'s.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pytest_day0.failures import Day0Error, FailureClass
from pytest_day0.gates.divergence import TextLogprobs
from pytest_day0.scoring.client import OpenAIClient, Reply
from pytest_day0.serving.endpoint import Endpoint
from pytest_day0.signals import run_stoppable

WHERE = "POST /v1/completions (divergence pre-check)"


@dataclass(frozen=True)
class SideLogprobs:
    texts: list[TextLogprobs]
    seconds: float  # wall time of the requests when they were made
    reused: bool = False  # read back from the workspace (an earlier session measured it)


def _malformed(what: str) -> Day0Error:
    return Day0Error(FailureClass.EVAL_JUDGE_FAILED, f"malformed response from {WHERE}: {what}")


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def parse_echo(reply: Reply, max_tokens: int) -> TextLogprobs:
    """The prompt's tokens and top-k dicts from an echo reply (EVAL_JUDGE_FAILED when it holds none)."""
    choices = reply.body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise _malformed("no choices[0]")
    logprobs = choices[0].get("logprobs")
    tokens = logprobs.get("tokens") if isinstance(logprobs, dict) else None
    tops = logprobs.get("top_logprobs") if isinstance(logprobs, dict) else None
    if not isinstance(tokens, list) or not isinstance(tops, list) or len(tokens) != len(tops):
        raise _malformed("logprobs.tokens / logprobs.top_logprobs missing or of different lengths (the server "
                         "returns no prompt logprobs for echo)")
    usage = reply.body.get("usage")
    generated = usage.get("completion_tokens") if isinstance(usage, dict) else None
    # vLLM answers max_tokens=0 + echo with the prompt alone but counts completion_tokens=1: trust the cap
    generated = max_tokens if not isinstance(generated, int) else min(max(generated, 0), max_tokens)
    n_prompt = len(tokens) - generated
    if n_prompt <= 0 or not all(isinstance(t, str) for t in tokens[:n_prompt]):
        raise _malformed(f"no prompt tokens echoed ({len(tokens)} tokens, {generated} generated)")
    top: list[dict[str, float] | None] = []
    for entry in tops[:n_prompt]:
        if entry is None:
            top.append(None)
        elif isinstance(entry, dict) and entry and all(isinstance(k, str) and _number(v) for k, v in entry.items()):
            top.append({k: float(v) for k, v in entry.items()})
        else:
            raise _malformed(f"a top_logprobs entry is not a token -> logprob object: {str(entry)[:80]}")
    if all(t is None for t in top):
        raise _malformed("no position of the echoed prompt has top logprobs")
    return TextLogprobs(tokens=list(tokens[:n_prompt]), top=top)


async def _side(endpoint: Endpoint, texts: Sequence[str], top_k: int, concurrency: int,
                timeout_s: float) -> list[TextLogprobs]:
    async with OpenAIClient(endpoint, concurrency=concurrency) as client:
        async def one(text: str) -> TextLogprobs:
            reply, max_tokens = await client.echo_logprobs(text, top_k)
            return parse_echo(reply, max_tokens)

        try:
            return list(await asyncio.wait_for(asyncio.gather(*(one(t) for t in texts)), timeout_s))
        except TimeoutError:
            raise Day0Error(FailureClass.INFRA_TRANSIENT, f"{WHERE}: {len(texts)} texts not scored within "
                            f"{timeout_s:g} s") from None


def side_logprobs(endpoint: Endpoint, texts: Sequence[str], *, top_k: int, concurrency: int = 16,
                  timeout_s: float = 600.0) -> list[TextLogprobs]:
    """Every text's top-k logprobs from one side's endpoint (sync; works from inside a running event loop too)."""
    def run() -> list[TextLogprobs]:
        return run_stoppable(_side(endpoint, texts, top_k, concurrency, timeout_s))

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return run()
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(run).result()


__all__ = ["SideLogprobs", "parse_echo", "side_logprobs"]
