"""The upstream HTTP transport: httpx's interface over aiohttp's connection pool.

The proxy speaks httpx (one client, one error vocabulary, `MockTransport`
in tests). Under load, though, httpx's default pool checked every idle
pooled socket for readability on each request (`has_expired` →
`is_socket_readable`): about a fifth of the gateway's CPU at concurrency 16
in our profile. aiohttp's pool hands out a connection in constant time and
parses HTTP in C, so this module adapts it to `httpx.AsyncBaseTransport`.

Errors are translated at this boundary into httpx's own exceptions, so the
proxy's handling (timeout → 504, unreachable → 502, broken stream → cut)
does not know which transport ran.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager

import aiohttp
import httpx


@contextmanager
def _translated(request: httpx.Request, *, connecting: bool) -> Iterator[None]:
    """aiohttp's exceptions as the httpx exceptions the proxy handles."""
    try:
        yield
    except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
        timeout = httpx.ConnectTimeout if connecting else httpx.ReadTimeout
        raise timeout(str(exc) or "upstream timed out", request=request) from exc
    except aiohttp.ClientConnectorError as exc:
        raise httpx.ConnectError(str(exc), request=request) from exc
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError) as exc:
        raise httpx.RemoteProtocolError(str(exc), request=request) from exc
    except (aiohttp.ClientError, OSError) as exc:
        error = httpx.ConnectError if connecting else httpx.ReadError
        raise error(str(exc) or exc.__class__.__name__, request=request) from exc


class _Body(httpx.AsyncByteStream):
    """The upstream body, handed on in whatever pieces arrive (never regrouped)."""

    def __init__(self, response: aiohttp.ClientResponse, request: httpx.Request) -> None:
        self._response = response
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _translated(self._request, connecting=False):
            async for chunk in self._response.content.iter_any():
                yield chunk

    async def aclose(self) -> None:
        if self._response.content.at_eof():
            self._response.release()  # read to the end: the connection is reused
        else:
            self._response.close()  # abandoned mid-body: close it, ending the upstream call


class AiohttpTransport(httpx.AsyncBaseTransport):
    """An httpx transport backed by one aiohttp session (HTTP/1.1, pooled)."""

    def __init__(self, *, limits: httpx.Limits) -> None:
        self._limits = limits
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self._limits.max_connections or 0,
                keepalive_timeout=self._limits.keepalive_expiry or 30.0,
                ssl=httpx.create_ssl_context(),
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=False,  # bytes pass through as the upstream sent them
                skip_auto_headers=("User-Agent", "Accept-Encoding"),
                cookie_jar=aiohttp.DummyCookieJar(),  # never keep upstream cookies
            )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeout = request.extensions.get("timeout", {})
        connect = timeout.get("connect")
        pool = timeout.get("pool")
        session = self._get_session()
        with _translated(request, connecting=True):
            response = await session.request(
                request.method,
                str(request.url),
                headers=[
                    (k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw
                ],
                data=request.content or None,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    connect=(connect or 0) + (pool or 0) or None,
                    sock_connect=connect,
                    sock_read=timeout.get("read"),
                ),
            )
        return httpx.Response(
            status_code=response.status,
            headers=list(response.raw_headers),
            stream=_Body(response, request),
            request=request,
            extensions={"http_version": b"HTTP/1.1"},
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            # Let aiohttp's connector finish closing its sockets.
            await asyncio.sleep(0)
            self._session = None


class UpstreamClient:
    """The upstream API as the proxy calls it: one transport, its base URL and timeouts.

    The proxy forwards to one base URL, keeps no cookies, sends its own
    `Authorization` header and never follows a redirect, so it does not go
    through `httpx.AsyncClient`: the client's per-request layers (URL merging,
    cookie extraction, auth and redirect wrappers) were about 8% of the
    gateway's CPU. Requests are still `httpx.Request`s and go to an
    `httpx.AsyncBaseTransport`, so transports stay interchangeable
    (`AiohttpTransport` in production, `httpx.MockTransport` in a test).
    """

    def __init__(
        self, *, base_url: str, timeout: httpx.Timeout, transport: httpx.AsyncBaseTransport
    ) -> None:
        self._base_url = base_url.rstrip("/")
        self._timeout = timeout.as_dict()
        self._transport = transport
        # Parsing a URL costs more than the rest of building the request; the
        # proxy asks for the same few paths over and over.
        self._url = functools.lru_cache(maxsize=256)(self._parse_url)

    def _parse_url(self, target: str) -> httpx.URL:
        return httpx.URL(self._base_url + target)

    def build_request(
        self, method: str, target: str, *, headers: Sequence[tuple[str, str]], content: bytes
    ) -> httpx.Request:
        """A request for `target` (path and query below the base URL, starting with "/")."""
        return httpx.Request(
            method,
            self._url(target),
            headers=headers,
            content=content,
            extensions={"timeout": self._timeout},
        )

    async def send(self, request: httpx.Request) -> httpx.Response:
        """The upstream's response, its body not yet read (close it with `aclose()`)."""
        return await self._transport.handle_async_request(request)

    async def aclose(self) -> None:
        await self._transport.aclose()
