"""Reading usage from whole (non-streamed) upstream responses."""

import json
from decimal import Decimal

from budget.operations import Operation
from budget.request import RequestInfo
from budget.response import usage_from_response
from budget.usage import Usage


def info(operation: Operation, model: str = "m", **fields: object) -> RequestInfo:
    return RequestInfo(operation, model, **fields)  # type: ignore[arg-type]  # test shorthand


def test_chat_usage_with_cached_and_reasoning_tokens() -> None:
    """Chat usage reads prompt/completion tokens, cached and reasoning details, and the model."""
    body = json.dumps(
        {
            "model": "gpt-4o-mini-2024-07-18",
            "choices": [],
            "usage": {
                "prompt_tokens": 1000,
                "completion_tokens": 500,
                "total_tokens": 1500,
                "prompt_tokens_details": {"cached_tokens": 200},
                "completion_tokens_details": {"reasoning_tokens": 64},
            },
        }
    ).encode()
    usage = usage_from_response(info(Operation.CHAT, "gpt-4o-mini"), body)
    assert usage == Usage(Operation.CHAT, "gpt-4o-mini-2024-07-18", 1000, 200, 500, 64)
    assert usage.total_tokens == 1500 and not usage.estimated


def test_responses_usage() -> None:
    """Responses usage reads input/output tokens and their details."""
    body = json.dumps(
        {
            "model": "o4-mini-2025-04-16",
            "usage": {
                "input_tokens": 30,
                "input_tokens_details": {"cached_tokens": 10},
                "output_tokens": 50,
                "output_tokens_details": {"reasoning_tokens": 40},
            },
        }
    ).encode()
    usage = usage_from_response(info(Operation.RESPONSES, "o4-mini"), body)
    assert usage == Usage(Operation.RESPONSES, "o4-mini-2025-04-16", 30, 10, 50, 40)


def test_embeddings_usage() -> None:
    """Embeddings usage is the prompt tokens, no output."""
    body = (
        b'{"data": [], "model": "text-embedding-3-small",'
        b' "usage": {"prompt_tokens": 8, "total_tokens": 8}}'
    )
    usage = usage_from_response(info(Operation.EMBEDDING), body)
    assert usage == Usage(Operation.EMBEDDING, "text-embedding-3-small", input_tokens=8)


def test_missing_usage_or_json_gives_none() -> None:
    """A chat response without usage, or not JSON, reports no usage."""
    assert usage_from_response(info(Operation.CHAT), b'{"choices": []}') is None
    assert usage_from_response(info(Operation.CHAT), b"<html>") is None


def test_transcription_duration_and_token_usage() -> None:
    """Transcription usage of type duration gives exact seconds; type tokens gives tokens."""
    duration = b'{"text": "x", "usage": {"type": "duration", "seconds": 12.5}}'
    usage = usage_from_response(info(Operation.TRANSCRIPTION, "whisper-1"), duration)
    assert usage == Usage(Operation.TRANSCRIPTION, "whisper-1", audio_seconds=Decimal("12.5"))
    tokens = json.dumps(
        {
            "text": "x",
            "usage": {
                "type": "tokens",
                "input_tokens": 14,
                "input_token_details": {"text_tokens": 0, "audio_tokens": 14},
                "output_tokens": 45,
                "total_tokens": 59,
            },
        }
    ).encode()
    request = info(Operation.TRANSCRIPTION, "gpt-4o-transcribe", audio_seconds=Decimal("3.2"))
    usage = usage_from_response(request, tokens)
    assert usage == Usage(
        Operation.TRANSCRIPTION,
        "gpt-4o-transcribe",
        input_tokens=14,
        output_tokens=45,
        audio_input_tokens=14,
    )


def test_text_transcription_uses_file_duration() -> None:
    """A text/srt answer is charged the file's duration to the second, as an estimate."""
    request = info(Operation.TRANSLATION, "whisper-1", audio_seconds=Decimal("1.5"))
    usage = usage_from_response(request, b"1\n00:00:00,000 --> 00:00:01,500\nHallo\n")
    assert usage == Usage(
        Operation.TRANSLATION, "whisper-1", audio_seconds=Decimal(2), estimated=True
    )
    assert usage is not None and usage.source == "estimated"
    assert usage_from_response(info(Operation.TRANSLATION, "whisper-1"), b"Hallo") is None


def test_speech_counts_request_characters() -> None:
    """Speech is charged the request's characters (what tts-1 bills); the audio body is ignored."""
    usage = usage_from_response(info(Operation.SPEECH, "tts-1", characters=42), b"\xff\xfb\x90")
    assert usage == Usage(Operation.SPEECH, "tts-1", characters=42)


def test_images_count_data_items_and_token_usage() -> None:
    """Images count the returned data items at the request's size/quality, plus any token usage."""
    request = info(
        Operation.IMAGE, "dall-e-3", images=3, image_size="1024x1792", image_quality="hd"
    )
    usage = usage_from_response(request, b'{"created": 1, "data": [{"url": "a"}, {"url": "b"}]}')
    assert usage == Usage(
        Operation.IMAGE, "dall-e-3", images=2, image_size="1024x1792", image_quality="hd"
    )
    gpt_image = json.dumps(
        {
            "data": [{"b64_json": "AA"}],
            "usage": {"input_tokens": 50, "output_tokens": 4160, "total_tokens": 4210},
        }
    ).encode()
    request = info(
        Operation.IMAGE, "gpt-image-1", images=1, image_size="1024x1024", image_quality="high"
    )
    usage = usage_from_response(request, gpt_image)
    assert usage is not None
    assert (usage.images, usage.input_tokens, usage.output_tokens) == (1, 50, 4160)


def test_moderation_is_zero_usage() -> None:
    """Moderation yields a zero usage under the response's model."""
    body = b'{"id": "modr", "model": "omni-moderation-2024-09-26", "results": []}'
    usage = usage_from_response(info(Operation.MODERATION, "omni-moderation-latest"), body)
    assert usage == Usage(Operation.MODERATION, "omni-moderation-2024-09-26")
