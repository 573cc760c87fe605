"""The practice console at /console/: plain HTML forms, server-rendered, for admin keys.

Pages: sign-in; the overview (availability gauge, license period, spend
charts, credit history with receipts, buy credit, save a card, auto top-up
settings); the usage table with filters and its CSV; the buy confirmation
(CHF and the USD it buys). Every state change is a POST carrying the
session's CSRF token (gateway/console/session.py); the answers are
redirects (post/redirect/get), so reloading a page never repeats one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit
from zoneinfo import ZoneInfo

from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.templating import Jinja2Templates

from budget.license import calendar_month
from budget.limits import Scope
from budget.money import InvalidAmount, micros_to_usd, parse_decimal
from credit.errors import CreditError
from credit.money import chf_to_internal_usd
from gateway.alerts.messages import LANGUAGES as ALERT_LANGUAGES
from gateway.alerts.store import AlertSettings
from gateway.console import charts
from gateway.console.alerts import alert_texts
from gateway.console.alerts import form_data as alert_form_data
from gateway.console.alerts import form_values as alert_form_values
from gateway.console.alerts import refusal_text as alert_refusal_text
from gateway.console.i18n import language_of, texts
from gateway.console.limits import form_data as limit_form_data
from gateway.console.limits import limit_rows, limit_texts
from gateway.console.limits import refusal_text as limit_refusal_text
from gateway.console.session import (
    LANG_COOKIE,
    PRE_COOKIE,
    SESSION_COOKIE,
    SESSION_SECONDS,
    Session,
    SessionSigner,
    same_token,
)
from gateway.errors import GatewayError
from gateway.keys import KeyIdentity
from gateway.messages import LANGUAGES, Language, credit_user_text, user_message
from gateway.routes.alerts import change_alert_settings
from gateway.routes.limits import change_limits, check_device_id, check_key_of_practice
from gateway.routes.usage import (
    UsageQuery,
    csv_response,
    parse_usage_query,
    report_of,
    usd,
)
from gateway.storage.keys import hash_key
from gateway.storage.usage_report import BatchEntry, GroupBy

if TYPE_CHECKING:
    from gateway.services import Services

log = logging.getLogger("aza.console")

TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
TABLE_ROWS = 200
HISTORY_ROWS = 50

_SECURITY_HEADERS = {
    "cache-control": "no-store",
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "content-security-policy": (
        "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
}


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def _signer(request: Request) -> SessionSigner:
    """One signer per app (its secret may be random per process)."""
    state = request.app.state
    signer: SessionSigner | None = getattr(state, "console_signer", None)
    if signer is None:
        signer = SessionSigner(_services(request).settings.console_secret.reveal())
        state.console_signer = signer
    return signer


def _language(request: Request) -> Language:
    default = _services(request).settings.user_language
    return language_of(
        request.query_params.get("lang") or request.cookies.get(LANG_COOKIE), default
    )


def _secure(request: Request) -> bool:
    public = _services(request).settings.public_url or ""
    return request.url.scheme == "https" or public.startswith("https://")


def _base_url(request: Request) -> str:
    public = _services(request).settings.public_url
    return public or str(request.base_url).rstrip("/")


def _set_cookie(request: Request, response: Response, name: str, value: str, max_age: int) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path="/console",
        httponly=True,
        samesite="strict",
        secure=_secure(request),
    )


def _page(
    request: Request,
    template: str,
    context: dict[str, Any],
    *,
    status: int = 200,
) -> Response:
    language = _language(request)
    words = texts(language)
    response = TEMPLATES.TemplateResponse(
        request,
        template,
        {"t": words, "lang": language, "languages": LANGUAGES, **context},
        status_code=status,
        headers=_SECURITY_HEADERS,
    )
    if request.query_params.get("lang") in LANGUAGES:
        _set_cookie(request, response, LANG_COOKIE, language, 365 * 86_400)
    return response


def _redirect(path: str, **params: str) -> RedirectResponse:
    query = ("?" + urlencode(params)) if params else ""
    return RedirectResponse("/console/" + path + query, status_code=303, headers=_SECURITY_HEADERS)


async def _signed_in(request: Request) -> tuple[Session, KeyIdentity] | None:
    """The session and its admin key's identity, or None (no, stale or narrowed session)."""
    session = _signer(request).read_session(request.cookies.get(SESSION_COOKIE))
    if session is None:
        return None
    identity = await _services(request).metering.identify_key_hash(session.key_hash)
    if identity is None or not identity.role.admin_capable:
        return None
    return session, identity


