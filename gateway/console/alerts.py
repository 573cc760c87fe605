"""The console's alerts page, /console/alerts: when and where the practice is told.

One form with the fields of `PUT /v1/ai-credit/alerts` (budget thresholds,
extra credit below an amount, a key's cap percent, email, webhook URL,
language), saved through `gateway.routes.alerts.change_alert_settings`,
the PUT's code: the same checks, a refusal shown in the person's language
and nothing changed. A new webhook URL shows its signing secret once, on
the page that answers the form (never in a URL, never again).
"""

from __future__ import annotations

from typing import Any

from starlette.datastructures import FormData

from gateway.alerts.events import usd_text
from gateway.alerts.store import AlertSettings
from gateway.errors import GatewayError
from gateway.messages import LANGUAGES, Language

# (de, fr, it, en)
_TEXTS: dict[str, tuple[str, str, str, str]] = {
    "alerts": ("Hinweise", "Alertes", "Avvisi", "Alerts"),
    "alerts_title": (
        "Hinweise per E-Mail und Webhook",
        "Alertes par e-mail et webhook",
        "Avvisi via e-mail e webhook",
        "Alerts by email and webhook",
    ),
    "alerts_hint": (
        "Jeder Hinweis kommt einmal pro Schwelle und Monat, bevor jemand blockiert wird.",
        "Chaque alerte arrive une fois par seuil et par mois, avant que quiconque soit bloqué.",
        "Ogni avviso arriva una volta per soglia e per mese, prima che qualcuno sia bloccato.",
        "Each alert comes once per threshold and month, before anyone is blocked.",
    ),
    "budget_used_percent": (
        "Budget verbraucht (Prozent, durch Kommas getrennt)",
        "Budget utilisé (pour cent, séparés par des virgules)",
        "Budget utilizzato (percentuali, separate da virgole)",
        "Budget used (percents, separated by commas)",
    ),
    "extra_credit_below_usd": (
        "Zusatzguthaben unter (USD)",
        "Crédit supplémentaire en dessous de (USD)",
        "Credito aggiuntivo sotto (USD)",
        "Extra credit below (USD)",
    ),
    "key_cap_percent": (
        "Schlüssel über Prozent seines Ausgabenlimits",
        "Clé au-delà de ce pourcentage de son plafond",
        "Chiave oltre questa percentuale del suo limite",
        "Key over this percent of its cap",
    ),
    "email": ("E-Mail-Adresse", "Adresse e-mail", "Indirizzo e-mail", "Email address"),
    "webhook_url": (
        "Webhook-URL (https)",
        "URL du webhook (https)",
        "URL del webhook (https)",
        "Webhook URL (https)",
    ),
    "alert_language": (
        "Sprache der Hinweise",
        "Langue des alertes",
        "Lingua degli avvisi",
        "Language of the alerts",
    ),
    "email_off": (
        "Der Betreiber hat keinen E-Mail-Versand eingerichtet: nur Webhooks und Banner.",
        "L'exploitant n'a pas configuré l'envoi d'e-mails : seulement webhooks et bannières.",
        "Il gestore non ha configurato l'invio di e-mail: solo webhook e banner.",
        "The operator has not set up email: webhooks and banners only.",
    ),
    "secret_set": (
        "Ein Signaturschlüssel ist gesetzt (er wird nicht mehr angezeigt).",
        "Une clé de signature est définie (elle n'est plus affichée).",
        "Una chiave di firma è impostata (non viene più mostrata).",
        "A signing secret is set (it is not shown again).",
    ),
    "secret_once": (
        "Signaturschlüssel des Webhooks, nur jetzt sichtbar (AzA-Signature prüfen):",
        "Clé de signature du webhook, visible maintenant seulement (vérifier AzA-Signature) :",
        "Chiave di firma del webhook, visibile solo ora (verificare AzA-Signature):",
        "The webhook's signing secret, shown only now (verify AzA-Signature with it):",
    ),
    "save_alerts": ("Speichern", "Enregistrer", "Salva", "Save"),
    "alerts_saved": ("Gespeichert.", "Enregistré.", "Salvato.", "Saved."),
    "alerts_refused": (
        "Nicht gespeichert: {reason}",
        "Non enregistré : {reason}",
        "Non salvato: {reason}",
        "Not saved: {reason}",
    ),
    "err_invalid_percent": (
        "«{field}»: ganze Prozent von 1 bis 100.",
        "« {field} » : des pour cent entiers de 1 à 100.",
        "«{field}»: percentuali intere da 1 a 100.",
        "'{field}': whole percents from 1 to 100.",
    ),
    "err_invalid_amount": (
        "«{field}» muss ein Betrag von 0 bis 1000000000 mit höchstens 6 Nachkommastellen "
        "sein (z. B. 5.00), oder leer.",
        "« {field} » doit être un montant de 0 à 1000000000 avec au plus 6 décimales "
        "(p. ex. 5.00), ou vide.",
        "«{field}» deve essere un importo da 0 a 1000000000 con al massimo 6 decimali "
        "(p. es. 5.00), o vuoto.",
        "'{field}' must be an amount from 0 to 1000000000 with at most 6 decimals "
        "(e.g. 5.00), or empty.",
    ),
    "err_invalid_email": (
        "«{field}» muss eine einzelne E-Mail-Adresse sein.",
        "« {field} » doit être une seule adresse e-mail.",
        "«{field}» deve essere un solo indirizzo e-mail.",
        "'{field}' must be one email address.",
    ),
    "err_invalid_webhook_url": (
        "«{field}» muss eine https-Adresse im öffentlichen Internet sein.",
        "« {field} » doit être une adresse https sur l'internet public.",
        "«{field}» deve essere un indirizzo https su internet pubblico.",
        "'{field}' must be an https address on the public internet.",
    ),
    "err_invalid_language": (
        "Sprache: de, fr, it oder en.",
        "Langue : de, fr, it ou en.",
        "Lingua: de, fr, it o en.",
        "Language: de, fr, it or en.",
    ),
}


