"""The upstream HTTP/1.1 client against a scripted server on loopback (on both loops)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from gateway.upstream import (
    Timeouts,
    UpstreamClient,
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamTimeout,
)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "Server"], Awaitable[None]]


@dataclass
class Server:
    """A loopback HTTP server whose handler answers each connection as a test scripts it."""

    handler: Handler
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    port: int = 0

    async def read_request(self, reader: asyncio.StreamReader) -> bytes | None:
        """One request (head and Content-Length body), or None when the client closed."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        body = await reader.readexactly(length) if length else b""
        self.requests.append(head + body)
        return head + body


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[Server]]]:
    servers: list[asyncio.Server] = []

    async def start(handler: Handler) -> Server:
        state = Server(handler)

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            state.connections += 1
            try:
                await handler(reader, writer, state)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        servers.append(server)
        state.port = server.sockets[0].getsockname()[1]
        return state

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


def client_for(server: Server, **timeouts: float) -> UpstreamClient:
    return UpstreamClient(
        base_url=f"http://127.0.0.1:{server.port}/v1", timeouts=Timeouts(**timeouts)
    )


def answer(body: bytes, *, extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\n"
        + extra
        + b"\r\n"
        + body
    )


async def keep_alive_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, s: Server):
    while await s.read_request(reader) is not None:
        writer.write(answer(b'{"n": %d}' % len(s.requests)))
        await writer.drain()


