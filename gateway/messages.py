"""Sentences for people: the `message_user` of a blocked request, per error code.

The OpenAI-shaped `message` is for developers (English, always); `message_user`
is what a client app shows the practice member, in the practice's language:
German by default, French, Italian or English by `Settings.user_language`
(`AZA_USER_LANGUAGE`). Each says what happened and what a person can do
about it.

The credit package (which does not import gateway/) writes its own
`message_user` in German; `credit_user_message` gives the same sentence in
the other languages, by the error's code and field.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

Language = Literal["de", "fr", "it", "en"]
LANGUAGES: tuple[Language, ...] = ("de", "fr", "it", "en")

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

Texts = Mapping[Language, str]

_USER: dict[str, Texts] = {
    BUDGET_EXHAUSTED: {
        "de": "Das KI-Budget Ihrer Praxis für diesen Monat ist aufgebraucht. "
        "Im Adminbereich können Sie KI-Guthaben aufladen.",
        "fr": "Le budget IA de votre cabinet pour ce mois est épuisé. "
        "Vous pouvez recharger du crédit IA dans l'espace d'administration.",
        "it": "Il budget IA del vostro studio per questo mese è esaurito. "
        "Nell'area di amministrazione potete ricaricare credito IA.",
        "en": "Your practice's AI budget for this month is used up. "
        "You can top up AI credit in the admin area.",
    },
    "AUTO_TOPUP_MONTHLY_LIMIT_REACHED": {
        "de": "Das KI-Budget ist aufgebraucht und die automatische Aufladung hat ihr "
        "Monatslimit erreicht. Eine manuelle Aufladung im Adminbereich ist weiterhin möglich.",
        "fr": "Le budget IA est épuisé et la recharge automatique a atteint sa limite "
        "mensuelle. Une recharge manuelle reste possible dans l'espace d'administration.",
        "it": "Il budget IA è esaurito e la ricarica automatica ha raggiunto il limite "
        "mensile. Una ricarica manuale nell'area di amministrazione è ancora possibile.",
        "en": "The AI budget is used up and automatic top-up has reached its monthly limit. "
        "A manual top-up in the admin area is still possible.",
    },
    "AUTO_TOPUP_REQUIRES_ACTION": {
        "de": "Die automatische Aufladung braucht eine Bestätigung Ihrer Karte. Bitte "
        "authentifizieren Sie die Karte im Adminbereich erneut oder laden Sie manuell auf.",
        "fr": "La recharge automatique demande une confirmation de votre carte. Veuillez "
        "authentifier à nouveau la carte dans l'espace d'administration ou recharger "
        "manuellement.",
        "it": "La ricarica automatica richiede una conferma della vostra carta. Autenticate "
        "di nuovo la carta nell'area di amministrazione o ricaricate manualmente.",
        "en": "Automatic top-up needs your card to be confirmed. Please re-authenticate "
        "the card in the admin area or top up manually.",
    },
    "AUTO_TOPUP_PAYMENT_FAILED": {
        "de": "Die automatische Aufladung ist fehlgeschlagen und wurde pausiert. Bitte prüfen "
        "Sie die Zahlungsmethode im Adminbereich oder laden Sie manuell auf.",
        "fr": "La recharge automatique a échoué et a été suspendue. Veuillez vérifier le "
        "moyen de paiement dans l'espace d'administration ou recharger manuellement.",
        "it": "La ricarica automatica non è riuscita ed è stata sospesa. Verificate il "
        "metodo di pagamento nell'area di amministrazione o ricaricate manualmente.",
        "en": "Automatic top-up failed and has been paused. Please check the payment method "
        "in the admin area or top up manually.",
    },
    "AUTO_TOPUP_PENDING": {
        "de": "Eine automatische Aufladung wird gerade verarbeitet. "
        "Bitte versuchen Sie es in einer Minute erneut.",
        "fr": "Une recharge automatique est en cours de traitement. "
        "Veuillez réessayer dans une minute.",
        "it": "Una ricarica automatica è in corso di elaborazione. Riprovate tra un minuto.",
        "en": "An automatic top-up is being processed. Please try again in a minute.",
    },
    "AUTO_TOPUP_COOLDOWN": {
        "de": "Das KI-Budget ist aufgebraucht; die letzte automatische Aufladung liegt "
        "weniger als 24 Stunden zurück. Eine manuelle Aufladung im Adminbereich ist möglich.",
        "fr": "Le budget IA est épuisé ; la dernière recharge automatique date de moins de "
        "24 heures. Une recharge manuelle est possible dans l'espace d'administration.",
        "it": "Il budget IA è esaurito; l'ultima ricarica automatica risale a meno di "
        "24 ore fa. Una ricarica manuale nell'area di amministrazione è possibile.",
        "en": "The AI budget is used up and the last automatic top-up was less than "
        "24 hours ago. A manual top-up in the admin area is possible.",
    },
    "LICENSE_MISSING": {
        "de": "Für Ihre Praxis ist keine Lizenz hinterlegt. Bitte wenden Sie sich an den Support.",
        "fr": "Aucune licence n'est enregistrée pour votre cabinet. Veuillez contacter le support.",
        "it": "Per il vostro studio non è registrata alcuna licenza. Contattate il supporto.",
        "en": "No license is on file for your practice. Please contact support.",
    },
    "LICENSE_INACTIVE": {
        "de": "Die Lizenz Ihrer Praxis ist nicht aktiv. Bitte prüfen Sie Ihr Abonnement.",
        "fr": "La licence de votre cabinet n'est pas active. Veuillez vérifier votre abonnement.",
        "it": "La licenza del vostro studio non è attiva. Verificate il vostro abbonamento.",
        "en": "Your practice's license is not active. Please check your subscription.",
    },
    "LICENSE_EXPIRED": {
        "de": "Die Lizenz Ihrer Praxis ist abgelaufen. Bitte verlängern Sie Ihr Abonnement.",
        "fr": "La licence de votre cabinet a expiré. Veuillez renouveler votre abonnement.",
        "it": "La licenza del vostro studio è scaduta. Rinnovate il vostro abbonamento.",
        "en": "Your practice's license has expired. Please renew your subscription.",
    },
    "ADMIN_KEY_REQUIRED": {
        "de": "Dafür braucht es einen Admin-Schlüssel der Praxis; Geräteschlüssel dürfen "
        "nur KI-Anfragen stellen und das Budget lesen.",
        "fr": "Il faut pour cela une clé d'administration du cabinet ; les clés des "
        "appareils ne peuvent qu'envoyer des requêtes IA et lire le budget.",
        "it": "Per questo serve una chiave di amministrazione dello studio; le chiavi dei "
        "dispositivi possono solo inviare richieste IA e leggere il budget.",
        "en": "This needs an admin key of the practice; device keys may only send AI "
        "requests and read the budget.",
    },
}

# The credit package's sentences (German there), by error code and field.
_CREDIT: dict[tuple[str, str | None], Texts] = {
    ("INVALID_TOPUP_AMOUNT", "amount_chf"): {
        "de": "Bitte einen Betrag zwischen {min_chf} und {max_chf} CHF wählen.",
        "fr": "Veuillez choisir un montant entre {min_chf} et {max_chf} CHF.",
        "it": "Scegliete un importo tra {min_chf} e {max_chf} CHF.",
        "en": "Please choose an amount between {min_chf} and {max_chf} CHF.",
    },
    ("INVALID_VALUE", "topup_amount_chf"): {
        "de": "Bitte einen Betrag zwischen {min_chf} und {max_chf} CHF wählen.",
        "fr": "Veuillez choisir un montant entre {min_chf} et {max_chf} CHF.",
        "it": "Scegliete un importo tra {min_chf} e {max_chf} CHF.",
        "en": "Please choose an amount between {min_chf} and {max_chf} CHF.",
    },
    ("INVALID_VALUE", "amount_usd"): {
        "de": "Ungültiger Betrag.",
        "fr": "Montant invalide.",
        "it": "Importo non valido.",
        "en": "Invalid amount.",
    },
    ("INVALID_VALUE", "note"): {
        "de": "Bitte eine Begründung angeben.",
        "fr": "Veuillez indiquer un motif.",
        "it": "Indicate una motivazione.",
        "en": "Please give a reason.",
    },
    ("INVALID_VALUE", "trigger_below_percent"): {
        "de": "Die Schwelle muss zwischen 1 und 100 % liegen.",
        "fr": "Le seuil doit être compris entre 1 et 100 %.",
        "it": "La soglia deve essere tra 1 e 100 %.",
        "en": "The threshold must be between 1 and 100 %.",
    },
    ("INVALID_VALUE", "monthly_limit_chf"): {
        "de": "Ungültiges Monatslimit: Es muss mindestens einen Aufladebetrag umfassen.",
        "fr": "Limite mensuelle invalide : elle doit couvrir au moins un montant de recharge.",
        "it": "Limite mensile non valido: deve coprire almeno un importo di ricarica.",
        "en": "Invalid monthly limit: it must cover at least one top-up amount.",
    },
    ("AUTO_TOPUP_NO_PAYMENT_METHOD", "enabled"): {
        "de": "Bitte zuerst eine Karte für das automatische Aufladen hinterlegen.",
        "fr": "Veuillez d'abord enregistrer une carte pour la recharge automatique.",
        "it": "Registrate prima una carta per la ricarica automatica.",
        "en": "Please save a card for automatic top-ups first.",
    },
    ("LIVE_TOPUP_BLOCKED", None): {
        "de": "Aufladen ist auf diesem Server noch nicht freigeschaltet.",
        "fr": "La recharge n'est pas encore activée sur ce serveur.",
        "it": "La ricarica non è ancora abilitata su questo server.",
        "en": "Top-ups are not enabled on this server yet.",
    },
    ("STRIPE_NOT_CONFIGURED", None): {
        "de": "Zahlungen sind zurzeit nicht verfügbar.",
        "fr": "Les paiements ne sont pas disponibles pour le moment.",
        "it": "I pagamenti non sono al momento disponibili.",
        "en": "Payments are not available at the moment.",
    },
    ("STRIPE_UNAVAILABLE", None): {
        "de": "Stripe ist gerade nicht erreichbar. Bitte später erneut versuchen.",
        "fr": "Stripe n'est pas joignable pour le moment. Veuillez réessayer plus tard.",
        "it": "Stripe non è raggiungibile al momento. Riprovate più tardi.",
        "en": "Stripe cannot be reached right now. Please try again later.",
    },
    ("STRIPE_REQUEST_FAILED", None): {
        "de": "Die Zahlung konnte nicht vorbereitet werden.",
        "fr": "Le paiement n'a pas pu être préparé.",
        "it": "Non è stato possibile preparare il pagamento.",
        "en": "The payment could not be prepared.",
    },
    ("STRIPE_SIGNATURE_INVALID", None): {
        "de": "Ungültige Stripe-Signatur.",
        "fr": "Signature Stripe invalide.",
        "it": "Firma Stripe non valida.",
        "en": "Invalid Stripe signature.",
    },
    ("STRIPE_WEBHOOK_NOT_CONFIGURED", None): {
        "de": "Stripe-Webhooks sind nicht eingerichtet.",
        "fr": "Les webhooks Stripe ne sont pas configurés.",
        "it": "I webhook Stripe non sono configurati.",
        "en": "Stripe webhooks are not set up.",
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


def credit_user_message(
    error_code: str | None,
    param: str | None,
    language: Language,
    *,
    german: str | None,
    **values: object,
) -> str | None:
    """A credit error's `message_user` in `language`.

    German is the credit package's own sentence (`german`, kept as written);
    for the other languages the sentence of this code and field, else of this
    code, else the German one.
    """
    if language == "de" or error_code is None:
        return german
    texts = _CREDIT.get((error_code, param)) or _CREDIT.get((error_code, None))
    if texts is None:
        return german
    return texts[language].format(**values)


def credit_user_text(
    error_code: str, param: str | None, language: Language, **values: object
) -> str | None:
    """The sentence of a credit error's code and field in `language` (German included);
    None for a code without one."""
    texts = _CREDIT.get((error_code, param)) or _CREDIT.get((error_code, None))
    return None if texts is None else texts[language].format(**values)


def developer_message(error_code: str) -> str:
    """The OpenAI-shaped `message` (English) for `error_code`."""
    return _DEVELOPER.get(error_code, _DEVELOPER[BUDGET_EXHAUSTED])


def all_user_texts() -> list[Texts]:
    """Every sentence table (for the test that each has all four languages)."""
    return [*_USER.values(), *_CREDIT.values()]
