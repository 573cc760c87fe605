"""Pricing usage from config/prices.toml, and plan budgets from config/plans.toml."""

from dataclasses import replace
from decimal import Decimal

import pytest

from budget.operations import Operation
from budget.pricing import PlanBook, PriceBook, UnpricedModel
from budget.usage import Usage
from config import CONFIG_DIR

PRICES = PriceBook.load(CONFIG_DIR / "prices.toml")


def test_chat_tokens_with_cached_input() -> None:
    """gpt-4o-mini 1000 in (200 cached) + 500 out = 800x0.15 + 200x0.075 + 500x0.60 per 1M."""
    usage = Usage(
        Operation.CHAT,
        "gpt-4o-mini",
        input_tokens=1000,
        cached_input_tokens=200,
        output_tokens=500,
    )
    assert PRICES.cost_usd(usage) == Decimal("0.000435")
    assert PRICES.cost_micros(usage) == 435


def test_reasoning_tokens_are_not_billed_twice() -> None:
    """o4-mini 100 in + 1000 out (800 reasoning inside) = 100x1.10 + 1000x4.40 per 1M."""
    usage = Usage(
        Operation.RESPONSES, "o4-mini", input_tokens=100, output_tokens=1000, reasoning_tokens=800
    )
    assert PRICES.cost_usd(usage) == Decimal("0.00451")
    assert PRICES.cost_micros(usage) == 4510


def test_cached_tokens_at_input_price_without_cached_price() -> None:
    """gpt-3.5-turbo-instruct has no cached price: 1000 in (400 cached) cost 1000x1.50 per 1M."""
    usage = Usage(Operation.COMPLETION, "gpt-3.5-turbo-instruct", 1000, 400, 100)
    assert PRICES.cost_usd(usage) == Decimal("0.0017")


def test_embedding_cost_rounds_up_to_micros() -> None:
    """1234 tokens x 0.02 per 1M = 24.68 micro-USD, charged as 25."""
    usage = Usage(Operation.EMBEDDING, "text-embedding-3-small", input_tokens=1234)
    assert PRICES.cost_usd(usage) == Decimal("0.00002468")
    assert PRICES.cost_micros(usage) == 25


def test_audio_per_minute() -> None:
    """whisper-1 90 s = 1.5 min x 0.006; gpt-4o-mini-transcribe 7 s x 0.003 / 60 = 350 micros."""
    whisper = Usage(Operation.TRANSCRIPTION, "whisper-1", audio_seconds=Decimal(90))
    assert PRICES.cost_micros(whisper) == 9000
    mini = Usage(Operation.TRANSLATION, "gpt-4o-mini-transcribe", audio_seconds=Decimal(7))
    assert PRICES.cost_usd(mini) == Decimal("0.00035")
    assert PRICES.cost_micros(mini) == 350


def test_audio_seconds_without_finite_decimal_round_up() -> None:
    """1 s of whisper-1 is 0.006 / 60 = 100 micros; 1 s at 0.007/min is 116.66.. -> 117."""
    one = Usage(Operation.TRANSCRIPTION, "whisper-1", audio_seconds=Decimal(1))
    assert PRICES.cost_micros(one) == 100
    odd = PriceBook.from_mapping({"models": {"w": {"per_audio_minute": "0.007"}}})
    assert odd.cost_micros(Usage(Operation.TRANSCRIPTION, "w", audio_seconds=Decimal(1))) == 117


def test_speech_per_character() -> None:
    """tts-1 1000 chars x 15 per 1M = 0.015; tts-1-hd 333 chars x 30 per 1M = 0.00999."""
    assert PRICES.cost_micros(Usage(Operation.SPEECH, "tts-1", characters=1000)) == 15_000
    assert PRICES.cost_usd(Usage(Operation.SPEECH, "tts-1-hd", characters=333)) == Decimal(
        "0.00999"
    )


def test_images_per_image_by_quality_and_size() -> None:
    """dall-e-3 2 x hd 1024x1792 = 0.24; dall-e-2 3 x standard 256x256 = 0.048."""
    hd = Usage(Operation.IMAGE, "dall-e-3", images=2, image_size="1024x1792", image_quality="hd")
    assert PRICES.cost_usd(hd) == Decimal("0.240")
    small = Usage(
        Operation.IMAGE, "dall-e-2", images=3, image_size="256x256", image_quality="standard"
    )
    assert PRICES.cost_micros(small) == 48_000


