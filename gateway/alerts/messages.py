"""Alert emails in the practice's language (de, fr, it, en): a subject and a short text.

Each text says what happened and what the practice can do; the numbers come
from `Alert.data()`. Unknown fields are never filled in from elsewhere, so a
text cannot carry a key, a payment method id or prompt content.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from gateway.alerts.events import Alert, AlertType

AlertLanguage = Literal["de", "fr", "it", "en"]
LANGUAGES: tuple[str, ...] = get_args(AlertLanguage)

_T = dict[AlertLanguage, tuple[str, str]]

_TEXTS: dict[AlertType, _T] = {
    AlertType.BUDGET_THRESHOLD_CROSSED: {
        "de": (
            "KI-Budget: {threshold_percent} % verbraucht",
            "Ihre Praxis hat {threshold_percent} % ihres KI-Budgets für diesen Monat verbraucht "
            "({used_usd} von {budget_usd} USD). Im Adminbereich können Sie KI-Guthaben "
            "aufladen oder die automatische Aufladung einschalten.",
        ),
        "fr": (
            "Budget IA : {threshold_percent} % utilisés",
            "Votre cabinet a utilisé {threshold_percent} % de son budget IA de ce mois "
            "({used_usd} sur {budget_usd} USD). Dans l'espace d'administration, vous pouvez "
            "recharger du crédit IA ou activer la recharge automatique.",
        ),
        "it": (
            "Budget IA: {threshold_percent} % utilizzato",
            "Il vostro studio ha utilizzato il {threshold_percent} % del budget IA di questo "
            "mese ({used_usd} di {budget_usd} USD). Nell'area di amministrazione potete "
            "ricaricare credito IA o attivare la ricarica automatica.",
        ),
        "en": (
            "AI budget: {threshold_percent} % used",
            "Your practice has used {threshold_percent} % of this month's AI budget "
            "({used_usd} of {budget_usd} USD). You can top up AI credit or turn on automatic "
            "top-up in the admin area.",
        ),
    },
    AlertType.CREDIT_LOW: {
        "de": (
            "KI-Guthaben fast aufgebraucht",
            "Das KI-Zusatzguthaben Ihrer Praxis liegt unter {threshold_usd} USD "
            "(noch {extra_credit_usd} USD). Im Adminbereich können Sie es aufladen.",
        ),
        "fr": (
            "Crédit IA presque épuisé",
            "Le crédit IA supplémentaire de votre cabinet est passé sous {threshold_usd} USD "
            "(reste {extra_credit_usd} USD). Vous pouvez le recharger dans l'espace "
            "d'administration.",
        ),
        "it": (
            "Credito IA quasi esaurito",
            "Il credito IA aggiuntivo del vostro studio è sceso sotto {threshold_usd} USD "
            "(restano {extra_credit_usd} USD). Potete ricaricarlo nell'area di amministrazione.",
        ),
        "en": (
            "AI credit running low",
            "Your practice's extra AI credit is below {threshold_usd} USD "
            "({extra_credit_usd} USD left). You can top it up in the admin area.",
        ),
    },
    AlertType.KEY_CAP_NEAR: {
        "de": (
            "Ausgabenlimit fast erreicht: {who}",
            "{who} hat {threshold_percent} % seines monatlichen Limits verbraucht "
            "({used_usd} von {monthly_cap_usd} USD). Danach werden seine Anfragen abgelehnt, "
            "bis das Limit im Adminbereich erhöht wird oder der Monat endet.",
        ),
        "fr": (
            "Plafond de dépenses presque atteint : {who}",
            "{who} a utilisé {threshold_percent} % de son plafond mensuel "
            "({used_usd} sur {monthly_cap_usd} USD). Ensuite ses requêtes seront refusées "
            "jusqu'à ce que le plafond soit relevé ou que le mois se termine.",
        ),
        "it": (
            "Limite di spesa quasi raggiunto: {who}",
            "{who} ha utilizzato il {threshold_percent} % del suo limite mensile "
            "({used_usd} di {monthly_cap_usd} USD). Poi le sue richieste saranno rifiutate "
            "finché il limite non viene aumentato o il mese non finisce.",
        ),
        "en": (
            "Spending cap nearly reached: {who}",
            "{who} has used {threshold_percent} % of its monthly cap "
            "({used_usd} of {monthly_cap_usd} USD). After that its requests are refused "
            "until the cap is raised in the admin area or the month ends.",
        ),
    },
    AlertType.TOPUP_SUCCEEDED: {
        "de": (
            "KI-Guthaben aufgeladen",
            "Ihrer Praxis wurden {credit_usd} USD KI-Guthaben gutgeschrieben.",
        ),
        "fr": (
            "Crédit IA rechargé",
            "{credit_usd} USD de crédit IA ont été crédités à votre cabinet.",
        ),
        "it": (
            "Credito IA ricaricato",
            "Al vostro studio sono stati accreditati {credit_usd} USD di credito IA.",
        ),
        "en": (
            "AI credit topped up",
            "{credit_usd} USD of AI credit have been added to your practice.",
        ),
    },
    AlertType.AUTO_TOPUP_FAILED: {
        "de": (
            "Automatische Aufladung fehlgeschlagen",
            "Die automatische Aufladung des KI-Guthabens ist fehlgeschlagen. Bitte prüfen Sie "
            "die Zahlungsmethode im Adminbereich oder laden Sie manuell auf.",
        ),
        "fr": (
            "Échec de la recharge automatique",
            "La recharge automatique du crédit IA a échoué. Veuillez vérifier le moyen de "
            "paiement dans l'espace d'administration ou recharger manuellement.",
        ),
        "it": (
            "Ricarica automatica non riuscita",
            "La ricarica automatica del credito IA non è riuscita. Verificate il metodo di "
            "pagamento nell'area di amministrazione o ricaricate manualmente.",
        ),
        "en": (
            "Automatic top-up failed",
            "The automatic top-up of AI credit failed. Please check the payment method in "
            "the admin area or top up manually.",
        ),
    },
    AlertType.AUTO_TOPUP_PAUSED: {
        "de": (
            "Automatische Aufladung pausiert",
            "Die automatische Aufladung des KI-Guthabens wurde pausiert. Sie können sie im "
            "Adminbereich wieder einschalten, sobald die Zahlungsmethode geprüft ist.",
        ),
        "fr": (
            "Recharge automatique suspendue",
            "La recharge automatique du crédit IA a été suspendue. Vous pouvez la réactiver "
            "dans l'espace d'administration une fois le moyen de paiement vérifié.",
        ),
        "it": (
            "Ricarica automatica sospesa",
            "La ricarica automatica del credito IA è stata sospesa. Potete riattivarla "
            "nell'area di amministrazione dopo aver verificato il metodo di pagamento.",
        ),
        "en": (
            "Automatic top-up paused",
            "Automatic top-up of AI credit has been paused. You can turn it on again in the "
            "admin area once the payment method is checked.",
        ),
    },
    AlertType.PAYMENT_ACTION_REQUIRED: {
        "de": (
            "Karte muss bestätigt werden",
            "Ihre Bank verlangt eine Bestätigung der Karte (3-D Secure). Bitte "
            "authentifizieren Sie die Karte im Adminbereich erneut.",
        ),
        "fr": (
            "La carte doit être confirmée",
            "Votre banque demande une confirmation de la carte (3-D Secure). Veuillez "
            "authentifier à nouveau la carte dans l'espace d'administration.",
        ),
        "it": (
            "La carta deve essere confermata",
            "La vostra banca richiede una conferma della carta (3-D Secure). Autenticate di "
            "nuovo la carta nell'area di amministrazione.",
        ),
        "en": (
            "Your card needs to be confirmed",
            "Your bank asks for the card to be confirmed (3-D Secure). Please re-authenticate "
            "the card in the admin area.",
        ),
    },
}

_WHO: dict[AlertLanguage, tuple[str, str]] = {
    "de": ("Der Schlüssel {}", "Das Gerät {}"),
    "fr": ("La clé {}", "L'appareil {}"),
    "it": ("La chiave {}", "Il dispositivo {}"),
    "en": ("The key {}", "The device {}"),
}


def language_of(value: str | None, default: AlertLanguage = "de") -> AlertLanguage:
    """`value` when it is a supported language, else `default`."""
    return value if value in LANGUAGES else default  # type: ignore[return-value]


def email_text(alert: Alert, language: AlertLanguage) -> tuple[str, str]:
    """The (subject, text) of `alert` in `language`."""
    subject, text = _TEXTS[alert.type][language]
    fields: dict[str, Any] = dict(alert.data())
    if alert.type is AlertType.KEY_CAP_NEAR:
        key_form, device_form = _WHO[language]
        form = device_form if alert.reason == "device" else key_form
        fields["who"] = form.format(alert.subject or "")
    return subject.format(**fields), text.format(**fields)
