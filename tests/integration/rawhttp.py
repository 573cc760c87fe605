"""A raw HTTP/1.1 client for requests no library sends as written (dot segments, bad escapes)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes
    sent_body_bytes: int = 0


async def _read_response(reader: asyncio.StreamReader) -> RawResponse:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    length = headers.get("content-length")
    body = await reader.readexactly(int(length)) if length is not None else await reader.read()
    return RawResponse(status, headers, body)


async def raw_request(
    root: str,
    method: str,
    target: str,
    *,
    headers: Mapping[str, str] | None = None,
    body: bytes = b"",
    answer_within: float = 10.0,
) -> RawResponse:
    """Send `method target` byte for byte as given (no normalisation); read one response.

    TimeoutError when no answer comes within `answer_within` seconds.
    """
    url = urlsplit(root)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    try:
        lines = [f"{method} {target} HTTP/1.1", f"Host: {url.netloc}", "Connection: close"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        declared = any(name.lower() == "content-length" for name in headers or {})
        if not declared and (body or method in ("POST", "PUT")):
            lines.append(f"Content-Length: {len(body)}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()
        if method == "HEAD":
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), answer_within)
            status = int(head.split(b" ")[1])
            return RawResponse(status, {}, b"")
        return await asyncio.wait_for(_read_response(reader), answer_within)
    finally:
        writer.close()


async def chunked_flood(
    root: str,
    target: str,
    *,
    headers: Mapping[str, str] | None = None,
    chunk: bytes = b"x" * 65536,
    total_bytes: int = 200 * 1024 * 1024,
) -> RawResponse:
    """POST a chunked body of up to `total_bytes`, stopping once the server has answered.

    `sent_body_bytes` says how much went out before the answer came (TCP
    buffers let a few MB through before the server reads at all).
    """
    url = urlsplit(root)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    lines = [f"POST {target} HTTP/1.1", f"Host: {url.netloc}", "Transfer-Encoding: chunked"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    answer = asyncio.create_task(_read_response(reader))
    sent = 0
    try:
        framed = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
        while sent < total_bytes and not answer.done():
            writer.write(framed)
            drain = asyncio.ensure_future(writer.drain())
            done, _ = await asyncio.wait(
                {answer, drain}, timeout=10, return_when=asyncio.FIRST_COMPLETED
            )
            if drain not in done or drain.exception() is not None:
                drain.cancel()
                break  # answered, stopped reading, or closed
            sent += len(chunk)
        response = await asyncio.wait_for(answer, timeout=10)
        response.sent_body_bytes = sent
        return response
    finally:
        answer.cancel()
        writer.close()