def test_image_without_price_for_size_is_unpriced() -> None:
    """An image size/quality the model has no price for raises UnpricedModel."""
    usage = Usage(Operation.IMAGE, "dall-e-3", images=1, image_size="256x256", image_quality="hd")
    with pytest.raises(UnpricedModel) as caught:
        PRICES.cost_usd(usage)
    assert caught.value.model == "dall-e-3"


def test_token_priced_images_use_tokens() -> None:
    """gpt-image-1 reporting 50 in + 4160 out tokens costs 50x5 + 4160x40 per 1M."""
    usage = Usage(
        Operation.IMAGE,
        "gpt-image-1",
        input_tokens=50,
        output_tokens=4160,
        image_output_tokens=4160,
        images=1,
        image_size="1024x1024",
        image_quality="high",
    )
    assert PRICES.cost_usd(usage) == Decimal("0.16665")


def test_dated_model_names_resolve_to_undated_price() -> None:
    """gpt-4o-mini-2024-07-18 and gpt-3.5-turbo-instruct-0914 are priced as their base model."""
    assert PRICES.resolve("gpt-4o-mini-2024-07-18") == PRICES.resolve("gpt-4o-mini")
    assert PRICES.resolve("gpt-3.5-turbo-instruct-0914") == PRICES.resolve("gpt-3.5-turbo-instruct")
    assert PRICES.resolve("gpt-4o-2024-08-06") == PRICES.resolve("gpt-4o")
    usage = Usage(Operation.CHAT, "gpt-4o-mini-2024-07-18", 1000, 200, 500)
    assert PRICES.cost_micros(usage) == 435


def test_exact_name_wins_over_stripped_date() -> None:
    """A dated name with its own price is charged that price, not the base model's."""
    book = PriceBook.from_mapping(
        {"models": {"m": {"input_per_1m": "1"}, "m-2025-01-01": {"input_per_1m": "2"}}}
    )
    usage = Usage(Operation.CHAT, "m-2025-01-01", input_tokens=1_000_000)
    assert book.cost_usd(usage) == Decimal(2)


def test_unknown_model_is_unpriced() -> None:
    """A model with no price raises UnpricedModel naming it."""
    assert PRICES.resolve("gpt-9-ultra") is None
    with pytest.raises(UnpricedModel) as caught:
        PRICES.cost_usd(Usage(Operation.CHAT, "gpt-9-ultra", input_tokens=10))
    assert caught.value.model == "gpt-9-ultra"


def test_missing_price_kind_is_unpriced() -> None:
    """Audio on a token-only model, or output tokens with no output price, are unpriced."""
    with pytest.raises(UnpricedModel):
        PRICES.cost_usd(Usage(Operation.TRANSCRIPTION, "gpt-4o", audio_seconds=Decimal(5)))
    with pytest.raises(UnpricedModel):
        PRICES.cost_usd(
            Usage(Operation.CHAT, "text-embedding-3-small", input_tokens=1, output_tokens=1)
        )


def test_usage_of_nothing_costs_zero() -> None:
    """Moderation (zero usage) costs 0, even under a dated model name with no price."""
    usage = Usage(Operation.MODERATION, "omni-moderation-2024-09-26")
    assert PRICES.cost_micros(usage) == 0


def test_price_table_rejects_bad_entries() -> None:
    """Unknown keys and negative prices in a price table are configuration errors."""
    with pytest.raises(ValueError, match="unknown keys"):
        PriceBook.from_mapping({"models": {"m": {"input_per_1M": "1"}}})
    with pytest.raises(ValueError):
        PriceBook.from_mapping({"models": {"m": {"input_per_1m": "-1"}}})


