"""The fake upstream's server-sent event writer: paced, cut, or abandoned on cue.

`sse_data` and `sse_event` frame one event the way OpenAI does (chat
completions send bare `data:` lines, the Responses API names each event).
`EventStream` sends the frames and reports to a `StreamControl` (the fake
upstream): it reads the pacing and cutting knobs before each frame and counts
how each stream ended, so failure tests can steer and observe streams.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable
from typing import Any, Protocol

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

DONE = b"data: [DONE]\n\n"


def dumps(value: Any) -> bytes:
    """`value` as JSON with compact separators, as OpenAI sends it."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def sse_data(value: Any) -> bytes:
    """One unnamed event (`data: {...}`), as chat completions stream."""
    return b"data: " + dumps(value) + b"\n\n"


def sse_event(name: str, value: Any) -> bytes:
    """One named event (`event: name` then `data: {...}`), as the Responses API streams."""
    return f"event: {name}\n".encode() + b"data: " + dumps(value) + b"\n\n"


class StreamControl(Protocol):
    """The knobs a stream reads before each frame and the counts it keeps."""

    chunk_delay: float
    cut_after_chunks: int | None
    open_streams: int
    streams_completed: int
    streams_abandoned: int
    streams_cut: int
    last_chunk_sent_at: float


class EventStream(Response):
    """A server-sent event stream that `control` can pace, cut, and see abandoned."""

    def __init__(self, control: StreamControl, chunks: Iterable[bytes]) -> None:
        super().__init__(media_type="text/event-stream")
        self._control = control
        self._chunks = list(chunks)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        control = self._control
        control.open_streams += 1

        async def client_gone() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        watcher = asyncio.ensure_future(client_gone())
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"text/event-stream; charset=utf-8"),
                        (b"cache-control", b"no-cache"),
                    ],
                }
            )
            for index, chunk in enumerate(self._chunks):
                if control.cut_after_chunks is not None and index >= control.cut_after_chunks:
                    # Returning without finishing the body makes the server
                    # drop the connection: the client sees a cut stream.
                    control.streams_cut += 1
                    return
                if index and control.chunk_delay:
                    await asyncio.wait({watcher}, timeout=control.chunk_delay)
                if watcher.done():
                    control.streams_abandoned += 1
                    return
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                control.last_chunk_sent_at = time.monotonic()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            control.streams_completed += 1
        finally:
            watcher.cancel()
            control.open_streams -= 1
