"""The console's limits page, /console/limits: each key's and device's cap and rate limits.

It lists the practice's active keys (prefix, label and role, never the key)
with their monthly cap, requests and tokens per minute and what they spent
this month against the cap, and the devices (`X-Device-Id`) that have
limits. Each row is a form; a new device gets one more. The forms go
through `gateway.routes.limits.change_limits`, the code of
`PUT /v1/ai-credit/keys/{prefix}/limits` and `PUT …/devices/{id}/limits`,
so they are validated alike; a refusal is shown in the person's language
and changes nothing. An empty field means no limit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.datastructures import FormData

from budget.limits import Limits, Scope
from gateway.alerts.events import usd_text
from gateway.errors import GatewayError
from gateway.messages import LANGUAGES, Language

if TYPE_CHECKING:
    from gateway.services import Services

_FIELDS = ("monthly_cap_usd", "requests_per_minute", "tokens_per_minute")

# (de, fr, it, en)
_TEXTS: dict[str, tuple[str, str, str, str]] = {
    "limits": ("Limits", "Limites", "Limiti", "Limits"),
    "limits_title": (
        "Limits pro Schlüssel und Gerät",
        "Limites par clé et par appareil",
        "Limiti per chiave e dispositivo",
        "Limits per key and device",
    ),
    "limits_hint": (
        "Ein monatliches Ausgabenlimit in USD und Anfragen bzw. Tokens pro Minute. "
        "Ein leeres Feld heisst: kein Limit. Wer über dem Ausgabenlimit ist, erhält "
        "keine Antworten mehr bis zum nächsten Monat oder bis das Limit erhöht wird.",
        "Un plafond mensuel de dépenses en USD et des requêtes ou jetons par minute. "
        "Un champ vide signifie : pas de limite. Au-delà du plafond, plus aucune réponse "
        "jusqu'au mois suivant ou jusqu'à ce que le plafond soit relevé.",
        "Un limite mensile di spesa in USD e richieste o token al minuto. Un campo vuoto "
        "significa: nessun limite. Oltre il limite di spesa non arrivano più risposte fino "
        "al mese successivo o finché il limite non viene aumentato.",
        "A monthly spending cap in USD and requests or tokens per minute. An empty field "
        "means no limit. Over its cap, a key or device gets no answers until next month or "
        "until the cap is raised.",
    ),
    "key_list": ("Schlüssel", "Clés", "Chiavi", "Keys"),
    "devices": ("Geräte", "Appareils", "Dispositivi", "Devices"),
    "key_prefix": ("Schlüssel", "Clé", "Chiave", "Key"),
    "key_label": ("Bezeichnung", "Libellé", "Etichetta", "Label"),
    "key_role": ("Rolle", "Rôle", "Ruolo", "Role"),
    "device_id": ("Geräte-ID", "ID de l'appareil", "ID del dispositivo", "Device id"),
    "monthly_cap_usd": (
        "Ausgabenlimit pro Monat (USD)",
        "Plafond mensuel (USD)",
        "Limite di spesa mensile (USD)",
        "Monthly cap (USD)",
    ),
    "requests_per_minute": (
        "Anfragen pro Minute",
        "Requêtes par minute",
        "Richieste al minuto",
        "Requests per minute",
    ),
    "tokens_per_minute": (
        "Tokens pro Minute",
        "Jetons par minute",
        "Token al minuto",
        "Tokens per minute",
    ),
    "spent_of_cap": (
        "Diesen Monat ausgegeben",
        "Dépensé ce mois-ci",
        "Speso questo mese",
        "Spent this month",
    ),
    "no_cap": ("kein Limit", "pas de limite", "nessun limite", "no cap"),
    "save_limits": ("Speichern", "Enregistrer", "Salva", "Save"),
    "clear_limits": ("Alle entfernen", "Tout retirer", "Rimuovi tutti", "Remove all"),
    "add_device": (
        "Limits für ein Gerät setzen",
        "Fixer les limites d'un appareil",
        "Impostare i limiti di un dispositivo",
        "Set the limits of a device",
    ),
    "device_hint": (
        "Für Apps, die einen Schlüssel auf mehreren Geräten teilen und den Header "
        "X-Device-Id senden.",
        "Pour les applications qui partagent une clé entre plusieurs appareils et envoient "
        "l'en-tête X-Device-Id.",
        "Per le app che condividono una chiave tra più dispositivi e inviano l'header X-Device-Id.",
        "For apps that share one key across devices and send the X-Device-Id header.",
    ),
    "no_devices": (
        "Noch kein Gerät mit Limits.",
        "Aucun appareil n'a encore de limites.",
        "Ancora nessun dispositivo con limiti.",
        "No device has limits yet.",
    ),
    "limits_saved": (
        "Limits gespeichert: {name}.",
        "Limites enregistrées : {name}.",
        "Limiti salvati: {name}.",
        "Limits saved: {name}.",
    ),
    "limits_refused": (
        "Nicht gespeichert ({name}): {reason}",
        "Non enregistré ({name}) : {reason}",
        "Non salvato ({name}): {reason}",
        "Not saved ({name}): {reason}",
    ),
    "err_invalid_limit": (
        "«{field}» muss eine ganze Zahl von 1 bis 1000000000 sein, oder leer für kein Limit.",
        "« {field} » doit être un nombre entier de 1 à 1000000000, ou vide pour aucune limite.",
        "«{field}» deve essere un numero intero da 1 a 1000000000, o vuoto per nessun limite.",
        "'{field}' must be a whole number from 1 to 1000000000, or empty for no limit.",
    ),
    "err_invalid_amount": (
        "«{field}» muss ein Betrag von 0 bis 1000000000 mit höchstens 6 Nachkommastellen "
        "sein (z. B. 25.00), oder leer für kein Limit.",
        "« {field} » doit être un montant de 0 à 1000000000 avec au plus 6 décimales "
        "(p. ex. 25.00), ou vide pour aucune limite.",
        "«{field}» deve essere un importo da 0 a 1000000000 con al massimo 6 decimali "
        "(p. es. 25.00), o vuoto per nessun limite.",
        "'{field}' must be an amount from 0 to 1000000000 with at most 6 decimals "
        "(e.g. 25.00), or empty for no limit.",
    ),
    "err_key_not_found": (
        "Kein aktiver Schlüssel Ihrer Praxis hat dieses Präfix.",
        "Aucune clé active de votre cabinet n'a ce préfixe.",
        "Nessuna chiave attiva del vostro studio ha questo prefisso.",
        "No active key of your practice has that prefix.",
    ),
    "err_invalid_device_id": (
        "Eine Geräte-ID hat 1 bis 200 druckbare Zeichen.",
        "Un ID d'appareil compte 1 à 200 caractères imprimables.",
        "Un ID dispositivo ha da 1 a 200 caratteri stampabili.",
        "A device id is 1 to 200 printable characters.",
    ),
}


def limit_texts(language: Language) -> dict[str, str]:
    index = LANGUAGES.index(language)
    return {key: values[index] for key, values in _TEXTS.items()}


def all_entries() -> dict[str, tuple[str, str, str, str]]:
    return dict(_TEXTS)


def refusal_text(error: GatewayError, words: dict[str, str]) -> str:
    """A refusal of `change_limits` as the person reads it (its field named in their words)."""
    sentence = words.get("err_" + (error.code or ""))
    if sentence is None:
        return error.message
    field = words.get(error.param or "", error.param or "")
    return sentence.format(field=field)


def form_data(form: FormData) -> dict[str, Any]:
    """The form's fields as the PUT's JSON would carry them: empty means null (no limit),
    whole numbers in ASCII digits are numbers, anything else is passed on as typed, for
    the PUT's validation to refuse."""
    data: dict[str, Any] = {}
    clear = form.get("clear") is not None
    for name in _FIELDS:
        raw = form.get(name)
        text = raw.strip() if isinstance(raw, str) else ""
        if clear or not text:
            data[name] = None
        elif name == "monthly_cap_usd":
            data[name] = text.replace(",", ".").replace("'", "")
        elif text.isascii() and text.isdigit():
            data[name] = int(text)
        else:
            data[name] = text
    return data


