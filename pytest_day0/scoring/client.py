"""An async OpenAI-API client for scoring: bounded concurrency, and retries that tell transient from fatal.

Why our own and not ``openai``: the failure class of every error is the product here. A 5xx, 429, timeout or
dropped connection is INFRA_TRANSIENT (retried with seeded, jittered backoff); any other 4xx, a bad key, or a
body that is not the OpenAI shape is EVAL_JUDGE_FAILED and is not retried, because re-sending cannot fix it.

HTTP: httpx's requests, responses, timeouts and errors on aiohttp's connection pool (``httpx-aiohttp``), sent
straight to the transport. The scorer sends tens of thousands of small POSTs; httpx's default httpcore + anyio
stack costs ~4x the client CPU per request of this one, and ``AsyncClient``'s per-request work the scorer does not
use (URL merging, cookie jar, auth and redirect flows) costs as much again as the transport (bench/RESULTS.md).
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import json
import math
import random
import ssl
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Self

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

from pytest_day0 import __version__
from pytest_day0.failures import Day0Error, FailureClass
from pytest_day0.serving.endpoint import Endpoint

TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
BODY_SNIPPET = 160
KEEPALIVE_S = 5.0  # an idle connection is closed after this, as httpx's pool does


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


def httpx_error_for(exc: BaseException) -> type[httpx.TransportError] | None:
    """httpx's name for an aiohttp failure, by its most specific class; None for anything not aiohttp's.

    httpx-aiohttp 0.2.0 maps by the first matching base class, so a refused port and a server that hangs up
    both arrive as ``ConnectTimeout`` (a timeout that never happened), and a malformed status line escapes as
    aiohttp's own ``ClientResponseError``, which no httpx handler catches."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout
    if isinstance(exc, aiohttp.ServerTimeoutError):
        return httpx.ReadTimeout
    if isinstance(exc, aiohttp.ClientConnectorError):
        return httpx.ConnectError
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError | aiohttp.ClientResponseError):
        return httpx.RemoteProtocolError
    if isinstance(exc, aiohttp.InvalidURL | aiohttp.NonHttpUrlClientError):
        return httpx.UnsupportedProtocol
    if isinstance(exc, aiohttp.ClientError):
        return httpx.ReadError
    return None


class ScorerTransport(AiohttpTransport):
    """httpx-aiohttp's transport, reading the whole body inside it so that every aiohttp failure, the body's
    included, reaches the retry policy as the httpx error it names (``httpx_error_for``)."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            response = await super().handle_async_request(request)
            try:
                await response.aread()
            except BaseException:  # cancelled or failed mid-body: aiohttp closes a half-read connection
                await response.aclose()
                raise
        except (httpx.TransportError, aiohttp.ClientError) as exc:
            cause = exc.__cause__ if isinstance(exc, httpx.TransportError) else exc
            kind = httpx_error_for(cause) if cause is not None else None
            if kind is None:
                raise
            raise kind(str(cause) or type(cause).__name__, request=request) from cause
        return response


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """httpx's certificate store (certifi, or SSL_CERT_FILE/SSL_CERT_DIR), loaded once per process: 70 ms a time."""
    return httpx.create_ssl_context()


def environment_proxy(url: str) -> httpx.Proxy | None:
    """The proxy HTTP(S)_PROXY / ALL_PROXY name for ``url``, unless NO_PROXY exempts it: read once per client, as
    httpx's client reads them. Not aiohttp's ``trust_env``: it looks them (and ~/.netrc) up on a worker thread for
    every request, two thread hand-offs per request (a third of the scorer's CPU in a profile)."""
    target = httpx.URL(url)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(target.scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass(target.host):
        return None
    return httpx.Proxy(proxy)


def scorer_transport(url: str, max_connections: int, verify: ssl.SSLContext | None = None) -> ScorerTransport:
    """For requests to ``url``: at most ``max_connections`` sockets, kept alive between requests; TLS verified
    against ``verify`` (default: httpx's store); the environment's proxy for ``url``, if any."""
    tls = verify or _tls_context()

    def session() -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(limit=max_connections, ssl=tls, keepalive_timeout=KEEPALIVE_S)
        return aiohttp.ClientSession(connector=connector)

    return ScorerTransport(verify=tls, client=session, proxy=environment_proxy(url))


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
        self.concurrency = concurrency
        timeout = httpx.Timeout(timeout_s, connect=min(connect_timeout_s, timeout_s))
        self._extensions = {"timeout": timeout.as_dict()}
        self._headers = httpx.Headers({"accept": "application/json", "accept-encoding": "gzip, deflate",
                                       "content-type": "application/json", "user-agent": f"pytest-day0/{__version__}",
                                       **endpoint.headers()})
        self._urls: dict[str, httpx.URL] = {}
        self._sem = asyncio.Semaphore(concurrency)
        self._rng = random.Random(self.policy.seed)
        self._http: ScorerTransport | None = None
        self.requests_sent = 0
        self.retries = 0
        # None until learnt: whether the server accepts max_tokens=0 for echo scoring
        self.zero_max_tokens_ok: bool | None = None
        self._probe = asyncio.Lock()

    async def __aenter__(self) -> Self:
        self._http = scorer_transport(self.base_url, self.concurrency)
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
                    resp = await self._http.handle_async_request(self._request(path, body))
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

    def _request(self, path: str, body: dict[str, Any]) -> httpx.Request:
        """What ``AsyncClient.post(path, json=body)`` builds, less its merging: the URL of each path parsed once."""
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = httpx.URL(self.base_url + path)
        content = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
        return httpx.Request("POST", url, headers=self._headers, content=content, extensions=self._extensions)

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
