"""The scorer's transport (httpx-aiohttp under httpx) against real sockets on 127.0.0.1.

It replaces httpx's default stack (~4x less client CPU per request), so it must keep what the retry policy relies
on: httpx's exception types, named for what happened (a hang-up is no timeout), keep-alive reuse without sending
into a closed socket, bodies of either framing, connections in an unknown state never reused, and verified TLS.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from pytest_day0.failures import Day0Error, FailureClass
from pytest_day0.scoring.client import OpenAIClient, RetryPolicy, scorer_transport
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


def client(url: str, timeout: float = 5.0, connections: int = 4, verify: ssl.SSLContext | None = None
           ) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, transport=scorer_transport(url, connections, verify), timeout=timeout)


def test_keep_alive_connections_are_reused_and_bounded() -> None:
    async def main() -> tuple[int, list[dict[str, object]]]:
        server = Server(keep_alive)
        async with server as url, client(url, connections=4) as http:
            replies = await asyncio.gather(*(http.post("/v1/completions", json={"i": i}) for i in range(200)))
        return server.connections, [r.json() for r in replies]

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
                statuses.append((await http.post("/x", content=b"{}")).status_code)
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
            return [(await http.get("/")).json() for _ in range(2)]

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
    ("silent", httpx.ReadTimeout),
    ("close-before-reply", httpx.RemoteProtocolError),
    ("close-mid-body", httpx.RemoteProtocolError),
    ("garbage", httpx.RemoteProtocolError),
]


@pytest.mark.parametrize(("behaviour", "error"), FAULTS)
def test_server_faults_raise_the_httpx_errors_the_retry_policy_knows(behaviour: str, error: type) -> None:
    async def main() -> None:
        handler: Handler = lambda r, w, _: misbehave(r, w, behaviour)  # noqa: E731
        async with Server(handler) as url, client(url, timeout=0.3) as http:
            await http.post("/v1/completions", json={})

    with pytest.raises(error) as caught:
        asyncio.run(main())
    assert type(caught.value) is error  # exactly: a hang-up that arrived as ConnectTimeout would pass a subclass test


@pytest.mark.parametrize(("behaviour", "error"), FAULTS)
def test_each_fault_ends_as_an_infra_transient_line_after_the_retries(behaviour: str, error: type) -> None:
    async def main() -> None:
        handler: Handler = lambda r, w, _: misbehave(r, w, behaviour)  # noqa: E731
        async with Server(handler) as url:
            policy = RetryPolicy(max_retries=1, backoff_base_s=0.01)
            async with OpenAIClient(Endpoint(url=url, model="m"), timeout_s=0.3, policy=policy) as api:
                await api.post("/v1/completions", {})

    with pytest.raises(Day0Error) as caught:
        asyncio.run(main())
    assert caught.value.failure_class is FailureClass.INFRA_TRANSIENT
    assert error.__name__ in str(caught.value) and "after 2 attempts" in str(caught.value)
    assert ("timed out" in str(caught.value)) == (behaviour == "silent")


def test_refused_port_is_a_connect_error() -> None:
    async def main() -> None:
        server = Server(keep_alive)
        async with server as url:
            pass  # closed: nothing listens there any more
        async with client(url) as http:
            await http.get("/")

    with pytest.raises(httpx.ConnectError):
        asyncio.run(main())


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
                await asyncio.wait_for(http.get("/"), 0.1)
            reply = (await http.get("/")).json()
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
                await asyncio.wait_for(http.get("/"), 0.2)
            # with one connection allowed, a socket still held by the cancelled response would block this forever
            reply = (await asyncio.wait_for(http.get("/"), 3)).json()
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
            return (await http.post("/v1/completions", json={})).json()

    assert asyncio.run(get(trusting)) == json.loads(BODY)  # TLS through the same pool when the chain is trusted
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        asyncio.run(get(None))  # the default store (certifi) does not know a self-signed certificate


def test_environment_proxies_still_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    """httpx's client honoured HTTP_PROXY / NO_PROXY; the scorer's transport does too."""
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
                return (await http.post("/v1/completions", json={})).json()

    for name in ("NO_PROXY", "no_proxy", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    origin = "http://127.0.0.1:9"  # nothing listens there: only the proxy can answer
    assert asyncio.run(main(origin)) == json.loads(BODY)
    assert seen == [b"POST http://127.0.0.1:9/v1/completions HTTP/1.1"]
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    with pytest.raises(httpx.ConnectError):
        asyncio.run(main(origin))  # bypassed: straight to the closed port
