"""Sentences for people: the `message_user` of a blocked request, per error code.

The OpenAI-shaped `message` is for developers (English, always); `message_user`
is what a client app shows the practice member, in the practice's language:
German by default, English when `Settings.user_language` is "en". Each says
what happened and what a person can do about it.
"""

from __future__ import annotations

from typing import Literal

Language = Literal["de", "en"]

BUDGET_EXHAUSTED = "AI_BUDGET_EXHAUSTED"

# Reasons an auto top-up did not happen that a person must act on; the gate
# reports these instead of the generic "budget exhausted".
ACTIONABLE_TOPUP_CODES = frozenset(
    {
        "AUTO_TOPUP_MONTHLY_LIMIT_REACHED",
        "AUTO_TOPUP_REQUIRES_ACTION",
        "AUTO_TOPUP_PAYMENT_FAILED",
        "AUTO_TOPUP_PENDING",
        "AUTO_TOPUP_COOLDOWN",
    }
)

_USER: dict[str, dict[Language, str]] = {
    BUDGET_EXHAUSTED: {
        "de": "Das KI-Budget Ihrer Praxis für diesen Monat ist aufgebraucht. "
        "Im Adminbereich können Sie KI-Guthaben aufladen.",
        "en": "Your practice's AI budget for this month is used up. "
        "You can top up AI credit in the admin area.",
    },
    "AUTO_TOPUP_MONTHLY_LIMIT_REACHED": {
        "de": "Das KI-Budget ist aufgebraucht und die automatische Aufladung hat ihr "
        "Monatslimit erreicht. Eine manuelle Aufladung im Adminbereich ist weiterhin möglich.",
        "en": "The AI budget is used up and automatic top-up has reached its monthly limit. "
        "A manual top-up in the admin area is still possible.",
    },
    "AUTO_TOPUP_REQUIRES_ACTION": {
        "de": "Die automatische Aufladung braucht eine Bestätigung Ihrer Karte. Bitte "
        "authentifizieren Sie die Karte im Adminbereich erneut oder laden Sie manuell auf.",
        "en": "Automatic top-up needs your card to be confirmed. Please re-authenticate "
        "the card in the admin area or top up manually.",
    },
    "AUTO_TOPUP_PAYMENT_FAILED": {
        "de": "Die automatische Aufladung ist fehlgeschlagen und wurde pausiert. Bitte prüfen "
        "Sie die Zahlungsmethode im Adminbereich oder laden Sie manuell auf.",
        "en": "Automatic top-up failed and has been paused. Please check the payment method "
        "in the admin area or top up manually.",
    },
    "AUTO_TOPUP_PENDING": {
        "de": "Eine automatische Aufladung wird gerade verarbeitet. "
        "Bitte versuchen Sie es in einer Minute erneut.",
        "en": "An automatic top-up is being processed. Please try again in a minute.",
    },
    "AUTO_TOPUP_COOLDOWN": {
        "de": "Das KI-Budget ist aufgebraucht; die letzte automatische Aufladung liegt "
        "weniger als 24 Stunden zurück. Eine manuelle Aufladung im Adminbereich ist möglich.",
        "en": "The AI budget is used up and the last automatic top-up was less than "
        "24 hours ago. A manual top-up in the admin area is possible.",
    },
    "LICENSE_MISSING": {
        "de": "Für Ihre Praxis ist keine Lizenz hinterlegt. Bitte wenden Sie sich an den Support.",
        "en": "No license is on file for your practice. Please contact support.",
    },
    "LICENSE_INACTIVE": {
        "de": "Die Lizenz Ihrer Praxis ist nicht aktiv. Bitte prüfen Sie Ihr Abonnement.",
        "en": "Your practice's license is not active. Please check your subscription.",
    },
    "LICENSE_EXPIRED": {
        "de": "Die Lizenz Ihrer Praxis ist abgelaufen. Bitte verlängern Sie Ihr Abonnement.",
        "en": "Your practice's license has expired. Please renew your subscription.",
    },
}

_DEVELOPER: dict[str, str] = {
    BUDGET_EXHAUSTED: "The practice's AI budget and extra credit are exhausted.",
    "AUTO_TOPUP_MONTHLY_LIMIT_REACHED": "AI budget exhausted; automatic top-up reached "
    "its monthly limit.",
    "AUTO_TOPUP_REQUIRES_ACTION": "AI budget exhausted; automatic top-up needs the "
    "card to be re-authenticated.",
    "AUTO_TOPUP_PAYMENT_FAILED": "AI budget exhausted; automatic top-up payment failed.",
    "AUTO_TOPUP_PENDING": "AI budget exhausted; an automatic top-up is pending.",
    "AUTO_TOPUP_COOLDOWN": "AI budget exhausted; automatic top-up is in its cooldown.",
    "LICENSE_MISSING": "The practice has no license.",
    "LICENSE_INACTIVE": "The practice's license is not active.",
    "LICENSE_EXPIRED": "The practice's license has expired.",
}


def user_message(error_code: str, language: Language = "de") -> str:
    """The sentence a practice member reads for `error_code`."""
    texts = _USER.get(error_code, _USER[BUDGET_EXHAUSTED])
    return texts[language]


def developer_message(error_code: str) -> str:
    """The OpenAI-shaped `message` (English) for `error_code`."""
    return _DEVELOPER.get(error_code, _DEVELOPER[BUDGET_EXHAUSTED])
