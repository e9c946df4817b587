"""A lean HTTP/1.1 transport for httpx: h11 over asyncio streams, with a keep-alive pool.

Why: the scorer sends tens of thousands of small POSTs, and httpx's default stack (httpcore's pool over anyio)
costs ~1.5 ms of client CPU per request on this class of machine, which caps a scorer at ~600 requests/s per
core — below what a batching server answers. h11 (httpx's own HTTP/1.1 parser) driven directly costs ~0.3 ms
(bench/bench_scorer_vs_lm_eval.py). httpx stays the API: retries, timeouts and errors keep their httpx types,
so the client's retry policy sees exactly what it saw before.

Plain ``http://`` only; ``OpenAIClient`` keeps httpx's default transport for ``https://`` (TLS, certificates)
and environment proxies still apply through httpx's own mounts.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import h11
import httpx

READ_CHUNK = 1 << 16


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.state = h11.Connection(h11.CLIENT)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()

    def reusable(self) -> bool:
        # a server that closed an idle keep-alive connection leaves EOF in the buffer: do not send into it
        return not self.reader.at_eof() and not self.writer.is_closing()


class H11Transport(httpx.AsyncBaseTransport):
    """At most ``max_connections`` requests in flight; idle connections are kept per (host, port)."""

    def __init__(self, max_connections: int = 16) -> None:
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: dict[tuple[str, int], list[_Connection]] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.scheme != "http":
            raise httpx.UnsupportedProtocol(f"H11Transport speaks plain http only, not {request.url.scheme!r}")
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        key = (request.url.host, request.url.port or 80)
        body = await request.aread()
        async with self._slots:
            idle = self._idle.setdefault(key, [])
            conn = None
            while idle and conn is None:
                conn = idle.pop()
                if not conn.reusable():  # as httpcore does: no request is sent into a closed keep-alive socket
                    conn.close()
                    conn = None
            if conn is None:
                conn = await self._connect(key, timeouts.get("connect"))
            # No silent re-send: a server that drops a request is the caller's retry policy to count, as with httpx.
            return await self._exchange(conn, request, body, timeouts, key)

    async def _connect(self, key: tuple[str, int], timeout: float | None) -> _Connection:
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(*key, limit=READ_CHUNK)
        except TimeoutError:
            raise httpx.ConnectTimeout(f"connect to {key[0]}:{key[1]} timed out") from None
        except OSError as exc:
            raise httpx.ConnectError(str(exc) or type(exc).__name__) from None
        return _Connection(reader, writer)

    async def _exchange(self, conn: _Connection, request: httpx.Request, body: bytes,
                        timeouts: dict[str, float | None], key: tuple[str, int]) -> httpx.Response:
        try:
            headers = list(request.headers.raw)
            out = conn.state.send(h11.Request(method=request.method, target=request.url.raw_path, headers=headers))
            out = (out or b"") + (conn.state.send(h11.Data(data=body)) or b"" if body else b"")
            out += conn.state.send(h11.EndOfMessage()) or b""
            try:
                async with asyncio.timeout(timeouts.get("write")):
                    conn.writer.write(out)
                    await conn.writer.drain()
            except TimeoutError:
                raise httpx.WriteTimeout("write timed out") from None
            head: h11.Response | None = None
            chunks: list[bytes] = []
            while True:
                event = conn.state.next_event()
                if event is h11.NEED_DATA:
                    try:
                        async with asyncio.timeout(timeouts.get("read")):
                            data = await conn.reader.read(READ_CHUNK)
                    except TimeoutError:
                        raise httpx.ReadTimeout("read timed out") from None
                    conn.state.receive_data(data)
                elif isinstance(event, h11.Response):
                    head = event
                elif isinstance(event, h11.Data):
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    raise httpx.RemoteProtocolError("server closed the connection mid-response")
                # InformationalResponse (100 Continue) needs nothing from us
        except (OSError, h11.ProtocolError) as exc:
            conn.close()
            kind = httpx.RemoteProtocolError if isinstance(exc, h11.ProtocolError) else httpx.ReadError
            raise kind(str(exc) or type(exc).__name__) from None
        except BaseException:  # timeouts, cancellation: the connection's state is unknown
            conn.close()
            raise
        assert head is not None  # h11 yields the response head before any data or end of message
        if conn.state.our_state is h11.DONE and conn.state.their_state is h11.DONE:
            conn.state.start_next_cycle()
            self._idle.setdefault(key, []).append(conn)
        else:
            conn.close()
        return httpx.Response(head.status_code, headers=list(head.headers), content=b"".join(chunks),
                              extensions={"http_version": b"HTTP/1.1", "reason_phrase": head.reason})

    async def aclose(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()


def transport_for(url: str, max_connections: int) -> Any:
    """The lean transport for plain http, None (httpx's default, with TLS) for anything else."""
    return H11Transport(max_connections) if httpx.URL(url).scheme == "http" else None
