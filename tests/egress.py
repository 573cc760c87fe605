"""A local HTTP CONNECT proxy for the egress tests: pipes bytes, records its tunnels."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field


@dataclass
class ConnectProxy:
    port: int
    credentials: str | None
    tunnels: list[str] = field(default_factory=list)
    refused: int = 0


@asynccontextmanager
async def connect_proxy() -> AsyncIterator[ConnectProxy]:
    """An HTTP CONNECT proxy on loopback that wants user `aza`, password `s3cret:x`."""
    state = ConnectProxy(0, "aza:s3cret:x")

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ")
        headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
        expected = "Basic " + base64.b64encode(str(state.credentials).encode()).decode()
        if method != "CONNECT" or headers.get("proxy-authorization") != expected:
            state.refused += 1
            writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\ncontent-length: 0\r\n\r\n")
            await writer.drain()
            writer.close()
            return
        state.tunnels.append(target)
        host, port = target.rsplit(":", 1)
        up_reader, up_writer = await asyncio.open_connection(
            "127.0.0.1" if host == "localhost" else host, int(port)
        )
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await writer.drain()
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    state.port = server.sockets[0].getsockname()[1]
    yield state
    server.close()
    await server.wait_closed()
