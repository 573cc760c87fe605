"""Stream taps: usage read from SSE streams whose bytes pass through unbuffered."""

import json
from collections.abc import Callable, Iterator
from decimal import Decimal

import pytest

from budget.operations import Operation
from budget.request import RequestInfo
from budget.stream import ChatStreamTap, StreamTap, stream_tap_for
from budget.usage import Usage


def chunk_event(delta: dict[str, object], finish: str | None = None) -> bytes:
    payload = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        "usage": None,
    }
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


CONTENT_EVENTS = [
    chunk_event({"role": "assistant", "content": ""}),
    chunk_event({"content": "Gr\u00fcezi"}),
    # Text that looks like a usage object stays inside an escaped JSON string.
    chunk_event({"content": 'say "usage": {"x": 1}'}),
    chunk_event({}, finish="stop"),
]
USAGE_EVENT = (
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,'
    b'"model":"gpt-4o-mini-2024-07-18","choices":[],"usage":{"prompt_tokens":20,'
    b'"completion_tokens":3,"total_tokens":23,"prompt_tokens_details":{"cached_tokens":4},'
    b'"completion_tokens_details":{"reasoning_tokens":0}}}\n\n'
)
DONE_EVENT = b"data: [DONE]\n\n"
CHAT_EVENTS = [*CONTENT_EVENTS, USAGE_EVENT, DONE_EVENT]
CHAT_USAGE = Usage(Operation.CHAT, "gpt-4o-mini-2024-07-18", 20, 4, 3, 0)


def crlf(event: bytes) -> bytes:
    return event.replace(b"\n", b"\r\n")


def chat_info(*, wants_usage: bool) -> RequestInfo:
    return RequestInfo(
        Operation.CHAT,
        "gpt-4o-mini",
        stream=True,
        client_wants_usage=wants_usage,
        input_chars=40,
    )


def splits(data: bytes) -> Iterator[list[bytes]]:
    """The stream cut into two pieces at every byte offset, then one byte at a time."""
    for i in range(len(data) + 1):
        yield [data[:i], data[i:]]
    yield [data[i : i + 1] for i in range(len(data))]


def run(tap: StreamTap, pieces: list[bytes]) -> list[bytes]:
    return [tap.feed(piece) for piece in pieces] + [tap.close()]


@pytest.mark.parametrize("line_end", [lambda e: e, crlf], ids=["lf", "crlf"])
def test_chat_tap_removes_exactly_the_usage_event(line_end: Callable[[bytes], bytes]) -> None:
    """Split at any byte, the forwarded bytes are the stream minus exactly the usage event."""
    events = [line_end(e) for e in CHAT_EVENTS]
    data = b"".join(events)
    expected = data.replace(line_end(USAGE_EVENT), b"")
    assert len(expected) == len(data) - len(line_end(USAGE_EVENT))
    for pieces in splits(data):
        tap = stream_tap_for(chat_info(wants_usage=False))
        assert isinstance(tap, ChatStreamTap)
        assert b"".join(run(tap, pieces)) == expected
        assert tap.usage() == CHAT_USAGE
        assert tap.completed


def test_chat_tap_never_holds_back_a_complete_event() -> None:
    """After every feed, all events complete so far (bar the usage event) have been forwarded."""
    data = b"".join(CHAT_EVENTS)
    ends, offset = [], 0
    for event in CHAT_EVENTS:
        offset += len(event)
        ends.append((offset, b"" if event == USAGE_EVENT else event))
    for i in range(len(data) + 1):
        tap = stream_tap_for(chat_info(wants_usage=False))
        forwarded = tap.feed(data[:i])
        assert forwarded == b"".join(event for end, event in ends if end <= i)


@pytest.mark.parametrize("line_end", [lambda e: e, crlf], ids=["lf", "crlf"])
def test_chat_tap_is_identity_when_client_wants_usage(line_end: Callable[[bytes], bytes]) -> None:
    """With the client's own include_usage, each feed returns its input bytes untouched."""
    data = b"".join(line_end(e) for e in CHAT_EVENTS)
    for pieces in splits(data):
        tap = stream_tap_for(chat_info(wants_usage=True))
        for piece in pieces:
            assert tap.feed(piece) == piece
        assert tap.close() == b""
        assert tap.usage() == CHAT_USAGE


def test_chat_tap_parses_only_the_usage_event(monkeypatch: pytest.MonkeyPatch) -> None:
    """Content chunks are never JSON-parsed: one JSON decode for the whole stream."""
    import budget.response

    calls: list[str] = []

    class CountingDecoder(json.JSONDecoder):
        def decode(self, s: str, *args: object, **kwargs: object) -> object:
            calls.append(s)
            return super().decode(s)

    monkeypatch.setattr(budget.response, "_EXACT_DECODER", CountingDecoder(parse_float=Decimal))
    tap = stream_tap_for(chat_info(wants_usage=False))
    for event in CHAT_EVENTS:
        tap.feed(event)
    tap.close()
    assert len(calls) == 1 and '"usage"' in calls[0]
    assert tap.usage() == CHAT_USAGE


