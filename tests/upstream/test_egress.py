"""TLS to the upstream with its own CA (SSL_CERT_FILE), and the HTTPS_PROXY CONNECT tunnel.

A local TLS upstream whose certificate comes from a throwaway CA (trustme)
and a local CONNECT proxy that pipes bytes and records what it was asked.
TLS through the proxy is verified exactly as without it: the upstream's
host name against its certificate, with the same CAs.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import socket
import ssl
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme

from gateway.services import upstream_client, upstream_ssl_context
from gateway.settings import Settings
from gateway.upstream import (
    NoProxy,
    ProxyConfig,
    Timeouts,
    UpstreamClient,
    UpstreamConnectError,
    UpstreamConnectTimeout,
)
from gateway.upstreams_config import legacy_upstream
from tests.egress import ConnectProxy, connect_proxy

ANSWER = (
    b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{"ok":true}'
)


@dataclass
class TlsUpstream:
    port: int
    ca: trustme.CA
    requests: list[bytes] = field(default_factory=list)

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context


async def _start_tls_server(ca: trustme.CA, *names: str) -> tuple[asyncio.Server, TlsUpstream]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(context)
    state = TlsUpstream(0, ca)

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            state.requests.append(head)
            writer.write(ANSWER)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0, ssl=context)
    state.port = server.sockets[0].getsockname()[1]
    return server, state


@pytest.fixture
async def tls_upstream() -> AsyncIterator[TlsUpstream]:
    """A TLS upstream on 127.0.0.1 whose certificate names localhost."""
    server, state = await _start_tls_server(trustme.CA(), "localhost")
    yield state
    server.close()
    await server.wait_closed()


@pytest.fixture
async def proxy() -> AsyncIterator[ConnectProxy]:
    """An HTTP CONNECT proxy on loopback that wants user `aza`, password `s3cret:x`."""
    async with connect_proxy() as state:
        yield state


def https_client(
    port: int, context: ssl.SSLContext, *, host: str = "localhost", proxy: str | None = None
) -> UpstreamClient:
    return UpstreamClient(
        base_url=f"https://{host}:{port}/v1",
        timeouts=Timeouts(connect=5, read=5, pool=5),
        ssl_context=context,
        proxy=ProxyConfig.parse(proxy) if proxy else None,
    )


async def _get(client: UpstreamClient) -> tuple[int, bytes]:
    try:
        response = await client.send("GET", "/models", headers=[])
        body = await response.aread()
        await response.aclose()
        return response.status_code, body
    finally:
        await client.aclose()


async def test_tls_upstream_with_its_own_ca(tls_upstream: TlsUpstream) -> None:
    """The upstream's CA trusted: the request goes through; the Host header names localhost."""
    status, body = await _get(https_client(tls_upstream.port, tls_upstream.client_context()))
    assert (status, body) == (200, b'{"ok":true}')
    assert b"host: localhost:" in tls_upstream.requests[0]


async def test_tls_upstream_with_an_unknown_ca_is_refused(tls_upstream: TlsUpstream) -> None:
    """Without its CA the certificate does not verify: a connect error, nothing sent."""
    with pytest.raises(UpstreamConnectError, match="certificate verify failed"):
        await _get(https_client(tls_upstream.port, ssl.create_default_context()))
    assert tls_upstream.requests == []


async def test_wrong_host_name_is_refused(tls_upstream: TlsUpstream) -> None:
    """The certificate names localhost; reached as 127.0.0.1 it is refused."""
    with pytest.raises(UpstreamConnectError, match="certificate verify failed"):
        await _get(https_client(tls_upstream.port, tls_upstream.client_context(), host="127.0.0.1"))
    assert tls_upstream.requests == []


async def test_ssl_cert_file_is_honoured(tls_upstream: TlsUpstream, tmp_path: Path) -> None:
    """SSL_CERT_FILE (read by Settings) is the CA bundle upstream TLS trusts."""
    bundle = tmp_path / "ca.pem"
    tls_upstream.ca.cert_pem.write_to_path(str(bundle))
    settings = Settings.from_env({"SSL_CERT_FILE": str(bundle)})
    assert settings.ssl_cert_file == str(bundle)
    status, _ = await _get(https_client(tls_upstream.port, upstream_ssl_context(settings)))
    assert status == 200


async def test_through_the_proxy_with_credentials(
    tls_upstream: TlsUpstream, proxy: ConnectProxy
) -> None:
    """HTTPS_PROXY: a CONNECT tunnel with Basic credentials from the URL; TLS inside it."""
    url = f"http://aza:s3cret%3Ax@127.0.0.1:{proxy.port}"
    client = https_client(tls_upstream.port, tls_upstream.client_context(), proxy=url)
    assert await _get(client) == (200, b'{"ok":true}')
    assert proxy.tunnels == [f"localhost:{tls_upstream.port}"]
    assert len(tls_upstream.requests) == 1