def _same_origin(request: Request) -> bool:
    """False when the request names another origin (Origin, else Referer) than its own."""
    origin = request.headers.get("origin") or request.headers.get("referer")
    if not origin:
        return True  # non-browser clients; the CSRF token still has to match
    if origin == "null":
        return False
    parts = urlsplit(origin)
    own = urlsplit(_base_url(request))
    host = request.headers.get("host", "")
    return parts.scheme in ("http", "https") and parts.netloc in (host, own.netloc)


async def _form(request: Request) -> FormData:
    return await request.form(max_files=0, max_fields=50, max_part_size=64 * 1024)


def _refused(request: Request) -> Response:
    words = texts(_language(request))
    return _page(
        request, "error.html", {"message": words["form_expired"], "code": "csrf_failed"}, status=403
    )


async def _post_session(request: Request) -> tuple[Session, KeyIdentity, FormData] | Response:
    """A signed-in POST with a matching CSRF token from this origin, or the answer refusing it."""
    signed = await _signed_in(request)
    if signed is None:
        return _redirect("")
    session, identity = signed
    form = await _form(request)
    token = form.get("csrf")
    if not _same_origin(request) or not same_token(
        session.csrf, token if isinstance(token, str) else None
    ):
        log.warning("console: a form without a valid CSRF token or from another origin")
        return _refused(request)
    return session, identity, form


# -- sign-in -------------------------------------------------------------------


def _login_page(request: Request, *, error: str | None = None, status: int = 200) -> Response:
    cookie, token = _signer(request).pre_cookie()
    response = _page(request, "login.html", {"csrf": token, "error": error}, status=status)
    _set_cookie(request, response, PRE_COOKIE, cookie, 3600)
    return response


async def root(request: Request) -> Response:
    """GET /: the console is what a person opening the gateway in a browser wants."""
    return RedirectResponse("/console/", status_code=307)


async def login(request: Request) -> Response:
    """POST /console/login key=…: sign in with an admin key."""
    words = texts(_language(request))
    form = await _form(request)
    expected = _signer(request).read_pre(request.cookies.get(PRE_COOKIE))
    token = form.get("csrf")
    if not _same_origin(request) or not same_token(
        expected, token if isinstance(token, str) else None
    ):
        return _login_page(request, error=words["form_expired"], status=403)
    raw = form.get("key")
    key = raw.strip() if isinstance(raw, str) else ""
    identity = await _services(request).metering.identify_key(key) if key else None
    if identity is None:
        return _login_page(request, error=words["wrong_key"], status=401)
    if not identity.role.admin_capable:
        return _login_page(
            request, error=user_message("ADMIN_KEY_REQUIRED", _language(request)), status=403
        )
    cookie, _ = _signer(request).session_cookie(hash_key(key))
    response = _redirect("")
    _set_cookie(request, response, SESSION_COOKIE, cookie, SESSION_SECONDS)
    response.delete_cookie(PRE_COOKIE, path="/console")
    return response


async def logout(request: Request) -> Response:
    """POST /console/logout: end the session."""
    outcome = await _post_session(request)
    if isinstance(outcome, Response):
        return outcome
    response = _redirect("")
    response.delete_cookie(SESSION_COOKIE, path="/console")
    return response


# -- overview ------------------------------------------------------------------


def _day(unix: int, zone: ZoneInfo) -> str:
    return datetime.fromtimestamp(unix, tz=UTC).astimezone(zone).strftime("%d.%m.%Y")