def replying(raw: bytes, *, then_wait: float = 0.0) -> Handler:
    """A handler that reads one request, writes `raw` as its answer and waits before closing."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, s: Server):
        await s.read_request(reader)
        writer.write(raw)
        await writer.drain()
        await asyncio.sleep(then_wait)

    return handler


async def test_request_line_headers_and_body_reach_the_upstream(serve) -> None:
    server = await serve(keep_alive_echo)
    client = client_for(server)
    response = await client.send(
        "POST",
        "/chat/completions?x=1",
        headers=[(b"content-type", b"application/json"), (b"authorization", b"Bearer k")],
        content=b'{"model": "m"}',
    )
    assert response.status_code == 200
    assert response.header(b"content-type") == b"application/json"
    assert await response.aread() == b'{"n": 1}'
    await response.aclose()
    await client.aclose()
    sent = server.requests[0]
    assert sent.startswith(b"POST /v1/chat/completions?x=1 HTTP/1.1\r\n")
    assert f"host: 127.0.0.1:{server.port}\r\n".encode() in sent
    assert b"authorization: Bearer k\r\n" in sent
    assert b"content-length: 14\r\n" in sent
    assert sent.endswith(b'\r\n\r\n{"model": "m"}')


async def test_a_connection_is_reused_after_a_body_read_to_its_end(serve) -> None:
    server = await serve(keep_alive_echo)
    client = client_for(server)
    bodies = []
    for _ in range(5):
        response = await client.send("POST", "/x", headers=[], content=b"{}")
        bodies.append(await response.aread())
        await response.aclose()
    await client.aclose()
    assert bodies == [b'{"n": %d}' % n for n in range(1, 6)]
    assert server.connections == 1


async def test_concurrent_requests_get_a_connection_each(serve) -> None:
    async def slow_echo(reader, writer, s):
        while await s.read_request(reader) is not None:
            await asyncio.sleep(0.05)
            writer.write(answer(b"ok"))

    server = await serve(slow_echo)
    client = client_for(server)

    async def one() -> bytes:
        response = await client.send("POST", "/x", headers=[], content=b"{}")
        try:
            return await response.aread()
        finally:
            await response.aclose()

    assert await asyncio.gather(*(one() for _ in range(4))) == [b"ok"] * 4
    assert server.connections == 4
    # All four went back to the pool: four more requests open nothing new.
    assert await asyncio.gather(*(one() for _ in range(4))) == [b"ok"] * 4
    assert server.connections == 4
    await client.aclose()


async def test_connection_close_is_not_reused(serve) -> None:
    async def closing(reader, writer, s):
        await s.read_request(reader)
        writer.write(answer(b"bye", extra=b"connection: close\r\n"))
        await writer.drain()

    server = await serve(closing)
    client = client_for(server)
    for _ in range(2):
        response = await client.send("GET", "/models", headers=[])
        assert await response.aread() == b"bye"
        await response.aclose()
    await client.aclose()
    assert server.connections == 2
    # A GET without a body says no content-length.
    assert b"content-length" not in server.requests[0]


async def test_an_idle_connection_the_upstream_closed_is_not_used(serve) -> None:
    async def one_then_close(reader, writer, s):
        await s.read_request(reader)
        writer.write(answer(b"once"))
        await writer.drain()  # then the handler returns and the server closes

    server = await serve(one_then_close)
    client = client_for(server)
    response = await client.send("POST", "/x", headers=[], content=b"{}")
    assert await response.aread() == b"once"
    await response.aclose()
    await asyncio.sleep(0.05)  # the close reaches the client's loop
    response = await client.send("POST", "/x", headers=[], content=b"{}")
    assert await response.aread() == b"once"
    await response.aclose()
    await client.aclose()
    assert server.connections == 2


async def test_a_chunked_stream_arrives_piece_by_piece(serve) -> None:
    async def chunked(reader, writer, s):
        await s.read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        for n in range(3):
            event = b"data: %d\n\n" % n
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            await writer.drain()
            await asyncio.sleep(0.03)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        await s.read_request(reader)

    server = await serve(chunked)
    client = client_for(server)
    response = await client.send("POST", "/x", headers=[], content=b"{}")
    assert response.header(b"transfer-encoding") == b"chunked"
    loop = asyncio.get_running_loop()
    arrivals = [(chunk, loop.time()) async for chunk in response.aiter_bytes()]
    await response.aclose()
    await client.aclose()
    assert b"".join(chunk for chunk, _ in arrivals) == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
    # Handed on as they came, ~30 ms apart, not gathered up to the end.
    assert len(arrivals) == 3
    assert arrivals[-1][1] - arrivals[0][1] > 0.04


async def test_a_body_ended_by_closing_the_connection(serve) -> None:
    server = await serve(replying(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nall of it"))
    client = client_for(server)
    response = await client.send("POST", "/x", headers=[], content=b"{}")
    assert await response.aread() == b"all of it"
    await response.aclose()
    await client.aclose()


async def test_an_upstream_breaking_off_mid_body_is_a_protocol_error(serve) -> None:
    server = await serve(replying(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly some"))
    client = client_for(server)
    response = await client.send("POST", "/x", headers=[], content=b"{}")
    received = b""
    with pytest.raises(UpstreamProtocolError):
        async for chunk in response.aiter_bytes():
            received += chunk
    assert received == b"only some"
    await response.aclose()
    await client.aclose()


async def test_garbage_instead_of_http_is_a_protocol_error(serve) -> None:
    server = await serve(replying(b"SSH-2.0-OpenSSH\r\n\r\n", then_wait=1))
    client = client_for(server)
    with pytest.raises(UpstreamProtocolError):
        await client.send("POST", "/x", headers=[], content=b"{}")
    await client.aclose()


async def test_no_answer_within_the_read_timeout(serve) -> None:
    server = await serve(replying(b"", then_wait=5))
    client = client_for(server, read=0.1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(UpstreamTimeout):
        await client.send("POST", "/x", headers=[], content=b"{}")
    assert loop.time() - started < 2
    await client.aclose()


async def test_a_stream_that_stops_sending_times_out_between_chunks(serve) -> None:
    server = await serve(
        replying(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n", then_wait=5
        )
    )
    client = client_for(server, read=0.1)
    response = await client.send("POST", "/x", headers=[], content=b"{}")
    pieces = []
    with pytest.raises(UpstreamTimeout):
        async for chunk in response.aiter_bytes():
            pieces.append(chunk)
    assert pieces == [b"hello"]
    await response.aclose()
    await client.aclose()


async def test_nothing_listening_is_a_connect_error() -> None:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    client = UpstreamClient(base_url=f"http://127.0.0.1:{port}", timeouts=Timeouts())
    with pytest.raises(UpstreamConnectError):
        await client.send("POST", "/x", headers=[], content=b"{}")
    await client.aclose()


async def test_an_abandoned_body_closes_the_connection(serve) -> None:
    upstream_saw_close = asyncio.Event()

    async def endless(reader, writer, s):
        await s.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        try:
            while True:
                writer.write(b"5\r\nchunk\r\n")
                await writer.drain()
                await asyncio.sleep(0.01)
        except ConnectionError:
            upstream_saw_close.set()

    server = await serve(endless)
    client = client_for(server)
    response = await client.send("POST", "/x", headers=[], content=b"{}")
    async for _ in response.aiter_bytes():
        break
    await response.aclose()
    await asyncio.wait_for(upstream_saw_close.wait(), 5)
    # The next request gets a new connection, not the half-read one.
    response = await client.send("POST", "/x", headers=[], content=b"{}")
    async for _ in response.aiter_bytes():
        break
    await response.aclose()
    await client.aclose()
    assert server.connections == 2


async def test_a_slow_reader_pauses_the_upstream_instead_of_buffering_it_all(serve) -> None:
    total = 8 * 1024 * 1024
    sent = 0

    async def big(reader, writer, s):
        nonlocal sent
        await s.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % total)
        piece = b"x" * 65536
        while sent < total:
            writer.write(piece)
            await writer.drain()
            sent += len(piece)
        await s.read_request(reader)

    server = await serve(big)
    client = client_for(server)
    response = await client.send("POST", "/x", headers=[], content=b"{}")
    await asyncio.sleep(0.3)  # the client reads nothing meanwhile
    assert sent < total  # the upstream was held back, not read into memory
    received = 0
    async for chunk in response.aiter_bytes():
        received += len(chunk)
    assert received == total
    await response.aclose()
    await client.aclose()


async def test_pool_timeout_when_every_connection_is_busy(serve) -> None:
    server = await serve(keep_alive_echo)
    client = UpstreamClient(
        base_url=f"http://127.0.0.1:{server.port}",
        timeouts=Timeouts(pool=0.1),
        max_connections=1,
    )
    held = await client.send("POST", "/x", headers=[], content=b"{}")
    with pytest.raises(UpstreamTimeout):
        await client.send("POST", "/x", headers=[], content=b"{}")
    await held.aread()
    await held.aclose()
    # The slot came back.
    response = await client.send("POST", "/x", headers=[], content=b"{}")
    assert response.status_code == 200
    await response.aread()
    await response.aclose()
    await client.aclose()


def test_base_url_must_be_http() -> None:
    with pytest.raises(ValueError, match="http"):
        UpstreamClient(base_url="ftp://example.test", timeouts=Timeouts())
