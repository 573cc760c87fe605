"""Real audio files in every format OpenAI accepts, encoded by the tests with PyAV.

`encode(extension, seconds)` returns the bytes of a sine tone of exactly
`seconds` in the container and codec a file of that extension has.
`webm_recording(seconds)` is WebM/Opus as a browser's MediaRecorder writes
it: streamed, so its header states no duration.
"""

from __future__ import annotations

import io
import math
import struct
from typing import Any

import av

RATE = 48_000
# extension -> (FFmpeg muxer, codec)
FORMATS: dict[str, tuple[str, str]] = {
    "flac": ("flac", "flac"),
    "m4a": ("ipod", "aac"),
    "mp3": ("mp3", "libmp3lame"),
    "mp4": ("mp4", "aac"),
    "mpeg": ("mp3", "libmp3lame"),
    "mpga": ("mp3", "libmp3lame"),
    "oga": ("ogg", "flac"),
    "ogg": ("ogg", "libopus"),
    "opus": ("ogg", "libopus"),
    "wav": ("wav", "pcm_s16le"),
    "webm": ("webm", "libopus"),
}
MIME = {
    "flac": "audio/flac",
    "m4a": "audio/mp4",
    "mp3": "audio/mpeg",
    "mp4": "audio/mp4",
    "mpeg": "audio/mpeg",
    "mpga": "audio/mpeg",
    "oga": "audio/ogg",
    "ogg": "audio/ogg",
    "opus": "audio/ogg",
    "wav": "audio/wav",
    "webm": "audio/webm",
}


class _Unseekable(io.RawIOBase):
    """A write-only sink the muxer cannot seek back in (a live recording)."""

    def __init__(self) -> None:
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def write(self, b: Any) -> int:
        self.data.extend(b)
        return len(b)


def _tone(frame_samples: int, start: int) -> bytes:
    return struct.pack(
        f"<{frame_samples}h",
        *(
            int(6000 * math.sin(2 * math.pi * 440 * (start + i) / RATE))
            for i in range(frame_samples)
        ),
    )


def _write(target: Any, muxer: str, codec: str, seconds: float) -> None:
    with av.open(target, mode="w", format=muxer) as out:
        stream = out.add_stream(codec, rate=RATE, layout="mono")
        frame_size = stream.codec_context.frame_size or 1024
        total = round(seconds * RATE)
        pts = 0
        while pts < total:
            n = min(frame_size, total - pts)
            frame = av.AudioFrame(format="s16", layout="mono", samples=n)
            frame.planes[0].update(_tone(n, pts))
            frame.sample_rate = RATE
            frame.pts = pts
            for packet in stream.encode(frame):
                out.mux(packet)
            pts += n
        for packet in stream.encode(None):
            out.mux(packet)


def encode(extension: str, seconds: float) -> bytes:
    """A `seconds` long tone as a file of `extension` (see FORMATS)."""
    muxer, codec = FORMATS[extension]
    buffer = io.BytesIO()
    _write(buffer, muxer, codec, seconds)
    return buffer.getvalue()


def webm_recording(seconds: float) -> bytes:
    """WebM/Opus written as it is recorded: no duration in its header."""
    sink = _Unseekable()
    _write(sink, "webm", "libopus", seconds)
    return bytes(sink.data)