def test_plan_budgets_in_micros() -> None:
    """aza_basic_monthly grants 20 USD, aza_team_yearly 60 USD; an unknown plan None."""
    plans = PlanBook.load(CONFIG_DIR / "plans.toml")
    assert plans.monthly_budget_micros("aza_basic_monthly") == 20_000_000
    assert plans.monthly_budget_micros("aza_team_yearly") == 60_000_000
    assert plans.monthly_budget_micros("nope") is None
    assert PlanBook.from_mapping(
        {"plans": {"x": {"monthly_budget_usd": "0.5"}}}
    ).monthly_budget_micros("x") == (500_000)


MODALITIES = PriceBook.from_mapping(
    {
        "models": {
            "m": {
                "input_per_1m": "1",
                "cached_input_per_1m": "0.5",
                "output_per_1m": "4",
                "audio_input_per_1m": "40",
                "cached_audio_input_per_1m": "2.5",
                "audio_output_per_1m": "80",
                "image_input_per_1m": "10",
                "priority": {"input_per_1m": "2", "output_per_1m": "8"},
                "flex": {"input_per_1m": "0.5"},
            },
            "text-only": {"input_per_1m": "1", "output_per_1m": "4"},
        },
        "tools": {"web_search": "0.01", "code_interpreter": "0.03"},
    }
)


def test_each_modality_at_its_own_rate() -> None:
    """1000 in = 100 cached text + 50 cached audio + 250 audio + 100 image + 500 text; 300 out
    = 200 audio + 100 text: 500x1 + 100x0.5 + 50x2.5 + 250x40 + 100x10 + 100x4 + 200x80."""
    usage = Usage(
        Operation.CHAT,
        "m",
        input_tokens=1000,
        cached_input_tokens=150,
        cached_audio_input_tokens=50,
        audio_input_tokens=300,
        image_input_tokens=100,
        output_tokens=300,
        audio_output_tokens=200,
    )
    expected = Decimal(500 + 50 + 125 + 10_000 + 1000 + 400 + 16_000) / 1_000_000
    assert MODALITIES.cost_usd(usage) == expected


def test_audio_tokens_never_fall_back_to_text_rates() -> None:
    """A model without audio prices cannot price audio tokens: refused, not billed as text."""
    usage = Usage(Operation.CHAT, "text-only", input_tokens=100, audio_input_tokens=50)
    with pytest.raises(UnpricedModel):
        MODALITIES.cost_usd(usage)


def test_service_tier_prices() -> None:
    """priority doubles what it names; flex changes input only; default and scale are standard;
    a tier without prices is refused."""
    base = Usage(Operation.RESPONSES, "m", input_tokens=1000, output_tokens=1000)
    assert MODALITIES.cost_usd(base) == Decimal("0.005")
    assert MODALITIES.cost_usd(replace(base, service_tier="priority")) == Decimal("0.010")
    assert MODALITIES.cost_usd(replace(base, service_tier="flex")) == Decimal("0.0045")
    assert MODALITIES.cost_usd(replace(base, service_tier="default")) == Decimal("0.005")
    assert MODALITIES.cost_usd(replace(base, service_tier="scale")) == Decimal("0.005")
    with pytest.raises(UnpricedModel):
        MODALITIES.cost_usd(replace(base, service_tier="batch"))


def test_tool_calls_are_their_own_price_kind() -> None:
    """2 web searches x 0.01 + 1 container x 0.03 on top of the tokens; unknown tools refused."""
    usage = Usage(
        Operation.RESPONSES,
        "m",
        input_tokens=1000,
        tool_calls={"web_search": 2, "code_interpreter": 1},
    )
    assert MODALITIES.cost_usd(usage) == Decimal("0.001") + Decimal("0.05")
    with pytest.raises(UnpricedModel):
        MODALITIES.cost_usd(replace(usage, tool_calls={"file_search": 1}))


def test_token_billed_transcription() -> None:
    """gpt-4o-transcribe 217 audio + 7 text in, 13 out: 217x6 + 7x2.5 + 13x10 per 1M."""
    usage = Usage(
        Operation.TRANSCRIPTION,
        "gpt-4o-transcribe",
        input_tokens=224,
        audio_input_tokens=217,
        output_tokens=13,
    )
    assert PRICES.cost_usd(usage) == Decimal("0.0014495")
    assert PRICES.cost_micros(usage) == 1450
