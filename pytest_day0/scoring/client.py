"""An async OpenAI-API client for scoring: bounded concurrency, and retries that tell transient from fatal.

Why our own and not ``openai``: the failure class of every error is the product here. A 5xx, 429, timeout or
dropped connection is INFRA_TRANSIENT (retried with seeded, jittered backoff); any other 4xx, a bad key, or a
body that is not the OpenAI shape is EVAL_JUDGE_FAILED and is not retried, because re-sending cannot fix it.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Self

import httpx

from pytest_day0.failures import Day0Error, FailureClass
from pytest_day0.scoring.transport import transport_for
from pytest_day0.serving.endpoint import Endpoint

TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
BODY_SNIPPET = 160


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 3  # retries after the first attempt
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 8.0
    retry_after_cap_s: float = 30.0  # a server asking for an hour must not stall a CI job for an hour
    seed: int = 0  # jitter is seeded so two runs of the same session wait the same way


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return max(seconds, 0.0)


def backoff_delay(policy: RetryPolicy, retry_index: int, rng: random.Random, retry_after: float | None = None) -> float:
    """Wait before retry number ``retry_index`` (0-based): the server's Retry-After (capped) when given,
    else exponential backoff with jitter in [50%, 100%] so parallel requests do not retry in lockstep."""
    if retry_after is not None:
        return min(retry_after, policy.retry_after_cap_s)
    ceiling = min(policy.backoff_cap_s, policy.backoff_base_s * (2.0 ** max(retry_index, 0)))
    return ceiling * (0.5 + 0.5 * rng.random())


def _one_line(text: str, limit: int = BODY_SNIPPET) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


@dataclass(frozen=True)
class Reply:
    body: dict[str, Any]
    attempts: int


class OpenAIClient:
    """One per evaluation: one connection pool, one semaphore bounding in-flight requests, one jitter stream."""

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        concurrency: int = 16,
        timeout_s: float = 120.0,
        connect_timeout_s: float = 10.0,
        policy: RetryPolicy | None = None,
    ) -> None:
        if concurrency < 1:
            raise Day0Error(FailureClass.USER_CONFIG_ERROR, f"concurrency must be >= 1, got {concurrency}")
        base = endpoint.url.rstrip("/")
        self.base_url = base.removesuffix("/v1")  # the contract is "without /v1"; tolerate the common slip
        self.endpoint = endpoint
        self.policy = policy or RetryPolicy()
        self._timeout = httpx.Timeout(timeout_s, connect=min(connect_timeout_s, timeout_s))
        self._limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self._sem = asyncio.Semaphore(concurrency)
        self._rng = random.Random(self.policy.seed)
        self._http: httpx.AsyncClient | None = None
        self.requests_sent = 0
        self.retries = 0
        # None until learnt: whether the server accepts max_tokens=0 for echo scoring
        self.zero_max_tokens_ok: bool | None = None
        self._probe = asyncio.Lock()

    async def __aenter__(self) -> Self:
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=self.endpoint.headers(), timeout=self._timeout, limits=self._limits,
            transport=transport_for(self.base_url, self._limits.max_connections or 1),
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def post(self, path: str, payload: dict[str, Any]) -> Reply:
        """POST with retries; returns the JSON object or raises Day0Error(INFRA_TRANSIENT | EVAL_JUDGE_FAILED)."""
        if self._http is None:
            raise RuntimeError("OpenAIClient used outside 'async with'")
        body = {"model": self.endpoint.model, **payload}
        where = f"POST {path}"
        attempts = 0
        while True:
            attempts += 1
            retry_after: float | None = None
            try:
                async with self._sem:
                    self.requests_sent += 1
                    resp = await self._http.post(path, json=body)
            except httpx.TimeoutException as exc:
                why = f"timed out ({type(exc).__name__})"
            except httpx.TransportError as exc:
                why = f"connection error ({type(exc).__name__}: {_one_line(str(exc), 80)})"
            else:
                if resp.status_code < 400:
                    return Reply(self._parse(where, resp, self._redact), attempts)
                snippet = _one_line(self._redact(resp.text))
                if resp.status_code not in TRANSIENT_STATUS:
                    raise Day0Error(
                        FailureClass.EVAL_JUDGE_FAILED,
                        f"{where}: HTTP {resp.status_code}: {snippet}",
                        status=resp.status_code,
                        attempts=attempts,
                    )
                why = f"HTTP {resp.status_code}: {snippet}"
                # 429 is the documented case; a 503 that says when to come back is honoured too
                retry_after = parse_retry_after(resp.headers.get("retry-after"))
            if attempts > self.policy.max_retries:
                raise Day0Error(
                    FailureClass.INFRA_TRANSIENT, f"{where}: {why} after {attempts} attempts", attempts=attempts
                )
            self.retries += 1
            await asyncio.sleep(backoff_delay(self.policy, attempts - 1, self._rng, retry_after))

    def _redact(self, text: str) -> str:
        """Servers echo a rejected key in their error body ("Incorrect API key provided: ..."); our message
        goes to JUnit and public CI summaries, so the key is cut out of anything we quote."""
        key = self.endpoint.api_key.get_secret_value() if self.endpoint.api_key else ""
        return text.replace(key, "**********") if key else text

    @staticmethod
    def _parse(where: str, resp: httpx.Response, redact: Callable[[str], str] = str) -> dict[str, Any]:
        try:
            data = resp.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise Day0Error(
                FailureClass.EVAL_JUDGE_FAILED,
                f"malformed response from {where}: not JSON: {_one_line(redact(resp.text))}",
            ) from None
        if not isinstance(data, dict):
            raise Day0Error(FailureClass.EVAL_JUDGE_FAILED, f"malformed response from {where}: not a JSON object")
        return data

    # ------------------------------------------------------------ the three request shapes the scorer needs

    async def echo_logprobs(self, prompt: str, top_k: int = 1) -> tuple[Reply, int]:
        """Score ``prompt`` without generating (lm-eval loglikelihood; with ``top_k`` alternatives per position, the
        divergence pre-check). Returns the reply and the max_tokens used: max_tokens=0 first, and 1 for the rest of
        the evaluation once a server rejects 0 (vLLM does)."""
        payload: dict[str, Any] = {"prompt": prompt, "echo": True, "logprobs": top_k, "temperature": 0.0}
        if self.zero_max_tokens_ok is None:
            async with self._probe:  # one probe decides for all: 300 samples must not each learn it by a 400
                if self.zero_max_tokens_ok is None:
                    return await self._echo_probe(payload)
        if self.zero_max_tokens_ok:
            return await self.post("/v1/completions", {**payload, "max_tokens": 0}), 0
        return await self.post("/v1/completions", {**payload, "max_tokens": 1}), 1

    async def _echo_probe(self, payload: dict[str, Any]) -> tuple[Reply, int]:
        try:
            reply = await self.post("/v1/completions", {**payload, "max_tokens": 0})
        except Day0Error as exc:
            if exc.detail.get("status") not in (400, 422):
                raise  # a transient failure teaches nothing; the next request probes again
            self.zero_max_tokens_ok = False
            return await self.post("/v1/completions", {**payload, "max_tokens": 1}), 1
        self.zero_max_tokens_ok = True
        return reply, 0

    async def complete(self, prompt: str, max_tokens: int, stop: tuple[str, ...]) -> Reply:
        payload: dict[str, Any] = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
        if stop:
            payload["stop"] = list(stop)
        return await self.post("/v1/completions", payload)

    async def chat(self, prompt: str, max_tokens: int, stop: tuple[str, ...]) -> Reply:
        payload: dict[str, Any] = {
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0.0,
        }
        if stop:
            payload["stop"] = list(stop)
        return await self.post("/v1/chat/completions", payload)