def _time(unix: int, zone: ZoneInfo) -> str:
    return datetime.fromtimestamp(unix, tz=UTC).astimezone(zone).strftime("%d.%m.%Y %H:%M")


def _chf(value: Decimal | float) -> str:
    return f"{Decimal(str(value)):.2f}"


async def _result_banner(
    request: Request, practice_id: str, words: dict[str, str]
) -> tuple[str, str] | None:
    """The message of a return from Checkout or a saved form: (kind, text)."""
    params = request.query_params
    topup = params.get("topup")
    if topup == "cancel":
        return "info", words["topup_cancelled"]
    if topup == "success":
        session_id = params.get("session_id") or ""
        async with _services(request).db.read() as conn:
            micros = await conn.fetchval(
                "SELECT amount_internal_micro_usd FROM ai_credit_ledger "
                "WHERE practice_id = ? AND stripe_checkout_session_id = ? AND status = 'succeeded'",
                practice_id,
                session_id,
            )
        if micros is None:
            return "info", words["topup_processing"]
        return "ok", words["topup_done"].format(usd=f"{micros_to_usd(int(micros)):.2f}")
    if params.get("card") == "success":
        return "ok", words["card_setup_done"]
    if params.get("saved"):
        return "ok", words["saved"]
    if params.get("dry_run"):
        return "info", words["dry_run"]
    error = params.get("error")
    if error:
        # Only a code travels in the URL; the sentence is ours (no text can be injected).
        cfg = _services(request).settings.credit
        text = credit_user_text(
            error,
            params.get("field") or None,
            _language(request),
            min_chf=cfg.min_topup_chf,
            max_chf=cfg.max_topup_chf,
        )
        return "error", text or words["error_generic"].format(code=error[:60])
    return None


async def overview(request: Request) -> Response:
    """GET /console/: everything an admin needs on one page (or the sign-in)."""
    signed = await _signed_in(request)
    if signed is None:
        return _login_page(request)
    session, identity = signed
    services = _services(request)
    practice_id = identity.practice_id
    language = _language(request)
    words = texts(language)
    zone = ZoneInfo(services.settings.credit.month_timezone)
    state = await services.metering.state(practice_id)
    snap = state.snapshot
    period = state.period or calendar_month(int(time.time()))
    report = report_of(services)
    spend = {
        group_by: await report.summary(
            practice_id, start=period.start, end=period.end, group_by=group_by
        )
        for group_by in GroupBy
    }
    empty = words["no_usage"]
    day_items = _every_day(
        {g.key or "": g.cost_micros for g in spend[GroupBy.DAY].groups},
        start=period.start,
        end=min(period.end, int(time.time()) + 1),
        zone=zone,
    )
    chart_svgs = {
        "day": charts.columns(day_items, empty=empty),
        "model": charts.bars(
            [(g.key or "–", g.cost_micros) for g in spend[GroupBy.MODEL].groups], empty=empty
        ),
        "operation": charts.bars(
            [(g.key or "–", g.cost_micros) for g in spend[GroupBy.OPERATION].groups],
            empty=empty,
        ),
        "device": charts.bars(
            [(g.key or "–", g.cost_micros) for g in spend[GroupBy.DEVICE].groups], empty=empty
        ),
    }
    gauge = charts.gauge(
        budget=snap.budget_micros,
        used=snap.used_micros,
        extra=snap.extra_credit_micros,
        held=snap.held_micros,
        available=snap.available_micros,
        labels=words,
    )
    credit = services.credit
    history = await credit.history(practice_id, limit=HISTORY_ROWS)
    for item in history:
        item["when"] = _time(int(item["created_at"]), zone)
        item["label"] = words.get("event_" + str(item["event_type"]), str(item["event_type"]))
        item["usd_text"] = f"{micros_to_usd(int(item['amount_internal_micro_usd'])):.2f}"
        rappen = item["amount_paid_rappen"]
        item["chf_text"] = "" if rappen is None else f"{Decimal(int(rappen)) / 100:.2f}"
    settings_status = await credit.settings_status(practice_id)
    cfg = services.settings.credit
    paused = settings_status.get("paused_reason")
    lic = state.license
    context = {
        "csrf": session.csrf,
        "practice_id": practice_id,
        "banner": await _result_banner(request, practice_id, words),
        "gauge": gauge,
        "snapshot": {
            "budget": usd(snap.budget_micros),
            "used": usd(snap.used_micros),
            "extra": usd(snap.extra_credit_micros),
            "held": usd(snap.held_micros),
            "available": usd(snap.available_micros),
            "available_2": f"{micros_to_usd(snap.available_micros):.2f}",
            "percent": snap.available_percent,
        },
        "license": None if lic is None else {"plan": lic.lookup_key, "status": lic.status},
        "license_problem": None
        if state.problem is None
        else user_message(state.problem.value, language),
        "period": {"start": _day(period.start, zone), "end": _day(period.end - 1, zone)},
        "charts": chart_svgs,
        "total_cost": usd(spend[GroupBy.DAY].total_cost_micros),
        "total_requests": spend[GroupBy.DAY].total_requests,
        "history": history,
        "settings": settings_status,
        "paused_reason": None if not paused else _paused_text(str(paused), language),
        "limits_text": words["limits_explained"].format(
            min=_chf(cfg.min_topup_chf),
            max=_chf(cfg.max_topup_chf),
            month=_chf(settings_status.get("auto_topups_chf_this_month", 0)),
        ),
        "rate_text": _rate_text(services, cfg.default_topup_amount_chf, words),
        "default_chf": _chf(cfg.default_topup_amount_chf),
        "min_chf": _chf(cfg.min_topup_chf),
        "max_chf": _chf(cfg.max_topup_chf),
        "dry_run": services.settings.topup_dry_run,
    }
    return _page(request, "overview.html", context)