async def test_through_the_proxy_tls_is_verified_as_without_it(
    tls_upstream: TlsUpstream, proxy: ConnectProxy
) -> None:
    """Through the tunnel, an unknown CA and a wrong host name are refused all the same."""
    url = f"http://aza:s3cret%3Ax@127.0.0.1:{proxy.port}"
    with pytest.raises(UpstreamConnectError, match="certificate verify failed"):
        await _get(https_client(tls_upstream.port, ssl.create_default_context(), proxy=url))
    with pytest.raises(UpstreamConnectError, match="certificate verify failed"):
        await _get(
            https_client(
                tls_upstream.port, tls_upstream.client_context(), host="127.0.0.1", proxy=url
            )
        )
    assert len(proxy.tunnels) == 2 and tls_upstream.requests == []


async def test_proxy_refusing_the_credentials(
    tls_upstream: TlsUpstream, proxy: ConnectProxy
) -> None:
    """A 407 from the proxy is a connect error that says what to fix."""
    url = f"http://aza:wrong@127.0.0.1:{proxy.port}"
    with pytest.raises(UpstreamConnectError, match="407"):
        await _get(https_client(tls_upstream.port, tls_upstream.client_context(), proxy=url))
    assert proxy.refused == 1 and tls_upstream.requests == []


async def test_no_proxy_hosts_go_direct(
    tls_upstream: TlsUpstream, proxy: ConnectProxy, tmp_path: Path
) -> None:
    """The gateway's upstream client uses HTTPS_PROXY unless NO_PROXY names the host."""
    bundle = tmp_path / "ca.pem"
    tls_upstream.ca.cert_pem.write_to_path(str(bundle))
    base = f"https://localhost:{tls_upstream.port}/v1"
    proxy_url = f"http://aza:s3cret%3Ax@127.0.0.1:{proxy.port}"
    for no_proxy, tunnels in (("", 1), ("example.org, .localhost", 1), ("localhost:443", 1)):
        settings = Settings.from_env(
            {"HTTPS_PROXY": proxy_url, "NO_PROXY": no_proxy, "SSL_CERT_FILE": str(bundle)}
        )
        config = legacy_upstream(base, settings.upstream_api_key)
        client = upstream_client(settings, config, upstream_ssl_context(settings))
        assert (await _get(client))[0] == 200
        # Only the first (no NO_PROXY) went through the proxy.
        assert len(proxy.tunnels) == tunnels
    assert len(tls_upstream.requests) == 3


def test_no_proxy_matching() -> None:
    """NO_PROXY: exact hosts, domains with or without a leading dot, `*`, ports ignored."""
    rule = NoProxy("localhost, .internal.example, example.org:8443,[::1]")
    assert rule.bypass("localhost") and rule.bypass("LOCALHOST.")
    assert rule.bypass("a.internal.example") and rule.bypass("internal.example")
    assert rule.bypass("api.example.org") and rule.bypass("::1")
    assert not rule.bypass("myresource.openai.azure.com")
    assert not rule.bypass("notexample.org")
    assert NoProxy("*").bypass("anything.example")
    assert not NoProxy("").bypass("localhost")


def test_proxy_url_parsing() -> None:
    """Credentials are percent-decoded into Basic auth and never shown in a repr."""
    parsed = ProxyConfig.parse("http://us%40r:p%3Ass@proxy.hospital.local:3128")
    assert (parsed.host, parsed.port) == ("proxy.hospital.local", 3128)
    assert parsed.authorization == b"Basic " + base64.b64encode(b"us@r:p:ss")
    assert "p:ss" not in repr(parsed) and "us@r" not in repr(parsed)
    assert ProxyConfig.parse("proxy:8080").authorization is None
    with pytest.raises(ValueError, match="http://"):
        ProxyConfig.parse("https://proxy:8443")


async def test_a_connect_to_the_proxy_cut_short_closes_its_socket() -> None:
    """A proxy that never answers the connect: the gateway gives up at its connect
    timeout (a cancellation inside the connect) and closes the socket it opened, instead
    of leaving it to the garbage collector."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    address = listener.getsockname()
    # Its accept queue full, the proxy's kernel drops further SYNs: a connect hangs.
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(address)
        fillers.append(filler)
    client = UpstreamClient(
        base_url="https://localhost:9/v1",
        timeouts=Timeouts(connect=0.3, read=5, pool=5),
        ssl_context=ssl.create_default_context(),
        proxy=ProxyConfig.parse(f"http://127.0.0.1:{address[1]}"),
    )
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            with pytest.raises(UpstreamConnectTimeout):
                await _get(client)
            gc.collect()
    finally:
        for filler in fillers:
            filler.close()
        listener.close()
    assert [str(w.message) for w in caught if w.category is ResourceWarning] == []
