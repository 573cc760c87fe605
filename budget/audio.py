"""The duration of uploaded audio, for transcription priced by the second.

PyAV (FFmpeg's demuxers) reads every format OpenAI accepts: flac, m4a, mp3,
mp4, mpeg, mpga, oga, ogg, opus, wav and webm. mutagen, used before, reads
no WebM/Matroska, which is what a browser's MediaRecorder writes.

The container's own length is used where it states one (read from the
header, nothing decoded). A WebM written while recording states none: then
the audio packets are demuxed, not decoded, and the last one's end time is
the length; that walk is bounded by `DEMUX_PACKET_LIMIT`.

The demuxer is chosen from the file's magic bytes, never probed: FFmpeg's
probing would also try playlist formats (HLS, concat) that open other files
or URLs named inside the upload.
"""

from __future__ import annotations

import io
from decimal import ROUND_CEILING, Decimal
from fractions import Fraction

import av

# A 25 MB upload of 6 kbit/s Opus in 20 ms packets is about 1.7 M packets
# (9 h); a walk over that many takes some seconds of CPU. Beyond the limit
# the length counts as unreadable.
DEMUX_PACKET_LIMIT = 2_000_000

_AV_TIME_BASE = Fraction(1, 1_000_000)  # the unit of a container's duration


def _demuxer(head: bytes) -> str | None:
    """FFmpeg's demuxer for a file starting with `head`, or None for no accepted format."""
    if head.startswith(b"RIFF") and head[8:12] == b"WAVE":
        return "wav"
    if head.startswith(b"fLaC"):
        return "flac"
    if head.startswith(b"OggS"):  # ogg, oga, opus
        return "ogg"
    if head.startswith(b"\x1a\x45\xdf\xa3"):  # EBML: webm (Matroska)
        return "matroska"
    if head[4:8] == b"ftyp":  # mp4, m4a
        return "mov"
    if head.startswith(b"ID3") or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0):
        return "mp3"  # mp3, mpeg, mpga: an ID3 tag or an MPEG audio frame sync
    return None


def audio_duration_seconds(data: bytes) -> Decimal | None:
    """Duration in seconds of audio file bytes (exact decimal of what the file states).

    None when the format is not one OpenAI accepts, the file is damaged, has
    no audio stream, or states no length and its packets do not tell one.
    """
    demuxer = _demuxer(data[:16])
    if demuxer is None:
        return None
    try:
        with av.open(io.BytesIO(data), mode="r", format=demuxer) as container:
            if not container.streams.audio:
                return None
            stream = container.streams.audio[0]
            length: Fraction | None
            if container.duration is not None and container.duration > 0:
                length = Fraction(container.duration) * _AV_TIME_BASE
            elif stream.duration is not None and stream.duration > 0 and stream.time_base:
                length = stream.duration * stream.time_base
            else:
                length = _demuxed_length(container, stream)
            # Opus counts its pre-skip (decoder delay) in the length; it is
            # not audio anyone recorded.
            delay = stream.codec_context.delay
            rate = stream.codec_context.sample_rate
            if length is not None and delay and rate:
                length -= Fraction(delay, rate)
    except (av.FFmpegError, ValueError, OSError, EOFError):
        return None
    if length is None or length <= 0:
        return None
    return Decimal(length.numerator) / Decimal(length.denominator)


def _demuxed_length(
    container: av.container.InputContainer, stream: av.audio.stream.AudioStream
) -> Fraction | None:
    """From the first packet's start to the last one's end, packets demuxed not decoded."""
    time_base = stream.time_base
    if time_base is None:
        return None
    start: int | None = None
    end: int | None = None
    for count, packet in enumerate(container.demux(stream)):
        if count >= DEMUX_PACKET_LIMIT:
            return None
        pts = packet.pts
        if pts is None:
            continue
        packet_end = pts + (packet.duration or 0)
        start = pts if start is None else min(start, pts)
        end = packet_end if end is None else max(end, packet_end)
    if start is None or end is None:
        return None
    return (end - start) * time_base


# A container's length may include the padding of its last codec frame
# (up to 1152 samples, 24 ms at 48 kHz): not billed as one more second.
FRAME_PADDING_SECONDS = Decimal("0.03")


def billed_seconds(seconds: Decimal, *, measured: bool = False) -> Decimal:
    """Seconds as OpenAI bills audio by time: whole seconds, rounded up, at least one.

    OpenAI's own reports do so (a verbose_json answer of `duration` 8.47 has
    `usage.seconds` 9). `measured`: the length was read from the upload, so
    up to FRAME_PADDING_SECONDS of it may be the last frame's padding.
    """
    if seconds <= 0:
        return Decimal(0)
    if measured:
        seconds -= FRAME_PADDING_SECONDS
    return max(Decimal(1), seconds.to_integral_value(rounding=ROUND_CEILING))
