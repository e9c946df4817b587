"""An async OpenAI-API client for scoring: bounded concurrency, and retries that tell transient from fatal.

Why our own and not ``openai``: the failure class of every error is the product here. A 5xx, 429, timeout or
dropped connection is INFRA_TRANSIENT (retried with seeded, jittered backoff); any other 4xx, a bad key, or a
body that is not the OpenAI shape is EVAL_JUDGE_FAILED and is not retried, because re-sending cannot fix it.

HTTP: aiohttp directly, one ``ClientSession`` per evaluation (the connection pool sized to the concurrency,
keep-alive). The scorer sends tens of thousands of small POSTs, and every layer above the socket is paid per
request: httpx's Request/Response objects on aiohttp's pool (``httpx-aiohttp``) cost 1.6-1.7x bare aiohttp's
client CPU per request; used directly, this client costs what aiohttp does (bench/RESULTS.md). httpx stays the
project's client everywhere else (health polls, downloads).
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
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Self

import aiohttp
from yarl import URL

from pytest_day0 import __version__
from pytest_day0.failures import Day0Error, FailureClass
from pytest_day0.serving.endpoint import Endpoint

TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
BODY_SNIPPET = 160
KEEPALIVE_S = 5.0  # an idle connection is closed after this, as httpx's pool does
# built once: json.dumps with any non-default argument builds a new encoder on every call
_ENCODE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


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


def transport_failure_kind(exc: aiohttp.ClientError) -> str:
    """What an aiohttp failure is, by its most specific class, in httpx's words (the scorer's messages have always
    named failures so: "timed out (ReadTimeout)", "connection error (ConnectError: ...)"). A refused port is no
    timeout and a hang-up is no connect error: the retry policy and the reader of the message both rely on the name."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return "ConnectTimeout"
    if isinstance(exc, aiohttp.ServerTimeoutError):
        return "ReadTimeout"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "ConnectError"
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError | aiohttp.ClientResponseError):
        return "RemoteProtocolError"
    if isinstance(exc, aiohttp.InvalidURL | aiohttp.NonHttpUrlClientError):
        return "UnsupportedProtocol"
    return "ReadError"  # any other failure while sending or reading


