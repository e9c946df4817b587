"""The scorer's HTTP layer (aiohttp directly, ``ScorerHTTP``) against real sockets on 127.0.0.1.

It replaced httpx on aiohttp (half the client CPU per request), so it must keep what the retry policy relies
on: failures named for what happened (a hang-up is no timeout), keep-alive reuse without sending into a closed
socket, bodies of either framing, connections in an unknown state never reused, verified TLS, the environment's
proxy, and no socket left open once the client is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from pytest_day0.failures import Day0Error, FailureClass
from pytest_day0.scoring.client import OpenAIClient, RetryPolicy, ScorerHTTP, TransportFailure, transport_failure_kind
from pytest_day0.serving.endpoint import Endpoint

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]
BODY = json.dumps({"ok": True, "text": "é" * 100}).encode()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return await reader.readexactly(length)


def response(body: bytes = BODY, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n" % (
        len(body), extra) + body


class Server:
    """A raw asyncio HTTP server whose behaviour per connection is the test's handler; counts connections."""

    def __init__(self, handler: Handler, tls: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.tls = tls
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(reader, writer, self.connections)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(on_connect, "127.0.0.1", 0, ssl=self.tls)
        port = self.server.sockets[0].getsockname()[1]
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


async def keep_alive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
    while True:
        await read_request(reader)
        writer.write(response())
        await writer.drain()


@contextlib.asynccontextmanager
async def client(url: str, timeout: float = 5.0, connections: int = 4, verify: ssl.SSLContext | None = None
                 ) -> AsyncIterator[ScorerHTTP]:
    http = ScorerHTTP(url, connections, timeout_s=timeout, verify=verify)
    try:
        yield http
    finally:
        await http.aclose()


async def post_json(http: ScorerHTTP, path: str = "/v1/completions", body: object = None) -> object:
    answer = await http.post(path, json.dumps(body or {}).encode())
    assert answer.status == 200
    return json.loads(answer.body)


def test_keep_alive_connections_are_reused_and_bounded() -> None:
    async def main() -> tuple[int, list[dict[str, object]]]:
        server = Server(keep_alive)
        async with server as url, client(url, connections=4) as http:
            replies = await asyncio.gather(*(post_json(http, body={"i": i}) for i in range(200)))
        return server.connections, list(replies)

    connections, bodies = asyncio.run(main())
    assert bodies == [json.loads(BODY)] * 200
    assert 1 <= connections <= 4  # 200 requests over at most max_connections sockets


def test_a_keep_alive_socket_the_server_closed_is_not_sent_into() -> None:
    async def close_after_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_request(reader)
        writer.write(response())  # no "connection: close": the client believes it may reuse the socket
        await writer.drain()

    async def main() -> tuple[int, list[int]]:
        server = Server(close_after_one)
        statuses = []
        async with server as url, client(url, connections=1) as http:
            for _ in range(3):
                statuses.append((await http.post("/x", b"{}")).status)
                await asyncio.sleep(0.1)  # the server's FIN arrives while the socket is idle
        return server.connections, statuses

    connections, statuses = asyncio.run(main())
    assert statuses == [200, 200, 200] and connections == 3


def test_chunked_body_and_connection_close_are_read_whole() -> None:
    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_request(reader)
        parts = [BODY[:10], BODY[10:57], BODY[57:]]
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n")
        for part in parts:
            writer.write(b"%x\r\n%s\r\n" % (len(part), part))
            await writer.drain()
            await asyncio.sleep(0.01)
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async def main() -> list[object]:
        server = Server(chunked)
        async with server as url, client(url) as http:
            return [await post_json(http, "/") for _ in range(2)]

    assert asyncio.run(main()) == [json.loads(BODY)] * 2


async def misbehave(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, behaviour: str) -> None:
    await read_request(reader)
    if behaviour == "silent":
        await asyncio.sleep(5)
    elif behaviour == "close-mid-body":
        writer.write(response()[:-20])
        await writer.drain()
    elif behaviour == "garbage":
        writer.write(b"SPDY/9 what\r\n\r\n")
        await writer.drain()


FAULTS = [
    ("silent", "ReadTimeout"),
    ("close-before-reply", "RemoteProtocolError"),
    ("close-mid-body", "RemoteProtocolError"),
    ("garbage", "RemoteProtocolError"),
]


@pytest.mark.parametrize(("behaviour", "error"), FAULTS)
def test_server_faults_are_named_for_what_happened(behaviour: str, error: str) -> None:
    async def main() -> None:
        handler: Handler = lambda r, w, _: misbehave(r, w, behaviour)  # noqa: E731
        async with Server(handler) as url, client(url, timeout=0.3) as http:
            await http.post("/v1/completions", b"{}")

    with pytest.raises(TransportFailure) as caught:
        asyncio.run(main())
    assert caught.value.kind == error  # a hang-up that arrived as ConnectTimeout would be retried as a timeout
    assert caught.value.timed_out == (behaviour == "silent")


@pytest.mark.parametrize(("behaviour", "error"), FAULTS)
def test_each_fault_ends_as_an_infra_transient_line_after_the_retries(behaviour: str, error: str) -> None:
    async def main() -> None:
        handler: Handler = lambda r, w, _: misbehave(r, w, behaviour)  # noqa: E731
        async with Server(handler) as url:
            policy = RetryPolicy(max_retries=1, backoff_base_s=0.01)
            async with OpenAIClient(Endpoint(url=url, model="m"), timeout_s=0.3, policy=policy) as api:
                await api.post("/v1/completions", {})

    with pytest.raises(Day0Error) as caught:
        asyncio.run(main())
    assert caught.value.failure_class is FailureClass.INFRA_TRANSIENT
    message = str(caught.value)
    assert "\n" not in message and message.startswith("[INFRA_TRANSIENT] POST /v1/completions: ")
    assert f"({error}" in message and message.endswith("after 2 attempts")
    assert ("timed out" in message) == (behaviour == "silent")


def test_refused_port_is_a_connect_error() -> None:
    async def main() -> None:
        server = Server(keep_alive)
        async with server as url:
            pass  # closed: nothing listens there any more
        async with client(url) as http:
            await http.post("/", b"{}")

    with pytest.raises(TransportFailure) as caught:
        asyncio.run(main())
    assert caught.value.kind == "ConnectError" and not caught.value.timed_out


def test_a_cancelled_request_never_leaves_its_connection_for_reuse() -> None:
    async def slow_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            await read_request(reader)
            if n == 1:
                await asyncio.sleep(0.5)  # the client gives up on this one; a late reply must not be read later
            writer.write(response(json.dumps({"connection": n}).encode()))
            await writer.drain()

    async def main() -> tuple[object, int]:
        server = Server(slow_first)
        async with server as url, client(url, connections=1) as http:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(http.post("/", b"{}"), 0.1)
            reply = await post_json(http, "/")
        return reply, server.connections

    reply, connections = asyncio.run(main())
    assert reply == {"connection": 2} and connections == 2


def test_a_request_cancelled_mid_body_never_leaves_its_connection_for_reuse() -> None:
    async def stall_in_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            await read_request(reader)
            body = json.dumps({"connection": n}).encode()
            if n == 1:
                writer.write(response(body)[:-5])  # head and most of the body, then nothing
                await writer.drain()
                await asyncio.sleep(5)
            writer.write(response(body))
            await writer.drain()

    async def main() -> tuple[object, int]:
        server = Server(stall_in_body)
        async with server as url, client(url, connections=1) as http:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(http.post("/", b"{}"), 0.2)
            # with one connection allowed, a socket still held by the cancelled response would block this forever
            reply = await asyncio.wait_for(post_json(http, "/"), 3)
        return reply, server.connections

    reply, connections = asyncio.run(main())
    assert reply == {"connection": 2} and connections == 2


def self_signed(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context for 127.0.0.1 and a client context that trusts exactly that certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_pem = tmp_path / "cert.pem"
    key_pem = tmp_path / "key.pem"
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_pem, key_pem)
    return server, ssl.create_default_context(cafile=str(cert_pem))


def test_https_is_verified_against_the_certificate_store(tmp_path: Path) -> None:
    server_tls, trusting = self_signed(tmp_path)

    async def get(verify: ssl.SSLContext | None) -> object:
        async with Server(keep_alive, tls=server_tls) as url, client(url, verify=verify) as http:
            return await post_json(http)

    assert asyncio.run(get(trusting)) == json.loads(BODY)  # TLS through the same pool when the chain is trusted
    with pytest.raises(TransportFailure, match="CERTIFICATE_VERIFY_FAILED") as caught:
        asyncio.run(get(None))  # the default store (certifi) does not know a self-signed certificate
    assert caught.value.kind == "ConnectError"


def test_environment_proxies_still_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    """httpx's client honoured HTTP_PROXY / NO_PROXY; the scorer's HTTP layer does too."""
    seen: list[bytes] = []

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        seen.append(head.split(b"\r\n")[0])
        lines = head.split(b"\r\n")
        await reader.readexactly(next(int(h.split(b":")[1]) for h in lines if h.lower().startswith(b"content-length")))
        writer.write(response())
        await writer.drain()

    async def main(origin: str) -> object:
        async with Server(proxy) as proxy_url:
            monkeypatch.setenv("HTTP_PROXY", proxy_url)
            async with client(origin) as http:
                return await post_json(http)

    for name in ("NO_PROXY", "no_proxy", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    origin = "http://127.0.0.1:9"  # nothing listens there: only the proxy can answer
    assert asyncio.run(main(origin)) == json.loads(BODY)
    assert seen == [b"POST http://127.0.0.1:9/v1/completions HTTP/1.1"]
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    with pytest.raises(TransportFailure) as caught:
        asyncio.run(main(origin))  # bypassed: straight to the closed port
    assert caught.value.kind == "ConnectError"


def test_proxy_credentials_travel_as_a_header_and_a_bad_proxy_is_one_config_line(
        monkeypatch: pytest.MonkeyPatch) -> None:
    heads: list[bytes] = []

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        heads.append(head)
        length = next(int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length"))
        await reader.readexactly(length)
        writer.write(response())
        await writer.drain()

    async def main() -> object:
        async with Server(proxy) as proxy_url:
            monkeypatch.setenv("HTTP_PROXY", proxy_url.replace("://", "://user%40x:s3cret-pw@"))
            async with client("http://127.0.0.1:9") as http:
                return await post_json(http)

    for name in ("NO_PROXY", "no_proxy", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert asyncio.run(main()) == json.loads(BODY)
    assert len(heads) == 1 and heads[0].startswith(b"POST http://127.0.0.1:9/v1/completions HTTP/1.1")
    assert b"proxy-authorization: basic dxnlckb4onmzy3jldc1wdw==" in heads[0].lower()  # base64("user@x:s3cret-pw")

    monkeypatch.setenv("HTTP_PROXY", "socks5://user:s3cret-pw@127.0.0.1:1080")
    with pytest.raises(Day0Error) as caught:
        ScorerHTTP("http://127.0.0.1:9", 1)
    assert caught.value.failure_class is FailureClass.USER_CONFIG_ERROR
    assert "socks5://..." in str(caught.value) and "s3cret" not in str(caught.value) and "\n" not in str(caught.value)


def test_an_error_status_is_an_answer_with_its_retry_after() -> None:
    async def busy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        while True:
            await read_request(reader)
            body = b'{"error": "busy"}'
            writer.write(b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 7\r\ncontent-length: %d\r\n\r\n%s"
                         % (len(body), body))
            await writer.drain()

    async def main() -> tuple[int, bytes, str | None]:
        async with Server(busy) as url, client(url) as http:
            answer = await http.post("/v1/completions", b"{}")
        return answer.status, answer.body, answer.retry_after

    assert asyncio.run(main()) == (503, b'{"error": "busy"}', "7")


def test_closing_the_client_closes_every_socket_even_with_requests_cancelled_in_flight() -> None:
    """What SIGINT/SIGTERM and the stage deadline do to an evaluation: cancel the requests in flight, then leave
    the client. The server must see every connection closed, and no task of ours may outlive the client."""
    closed: list[int] = []

    async def stall_some(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        try:
            while True:
                await read_request(reader)
                if n % 2:
                    assert await reader.read(1) == b""  # half the connections never answer: wait for the client's FIN
                    return
                writer.write(response())
                await writer.drain()
        finally:
            closed.append(n)

    async def main() -> tuple[int, list[int], set[asyncio.Task[object]]]:
        server = Server(stall_some)
        async with server as url:
            before = asyncio.all_tasks()
            async with OpenAIClient(Endpoint(url=url, model="m"), concurrency=8) as api:
                requests = [asyncio.ensure_future(api.post("/v1/completions", {"i": i})) for i in range(32)]
                await asyncio.sleep(0.5)
                for request in requests:
                    request.cancel()
                await asyncio.gather(*requests, return_exceptions=True)
            for _ in range(200):  # the server's side of each close arrives within a few loop turns
                if len(closed) == server.connections:
                    break
                await asyncio.sleep(0.01)
            # the server's handlers have all ended with their connections, so anything else still running is ours
            return server.connections, sorted(closed), asyncio.all_tasks() - before - {asyncio.current_task()}

    connections, closed_in_time, left = asyncio.run(main())
    assert connections >= 2 and closed_in_time == list(range(1, connections + 1))
    assert left == set(), left


@pytest.mark.parametrize(("error", "kind"), [
    (aiohttp.ConnectionTimeoutError("connect"), "ConnectTimeout"),  # a subclass of the read timeout's base: first
    (aiohttp.SocketTimeoutError("read"), "ReadTimeout"),
    (aiohttp.ServerDisconnectedError(), "RemoteProtocolError"),
    (aiohttp.ClientPayloadError("short body"), "RemoteProtocolError"),
    (aiohttp.InvalidURL("http://[::1"), "UnsupportedProtocol"),
    (aiohttp.ClientOSError(104, "reset"), "ReadError"),
])
def test_each_aiohttp_failure_has_the_name_of_what_happened(error: aiohttp.ClientError, kind: str) -> None:
    """The kinds no socket test above provokes on 127.0.0.1 (a connect timeout needs an address that never
    answers), decided on the exception alone."""
    assert transport_failure_kind(error) == kind
    assert TransportFailure(kind, str(error)).timed_out == kind.endswith("Timeout")


def test_a_proxy_refusing_the_tunnel_never_shows_its_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """aiohttp puts the proxy's URL, user and password included, into the error of a refused CONNECT; that error's
    text becomes the INFRA_TRANSIENT message, which goes to JUnit and CI summaries."""
    tunnels: list[bytes] = []

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        tunnels.append((await reader.readuntil(b"\r\n\r\n")).split(b"\r\n")[0])
        writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()

    async def main() -> None:
        async with Server(refuse) as proxy_url:
            monkeypatch.setenv("HTTPS_PROXY", proxy_url.replace("://", "://us%40er:s3cret-pw@"))
            policy = RetryPolicy(max_retries=1, backoff_base_s=0.01)
            async with OpenAIClient(Endpoint(url="https://127.0.0.1:9", model="m"), policy=policy) as api:
                await api.post("/v1/completions", {})

    for name in ("NO_PROXY", "no_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(Day0Error) as caught:
        asyncio.run(main())
    message = str(caught.value)
    assert tunnels == [b"CONNECT 127.0.0.1:9 HTTP/1.1"] * 2  # the proxy was asked, twice (one retry)
    assert caught.value.failure_class is FailureClass.INFRA_TRANSIENT and "407" in message
    assert "s3cret" not in message and "us%40er" not in message and "us@er" not in message, message
