"""Pricing under the operator's unpriced-model policy: made once per app (`Services.pricing`)."""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal

from budget.money import cost_to_micros, with_uplift
from budget.pricing import PriceBook, UnpricedModel
from budget.usage import Usage
from gateway.errors import GatewayError, bad_request
from gateway.settings import Settings


def model_not_priced(model: str) -> GatewayError:
    return bad_request(
        f"The model '{model}' has no price configured at this gateway.",
        code="model_not_priced",
        param="model",
    )


class Pricing:
    """Prices usage under the unpriced-model policy; integer micro-USD, rounded up."""

    def __init__(self, settings: Settings) -> None:
        self.prices: PriceBook = settings.prices
        self.fallback = (
            settings.fallback_model if settings.unpriced_model_policy == "fallback" else None
        )

    def check(self, model: str, service_tier: str | None = None) -> None:
        """Refuse a model, or a tier of it, without a price before anything is forwarded.

        A missing model is refused under the reject policy only; a service tier
        asked for that has no prices is refused under both (the fallback model's
        tier prices are not this model's).
        """
        price = self.prices.resolve(model)
        if price is None:
            if self.fallback is None:
                raise model_not_priced(model)
            return
        if price.at_tier(service_tier) is None:
            raise bad_request(
                f"The model '{model}' has no '{service_tier}' service tier prices "
                "configured at this gateway.",
                code="service_tier_not_priced",
                param="service_tier",
            )

    def cost_micros(self, usage: Usage, uplift_percent: Decimal = Decimal(0)) -> int:
        """The cost of `usage` plus an upstream's uplift, rounded up once."""
        try:
            cost = self.prices.cost_usd(usage)
        except UnpricedModel:
            if self.fallback is None:
                raise
            cost = self.prices.cost_usd(replace(usage, model=self.fallback))
        return cost_to_micros(with_uplift(cost, uplift_percent))
