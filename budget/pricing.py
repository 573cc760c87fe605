"""Upstream prices (config/prices.toml) and plan budgets (config/plans.toml).

Costs are computed exactly in Decimal USD; `cost_micros` rounds the result up
to a whole micro-USD in `budget.money.cost_to_micros`, the one rounding place.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, Context, Decimal, InvalidOperation
from types import MappingProxyType
from typing import Any

from budget.money import InvalidAmount, cost_to_micros, parse_decimal, usd_to_micros
from budget.operations import IMAGE_OPERATIONS, Operation
from budget.usage import Usage

_PER_MILLION = Decimal(1_000_000)
_SECONDS_PER_MINUTE = Decimal(60)
# Products of counts and prices are exact at this precision; a division by 60
# that does not terminate rounds up, so the cost rounded up later is never short.
_COST = Context(prec=60, rounding=ROUND_CEILING, traps=[InvalidOperation])

_DATE_SUFFIX = re.compile(r"-\d{4}-\d{2}-\d{2}$")  # gpt-4o-mini-2024-07-18
_MMDD_SUFFIX = re.compile(r"-\d{4}$")  # gpt-3.5-turbo-0125

_TOKEN_OPERATIONS = frozenset(
    {
        Operation.CHAT,
        Operation.COMPLETION,
        Operation.RESPONSES,
        Operation.EMBEDDING,
        Operation.MODERATION,
        Operation.REALTIME,
    }
)


# Service tiers with prices of their own; any other tier a response names
# ("default", "auto", "scale") is billed at the model's standard prices.
PRICED_TIERS = frozenset({"priority", "flex", "batch"})


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """Prices of one model in USD: per 1M tokens (by modality), per audio minute,
    per 1M characters, per image; and the prices of its service tiers.

    per_image is keyed "quality:size", e.g. "hd:1024x1792". `tiers` holds a
    complete price per tier ("priority", "flex", "batch"): the tier's table
    in prices.toml names the prices that differ, the rest are the model's.
    `source` and `as_of` say where and when the figures were read.
    """

    input_per_1m: Decimal | None = None
    cached_input_per_1m: Decimal | None = None
    output_per_1m: Decimal | None = None
    audio_input_per_1m: Decimal | None = None
    cached_audio_input_per_1m: Decimal | None = None
    audio_output_per_1m: Decimal | None = None
    image_input_per_1m: Decimal | None = None
    image_output_per_1m: Decimal | None = None
    per_audio_minute: Decimal | None = None
    per_1m_characters: Decimal | None = None
    per_image: Mapping[str, Decimal] = field(default_factory=lambda: MappingProxyType({}))
    tiers: Mapping[str, ModelPrice] = field(default_factory=lambda: MappingProxyType({}))
    source: str | None = None
    as_of: str | None = None
    # The built-in tool this model calls once per request (search-preview models).
    tool_calls_per_request: str | None = None

    @property
    def has_token_prices(self) -> bool:
        """True when the model is priced per token."""
        return self.input_per_1m is not None or self.output_per_1m is not None

    def at_tier(self, tier: str | None) -> ModelPrice | None:
        """The prices at service tier `tier`; None when that tier has no prices here."""
        if tier is None or tier not in PRICED_TIERS:
            return self
        return self.tiers.get(tier)


class UnpricedModel(Exception):
    """No price for this model, or not for what this usage used."""

    def __init__(self, model: str, detail: str | None = None) -> None:
        super().__init__(f"no price for model {model!r}" + (f": {detail}" if detail else ""))
        self.model = model


def _price(value: Any, where: str) -> Decimal:
    if isinstance(value, Decimal):
        raise ValueError(f"{where}: a price must be a string or number, not {value!r}")
    try:
        # A float goes through its shortest text: prices should be strings.
        price = parse_decimal(value, what=where)
    except InvalidAmount as exc:
        raise ValueError(str(exc)) from None
    if price < 0:
        raise ValueError(f"{where}: a price must be a finite amount >= 0, not {value!r}")
    return price


_SCALAR_PRICES = (
    "input_per_1m",
    "cached_input_per_1m",
    "output_per_1m",
    "audio_input_per_1m",
    "cached_audio_input_per_1m",
    "audio_output_per_1m",
    "image_input_per_1m",
    "image_output_per_1m",
    "per_audio_minute",
    "per_1m_characters",
)
_TEXT_KEYS = ("source", "as_of", "retired", "tool_calls_per_request")


def _scalars(name: str, entry: Mapping[str, Any]) -> dict[str, Decimal]:
    return {
        key: _price(entry[key], f"models.{name}.{key}") for key in _SCALAR_PRICES if key in entry
    }


def _model_price(name: str, entry: Any) -> ModelPrice:
    if not isinstance(entry, Mapping):
        raise ValueError(f"models.{name}: expected a table")
    unknown = set(entry) - {*_SCALAR_PRICES, *_TEXT_KEYS, *PRICED_TIERS, "per_image"}
    if unknown:
        raise ValueError(f"models.{name}: unknown keys {sorted(unknown)}")
    scalars = _scalars(name, entry)
    images = entry.get("per_image", {})
    if not isinstance(images, Mapping):
        raise ValueError(f"models.{name}.per_image: expected a table")
    per_image = {
        str(key): _price(value, f"models.{name}.per_image.{key}") for key, value in images.items()
    }
    tiers: dict[str, ModelPrice] = {}
    for tier in sorted(PRICED_TIERS & set(entry)):
        table = entry[tier]
        if not isinstance(table, Mapping) or set(table) - set(_SCALAR_PRICES):
            raise ValueError(f"models.{name}.{tier}: expected a table of prices")
        tiers[tier] = _with_scalars({**scalars, **_scalars(f"{name}.{tier}", table)})
    return _with_scalars(
        scalars,
        per_image=MappingProxyType(per_image),
        tiers=MappingProxyType(tiers),
        source=str(entry["source"]) if "source" in entry else None,
        as_of=str(entry["as_of"]) if "as_of" in entry else None,
        tool_calls_per_request=(
            str(entry["tool_calls_per_request"]) if "tool_calls_per_request" in entry else None
        ),
    )


def _with_scalars(
    scalars: Mapping[str, Decimal],
    *,
    per_image: Mapping[str, Decimal] | None = None,
    tiers: Mapping[str, ModelPrice] | None = None,
    source: str | None = None,
    as_of: str | None = None,
    tool_calls_per_request: str | None = None,
) -> ModelPrice:
    get = scalars.get
    return ModelPrice(
        input_per_1m=get("input_per_1m"),
        cached_input_per_1m=get("cached_input_per_1m"),
        output_per_1m=get("output_per_1m"),
        audio_input_per_1m=get("audio_input_per_1m"),
        cached_audio_input_per_1m=get("cached_audio_input_per_1m"),
        audio_output_per_1m=get("audio_output_per_1m"),
        image_input_per_1m=get("image_input_per_1m"),
        image_output_per_1m=get("image_output_per_1m"),
        per_audio_minute=get("per_audio_minute"),
        per_1m_characters=get("per_1m_characters"),
        per_image=per_image if per_image is not None else MappingProxyType({}),
        tiers=tiers if tiers is not None else MappingProxyType({}),
        source=source,
        as_of=as_of,
        tool_calls_per_request=tool_calls_per_request,
    )


def _read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    with open(path, "rb") as f:
        return tomllib.load(f)


class PriceBook:
    """Prices of upstream models, by model name."""

    def __init__(
        self, models: Mapping[str, ModelPrice], tools: Mapping[str, Decimal] | None = None
    ) -> None:
        self._models = MappingProxyType(dict(models))
        self._tools = MappingProxyType(dict(tools or {}))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> PriceBook:
        """Build from a parsed prices document.

        {"models": {name: {price keys: USD, tier: {price keys}}}, "tools": {kind: USD per call}}
        """
        models = data.get("models", {})
        if not isinstance(models, Mapping):
            raise ValueError("models: expected a table")
        tools = data.get("tools", {})
        if not isinstance(tools, Mapping):
            raise ValueError("tools: expected a table")
        return cls(
            {str(name): _model_price(name, entry) for name, entry in models.items()},
            {str(kind): _price(fee, f"tools.{kind}") for kind, fee in tools.items()},
        )

    @property
    def tools(self) -> Mapping[str, Decimal]:
        """Per-call fees of built-in tools in USD, by price kind."""
        return self._tools

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PriceBook:
        """Read a prices TOML file like config/prices.toml."""
        return cls.from_mapping(_read_toml(path))

    @property
    def models(self) -> Mapping[str, ModelPrice]:
        """Every priced model by its configured name."""
        return self._models

    def resolve(self, model: str) -> ModelPrice | None:
        """Price of `model`: exact name, else without a -YYYY-MM-DD date, else without -MMDD."""
        name = self.resolved_name(model)
        return None if name is None else self._models[name]

    def resolved_name(self, model: str) -> str | None:
        """The price entry `model` is priced by (see `resolve`), or None."""
        if model in self._models:
            return model  # the common case: no suffix to strip
        for candidate in (_DATE_SUFFIX.sub("", model), _MMDD_SUFFIX.sub("", model)):
            if candidate in self._models:
                return candidate
        return None

    def cost_usd(self, usage: Usage) -> Decimal:
        """Exact cost of `usage` in USD; raises UnpricedModel when a needed price is missing.

        Token usage is billed per token wherever the model has token prices
        (chat, embeddings, and images/audio/speech that report tokens), each
        modality at its own rate, at the service tier the usage names;
        otherwise audio per minute, speech per character, images per image.
        Built-in tool calls add their per-call fee. A usage of nothing costs 0
        whether or not the model is priced.
        """
        if not _uses_anything(usage):
            return Decimal(0)
        base = self.resolve(usage.model)
        if base is None:
            raise UnpricedModel(usage.model)
        price = base.at_tier(usage.service_tier)
        if price is None:
            raise UnpricedModel(usage.model, f"no {usage.service_tier} tier prices")
        return _COST.add(self._usage_cost(usage, price), self._tool_cost(usage, base))

    def _tool_cost(self, usage: Usage, price: ModelPrice) -> Decimal:
        calls_by_kind = dict(usage.tool_calls)
        per_request = price.tool_calls_per_request
        if per_request is not None and usage.operation is Operation.CHAT:
            calls_by_kind[per_request] = calls_by_kind.get(per_request, 0) + 1
        total = Decimal(0)
        for kind, calls in calls_by_kind.items():
            if calls:
                fee = self._tools.get(kind)
                if fee is None:
                    raise UnpricedModel(usage.model, f"no per-call price for tool {kind!r}")
                total = _COST.add(total, _COST.multiply(Decimal(calls), fee))
        return total

    @staticmethod
    def _usage_cost(usage: Usage, price: ModelPrice) -> Decimal:
        op = usage.operation
        if op in _TOKEN_OPERATIONS or (usage.has_tokens and price.has_token_prices):
            return _token_cost(usage, price)
        if not (usage.audio_seconds or usage.characters or usage.images):
            return Decimal(0)  # tool calls only
        if op in (
            Operation.TRANSCRIPTION,
            Operation.TRANSLATION,
            Operation.REALTIME_TRANSCRIPTION,
        ):
            per_minute = _needed(price.per_audio_minute, usage.model, "per_audio_minute")
            # Multiply first: the division is then exact whenever the cost
            # has a finite decimal form (7 s x 0.003 / 60 = 0.00035).
            return _COST.divide(
                _COST.multiply(usage.audio_seconds, per_minute), _SECONDS_PER_MINUTE
            )
        if op is Operation.SPEECH:
            per_1m = _needed(price.per_1m_characters, usage.model, "per_1m_characters")
            return _COST.divide(_COST.multiply(Decimal(usage.characters), per_1m), _PER_MILLION)
        if op in IMAGE_OPERATIONS:
            key = f"{usage.image_quality or 'standard'}:{usage.image_size or '1024x1024'}"
            per_image = price.per_image.get(key)
            if per_image is None:
                raise UnpricedModel(usage.model, f"no image price for {key!r}")
            return _COST.multiply(Decimal(usage.images), per_image)
        raise UnpricedModel(usage.model, f"no price kind for {op}")

    def cost_micros(self, usage: Usage) -> int:
        """Cost of `usage` in integer micro-USD, rounded up."""
        return cost_to_micros(self.cost_usd(usage))


def _uses_anything(usage: Usage) -> bool:
    return bool(
        usage.input_tokens
        or usage.output_tokens
        or usage.audio_seconds
        or usage.characters
        or usage.images
        or any(usage.tool_calls.values())
    )


def _needed(price: Decimal | None, model: str, kind: str) -> Decimal:
    if price is None:
        raise UnpricedModel(model, f"no {kind} price")
    return price


def _token_cost(usage: Usage, price: ModelPrice) -> Decimal:
    """Each kind of token at its own rate, in USD.

    Input: cached text at the cached price (else the input price), cached
    audio at the cached audio price (else the audio price), the rest of the
    audio at the audio price, images at the image input price, the remaining
    text at the input price. Output: audio at the audio output price, images
    at the image output price (else the output price: an image model's output
    price is its image price), the rest (reasoning included) at the output price.
    Audio and image tokens never fall back to text rates.
    """
    cached = min(usage.cached_input_tokens, usage.input_tokens)
    cached_audio = min(usage.cached_audio_input_tokens, cached, usage.audio_input_tokens)
    audio_in = usage.audio_input_tokens - cached_audio
    image_in = usage.image_input_tokens
    text_in = max(0, usage.input_tokens - cached - audio_in - image_in)
    audio_out = min(usage.audio_output_tokens, usage.output_tokens)
    image_out = min(usage.image_output_tokens, usage.output_tokens - audio_out)
    text_out = usage.output_tokens - audio_out - image_out
    cached_text_per_1m = price.cached_input_per_1m
    if cached_text_per_1m is None:
        cached_text_per_1m = price.input_per_1m
    cached_audio_per_1m = price.cached_audio_input_per_1m
    if cached_audio_per_1m is None:
        cached_audio_per_1m = price.audio_input_per_1m
    image_out_per_1m = price.image_output_per_1m
    if image_out_per_1m is None:
        image_out_per_1m = price.output_per_1m
    total = Decimal(0)
    for tokens, per_1m, kind in (
        (text_in, price.input_per_1m, "input_per_1m"),
        (cached - cached_audio, cached_text_per_1m, "input_per_1m"),
        (audio_in, price.audio_input_per_1m, "audio_input_per_1m"),
        (cached_audio, cached_audio_per_1m, "audio_input_per_1m"),
        (image_in, price.image_input_per_1m, "image_input_per_1m"),
        (text_out, price.output_per_1m, "output_per_1m"),
        (audio_out, price.audio_output_per_1m, "audio_output_per_1m"),
        (image_out, image_out_per_1m, "image_output_per_1m"),
    ):
        if tokens:
            rate = _needed(per_1m, usage.model, kind)
            total = _COST.add(total, _COST.multiply(Decimal(tokens), rate))
    return _COST.divide(total, _PER_MILLION)


class PlanBook:
    """Monthly AI budgets of license plans, by Stripe price lookup_key."""

    def __init__(self, budgets_usd: Mapping[str, Decimal]) -> None:
        self._budget_micros = MappingProxyType(
            {key: usd_to_micros(usd) for key, usd in budgets_usd.items()}
        )

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> PlanBook:
        """Build from a parsed plans document: {"plans": {key: {"monthly_budget_usd": USD}}}."""
        plans = data.get("plans", {})
        if not isinstance(plans, Mapping):
            raise ValueError("plans: expected a table")
        budgets: dict[str, Decimal] = {}
        for key, entry in plans.items():
            if not isinstance(entry, Mapping) or "monthly_budget_usd" not in entry:
                raise ValueError(f"plans.{key}: expected a table with monthly_budget_usd")
            budgets[str(key)] = _price(entry["monthly_budget_usd"], f"plans.{key}")
        return cls(budgets)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PlanBook:
        """Read a plans TOML file like config/plans.toml."""
        return cls.from_mapping(_read_toml(path))

    @property
    def lookup_keys(self) -> frozenset[str]:
        """Every configured plan's lookup_key."""
        return frozenset(self._budget_micros)

    def monthly_budget_micros(self, lookup_key: str) -> int | None:
        """Monthly AI budget of a plan in integer micro-USD; None for an unknown plan."""
        return self._budget_micros.get(lookup_key)