def _every_day(
    costs: Mapping[str, int], *, start: int, end: int, zone: ZoneInfo
) -> list[tuple[str, int]]:
    """(day, micro-USD) for every calendar day from `start` to `end`, 0 where nothing was spent."""
    first = datetime.fromtimestamp(start, tz=UTC).astimezone(zone).date()
    last = datetime.fromtimestamp(max(start, end - 1), tz=UTC).astimezone(zone).date()
    days = [first + timedelta(days=n) for n in range((last - first).days + 1)]
    return [(day.isoformat(), costs.get(day.isoformat(), 0)) for day in days]


def _paused_text(reason: str, language: Language) -> str:
    """A pause reason as people read it: the code's sentence where there is one."""
    code = reason.upper()
    if code.startswith("AUTO_TOPUP_") or code == "AI_BUDGET_EXHAUSTED":
        return f"{user_message(code, language)} ({reason})"
    return reason


def _rate_text(services: Services, chf: Decimal, words: dict[str, str]) -> str:
    cfg = services.settings.credit
    credit_usd = chf_to_internal_usd(chf, cfg.chf_per_internal_usd)
    if cfg.vat_rate > 0 and not cfg.stripe_tax:
        return words["rate"].format(chf=_chf(chf), usd=f"{credit_usd:.2f}", vat=f"{cfg.vat_rate}")
    return words["rate_no_vat"].format(chf=_chf(chf), usd=f"{credit_usd:.2f}")


# -- usage ---------------------------------------------------------------------


def _console_query(params: Mapping[str, str]) -> dict[str, str]:
    """The console's usage filters as the usage route reads them (dates, optional)."""
    keep = {}
    for name in ("from", "to", "model", "operation", "device"):
        value = params.get(name)
        if value:
            keep[name] = value
    if "to" in keep and "-" in keep["to"]:
        # A date in the form means "up to and including that day".
        try:
            day = datetime.strptime(keep["to"], "%Y-%m-%d").replace(tzinfo=UTC)
            keep["to"] = str(int(day.timestamp()) + 86_400)
        except ValueError:
            pass
    return keep


