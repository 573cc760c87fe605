"""Hold estimates made before a request is forwarded."""

from decimal import Decimal

from budget.estimate import estimate_usage
from budget.operations import Operation
from budget.pricing import PriceBook
from budget.request import RequestInfo
from config import CONFIG_DIR

PRICES = PriceBook.load(CONFIG_DIR / "prices.toml")


def test_chat_estimate_uses_max_tokens_or_default() -> None:
    """Input = ceil(chars / 4) + 8; output = max tokens (else the default) per choice."""
    usage = estimate_usage(
        RequestInfo(Operation.CHAT, "gpt-4o-mini", input_chars=101, max_output_tokens=None),
        default_max_output_tokens=1024,
    )
    assert (usage.input_tokens, usage.output_tokens, usage.estimated) == (34, 1024, True)
    usage = estimate_usage(
        RequestInfo(Operation.CHAT, "gpt-4o-mini", input_chars=0, max_output_tokens=10, choices=3),
        default_max_output_tokens=1024,
    )
    assert (usage.input_tokens, usage.output_tokens) == (8, 30)


def test_embedding_and_moderation_estimate_no_output() -> None:
    """Embeddings and moderation reserve input tokens only."""
    for op in (Operation.EMBEDDING, Operation.MODERATION):
        usage = estimate_usage(RequestInfo(op, "m", input_chars=8), default_max_output_tokens=99)
        assert (usage.input_tokens, usage.output_tokens) == (10, 0)


def test_audio_estimate_uses_duration_or_ten_minutes() -> None:
    """Transcription holds the file's duration to the second, or 600 s when it is unreadable."""
    known = RequestInfo(Operation.TRANSCRIPTION, "whisper-1", audio_seconds=Decimal("1.5"))
    assert estimate_usage(known, default_max_output_tokens=1).audio_seconds == Decimal(2)
    short = RequestInfo(Operation.TRANSCRIPTION, "whisper-1", audio_seconds=Decimal("0.2"))
    assert estimate_usage(short, default_max_output_tokens=1).audio_seconds == Decimal(1)
    unknown = RequestInfo(Operation.TRANSLATION, "whisper-1")
    usage = estimate_usage(unknown, default_max_output_tokens=1)
    assert usage.audio_seconds == 600
    assert PRICES.cost_micros(usage) == 60_000  # 10 min x 0.006


def test_speech_and_image_estimates_price() -> None:
    """Speech holds its characters; images hold n at size/quality, by image or by token price."""
    speech = estimate_usage(
        RequestInfo(Operation.SPEECH, "tts-1", characters=1000), default_max_output_tokens=1
    )
    assert PRICES.cost_micros(speech) == 15_000
    dalle = RequestInfo(
        Operation.IMAGE, "dall-e-3", images=2, image_size="1024x1792", image_quality="hd"
    )
    assert PRICES.cost_micros(estimate_usage(dalle, default_max_output_tokens=1)) == 240_000
    gpt_image = RequestInfo(
        Operation.IMAGE,
        "gpt-image-1",
        input_chars=0,
        images=1,
        image_size="1024x1024",
        image_quality="low",
    )
    usage = estimate_usage(gpt_image, default_max_output_tokens=1)
    assert (usage.input_tokens, usage.output_tokens) == (8, 272)
    assert PRICES.cost_micros(usage) == 10_920  # 8 x 5 + 272 x 40 per 1M
