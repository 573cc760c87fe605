"""The upstream HTTP client: a small HTTP/1.1 connection pool on asyncio and httptools.

Every metered request becomes exactly one upstream request to one base URL,
with the gateway's own key, no cookies, no redirects and an unencoded body.
That is all this client does, so it does it directly: a request is written
in one `transport.write`, the response is parsed in C by httptools (the
parser uvicorn uses for the server side) as bytes arrive, and the body is
handed on in whatever pieces arrive, never regrouped beyond what arrived
together. In the gateway's profile the general-purpose clients cost more than
all our own code: httpx's pool probed every idle socket on each request
(about a fifth of the CPU at concurrency 16), and aiohttp behind httpx's
interface still about a quarter of the CPU per request, most of it in
per-request objects (timeouts, request and response wrappers, header
multidicts) that this proxy never needs.

Timeouts: `connect` bounds making a connection (TCP and TLS), `pool` bounds
waiting for a free connection slot, and `read` bounds every wait for the
upstream's next bytes, headers included (what OpenAI's SDK calls the read
timeout: a stream may run for minutes as long as it keeps sending).

Connections are kept for reuse only after a response was read to its end and
the upstream allows keep-alive; a connection the upstream closed while idle
is dropped as soon as the loop sees it, and one idle longer than
`keepalive_seconds` is not reused. A response abandoned mid-body closes its
connection, which ends the upstream request (an abandoned stream stops
costing money).

Errors are `UpstreamError`s: `UpstreamTimeout` (`UpstreamConnectTimeout`
while connecting), `UpstreamConnectError` (no connection, or the request
could not be sent) and `UpstreamProtocolError` (the upstream broke off or
sent something that is not HTTP). The two connect errors mean the upstream
never saw the request, so another upstream may be tried.

Egress proxy: with a `ProxyConfig`, an https upstream is reached through an
HTTP CONNECT tunnel (`Proxy-Authorization: Basic` from the proxy URL's
credentials); TLS to the upstream runs inside the tunnel and is verified
exactly as without a proxy (the upstream's host name, the same CAs). The
caller decides per upstream whether the proxy applies (`NoProxy`).
"""

from __future__ import annotations

import asyncio
import base64
import socket
import ssl
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import cast
from urllib.parse import unquote, urlsplit

import httptools

Header = tuple[bytes, bytes]

# Bytes buffered from the upstream before reading pauses until the client
# takes them (a slow client must not make the gateway hold a whole body).
_HIGH_WATER = 256 * 1024


class UpstreamError(Exception):
    """The upstream call failed."""


class UpstreamTimeout(UpstreamError):
    """The upstream did not connect, free a connection or send bytes in time."""


class UpstreamConnectError(UpstreamError):
    """No connection to the upstream could be made, or the request could not be sent."""


class UpstreamConnectTimeout(UpstreamTimeout):
    """Making the connection (TCP, proxy tunnel, TLS) took too long: nothing was sent."""


# Raised before the upstream saw the request: safe to try another upstream.
NOT_SENT_ERRORS = (UpstreamConnectError, UpstreamConnectTimeout)

# The largest CONNECT answer head read from a proxy.
_MAX_PROXY_HEAD = 16 * 1024


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """An HTTP proxy for CONNECT tunnels: `http://[user:password@]host:port`."""

    host: str
    port: int
    authorization: bytes | None = None

    @classmethod
    def parse(cls, url: str) -> ProxyConfig:
        if "://" not in url:
            url = "http://" + url
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(
                "the proxy must be an http://[user:password@]host:port URL "
                "(TLS to the upstream runs inside the CONNECT tunnel)"
            )
        authorization = None
        if parts.username is not None:
            credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            authorization = b"Basic " + base64.b64encode(credentials.encode("utf-8"))
        return cls(parts.hostname, parts.port or 80, authorization)

    def __repr__(self) -> str:  # the credentials never show
        return f"ProxyConfig({self.host!r}, {self.port})"


