"""A real HTTP server on 127.0.0.1 that speaks the OpenAI completions API over a deterministic toy model.

Not a mock: the scorer talks to it through sockets, so retries, timeouts and dropped connections are the
real thing. The "model" is char-level with a BOS token: the log-probability of a char depends only on the
previous char (``toy_distribution``), so a test can recompute every expected number independently.
Generation comes from an oracle function of the prompt, so exact-match outcomes are chosen by the test.
Fault modes are switched on the live server through ``server.faults``.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

VOCAB = [chr(c) for c in range(32, 127)] + ["\n"]
BOS = "<bos>"


def toy_distribution(prev: str) -> dict[str, float]:
    """log_softmax over VOCAB of a fixed logit table indexed by (previous char, char)."""
    p = 1 if prev == BOS else ord(prev[-1])
    logits = {c: ((p * 7 + ord(c) * 13) % 23) / 4.0 for c in VOCAB}
    z = math.log(sum(math.exp(v) for v in logits.values()))
    return {c: v - z for c, v in logits.items()}


def toy_logprob(prev: str, char: str) -> float:
    return toy_distribution(prev)[char]


def toy_argmax(prev: str) -> str:
    dist = toy_distribution(prev)
    return max(VOCAB, key=lambda c: dist[c])


def expected_continuation_logprob(context: str, continuation: str) -> float:
    """What a correct scorer must report: the sum over the continuation chars only."""
    text = context + continuation
    total = 0.0
    for i in range(len(context), len(text)):
        prev = text[i - 1] if i > 0 else BOS
        total += toy_logprob(prev, text[i])
    return total


def addition_oracle(prompt: str) -> str:
    """'a+b=' -> the sum then junk after a newline, so only a honoured stop gives an exact match."""
    head = prompt.rstrip("=").split("+")
    try:
        return f"{int(head[0]) + int(head[1])}\nextra tokens"
    except (ValueError, IndexError):
        return "?\n"


@dataclass
class Faults:
    fail_first: int = 0  # the first k requests get HTTP 500
    rate_limit_first: int = 0  # the next k get 429 with Retry-After
    retry_after: str = "0"
    close_first: int = 0  # the next k: connection closed without a response
    status_always: int | None = None  # every request gets this status (e.g. 401)
    invalid_json: bool = False
    slow_s: float = 0.0  # sleep before answering (client timeouts)
    logprobs_mode: str = "ok"  # ok | missing | null | truncated | no_echo
    reject_zero_max_tokens: bool = False  # like vLLM: max_tokens must be >= 1
    bos_text: str = BOS  # the BOS token's text: "<bos>" shifts text_offset like vLLM, "" is zero-width
    ignore_stop: bool = False


@dataclass
class ServerState:
    faults: Faults = field(default_factory=Faults)
    oracle: Callable[[str], str] = addition_oracle
    requests: list[dict[str, Any]] = field(default_factory=list)
    models: list[str] = field(default_factory=lambda: ["toy"])  # what GET /v1/models lists
    statuses: list[int] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    counter: int = 0  # requests seen, for the "first k" fault modes

    def reset_counts(self) -> None:
        with self.lock:
            self.requests.clear()
            self.statuses.clear()
            self.counter = 0
            self.max_in_flight = 0


def _completion_logprobs(prompt: str, max_tokens: int, faults: Faults) -> tuple[dict[str, Any] | None, str, int]:
    """The echo=true logprobs object as a vLLM-like server builds it, plus generated text and token count."""
    gen = ""
    prev = prompt[-1] if prompt else BOS
    for _ in range(max_tokens):
        nxt = toy_argmax(prev)
        gen += nxt
        prev = nxt
    tokens = [faults.bos_text, *prompt, *gen]
    offsets: list[int] = []
    pos = 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    lps: list[float | None] = [None]
    tops: list[dict[str, float] | None] = [None]
    seq = [BOS, *prompt, *gen]
    for i in range(1, len(seq)):
        dist = toy_distribution(seq[i - 1])
        best = max(VOCAB, key=lambda c: dist[c])
        lps.append(dist[seq[i]])
        tops.append({seq[i]: dist[seq[i]], best: dist[best]})
    mode = faults.logprobs_mode
    if mode == "missing":
        return None, gen, len(gen)
    if mode == "null":
        lps = [None] * len(lps)
    if mode == "truncated":  # only the last 2 prompt tokens come back
        keep = 2 + len(gen)
        tokens, offsets, lps, tops = tokens[-keep:], offsets[-keep:], lps[-keep:], tops[-keep:]
    if mode == "no_echo":  # echo ignored: only the generated tokens
        n = len(gen)
        tokens, offsets, lps, tops = tokens[len(tokens) - n :], offsets[len(offsets) - n :], lps[-n:] if n else [], []
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}, gen, len(gen)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out as separate writes; Nagle would add 40 ms each
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.server.state.statuses.append(status)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            models = self.server.state.models
            self._json(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in models]})
        elif self.path == "/health":  # as vLLM answers it
            self._send(200, b"")
        else:
            self._json(404, {"error": {"message": "not found"}})

    def do_POST(self) -> None:
        state = self.server.state
        length = int(self.headers.get("Content-Length", "0"))
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw)
        except json.JSONDecodeError:
            self._json(400, {"error": {"message": "bad json"}})
            return
        with state.lock:
            state.counter += 1
            n = state.counter
            state.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
            state.in_flight += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)
        try:
            self._answer(state, n, body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout test); nothing to answer
        finally:
            with state.lock:
                state.in_flight -= 1

    def _answer(self, state: ServerState, n: int, body: dict[str, Any]) -> None:
        f = state.faults
        if f.slow_s:
            time.sleep(f.slow_s)
        if f.status_always is not None:
            self._json(f.status_always, {"error": {"message": f"status {f.status_always} by fault mode"}})
            return
        if n <= f.fail_first:
            self._json(500, {"error": {"message": "internal error (fault mode)"}})
            return
        if n <= f.fail_first + f.rate_limit_first:
            self._json(429, {"error": {"message": "rate limited"}}, {"Retry-After": f.retry_after})
            return
        if n <= f.fail_first + f.rate_limit_first + f.close_first:
            self.close_connection = True
            self.server.state.statuses.append(0)
            return  # no response at all: the client sees the connection drop
        if f.invalid_json:
            self._send(200, b'{"choices": [ this is not json')
            return
        if self.path == "/v1/completions":
            self._completions(body)
        elif self.path == "/v1/chat/completions":
            self._chat(body)
        else:
            self._json(404, {"error": {"message": "not found"}})

    def _generate(self, prompt: str, body: dict[str, Any]) -> tuple[str, str]:
        f = self.server.state.faults
        text = self.server.state.oracle(prompt)
        finish = "length"
        stops = body.get("stop") or []
        if isinstance(stops, str):
            stops = [stops]
        if not f.ignore_stop:
            cuts = [text.find(s) for s in stops if s and s in text]
            if cuts:
                text, finish = text[: min(cuts)], "stop"
        max_tokens = int(body.get("max_tokens", 16))
        if len(text) > max_tokens:
            text, finish = text[:max_tokens], "length"
        return text, finish

    def _completions(self, body: dict[str, Any]) -> None:
        f = self.server.state.faults
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            self._json(400, {"error": {"message": "prompt must be a string"}})
            return
        max_tokens = body.get("max_tokens", 16)
        if not isinstance(max_tokens, int) or max_tokens < 0 or (max_tokens == 0 and f.reject_zero_max_tokens):
            self._json(400, {"error": {"message": "max_tokens must be at least 1, got 0."}})
            return
        if body.get("echo") and body.get("logprobs") is not None:
            logprobs, gen, n_gen = _completion_logprobs(prompt, max_tokens, f)
            choice = {"index": 0, "text": prompt + gen, "logprobs": logprobs, "finish_reason": "length"}
            usage = {"prompt_tokens": len(prompt) + 1, "completion_tokens": n_gen}
        else:
            text, finish = self._generate(prompt, body)
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            usage = {"prompt_tokens": len(prompt) + 1, "completion_tokens": len(text)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        self._json(200, {"id": "cmpl-toy", "object": "text_completion", "model": body.get("model"),
                         "choices": [choice], "usage": usage})

    def _chat(self, body: dict[str, Any]) -> None:
        messages = body.get("messages") or []
        prompt = "".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
        text, finish = self._generate(prompt, body)
        usage = {"prompt_tokens": len(prompt) + 1, "completion_tokens": len(text)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        self._json(200, {"id": "chat-toy", "object": "chat.completion", "model": body.get("model"),
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                      "finish_reason": finish}], "usage": usage})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: ServerState

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # dropped connections are part of the fault modes; keep test output clean


class ToyOpenAIServer:
    """``with ToyOpenAIServer() as srv: srv.url`` — a live server on an ephemeral 127.0.0.1 port."""

    def __init__(self, oracle: Callable[[str], str] = addition_oracle) -> None:
        self.state = ServerState(oracle=oracle)
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.state = self.state
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, name="toy-openai", daemon=True
        )

    @property
    def faults(self) -> Faults:
        return self.state.faults

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def request_count(self, path: str | None = None) -> int:
        with self.state.lock:
            return sum(1 for r in self.state.requests if path is None or r["path"] == path)

    def __enter__(self) -> ToyOpenAIServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