def alert_texts(language: Language) -> dict[str, str]:
    index = LANGUAGES.index(language)
    return {key: values[index] for key, values in _TEXTS.items()}


def all_entries() -> dict[str, tuple[str, str, str, str]]:
    return dict(_TEXTS)


def refusal_text(error: GatewayError, words: dict[str, str]) -> str:
    """A refusal of `change_alert_settings` in the person's words (the field named)."""
    sentence = words.get("err_" + (error.code or ""))
    if sentence is None:
        return error.message
    return sentence.format(field=words.get(error.param or "", error.param or ""))


def _whole(text: str) -> int | str:
    return int(text) if text.isascii() and text.isdigit() else text


def form_data(form: FormData) -> dict[str, Any]:
    """The form's fields as the PUT's JSON would carry them (empty: null, or no thresholds;
    whole numbers as numbers; anything else as typed, for the PUT's checks to refuse)."""

    def text(name: str) -> str:
        raw = form.get(name)
        return raw.strip() if isinstance(raw, str) else ""

    data: dict[str, Any] = {
        "budget_used_percent": [
            _whole(part.strip().rstrip("%").strip())
            for part in text("budget_used_percent").split(",")
            if part.strip()
        ],
        "extra_credit_below_usd": text("extra_credit_below_usd").replace(",", ".") or None,
        "email": text("email") or None,
        "webhook_url": text("webhook_url") or None,
        "language": text("language"),
    }
    cap = text("key_cap_percent").rstrip("%").strip()
    if cap:
        data["key_cap_percent"] = _whole(cap)
    return data


def form_values(settings: AlertSettings) -> dict[str, str]:
    below = settings.extra_credit_below_micros
    return {
        "budget_used_percent": ", ".join(str(p) for p in settings.budget_used_percent),
        "extra_credit_below_usd": "" if below is None else usd_text(below),
        "key_cap_percent": str(settings.key_cap_percent),
        "email": settings.email or "",
        "webhook_url": settings.webhook_url or "",
        "language": settings.language,
    }