def _values(limits: Limits) -> dict[str, str]:
    cap, rpm, tpm = limits.monthly_cap_micros, limits.requests_per_minute, limits.tokens_per_minute
    return {
        "monthly_cap_usd": "" if cap is None else usd_text(cap),
        "requests_per_minute": "" if rpm is None else str(rpm),
        "tokens_per_minute": "" if tpm is None else str(tpm),
    }


async def limit_rows(
    services: Services, practice_id: str, period_start: int | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The page's rows: (keys, devices), each with its limits and this period's spend."""
    limits = await services.limits.of_practice(practice_id)
    spend = (
        {}
        if period_start is None
        else await services.limits.spend_of_practice(practice_id, period_start)
    )

    def row(scope: Scope, name: str, **extra: Any) -> dict[str, Any]:
        found = limits.get((scope, name), Limits())
        cap = found.monthly_cap_micros
        used = spend.get((scope, name), 0)
        return {
            "name": name,
            "values": _values(found),
            "cap": None if cap is None else usd_text(cap),
            "used": usd_text(used) if cap is not None else None,
            "percent": None if not cap else min(999, used * 100 // cap),
            **extra,
        }

    keys = [
        row(Scope.KEY, str(key["key_prefix"]), label=key["label"] or "", role=key["role"])
        for key in await services.metering.list_keys(practice_id)
        if key["revoked_at"] is None and key["key_prefix"]
    ]
    devices = [row(Scope.DEVICE, name) for scope, name in limits if scope is Scope.DEVICE]
    return keys, devices