async def usage_page(request: Request) -> Response:
    """GET /console/usage: the usage events in a table, filtered, newest first."""
    signed = await _signed_in(request)
    if signed is None:
        return _redirect("")
    session, identity = signed
    services = _services(request)
    words = texts(_language(request))
    zone = ZoneInfo(services.settings.credit.month_timezone)
    params = _console_query(request.query_params)
    try:
        query: UsageQuery = await parse_usage_query(services, identity.practice_id, params)
    except GatewayError as exc:
        return _page(
            request, "error.html", {"message": exc.message, "code": exc.code}, status=exc.status
        )
    report = report_of(services)
    rows = await report.latest_events(
        identity.practice_id,
        start=query.start,
        end=query.end,
        limit=TABLE_ROWS,
        filters=query.filters,
        batch_lines=False,
    )
    batches = await report.batches(
        identity.practice_id,
        start=query.start,
        end=query.end,
        limit=TABLE_ROWS,
        filters=query.filters,
    )
    # One row per request, and one per batch however many lines it had; newest first.
    entries: list[tuple[int, dict[str, Any]]] = [
        (
            int(row["created_at"]),
            {
                "when": _time(int(row["created_at"]), zone),
                "request_id": row["request_id"],
                "device": row["device_id"] or "",
                "operation": row["operation_type"],
                "model": row["model"] or "",
                "input_tokens": row["input_tokens"],
                "output_tokens": row["output_tokens"],
                "audio_seconds": f"{float(row['audio_seconds']):g}",
                "cost": usd(int(row["estimated_cost_micro_usd"])),
            },
        )
        for row in rows
    ]
    entries += [(batch.at, _batch_entry(batch, zone, words)) for batch in batches]
    entries.sort(key=lambda entry: entry[0], reverse=True)
    events = [entry for _, entry in entries[:TABLE_ROWS]]
    choices = {
        group_by.value: [
            g.key
            for g in (
                await report.summary(
                    identity.practice_id, start=query.start, end=query.end, group_by=group_by
                )
            ).groups
            if g.key
        ]
        for group_by in (GroupBy.MODEL, GroupBy.OPERATION, GroupBy.DEVICE)
    }
    form_values = {
        "from": datetime.fromtimestamp(query.start, tz=UTC).astimezone(zone).date().isoformat(),
        "to": datetime.fromtimestamp(query.end - 1, tz=UTC).astimezone(zone).date().isoformat(),
        "model": query.filters.model or "",
        "operation": query.filters.operation or "",
        "device": query.filters.device or "",
    }
    csv_params = {"from": str(query.start), "to": str(query.end)}
    for name in ("model", "operation", "device"):
        if form_values[name]:
            csv_params[name] = form_values[name]
    context = {
        "csrf": session.csrf,
        "practice_id": identity.practice_id,
        "events": events,
        "shown_latest": words["shown_latest"].format(n=TABLE_ROWS)
        if len(entries) >= TABLE_ROWS
        else None,
        "choices": choices,
        "values": form_values,
        "csv_url": "/console/usage.csv?" + urlencode(csv_params),
    }
    return _page(request, "usage.html", context)


def _batch_entry(batch: BatchEntry, zone: ZoneInfo, words: Mapping[str, str]) -> dict[str, Any]:
    """A batch as one row of the usage table: its id, state, line counts and cost."""
    settled = batch.settled_at is not None
    return {
        "when": _time(batch.at, zone),
        "batch_id": batch.batch_id,
        "status": batch.status,
        "status_text": words.get(f"batch_status_{batch.status}", batch.status),
        "lines": batch.lines,
        "completed": batch.completed_lines,
        "failed": batch.failed_lines,
        "lines_text": words["batch_lines"].format(
            lines=batch.lines, completed=batch.completed_lines, failed=batch.failed_lines
        ),
        "held_text": None
        if settled
        else words["batch_held"].format(usd=usd(batch.estimate_micros)),
        "device": batch.device_id or "",
        "operation": batch.operation,
        "model": batch.model,
        "input_tokens": batch.input_tokens,
        "output_tokens": batch.output_tokens,
        "audio_seconds": "",
        "cost": usd(batch.cost_micros),
    }