class NoProxy:
    """`NO_PROXY`: hosts reached directly. `*` is every host; `example.com` and
    `.example.com` match the domain and its subdomains; a port is ignored."""

    def __init__(self, raw: str) -> None:
        entries = []
        for item in raw.split(","):
            entry = item.strip().lower()
            if entry.startswith("[") and "]" in entry:
                entry = entry[1 : entry.index("]")]
            elif entry.count(":") == 1:
                entry = entry.split(":", 1)[0]
            entry = entry.lstrip(".")
            if entry:
                entries.append(entry)
        self.everything = "*" in entries
        self.entries = tuple(entries)

    def bypass(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        if self.everything:
            return True
        return any(host == entry or host.endswith("." + entry) for entry in self.entries)


class UpstreamProtocolError(UpstreamError):
    """The upstream broke off, or answered with something that is not HTTP/1.1."""


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float | None = 10.0
    read: float | None = 600.0
    pool: float | None = 10.0


def _timeout_waiter(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(UpstreamTimeout("the upstream sent nothing in time"))


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: a protocol that parses one response at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._parser: httptools.HttpResponseParser | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self.reset()

    def reset(self) -> None:
        """Ready for the next response on this connection."""
        self._parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: list[Header] = []
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.length_known = False
        self.error: UpstreamError | None = None
        self.chunks: list[bytes] = []
        self.buffered = 0

    # -- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        assert self._parser is not None
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.error = UpstreamProtocolError(f"the upstream's answer is not HTTP: {exc}")
            self.close()
        self._wake()

    def eof_received(self) -> bool | None:
        return None  # let the transport close; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.headers_done and not self.complete and not self.length_known:
            # A body delimited by the connection's end (no length, not chunked).
            self.complete = True
        elif not self.complete and self.error is None:
            reason = f": {exc}" if exc else ""
            self.error = UpstreamProtocolError(f"the upstream closed the connection{reason}")
        self._wake()

    # -- httptools callbacks ----------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-length" or (
            name == b"transfer-encoding" and b"chunked" in value.lower()
        ):
            self.length_known = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        self.status = self._parser.get_status_code()
        if 100 <= self.status < 200:
            # An interim answer (e.g. 103 Early Hints): the real one follows.
            self.headers = []
            self.length_known = False
            return
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self.headers_done:
            assert self._parser is not None
            # Asked now: the parser forgets it once the message is done.
            self.keep_alive = self._parser.should_keep_alive()
            self.complete = True

    # -- used by the client -----------------------------------------------

    def take_chunks(self) -> bytes:
        data = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
        self.chunks = []
        self.buffered = 0
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.transport.resume_reading()
        return data

    async def wait(self, seconds: float | None) -> None:
        """Until more bytes, the end, or an error arrive; UpstreamTimeout after `seconds`.

        A timer on the waiter rather than `asyncio.timeout`: this runs for
        every wait of every request, and needs no cancellation bookkeeping.
        """
        waiter = self._loop.create_future()
        self._waiter = waiter
        handle = (
            None if seconds is None else self._loop.call_later(seconds, _timeout_waiter, waiter)
        )
        try:
            await waiter
        finally:
            self._waiter = None
            if handle is not None:
                handle.cancel()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class UpstreamResponse:
    """An upstream answer whose headers have arrived; read its body, then `aclose()` it."""

    __slots__ = ("_client", "_conn", "_read_timeout", "_released", "headers", "status_code")

    def __init__(
        self, conn: _Connection, client: UpstreamClient, read_timeout: float | None
    ) -> None:
        self.status_code = conn.status
        # Names in lower case, values as sent.
        self.headers: list[Header] = conn.headers
        self._conn = conn
        self._client = client
        self._read_timeout = read_timeout
        self._released = False

    def header(self, name: bytes) -> bytes | None:
        """The first value of header `name` (lower case), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        """The body in the pieces it arrives in; UpstreamError if the upstream breaks off."""
        conn = self._conn
        while True:
            if conn.chunks:
                yield conn.take_chunks()
            elif conn.complete:
                return
            elif conn.error is not None:
                raise conn.error
            else:
                await conn.wait(self._read_timeout)

    @property
    def fully_received(self) -> bool:
        """Whether the whole body has arrived already (the usual case for a JSON answer)."""
        return self._conn.complete

    async def aread(self) -> bytes:
        return b"".join([chunk async for chunk in self.aiter_bytes()])

    async def aclose(self) -> None:
        """Give the connection back when the body was read to its end, else close it."""
        if self._released:
            return
        self._released = True
        conn = self._conn
        reusable = conn.complete and not conn.chunks and not conn.closed and conn.keep_alive
        self._client._release(conn, reusable=reusable)


class UpstreamClient:
    """Requests to one upstream base URL over pooled HTTP/1.1 connections."""

    def __init__(
        self,
        *,
        base_url: str,
        timeouts: Timeouts,
        max_connections: int = 1000,
        keepalive_seconds: float = 15.0,
        ssl_context: ssl.SSLContext | None = None,
        proxy: ProxyConfig | None = None,
    ) -> None:
        parts = urlsplit(base_url.rstrip("/"))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"upstream base URL must be http(s)://host[:port][/path]: {base_url}")
        self._tls = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._tls else 80)
        default_port = 443 if self._tls else 80
        host_header = parts.netloc.rsplit("@", 1)[-1]
        if parts.port == default_port:
            host_header = host_header.rsplit(":", 1)[0]
        self._host_header = host_header.encode("idna")
        self._base_path = parts.path.encode("latin-1")
        self._ssl = (ssl_context or ssl.create_default_context()) if self._tls else None
        # HTTPS_PROXY is for https upstreams; a plain-http upstream is local.
        self._proxy = proxy if self._tls else None
        self.timeouts = timeouts
        self._keepalive_seconds = keepalive_seconds
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[_Connection] = []
        self._closed = False

    def _request_head(
        self, method: str, target: str, headers: Sequence[Header], body: bytes
    ) -> bytes:
        lines = [
            method.encode("ascii"),
            b" ",
            self._base_path,
            target.encode("latin-1"),
            b" HTTP/1.1\r\nhost: ",
            self._host_header,
            b"\r\n",
        ]
        for name, value in headers:
            lines += (name, b": ", value, b"\r\n")
        if body or method not in ("GET", "HEAD"):
            lines += (b"content-length: ", str(len(body)).encode("ascii"), b"\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)

    async def send(
        self, method: str, target: str, *, headers: Sequence[Header], content: bytes = b""
    ) -> UpstreamResponse:
        """Send a request for `target` (below the base URL, starting with "/").

        Returns when the response's headers have arrived; its body is read
        through the response, which must then be closed with `aclose()`.
        """
        if self._closed:
            raise UpstreamConnectError("the upstream client is closed")
        timeouts = self.timeouts
        if self._slots.locked():
            try:
                async with asyncio.timeout(timeouts.pool):
                    await self._slots.acquire()
            except TimeoutError:
                raise UpstreamTimeout("no upstream connection became free in time") from None
        else:
            await self._slots.acquire()  # free: returns at once
        conn: _Connection | None = None
        try:
            conn = await self._connection()
            message = self._request_head(method, target, headers, content)
            assert conn.transport is not None
            conn.transport.write(message + content if len(content) < 65536 else message)
            if len(content) >= 65536:
                conn.transport.write(content)
            while not conn.headers_done:
                if conn.error is not None:
                    raise conn.error
                await conn.wait(timeouts.read)
        except BaseException:
            if conn is not None:
                conn.close()
            self._slots.release()
            raise
        return UpstreamResponse(conn, self, timeouts.read)

    async def _connection(self) -> _Connection:
        """An idle pooled connection still open and fresh, or a new one."""
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and now - conn.idle_since < self._keepalive_seconds:
                conn.reset()
                return conn
            conn.close()
        loop = asyncio.get_running_loop()
        sock: socket.socket | None = None
        try:
            async with asyncio.timeout(self.timeouts.connect):
                if self._proxy is None:
                    _, protocol = await loop.create_connection(
                        lambda: _Connection(loop),
                        self._host,
                        self._port,
                        ssl=self._ssl,
                        server_hostname=self._host if self._tls else None,
                    )
                else:
                    sock = await self._tunnel(loop, self._proxy)
                    _, protocol = await loop.create_connection(
                        lambda: _Connection(loop),
                        sock=sock,
                        ssl=self._ssl,
                        server_hostname=self._host,
                    )
        except TimeoutError:
            if sock is not None:
                sock.close()
            raise UpstreamConnectTimeout(
                f"connecting to {self._host}:{self._port} timed out"
            ) from None
        except OSError as exc:
            if sock is not None:
                sock.close()
            raise UpstreamConnectError(
                f"cannot connect to {self._host}:{self._port}: {exc}"
            ) from exc
        except UpstreamConnectError:
            if sock is not None:
                sock.close()
            raise
        return protocol

    async def _tunnel(self, loop: asyncio.AbstractEventLoop, proxy: ProxyConfig) -> socket.socket:
        """A socket through `proxy` to the upstream (HTTP CONNECT), ready for TLS."""
        infos = await loop.getaddrinfo(proxy.host, proxy.port, type=socket.SOCK_STREAM)
        sock: socket.socket | None = None
        error: OSError | None = None
        for family, kind, proto, _, address in infos:
            candidate = socket.socket(family, kind, proto)
            candidate.setblocking(False)
            try:
                await loop.sock_connect(candidate, address)
            except OSError as exc:
                candidate.close()
                error = exc
                continue
            except BaseException:
                # Cancelled (the connect timeout, the request gone): closed here,
                # not left to the garbage collector.
                candidate.close()
                raise
            sock = candidate
            break
        if sock is None:
            raise UpstreamConnectError(
                f"cannot connect to the proxy {proxy.host}:{proxy.port}: {error}"
            )
        try:
            authority = f"{self._host}:{self._port}".encode("idna")
            head = b"CONNECT " + authority + b" HTTP/1.1\r\nhost: " + authority + b"\r\n"
            if proxy.authorization is not None:
                head += b"proxy-authorization: " + proxy.authorization + b"\r\n"
            await loop.sock_sendall(sock, head + b"\r\n")
            answer = b""
            while b"\r\n\r\n" not in answer:
                data = await loop.sock_recv(sock, 4096)
                if not data:
                    raise UpstreamConnectError("the proxy closed the connection during CONNECT")
                answer += data
                if len(answer) > _MAX_PROXY_HEAD:
                    raise UpstreamConnectError("the proxy's answer to CONNECT is too long")
            status_line = answer.split(b"\r\n", 1)[0]
            fields = status_line.split(b" ", 2)
            status = int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else 0
            if status == 407:
                raise UpstreamConnectError(
                    "the proxy refused its credentials (407): check HTTPS_PROXY's user:password"
                )
            if not 200 <= status < 300:
                raise UpstreamConnectError(
                    f"the proxy refused the tunnel to {self._host}:{self._port}: "
                    f"{status_line.decode('latin-1', 'replace')}"
                )
            if not answer.endswith(b"\r\n\r\n"):
                # The upstream speaks only after our TLS hello: anything more is wrong.
                raise UpstreamConnectError("the proxy sent bytes after its CONNECT answer")
        except BaseException:
            sock.close()
            raise
        return sock

    def _release(self, conn: _Connection, *, reusable: bool) -> None:
        self._slots.release()
        if reusable and not self._closed:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            conn.close()

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        # Let the transports finish closing their sockets.
        await asyncio.sleep(0)
