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

from budget.money import cost_to_micros, usd_to_micros
from budget.operations import Operation
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
    }
)


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """Prices of one model in USD: per 1M tokens, per audio minute, per 1M characters, per image.

    per_image is keyed "quality:size", e.g. "hd:1024x1792".
    """

    input_per_1m: Decimal | None = None
    cached_input_per_1m: Decimal | None = None
    output_per_1m: Decimal | None = None
    per_audio_minute: Decimal | None = None
    per_1m_characters: Decimal | None = None
    per_image: Mapping[str, Decimal] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def has_token_prices(self) -> bool:
        """True when the model is priced per token."""
        return self.input_per_1m is not None or self.output_per_1m is not None


class UnpricedModel(Exception):
    """No price for this model, or not for what this usage used."""

    def __init__(self, model: str, detail: str | None = None) -> None:
        super().__init__(f"no price for model {model!r}" + (f": {detail}" if detail else ""))
        self.model = model


def _price(value: Any, where: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"{where}: a price must be a string or number, not {value!r}")
    try:
        # A float goes through str() (its shortest text): prices should be strings.
        price = Decimal(str(value))
    except InvalidOperation:
        raise ValueError(f"{where}: not a number: {value!r}") from None
    if not price.is_finite() or price < 0:
        raise ValueError(f"{where}: a price must be a finite amount >= 0, not {value!r}")
    return price


_SCALAR_PRICES = (
    "input_per_1m",
    "cached_input_per_1m",
    "output_per_1m",
    "per_audio_minute",
    "per_1m_characters",
)


def _model_price(name: str, entry: Any) -> ModelPrice:
    if not isinstance(entry, Mapping):
        raise ValueError(f"models.{name}: expected a table")
    unknown = set(entry) - {*_SCALAR_PRICES, "per_image"}
    if unknown:
        raise ValueError(f"models.{name}: unknown keys {sorted(unknown)}")
    scalars = {
        key: _price(entry[key], f"models.{name}.{key}") for key in _SCALAR_PRICES if key in entry
    }
    images = entry.get("per_image", {})
    if not isinstance(images, Mapping):
        raise ValueError(f"models.{name}.per_image: expected a table")
    per_image = {
        str(key): _price(value, f"models.{name}.per_image.{key}") for key, value in images.items()
    }
    return ModelPrice(**scalars, per_image=MappingProxyType(per_image))


def _read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    with open(path, "rb") as f:
        return tomllib.load(f)


class PriceBook:
    """Prices of upstream models, by model name."""

    def __init__(self, models: Mapping[str, ModelPrice]) -> None:
        self._models = MappingProxyType(dict(models))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> PriceBook:
        """Build from a parsed prices document: {"models": {name: {price keys: USD}}}."""
        models = data.get("models", {})
        if not isinstance(models, Mapping):
            raise ValueError("models: expected a table")
        return cls({str(name): _model_price(name, entry) for name, entry in models.items()})

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
        for candidate in (
            model,
            _DATE_SUFFIX.sub("", model),
            _MMDD_SUFFIX.sub("", model),
        ):
            price = self._models.get(candidate)
            if price is not None:
                return price
        return None

    def cost_usd(self, usage: Usage) -> Decimal:
        """Exact cost of `usage` in USD; raises UnpricedModel when a needed price is missing.

        Token usage is billed per token wherever the model has token prices
        (chat, embeddings, and images/audio that report tokens); otherwise
        audio per minute, speech per character, images per image. A usage of
        nothing costs 0 whether or not the model is priced.
        """
        if not _uses_anything(usage):
            return Decimal(0)
        price = self.resolve(usage.model)
        if price is None:
            raise UnpricedModel(usage.model)
        op = usage.operation
        if op in _TOKEN_OPERATIONS or (usage.has_tokens and price.has_token_prices):
            return _token_cost(usage, price)
        if op in (Operation.TRANSCRIPTION, Operation.TRANSLATION):
            per_minute = _needed(price.per_audio_minute, usage.model, "per_audio_minute")
            # Multiply first: the division is then exact whenever the cost
            # has a finite decimal form (7 s x 0.003 / 60 = 0.00035).
            return _COST.divide(
                _COST.multiply(usage.audio_seconds, per_minute), _SECONDS_PER_MINUTE
            )
        if op is Operation.SPEECH:
            per_1m = _needed(price.per_1m_characters, usage.model, "per_1m_characters")
            return _COST.divide(_COST.multiply(Decimal(usage.characters), per_1m), _PER_MILLION)
        if op is Operation.IMAGE:
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
    )


def _needed(price: Decimal | None, model: str, kind: str) -> Decimal:
    if price is None:
        raise UnpricedModel(model, f"no {kind} price")
    return price


def _token_cost(usage: Usage, price: ModelPrice) -> Decimal:
    """Cached input at the cached price (else the input price), the rest of input at the
    input price, output (reasoning tokens included) at the output price; USD."""
    cached = min(usage.cached_input_tokens, usage.input_tokens)
    uncached = usage.input_tokens - cached
    cached_per_1m = price.cached_input_per_1m
    if cached_per_1m is None:
        cached_per_1m = price.input_per_1m
    total = Decimal(0)
    for tokens, per_1m, kind in (
        (uncached, price.input_per_1m, "input_per_1m"),
        (cached, cached_per_1m, "input_per_1m"),
        (usage.output_tokens, price.output_per_1m, "output_per_1m"),
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