class TransportFailure(Exception):
    """A request that got no HTTP answer at all; ``kind`` is ``transport_failure_kind``'s name for it."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail

    @property
    def timed_out(self) -> bool:
        return self.kind.endswith("Timeout")


@dataclass(frozen=True, slots=True)
class Answer:
    """An HTTP answer, body read whole; Retry-After kept only where it matters (an error status)."""

    status: int
    body: bytes
    retry_after: str | None = None


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """httpx's certificate store (certifi, or SSL_CERT_FILE/SSL_CERT_DIR), loaded once per process: 70 ms a time,
    and only for an https endpoint (httpx is imported for it then, not on every scorer start)."""
    import httpx

    return httpx.create_ssl_context()


def environment_proxy(url: str) -> URL | None:
    """The proxy HTTP(S)_PROXY / ALL_PROXY name for ``url``, unless NO_PROXY exempts it: read once per client, as
    httpx's client reads them. Not aiohttp's ``trust_env``: it looks them (and ~/.netrc) up on a worker thread for
    every request, two thread hand-offs per request (a third of the scorer's CPU in a profile). Credentials stay in
    the URL, where aiohttp takes them for Proxy-Authorization; the URL is never put into a message."""
    target = urllib.parse.urlsplit(url)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(target.scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass(target.hostname or ""):
        return None
    try:
        parsed = URL(proxy)
    except ValueError:
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
        scheme = proxy.split("://", 1)[0]  # never the rest: it may carry a password
        raise Day0Error(FailureClass.USER_CONFIG_ERROR,
                        f"the environment's proxy for {target.scheme} ({scheme}://...) is not an http(s) proxy URL; "
                        "fix HTTP_PROXY/HTTPS_PROXY/ALL_PROXY or exempt the endpoint with NO_PROXY")
    return parsed


class ScorerHTTP:
    """One aiohttp session for one base URL: at most ``max_connections`` sockets, kept alive between requests;
    TLS verified against ``verify`` (default: httpx's store); the environment's proxy, if any.

    ``post`` reads the whole body inside the request, so every failure, the body's included, arrives as a
    ``TransportFailure``, and a request cancelled or failed half-way closes its socket (aiohttp never returns
    a connection with unread bytes to the pool)."""

    def __init__(self, base_url: str, max_connections: int, *, timeout_s: float = 120.0,
                 connect_timeout_s: float = 10.0, headers: dict[str, str] | None = None,
                 verify: ssl.SSLContext | None = None) -> None:
        self.base_url = base_url
        self._urls: dict[str, URL] = {}
        proxy = environment_proxy(base_url)
        self._proxy: dict[str, Any] = {"proxy": proxy} if proxy else {}
        # aiohttp names the proxy's URL, credentials included, in its errors (a refused CONNECT): cut them out
        secrets = (proxy.raw_user, proxy.raw_password, proxy.user, proxy.password) if proxy else ()
        self._secrets = sorted({s for s in secrets if s}, key=len, reverse=True)
        tls: ssl.SSLContext | bool = True  # aiohttp's own default; never used for plain http
        if verify is not None or base_url.startswith("https:") or (proxy and proxy.scheme == "https"):
            tls = verify or _tls_context()
        connector = aiohttp.TCPConnector(limit=max_connections, ssl=tls, keepalive_timeout=KEEPALIVE_S)
        # connect: waiting for a pooled socket plus connecting; sock_connect: the TCP/TLS connect alone;
        # sock_read: silence between two reads (what httpx calls its read timeout); no total: a long generation
        # that streams nothing until done is bounded by sock_read alone, as before
        timeout = aiohttp.ClientTimeout(total=None, connect=timeout_s, sock_connect=min(connect_timeout_s, timeout_s),
                                        sock_read=timeout_s)
        self._session = aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers,
                                              trust_env=False, raise_for_status=False)

    def url(self, path: str) -> URL:
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = URL(self.base_url + path)
        return url

    async def post(self, path: str, content: bytes) -> Answer:
        url = self._urls.get(path) or self.url(path)
        try:
            async with self._session.post(url, data=content, allow_redirects=False, **self._proxy) as resp:
                body = await resp.read()
                status = resp.status
                return Answer(status, body, resp.headers.get("Retry-After") if status >= 400 else None)
        except aiohttp.ClientError as exc:
            detail = str(exc) or type(exc).__name__
            for secret in self._secrets:
                detail = detail.replace(secret, "**********")
            raise TransportFailure(transport_failure_kind(exc), detail) from None

    async def aclose(self) -> None:
        await self._session.close()


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
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._sem = asyncio.Semaphore(concurrency)
        self._rng = random.Random(self.policy.seed)
        self._http: ScorerHTTP | None = None
        self.requests_sent = 0
        self.retries = 0
        # None until learnt: whether the server accepts max_tokens=0 for echo scoring
        self.zero_max_tokens_ok: bool | None = None
        self._probe = asyncio.Lock()

    def _headers(self) -> dict[str, str]:
        return {"Accept": "application/json", "Accept-Encoding": "gzip, deflate", "Content-Type": "application/json",
                "User-Agent": f"pytest-day0/{__version__}", **self.endpoint.headers()}

    async def __aenter__(self) -> Self:
        self._http = ScorerHTTP(self.base_url, self.concurrency, timeout_s=self.timeout_s,
                                connect_timeout_s=self.connect_timeout_s, headers=self._headers())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def post(self, path: str, payload: dict[str, Any]) -> Reply:
        """POST with retries; returns the JSON object or raises Day0Error(INFRA_TRANSIENT | EVAL_JUDGE_FAILED)."""
        http = self._http
        if http is None:
            raise RuntimeError("OpenAIClient used outside 'async with'")
        content = _ENCODE({"model": self.endpoint.model, **payload}).encode()
        where = f"POST {path}"
        attempts = 0
        while True:
            attempts += 1
            retry_after: float | None = None
            try:
                async with self._sem:
                    self.requests_sent += 1
                    answer = await http.post(path, content)
            except TransportFailure as exc:
                if exc.timed_out:
                    why = f"timed out ({exc.kind})"
                else:
                    why = f"connection error ({exc.kind}: {_one_line(exc.detail, 80)})"
            else:
                status = answer.status
                if status < 400:
                    return Reply(self._parse(where, answer.body, self._redact), attempts)
                snippet = _one_line(self._redact(answer.body.decode("utf-8", "replace")))
                if status not in TRANSIENT_STATUS:
                    raise Day0Error(
                        FailureClass.EVAL_JUDGE_FAILED,
                        f"{where}: HTTP {status}: {snippet}",
                        status=status,
                        attempts=attempts,
                    )
                why = f"HTTP {status}: {snippet}"
                # 429 is the documented case; a 503 that says when to come back is honoured too
                retry_after = parse_retry_after(answer.retry_after)
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
    def _parse(where: str, body: bytes, redact: Callable[[str], str] = str) -> dict[str, Any]:
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise Day0Error(
                FailureClass.EVAL_JUDGE_FAILED,
                f"malformed response from {where}: not JSON: {_one_line(redact(body.decode('utf-8', 'replace')))}",
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