async def usage_csv(request: Request) -> Response:
    """GET /console/usage.csv: the filtered events as CSV (the usage route's, streamed)."""
    signed = await _signed_in(request)
    if signed is None:
        return _redirect("")
    _, identity = signed
    services = _services(request)
    params = _console_query(request.query_params)
    try:
        query = await parse_usage_query(services, identity.practice_id, params)
    except GatewayError as exc:
        return _page(
            request, "error.html", {"message": exc.message, "code": exc.code}, status=exc.status
        )
    return csv_response(report_of(services), identity.practice_id, query)


# -- buying credit, saving a card, settings -----------------------------------


def _chf_field(form: FormData, name: str) -> Decimal | None:
    raw = form.get(name)
    if not isinstance(raw, str) or not raw.strip():
        return None
    try:
        # A person writes "1'000,50" as readily as "1000.50".
        return parse_decimal(raw.replace(",", ".").replace("'", ""), what=name)
    except InvalidAmount:
        return Decimal("NaN")


async def buy_page(request: Request) -> Response:
    """GET /console/buy?amount_chf=…: what the amount buys, and the button to pay."""
    signed = await _signed_in(request)
    if signed is None:
        return _redirect("")
    session, identity = signed
    services = _services(request)
    words = texts(_language(request))
    raw = request.query_params.get("amount_chf", "")
    from credit.checkout import validate_topup_amount

    try:
        chf = validate_topup_amount(raw.replace(",", ".") or "0", services.settings.credit)
    except CreditError as exc:
        return _redirect("", error=exc.error_code, field=exc.param or "")
    credit_usd = chf_to_internal_usd(chf, services.settings.credit.chf_per_internal_usd)
    context = {
        "csrf": session.csrf,
        "practice_id": identity.practice_id,
        "amount_chf": _chf(chf),
        "confirm": words["confirm_buy"].format(chf=_chf(chf), usd=f"{credit_usd:.2f}"),
        "rate_text": _rate_text(services, chf, words),
    }
    return _page(request, "buy.html", context)


async def topup(request: Request) -> Response:
    """POST /console/topup amount_chf=…: open a Stripe Checkout and go there."""
    outcome = await _post_session(request)
    if isinstance(outcome, Response):
        return outcome
    _, identity, form = outcome
    services = _services(request)
    amount = _chf_field(form, "amount_chf")
    state = await services.metering.state(identity.practice_id)
    lic = state.license
    base = _base_url(request)
    try:
        result = await services.credit.create_topup_checkout(
            identity.practice_id,
            subscription_id=lic.subscription_id if lic else None,
            customer_email=lic.customer_email if lic else None,
            amount_chf=amount if amount is not None else Decimal("NaN"),
            success_url=base + "/console/?topup=success&session_id={CHECKOUT_SESSION_ID}",
            cancel_url=base + "/console/?topup=cancel",
        )
    except CreditError as exc:
        return _redirect("", error=exc.error_code, field=exc.param or "")
    url = result.get("checkout_url")
    if not url:
        return _redirect("", dry_run="1")
    return RedirectResponse(str(url), status_code=303, headers=_SECURITY_HEADERS)


async def card(request: Request) -> Response:
    """POST /console/card: a Stripe Checkout in setup mode, to save a card."""
    outcome = await _post_session(request)
    if isinstance(outcome, Response):
        return outcome
    _, identity, _form_data = outcome
    services = _services(request)
    state = await services.metering.state(identity.practice_id)
    email = state.license.customer_email if state.license else None
    base = _base_url(request)
    try:
        result = await services.credit.create_setup_checkout(
            identity.practice_id,
            customer_email=email,
            success_url=base + "/console/?card=success",
            cancel_url=base + "/console/",
        )
    except CreditError as exc:
        return _redirect("", error=exc.error_code, field=exc.param or "")
    url = result.get("setup_url")
    if not url:
        return _redirect("", dry_run="1")
    return RedirectResponse(str(url), status_code=303, headers=_SECURITY_HEADERS)


