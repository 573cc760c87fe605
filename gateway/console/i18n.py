"""The console's words in German (default), French, Italian and English.

Each entry is (de, fr, it, en); `texts(language)` gives one language's
table for the templates. The sentences of error codes come from
gateway/messages.py.
"""

from __future__ import annotations

from gateway.messages import LANGUAGES, Language

_TEXTS: dict[str, tuple[str, str, str, str]] = {
    "title": ("KI-Konsole", "Console IA", "Console IA", "AI console"),
    "practice": ("Praxis", "Cabinet", "Studio", "Practice"),
    "sign_in": ("Anmelden", "Se connecter", "Accedi", "Sign in"),
    "sign_out": ("Abmelden", "Se déconnecter", "Esci", "Sign out"),
    "admin_key": (
        "Admin-Schlüssel",
        "Clé d'administration",
        "Chiave di amministrazione",
        "Admin key",
    ),
    "sign_in_hint": (
        "Melden Sie sich mit dem Admin-Schlüssel Ihrer Praxis an (beginnt mit aza_).",
        "Connectez-vous avec la clé d'administration de votre cabinet (commence par aza_).",
        "Accedete con la chiave di amministrazione del vostro studio (inizia con aza_).",
        "Sign in with your practice's admin key (it starts with aza_).",
    ),
    "wrong_key": (
        "Dieser Schlüssel ist unbekannt oder widerrufen.",
        "Cette clé est inconnue ou révoquée.",
        "Questa chiave è sconosciuta o revocata.",
        "This key is unknown or revoked.",
    ),
    "form_expired": (
        "Das Formular ist abgelaufen oder kam nicht von dieser Seite. Bitte erneut versuchen.",
        "Le formulaire a expiré ou ne provient pas de cette page. Veuillez réessayer.",
        "Il modulo è scaduto o non proviene da questa pagina. Riprovate.",
        "The form expired or did not come from this page. Please try again.",
    ),
    "error_generic": (
        "Das hat nicht geklappt (Code {code}). Bitte erneut versuchen.",
        "Cela n'a pas fonctionné (code {code}). Veuillez réessayer.",
        "Non ha funzionato (codice {code}). Riprovate.",
        "That did not work (code {code}). Please try again.",
    ),
    "available_now": (
        "Jetzt verfügbar",
        "Disponible maintenant",
        "Disponibile ora",
        "Available now",
    ),
    "monthly_budget": ("Monatsbudget", "Budget mensuel", "Budget mensile", "Monthly budget"),
    "used": ("Verbraucht", "Utilisé", "Utilizzato", "Used"),
    "extra_credit": (
        "Zusatzguthaben",
        "Crédit supplémentaire",
        "Credito aggiuntivo",
        "Extra credit",
    ),
    "in_flight": ("In Bearbeitung", "En cours", "In corso", "In flight"),
    "license_period": (
        "Lizenzperiode",
        "Période de licence",
        "Periodo di licenza",
        "License period",
    ),
    "license": ("Lizenz", "Licence", "Licenza", "License"),
    "no_license": (
        "Keine Lizenz hinterlegt.",
        "Aucune licence enregistrée.",
        "Nessuna licenza registrata.",
        "No license on file.",
    ),
    "spend": (
        "Ausgaben in der Periode",
        "Dépenses de la période",
        "Spese nel periodo",
        "Spend in the period",
    ),
    "by_day": ("pro Tag", "par jour", "al giorno", "by day"),
    "by_model": ("nach Modell", "par modèle", "per modello", "by model"),
    "by_operation": ("nach Art", "par type", "per tipo", "by operation"),
    "by_device": ("nach Gerät", "par appareil", "per dispositivo", "by device"),
    "no_usage": (
        "Noch keine Nutzung in dieser Periode.",
        "Aucune utilisation dans cette période.",
        "Nessun utilizzo in questo periodo.",
        "No usage in this period yet.",
    ),
    "usage": ("Nutzung", "Utilisation", "Utilizzo", "Usage"),
    "usage_table": (
        "Nutzung im Detail",
        "Utilisation détaillée",
        "Utilizzo dettagliato",
        "Usage in detail",
    ),
    "from": ("Von", "Du", "Dal", "From"),
    "to": ("Bis", "Au", "Al", "To"),
    "model": ("Modell", "Modèle", "Modello", "Model"),
    "operation": ("Art", "Type", "Tipo", "Operation"),
    "device": ("Gerät", "Appareil", "Dispositivo", "Device"),
    "any": ("alle", "tous", "tutti", "any"),
    "filter": ("Filtern", "Filtrer", "Filtra", "Filter"),
    "download_csv": ("CSV herunterladen", "Télécharger le CSV", "Scarica CSV", "Download CSV"),
    "time": ("Zeit", "Heure", "Ora", "Time"),
    "requests": ("Anfragen", "Requêtes", "Richieste", "Requests"),
    "tokens_in": ("Tokens ein", "Tokens entrée", "Token in entrata", "Tokens in"),
    "tokens_out": ("Tokens aus", "Tokens sortie", "Token in uscita", "Tokens out"),
    "audio_seconds": ("Audio-Sekunden", "Secondes audio", "Secondi audio", "Audio seconds"),
    "cost": ("Kosten", "Coût", "Costo", "Cost"),
    "batch": ("Batch", "Lot", "Batch", "Batch"),
    "batch_lines": (
        "{lines} Zeilen: {completed} erledigt, {failed} fehlgeschlagen",
        "{lines} lignes : {completed} traitées, {failed} en échec",
        "{lines} righe: {completed} completate, {failed} non riuscite",
        "{lines} lines: {completed} completed, {failed} failed",
    ),
    "batch_held": (
        "reserviert {usd} USD",
        "réservé {usd} USD",
        "riservati {usd} USD",
        "{usd} USD held",
    ),
    "batch_status_creating": ("wird angelegt", "en création", "in creazione", "creating"),
    "batch_status_validating": ("wird geprüft", "en validation", "in verifica", "validating"),
    "batch_status_in_progress": ("läuft", "en cours", "in corso", "in progress"),
    "batch_status_finalizing": (
        "wird abgeschlossen",
        "en finalisation",
        "in chiusura",
        "finalizing",
    ),
    "batch_status_completed": ("abgeschlossen", "terminé", "completato", "completed"),
    "batch_status_failed": ("fehlgeschlagen", "échoué", "non riuscito", "failed"),
    "batch_status_expired": ("abgelaufen", "expiré", "scaduto", "expired"),
    "batch_status_cancelling": (
        "wird abgebrochen",
        "en annulation",
        "in annullamento",
        "cancelling",
    ),
    "batch_status_cancelled": ("abgebrochen", "annulé", "annullato", "cancelled"),
    "batch_status_missing": ("unbekannt", "inconnu", "sconosciuto", "unknown"),
    "shown_latest": (
        "Die neuesten {n} Einträge; die CSV enthält alle.",
        "Les {n} entrées les plus récentes ; le CSV les contient toutes.",
        "Le {n} voci più recenti; il CSV le contiene tutte.",
        "The latest {n} entries; the CSV has them all.",
    ),
    "history": ("Guthabenverlauf", "Historique du crédit", "Storico del credito", "Credit history"),
    "no_history": ("Noch keine Einträge.", "Aucune entrée.", "Nessuna voce.", "No entries yet."),
    "date": ("Datum", "Date", "Data", "Date"),
    "entry": ("Eintrag", "Opération", "Voce", "Entry"),
    "status": ("Status", "Statut", "Stato", "Status"),
    "paid": ("Bezahlt", "Payé", "Pagato", "Paid"),
    "credited": ("Gutgeschrieben", "Crédité", "Accreditato", "Credited"),
    "receipt": ("Beleg", "Reçu", "Ricevuta", "Receipt"),
    "buy_credit": ("Guthaben kaufen", "Acheter du crédit", "Acquista credito", "Buy credit"),
    "amount_chf": ("Betrag in CHF", "Montant en CHF", "Importo in CHF", "Amount in CHF"),
    "rate": (
        "{chf} CHF kaufen {usd} USD KI-Guthaben (inkl. {vat} % MWST).",
        "{chf} CHF achètent {usd} USD de crédit IA (TVA {vat} % incluse).",
        "{chf} CHF acquistano {usd} USD di credito IA (IVA {vat} % inclusa).",
        "{chf} CHF buy {usd} USD of AI credit (incl. {vat} % VAT).",
    ),
    "rate_no_vat": (
        "{chf} CHF kaufen {usd} USD KI-Guthaben.",
        "{chf} CHF achètent {usd} USD de crédit IA.",
        "{chf} CHF acquistano {usd} USD di credito IA.",
        "{chf} CHF buy {usd} USD of AI credit.",
    ),
    "continue": ("Weiter", "Continuer", "Avanti", "Continue"),
    "confirm_buy": (
        "Sie kaufen {usd} USD KI-Guthaben für {chf} CHF.",
        "Vous achetez {usd} USD de crédit IA pour {chf} CHF.",
        "Acquistate {usd} USD di credito IA per {chf} CHF.",
        "You buy {usd} USD of AI credit for {chf} CHF.",
    ),
    "pay_stripe": (
        "Mit Stripe bezahlen",
        "Payer avec Stripe",
        "Paga con Stripe",
        "Pay with Stripe",
    ),
    "back": ("Zurück", "Retour", "Indietro", "Back"),
    "limits_nav": ("Limits", "Limites", "Limiti", "Limits"),
    "alerts_nav": ("Hinweise", "Alertes", "Avvisi", "Alerts"),
    "topup_done": (
        "Zahlung erhalten: {usd} USD wurden gutgeschrieben.",
        "Paiement reçu : {usd} USD ont été crédités.",
        "Pagamento ricevuto: sono stati accreditati {usd} USD.",
        "Payment received: {usd} USD were credited.",
    ),
    "topup_processing": (
        "Zahlung wird verarbeitet; das Guthaben erscheint in Kürze.",
        "Paiement en cours de traitement ; le crédit apparaîtra sous peu.",
        "Pagamento in elaborazione; il credito apparirà a breve.",
        "Payment is being processed; the credit appears shortly.",
    ),
    "topup_cancelled": (
        "Zahlung abgebrochen; es wurde nichts belastet.",
        "Paiement annulé ; rien n'a été débité.",
        "Pagamento annullato; non è stato addebitato nulla.",
        "Payment cancelled; nothing was charged.",
    ),
    "dry_run": (
        "Testmodus: Es wird nichts belastet und keine Zahlung geöffnet.",
        "Mode test : rien n'est débité et aucun paiement n'est ouvert.",
        "Modalità test: non viene addebitato nulla e non si apre alcun pagamento.",
        "Test mode: nothing is charged and no payment is opened.",
    ),
    "save_card": (
        "Karte hinterlegen",
        "Enregistrer une carte",
        "Registra una carta",
        "Save a card",
    ),
    "card_saved": ("Karte hinterlegt.", "Carte enregistrée.", "Carta registrata.", "Card saved."),
    "card_missing": (
        "Noch keine Karte hinterlegt.",
        "Aucune carte enregistrée.",
        "Nessuna carta registrata.",
        "No card saved yet.",
    ),
    "card_hint": (
        "Für automatische Aufladungen wird eine Karte bei Stripe hinterlegt; "
        "die Kartennummer sieht das Gateway nie.",
        "Pour les recharges automatiques, une carte est enregistrée chez Stripe ; "
        "la passerelle ne voit jamais son numéro.",
        "Per le ricariche automatiche si registra una carta presso Stripe; "
        "il gateway non ne vede mai il numero.",
        "Automatic top-ups charge a card saved at Stripe; the gateway never sees its number.",
    ),
    "card_setup_done": (
        "Karte gespeichert. Sie können die automatische Aufladung einschalten.",
        "Carte enregistrée. Vous pouvez activer la recharge automatique.",
        "Carta salvata. Potete attivare la ricarica automatica.",
        "Card saved. You can switch automatic top-up on.",
    ),
    "auto_topup": (
        "Automatische Aufladung",
        "Recharge automatique",
        "Ricarica automatica",
        "Automatic top-up",
    ),
    "enabled": ("Eingeschaltet", "Activée", "Attivata", "On"),
    "topup_amount": (
        "Aufladebetrag (CHF)",
        "Montant de recharge (CHF)",
        "Importo di ricarica (CHF)",
        "Top-up amount (CHF)",
    ),
    "trigger": (
        "Aufladen unter (% verfügbar)",
        "Recharger sous (% disponible)",
        "Ricaricare sotto (% disponibile)",
        "Top up below (% available)",
    ),
    "monthly_limit": (
        "Monatslimit (CHF)",
        "Limite mensuelle (CHF)",
        "Limite mensile (CHF)",
        "Monthly limit (CHF)",
    ),
    "limits_explained": (
        "Aufgeladen wird, wenn weniger als die Schwelle des Budgets verfügbar ist: höchstens "
        "einmal in 24 Stunden und höchstens bis zum Monatslimit pro Kalendermonat "
        "(manuelle Käufe zählen nicht dazu). Betrag {min}–{max} CHF. Diesen Monat "
        "automatisch aufgeladen: {month} CHF.",
        "La recharge a lieu quand moins que le seuil du budget est disponible : au plus une "
        "fois par 24 heures et au plus jusqu'à la limite mensuelle par mois civil (les achats "
        "manuels ne comptent pas). Montant {min}–{max} CHF. Rechargé automatiquement ce mois : "
        "{month} CHF.",
        "La ricarica avviene quando è disponibile meno della soglia del budget: al massimo "
        "una volta ogni 24 ore e al massimo fino al limite mensile per mese civile (gli "
        "acquisti manuali non contano). Importo {min}–{max} CHF. Ricaricato automaticamente "
        "questo mese: {month} CHF.",
        "A top-up happens when less than the threshold of the budget is available: at most "
        "once in 24 hours and at most up to the monthly limit per calendar month (manual "
        "purchases do not count). Amount {min}–{max} CHF. Topped up automatically this "
        "month: {month} CHF.",
    ),
    "save": ("Speichern", "Enregistrer", "Salva", "Save"),
    "saved": ("Gespeichert.", "Enregistré.", "Salvato.", "Saved."),
    "paused": (
        "Pausiert: {reason}",
        "Suspendue : {reason}",
        "Sospesa: {reason}",
        "Paused: {reason}",
    ),
    "resume": ("Fortsetzen", "Reprendre", "Riprendi", "Resume"),
    "language": ("Sprache", "Langue", "Lingua", "Language"),
    "status_succeeded": ("erfolgreich", "réussi", "riuscito", "succeeded"),
    "status_pending": ("in Bearbeitung", "en cours", "in corso", "pending"),
    "status_failed": ("fehlgeschlagen", "échoué", "non riuscito", "failed"),
    "event_topup_purchase": ("Aufladung", "Recharge", "Ricarica", "Top-up"),
    "event_auto_topup_purchase": (
        "Automatische Aufladung",
        "Recharge automatique",
        "Ricarica automatica",
        "Automatic top-up",
    ),
    "event_failed_auto_topup": (
        "Fehlgeschlagene Aufladung",
        "Recharge échouée",
        "Ricarica non riuscita",
        "Failed top-up",
    ),
    "event_refund": ("Rückerstattung", "Remboursement", "Rimborso", "Refund"),
    "event_admin_adjustment": ("Korrektur", "Correction", "Correzione", "Adjustment"),
}

Texts = dict[str, str]


def texts(language: Language) -> Texts:
    """The console's words in `language`."""
    index = LANGUAGES.index(language)
    return {key: values[index] for key, values in _TEXTS.items()}


def language_of(raw: str | None, default: Language) -> Language:
    """`raw` when it names a console language, else `default`."""
    for language in LANGUAGES:
        if raw == language:
            return language
    return default


def all_entries() -> dict[str, tuple[str, str, str, str]]:
    return dict(_TEXTS)
