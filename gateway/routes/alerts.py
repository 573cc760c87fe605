"""Alert settings of a practice: `GET`/`PUT /v1/ai-credit/alerts`.

`{"budget_used_percent": [50, 80, 95, 100], "extra_credit_below_usd": "5.00",
"key_cap_percent": 80, "email": "praxis@example.ch", "webhook_url": "https://…",
"language": "de"}`; a PUT changes the fields it names. A PUT that sets a new
`webhook_url` answers its `webhook_secret`, once: it is never shown again.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from gateway.alerts.events import usd_text
from gateway.alerts.messages import LANGUAGES, language_of
from gateway.alerts.signing import new_webhook_secret
from gateway.alerts.store import AlertSettings
from gateway.alerts.targets import TargetRefused, check_target
from gateway.errors import unprocessable
from gateway.routes.common import (
    admin_practice_of,
    endpoint,
    json_body,
    micro_usd_field,
    ok,
    services_of,
)

if TYPE_CHECKING:
    from gateway.services import Services

MAX_THRESHOLDS = 10
_FIELDS = frozenset(
    {
        "budget_used_percent",
        "extra_credit_below_usd",
        "key_cap_percent",
        "email",
        "webhook_url",
        "language",
    }
)
# What a GET answers besides the settings: a PUT of a GET's answer is taken, these ignored.
_READ_ONLY = frozenset({"webhook_secret_set", "email_enabled"})


def settings_view(settings: AlertSettings, *, email_enabled: bool) -> dict[str, Any]:
    below = settings.extra_credit_below_micros
    return {
        "budget_used_percent": list(settings.budget_used_percent),
        "extra_credit_below_usd": None if below is None else usd_text(below),
        "key_cap_percent": settings.key_cap_percent,
        "email": settings.email,
        "webhook_url": settings.webhook_url,
        "language": settings.language,
        "webhook_secret_set": bool(settings.webhook_secret),
        # False: the operator has not configured SMTP (AZA_SMTP_URL, AZA_ALERT_FROM).
        "email_enabled": email_enabled,
    }


def _percent(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 100:
        raise unprocessable(
            f"'{name}' must be whole percents from 1 to 100.", code="invalid_percent", param=name
        )
    return value


def _text(data: dict[str, Any], name: str, current: str | None) -> str | None:
    if name not in data:
        return current
    value = data[name]
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise unprocessable(
            f"'{name}' must be a string or null.", code="invalid_" + name, param=name
        )
    return value.strip()


async def _updated(
    data: dict[str, Any], current: AlertSettings, *, allow_private: bool
) -> AlertSettings:
    """`current` with the fields `data` names, each checked; 422 on the first bad one."""
    unknown = set(data) - _FIELDS - _READ_ONLY
    if unknown:
        name = sorted(unknown)[0]
        # webhook_secret included: the gateway makes it (a new webhook_url gets a new one).
        raise unprocessable(f"Unknown field '{name}'.", code="unknown_field", param=name)
    new = current
    if "budget_used_percent" in data:
        raw = data["budget_used_percent"]
        if raw is None:
            raw = []
        if not isinstance(raw, list) or len(raw) > MAX_THRESHOLDS:
            raise unprocessable(
                f"'budget_used_percent' must be a list of at most {MAX_THRESHOLDS} percents.",
                code="invalid_percent",
                param="budget_used_percent",
            )
        percents = sorted({_percent(p, "budget_used_percent") for p in raw})
        new = replace(new, budget_used_percent=tuple(percents))
    if "extra_credit_below_usd" in data:
        below = micro_usd_field(data, "extra_credit_below_usd")
        new = replace(new, extra_credit_below_micros=below)
    if "key_cap_percent" in data:
        new = replace(new, key_cap_percent=_percent(data["key_cap_percent"], "key_cap_percent"))
    email = _text(data, "email", current.email)
    if email is not None and (
        len(email) > 254 or "@" not in email or any(c in email for c in "\r\n ,;")
    ):
        raise unprocessable(
            "'email' must be one email address.", code="invalid_email", param="email"
        )
    new = replace(new, email=email)
    if "language" in data:
        if data["language"] not in LANGUAGES:
            raise unprocessable(
                "'language' must be one of de, fr, it, en.",
                code="invalid_language",
                param="language",
            )
        new = replace(new, language=language_of(data["language"]))
    url = _text(data, "webhook_url", current.webhook_url)
    if url != current.webhook_url:
        if url is not None:
            try:
                await check_target(url, allow_private=allow_private)
            except TargetRefused as exc:
                raise unprocessable(
                    str(exc), code="invalid_webhook_url", param="webhook_url"
                ) from None
        new = replace(new, webhook_url=url, webhook_secret=new_webhook_secret() if url else None)
    return new


@endpoint
async def alerts_get(request: Request) -> Response:
    """GET /v1/ai-credit/alerts: the practice's alert settings (never the webhook secret)."""
    _, practice_id = await admin_practice_of(request)
    services = services_of(request)
    current = await services.alerts.settings(practice_id)
    return ok(settings_view(current, email_enabled=services.dispatcher.mailer is not None))


async def change_alert_settings(
    services: Services, practice_id: str, data: dict[str, Any]
) -> tuple[AlertSettings, str | None]:
    """Apply a PUT's `data` to a practice's alert settings (422 on the first bad field,
    nothing changed then): the settings now, and a new webhook secret to show once (or
    None). The PUT route and the console's form both come here."""
    current = await services.alerts.settings(practice_id)
    new = await _updated(data, current, allow_private=services.settings.alert_webhook_allow_private)
    state = await services.metering.state(practice_id)
    period = None
    if state.period is not None:
        period = (state.period.start, state.snapshot.budget_micros)
    await services.alerts.save_settings(practice_id, new, period=period)
    fresh = new.webhook_secret if new.webhook_secret != current.webhook_secret else None
    return new, fresh


@endpoint
async def alerts_put(request: Request) -> Response:
    """PUT /v1/ai-credit/alerts: change the named fields; a new webhook_url answers its secret."""
    _, practice_id = await admin_practice_of(request)
    services = services_of(request)
    new, secret = await change_alert_settings(services, practice_id, await json_body(request))
    payload = settings_view(new, email_enabled=services.dispatcher.mailer is not None)
    if secret:
        payload["webhook_secret"] = secret
    return ok(payload)


routes: list[BaseRoute] = [
    Route("/v1/ai-credit/alerts", alerts_get, methods=["GET"]),
    Route("/v1/ai-credit/alerts", alerts_put, methods=["PUT"]),
]
