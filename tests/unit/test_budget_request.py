"""Reading client requests: what they ask for, and the body forwarded upstream."""

import io
import json
import wave
from decimal import Decimal

import pytest

from budget.operations import Operation
from budget.request import InvalidRequest, parse_request

JSON = "application/json"


def body(**fields: object) -> bytes:
    return json.dumps(fields).encode()


def test_streamed_chat_gets_include_usage_and_keeps_other_stream_options() -> None:
    """A streamed chat request is forwarded with include_usage true, its other options kept."""
    raw = (
        b'{"model": "gpt-4o-mini", "stream": true, "temperature": 0.2,'
        b' "stream_options": {"include_obfuscation": false},'
        b' "messages": [{"role": "user", "content": "Gr\\u00fcezi"}]}'
    )
    info, forwarded = parse_request(Operation.CHAT, JSON, raw)
    assert info.stream and not info.client_wants_usage
    assert json.loads(forwarded) == {
        "model": "gpt-4o-mini",
        "stream": True,
        "temperature": 0.2,
        "stream_options": {"include_obfuscation": False, "include_usage": True},
        "messages": [{"role": "user", "content": "Grüezi"}],
        "store": False,
    }
    assert b", " not in forwarded and b": " not in forwarded  # compact


def test_streamed_completion_with_usage_false_is_switched_on() -> None:
    """include_usage false from the client is turned on upstream; the client still did not ask."""
    raw = body(
        model="gpt-3.5-turbo-instruct",
        prompt="x",
        stream=True,
        stream_options={"include_usage": False},
    )
    info, forwarded = parse_request(Operation.COMPLETION, JSON, raw)
    assert not info.client_wants_usage
    assert json.loads(forwarded)["stream_options"] == {"include_usage": True}


def test_body_identity_when_nothing_changes() -> None:
    """Requests that set `store` and need no include_usage go upstream as the same bytes."""
    plain = body(model="gpt-4o-mini", messages=[], store=False)
    assert parse_request(Operation.CHAT, JSON, plain)[1] is plain
    asked = body(
        model="gpt-4o-mini",
        stream=True,
        stream_options={"include_usage": True},
        store=True,
        messages=[],
    )
    info, forwarded = parse_request(Operation.CHAT, JSON, asked)
    assert forwarded is asked and info.client_wants_usage and info.store is True
    responses = body(model="gpt-4.1", input="hi", stream=True, store=False)
    assert parse_request(Operation.RESPONSES, JSON, responses)[1] is responses
    embedding = body(model="text-embedding-3-small", input="hi")
    assert parse_request(Operation.EMBEDDING, JSON, embedding)[1] is embedding


@pytest.mark.parametrize(
    ("operation", "raw"),
    [
        (Operation.CHAT, b'{"model":"gpt-4o-mini","messages":[]}'),
        (Operation.RESPONSES, b'{"model":"gpt-4.1","input":"hi"}'),
        (Operation.RESPONSES, b'{"model":"gpt-4.1","input":"hi","store":null}'),
        (Operation.RESPONSES, b'  \n{"model":"gpt-4.1","input":"hi"}'),
        (Operation.CHAT, b'{"model":"gpt-4o-mini","messages":[],"stream":true}'),
    ],
)
def test_store_false_added_where_the_client_did_not_set_it(
    operation: Operation, raw: bytes
) -> None:
    """Chat and Responses without `store` go upstream with `store: false`, once, as valid JSON."""
    info, forwarded = parse_request(operation, JSON, raw)
    assert info.store is None
    assert json.loads(forwarded)["store"] is False
    assert forwarded.count(b'"store"') == 1
    assert {
        k: v for k, v in json.loads(forwarded).items() if k not in ("store", "stream_options")
    } == {k: v for k, v in json.loads(raw).items() if k != "store"}


def test_store_must_be_a_boolean() -> None:
    """A `store` that is not a boolean is refused, naming the parameter."""
    with pytest.raises(InvalidRequest) as caught:
        parse_request(Operation.CHAT, JSON, b'{"model":"gpt-4o-mini","store":"yes"}')
    assert caught.value.param == "store"


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b'"model"', b"", b"\xff\xfe{"])
def test_invalid_json_body(raw: bytes) -> None:
    """A body that is not a JSON object is rejected as invalid_json."""
    with pytest.raises(InvalidRequest) as caught:
        parse_request(Operation.CHAT, JSON, raw)
    assert caught.value.message == "Invalid JSON body"
    assert caught.value.code == "invalid_json"
    assert caught.value.param is None


@pytest.mark.parametrize(
    ("operation", "fields", "param"),
    [
        (Operation.CHAT, {"messages": []}, "model"),
        (Operation.CHAT, {"model": 4}, "model"),
        (Operation.CHAT, {"model": "m", "stream": "yes"}, "stream"),
        (Operation.CHAT, {"model": "m", "max_tokens": "10"}, "max_tokens"),
        (Operation.CHAT, {"model": "m", "max_completion_tokens": True}, "max_completion_tokens"),
        (Operation.CHAT, {"model": "m", "n": 1.5}, "n"),
        (Operation.IMAGE, {"model": "dall-e-3", "prompt": "a", "n": 0}, "n"),
        (Operation.RESPONSES, {"model": "m", "max_output_tokens": -1}, "max_output_tokens"),
        (Operation.CHAT, {"model": "m", "stream": True, "stream_options": 1}, "stream_options"),
    ],
)
def test_invalid_fields(operation: Operation, fields: dict[str, object], param: str) -> None:
    """A missing model or a wrongly typed stream/max tokens/n names the offending param."""
    with pytest.raises(InvalidRequest) as caught:
        parse_request(operation, JSON, json.dumps(fields).encode())
    assert caught.value.param == param
    assert caught.value.code == "invalid_request"