async def settings_save(request: Request) -> Response:
    """POST /console/settings: the auto top-up settings form."""
    outcome = await _post_session(request)
    if isinstance(outcome, Response):
        return outcome
    _, identity, form = outcome
    trigger_raw = form.get("trigger_below_percent")
    trigger: int | None = None
    if isinstance(trigger_raw, str) and trigger_raw.strip():
        text = trigger_raw.strip()
        trigger = int(text) if text.isascii() and text.isdigit() else -1
    try:
        await _services(request).credit.update_settings(
            identity.practice_id,
            enabled=form.get("enabled") == "on",
            topup_amount_chf=_chf_field(form, "topup_amount_chf"),
            trigger_below_percent=trigger,
            monthly_limit_chf=_chf_field(form, "monthly_limit_chf"),
        )
    except CreditError as exc:
        return _redirect("", error=exc.error_code, field=exc.param or "")
    return _redirect("", saved="1")


async def resume(request: Request) -> Response:
    """POST /console/resume: switch a paused automatic top-up back on."""
    outcome = await _post_session(request)
    if isinstance(outcome, Response):
        return outcome
    _, identity, _form_data = outcome
    try:
        await _services(request).credit.update_settings(identity.practice_id, enabled=True)
    except CreditError as exc:
        return _redirect("", error=exc.error_code, field=exc.param or "")
    return _redirect("", saved="1")


# -- limits ----------------------------------------------------------------------


async def limits_page(request: Request) -> Response:
    """GET /console/limits: each key's and device's limits and this month's spend."""
    signed = await _signed_in(request)
    if signed is None:
        return _redirect("")
    session, identity = signed
    return await _limits_page(request, session, identity)


async def _limits_page(
    request: Request,
    session: Session,
    identity: KeyIdentity,
    *,
    refused: tuple[str, str, str] | None = None,
    entered: dict[str, Any] | None = None,
) -> Response:
    services = _services(request)
    words = limit_texts(_language(request))
    state = await services.metering.state(identity.practice_id)
    keys, devices = await limit_rows(
        services, identity.practice_id, None if state.period is None else state.period.start
    )
    banner: tuple[str, str] | None = None
    saved = request.query_params.get("saved")
    if refused is not None:
        banner = ("error", words["limits_refused"].format(name=refused[1], reason=refused[2]))
        for row in keys if refused[0] == "key" else devices:
            if row["name"] == refused[1] and entered is not None:
                row["values"] = entered
    elif saved:
        banner = ("ok", words["limits_saved"].format(name=saved[:200]))
    context = {
        "csrf": session.csrf,
        "practice_id": identity.practice_id,
        "lt": words,
        "banner": banner,
        "keys": keys,
        "devices": devices,
        "new_device": entered if refused is not None and refused[0] == "new" else None,
    }
    return _page(request, "limits.html", context, status=422 if refused else 200)


async def limits_save(request: Request) -> Response:
    """POST /console/limits scope=key|device name=… (or device_id=…) and the three limits:
    through the PUT routes' code (`change_limits`); refused: the page again, saying why."""
    outcome = await _post_session(request)
    if isinstance(outcome, Response):
        return outcome
    session, identity, form = outcome
    services = _services(request)
    scope_raw = form.get("scope")
    new_device = scope_raw == "new"
    scope = Scope.KEY if scope_raw == "key" else Scope.DEVICE
    raw_name = form.get("device_id" if new_device else "name")
    name = raw_name.strip() if isinstance(raw_name, str) else ""
    data = limit_form_data(form)
    try:
        if scope is Scope.KEY:
            await check_key_of_practice(services, identity.practice_id, name)
        else:
            check_device_id(name)
        await change_limits(services, identity.practice_id, scope, name, data)
    except GatewayError as exc:
        words = limit_texts(_language(request))
        entered = {k: "" if v is None else str(v) for k, v in data.items()}
        if new_device:
            entered["device_id"] = name
        return await _limits_page(
            request,
            session,
            identity,
            refused=("new" if new_device else str(scope), name, limit_refusal_text(exc, words)),
            entered=entered,
        )
    return _redirect("limits", saved=name)