def test_usage_riding_on_a_content_chunk_is_kept() -> None:
    """A chunk carrying both choices and usage is read but forwarded, as it holds content."""
    event = (
        b'data: {"model":"m","choices":[{"index":0,"delta":{"content":"a"}}],'
        b'"usage":{"prompt_tokens":1,"completion_tokens":1}}\n\n'
    )
    tap = stream_tap_for(chat_info(wants_usage=False))
    assert tap.feed(event) == event
    assert tap.usage() == Usage(Operation.CHAT, "m", input_tokens=1, output_tokens=1)


def test_stream_without_usage_is_estimated() -> None:
    """A stream cut short charges input from the request and one token per content event."""
    tap = stream_tap_for(chat_info(wants_usage=False))
    out = b"".join(tap.feed(e) for e in CONTENT_EVENTS[:3]) + tap.close()
    assert out == b"".join(CONTENT_EVENTS[:3])
    assert tap.usage() is None and not tap.completed
    estimate = tap.estimated_usage()
    assert (estimate.input_tokens, estimate.output_tokens) == (18, 3)  # ceil(40/4) + 8
    assert estimate.estimated and estimate.model == "gpt-4o-mini"


def test_unterminated_last_event_is_forwarded_on_close() -> None:
    """Bytes of an event that never got its blank line come out at close()."""
    tap = stream_tap_for(chat_info(wants_usage=False))
    partial = CONTENT_EVENTS[1][:-2]
    assert tap.feed(partial) == b""
    assert tap.close() == partial


def responses_event(kind: str, payload: dict[str, object]) -> bytes:
    data = json.dumps({"type": kind, **payload}).encode()
    return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"


RESPONSE_USAGE = {
    "input_tokens": 30,
    "input_tokens_details": {"cached_tokens": 10},
    "output_tokens": 5,
    "output_tokens_details": {"reasoning_tokens": 2},
    "total_tokens": 35,
}
RESPONSES_EVENTS = [
    responses_event("response.created", {"response": {"model": "gpt-4.1", "usage": None}}),
    responses_event("response.output_text.delta", {"delta": "Hal"}),
    responses_event("response.output_text.delta", {"delta": '"type": "response.completed"'}),
    responses_event("response.output_text.done", {"text": "Hallo"}),
    responses_event(
        "response.completed",
        {"response": {"model": "gpt-4.1-2025-04-14", "usage": RESPONSE_USAGE}},
    ),
]


def test_responses_tap_reads_completed_usage_and_forwards_untouched() -> None:
    """Responses streams pass byte-for-byte; usage comes from response.completed."""
    data = b"".join(RESPONSES_EVENTS)
    info = RequestInfo(Operation.RESPONSES, "gpt-4.1", stream=True, input_chars=12)
    for pieces in splits(data):
        tap = stream_tap_for(info)
        for piece in pieces:
            assert tap.feed(piece) == piece
        assert tap.close() == b""
        assert tap.completed
        assert tap.usage() == Usage(Operation.RESPONSES, "gpt-4.1-2025-04-14", 30, 10, 5, 2)


def test_responses_stream_cut_short_is_estimated() -> None:
    """Without response.completed the usage is estimated from the output_text deltas seen."""
    info = RequestInfo(Operation.RESPONSES, "gpt-4.1", stream=True, input_chars=12)
    tap = stream_tap_for(info)
    for event in RESPONSES_EVENTS[:4]:
        tap.feed(event)
    tap.close()
    assert tap.usage() is None and not tap.completed
    estimate = tap.estimated_usage()
    assert (estimate.input_tokens, estimate.output_tokens, estimate.estimated) == (11, 2, True)


def test_transcription_stream_reads_done_usage() -> None:
    """A streamed transcription's usage comes from transcript.text.done."""
    data = (
        b'data: {"type":"transcript.text.delta","delta":"Hal"}\n\n'
        b'data: {"type":"transcript.text.done","text":"Hallo","usage":{"type":"tokens",'
        b'"input_tokens":14,"output_tokens":3,"total_tokens":17}}\n\n'
    )
    info = RequestInfo(Operation.TRANSCRIPTION, "gpt-4o-transcribe", stream=True)
    tap = stream_tap_for(info)
    assert tap.feed(data) == data
    assert tap.usage() == Usage(
        Operation.TRANSCRIPTION, "gpt-4o-transcribe", input_tokens=14, output_tokens=3
    )