def test_chat_input_chars_and_max_tokens() -> None:
    """Chat counts string contents and text parts (not images); max_completion_tokens wins."""
    raw = body(
        model="gpt-4o",
        max_tokens=50,
        max_completion_tokens=70,
        n=2,
        messages=[
            {"role": "system", "content": "Hallo"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "abc"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                ],
            },
        ],
    )
    info, _ = parse_request(Operation.CHAT, JSON, raw)
    assert (info.input_chars, info.max_output_tokens, info.choices) == (8, 70, 2)
    assert not info.stream


def test_token_array_inputs_count_four_chars_per_token() -> None:
    """Completions prompts and embedding inputs given as token ids count 4 characters a token."""
    info, _ = parse_request(Operation.COMPLETION, JSON, body(model="m", prompt=[1, 2, 3]))
    assert info.input_chars == 12
    info, _ = parse_request(Operation.EMBEDDING, JSON, body(model="m", input=[[1, 2], [3]]))
    assert info.input_chars == 12
    info, _ = parse_request(Operation.EMBEDDING, JSON, body(model="m", input=["ab", "cde"]))
    assert info.input_chars == 5


def test_responses_input_and_instructions() -> None:
    """Responses counts instructions, string input and input_text parts; reads max_output_tokens."""
    raw = body(
        model="gpt-4.1",
        instructions="Be brief",
        max_output_tokens=99,
        input=[{"role": "user", "content": [{"type": "input_text", "text": "Hello"}]}],
    )
    info, _ = parse_request(Operation.RESPONSES, JSON, raw)
    assert (info.input_chars, info.max_output_tokens) == (13, 99)


def test_speech_and_image_requests() -> None:
    """Speech counts input characters; images read n, size and quality with their defaults."""
    info, _ = parse_request(Operation.SPEECH, JSON, body(model="tts-1", input="Grüezi", voice="a"))
    assert info.characters == 6
    info, _ = parse_request(Operation.IMAGE, JSON, body(model="dall-e-2", prompt="cat"))
    assert (info.images, info.image_size, info.image_quality) == (1, "1024x1024", "standard")
    raw = body(model="dall-e-3", prompt="cat", n=2, size="1792x1024", quality="hd")
    info, _ = parse_request(Operation.IMAGE, JSON, raw)
    assert (info.images, info.image_size, info.image_quality) == (2, "1792x1024", "hd")


def wav_bytes(seconds_frames: int, rate: int = 8000) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"\x00\x00" * seconds_frames)
    return out.getvalue()


def multipart(fields: dict[str, str], file: bytes | None) -> tuple[str, bytes]:
    boundary = "----aza-test-boundary"
    parts = []
    for name, value in fields.items():
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
        parts.append(f"{head}{value}\r\n".encode())
    if file is not None:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
            "Content-Type: audio/wav\r\n\r\n".encode()
            + file
            + b"\r\n"
        )
    parts.append(f"--{boundary}--\r\n".encode())
    return f"multipart/form-data; boundary={boundary}", b"".join(parts)


def test_transcription_reads_wav_duration_exactly() -> None:
    """A 12000-frame 8 kHz WAV upload is 1.5 s; the multipart body is forwarded unchanged."""
    content_type, raw = multipart(
        {"model": "whisper-1", "stream": "false", "response_format": "text"}, wav_bytes(12_000)
    )
    info, forwarded = parse_request(Operation.TRANSCRIPTION, content_type, raw)
    assert forwarded is raw
    assert info.model == "whisper-1" and not info.stream
    assert info.audio_seconds == Decimal("1.5")


def test_translation_of_unreadable_audio_has_no_duration() -> None:
    """An unreadable file gives audio_seconds None (json answers report usage); stream is read."""
    content_type, raw = multipart({"model": "whisper-1", "stream": "true"}, b"not audio at all")
    info, _ = parse_request(Operation.TRANSLATION, content_type, raw)
    assert info.audio_seconds is None and info.stream and info.response_format == "json"


@pytest.mark.parametrize("response_format", ["text", "srt", "vtt"])
def test_unreadable_audio_without_usage_to_come_is_refused(response_format: str) -> None:
    """text/srt/vtt answers carry no usage: an unreadable upload cannot be billed, so refused."""
    content_type, raw = multipart(
        {"model": "whisper-1", "response_format": response_format}, b"not audio at all"
    )
    with pytest.raises(InvalidRequest) as caught:
        parse_request(Operation.TRANSCRIPTION, content_type, raw)
    assert (caught.value.code, caught.value.param) == ("audio_duration_unreadable", "file")


def test_speech_instructions_count_as_input() -> None:
    """gpt-4o-mini-tts reads its instructions: 6 input + 12 instruction characters."""
    raw = body(model="gpt-4o-mini-tts", input="Grüezi", instructions="Sprich ruhig", voice="a")
    info, _ = parse_request(Operation.SPEECH, JSON, raw)
    assert info.characters == info.input_chars == 18


def test_multipart_errors() -> None:
    """A missing model, a bad stream flag or a non-multipart body are invalid requests."""
    content_type, raw = multipart({"language": "de"}, wav_bytes(800))
    with pytest.raises(InvalidRequest) as caught:
        parse_request(Operation.TRANSCRIPTION, content_type, raw)
    assert caught.value.param == "model"
    content_type, raw = multipart({"model": "whisper-1", "stream": "maybe"}, None)
    with pytest.raises(InvalidRequest) as caught:
        parse_request(Operation.TRANSCRIPTION, content_type, raw)
    assert caught.value.param == "stream"
    with pytest.raises(InvalidRequest):
        parse_request(Operation.TRANSCRIPTION, JSON, body(model="whisper-1"))