# -- alerts ----------------------------------------------------------------------


async def alerts_page(request: Request) -> Response:
    """GET /console/alerts: the practice's alert settings as a form."""
    signed = await _signed_in(request)
    if signed is None:
        return _redirect("")
    session, identity = signed
    current = await _services(request).alerts.settings(identity.practice_id)
    return _alerts_page(request, session, identity, alert_form_values(current), current)


def _alerts_page(
    request: Request,
    session: Session,
    identity: KeyIdentity,
    values: dict[str, str],
    current: AlertSettings,
    *,
    banner: tuple[str, str] | None = None,
    secret: str | None = None,
    status: int = 200,
) -> Response:
    services = _services(request)
    words = alert_texts(_language(request))
    if banner is None and request.query_params.get("saved"):
        banner = ("ok", words["alerts_saved"])
    context = {
        "csrf": session.csrf,
        "practice_id": identity.practice_id,
        "at": words,
        "banner": banner,
        "values": values,
        "secret": secret,
        "secret_set": bool(current.webhook_secret),
        "email_enabled": services.dispatcher.mailer is not None,
        "alert_languages": ALERT_LANGUAGES,
    }
    return _page(request, "alerts.html", context, status=status)


async def alerts_save(request: Request) -> Response:
    """POST /console/alerts: through the PUT route's code (`change_alert_settings`); a new
    webhook URL's secret is shown on the answering page, once."""
    outcome = await _post_session(request)
    if isinstance(outcome, Response):
        return outcome
    session, identity, form = outcome
    services = _services(request)
    words = alert_texts(_language(request))
    data = alert_form_data(form)
    try:
        new, secret = await change_alert_settings(services, identity.practice_id, data)
    except GatewayError as exc:
        current = await services.alerts.settings(identity.practice_id)
        entered = {name: str(form.get(name) or "") for name in alert_form_values(current)}
        reason = alert_refusal_text(exc, words)
        return _alerts_page(
            request,
            session,
            identity,
            entered,
            current,
            banner=("error", words["alerts_refused"].format(reason=reason)),
            status=422,
        )
    if secret:
        # Shown here and never again: not a redirect (the secret stays out of every URL).
        return _alerts_page(
            request,
            session,
            identity,
            alert_form_values(new),
            new,
            banner=("ok", words["alerts_saved"]),
            secret=secret,
        )
    return _redirect("alerts", saved="1")


routes: list[BaseRoute] = [
    Route("/", root, methods=["GET"]),
    Route("/console", root, methods=["GET"]),
    Route("/console/", overview, methods=["GET"]),
    Route("/console/login", login, methods=["POST"]),
    Route("/console/logout", logout, methods=["POST"]),
    Route("/console/usage", usage_page, methods=["GET"]),
    Route("/console/usage.csv", usage_csv, methods=["GET"]),
    Route("/console/buy", buy_page, methods=["GET"]),
    Route("/console/topup", topup, methods=["POST"]),
    Route("/console/card", card, methods=["POST"]),
    Route("/console/settings", settings_save, methods=["POST"]),
    Route("/console/resume", resume, methods=["POST"]),
    Route("/console/limits", limits_page, methods=["GET"]),
    Route("/console/limits", limits_save, methods=["POST"]),
    Route("/console/alerts", alerts_page, methods=["GET"]),
    Route("/console/alerts", alerts_save, methods=["POST"]),
]
