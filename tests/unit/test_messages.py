"""Every sentence for people exists in German, French, Italian and English."""

from __future__ import annotations

import pytest

from gateway.console.i18n import all_entries, texts
from gateway.messages import (
    LANGUAGES,
    Language,
    all_user_texts,
    credit_user_message,
    user_message,
)


def test_every_message_user_has_all_four_languages() -> None:
    for table in all_user_texts():
        assert set(table) == set(LANGUAGES)
        assert all(text.strip() for text in table.values())
        # A translation is not the German sentence left as it was.
        assert len({table[language] for language in LANGUAGES}) == 4, table["de"]


def test_every_console_word_has_all_four_languages() -> None:
    for key, values in all_entries().items():
        assert len(values) == 4 and all(v.strip() for v in values), key
    assert texts("it")["buy_credit"] == "Acquista credito"


@pytest.mark.parametrize(
    ("language", "start"),
    [("de", "Das KI-Budget"), ("fr", "Le budget IA"), ("it", "Il budget IA"), ("en", "Your")],
)
def test_a_blocked_request_reads_in_each_language(language: Language, start: str) -> None:
    assert user_message("AI_BUDGET_EXHAUSTED", language).startswith(start)


def test_credit_errors_keep_their_german_and_translate_the_rest() -> None:
    german = "Bitte einen Betrag zwischen 10 und 1000 CHF wählen."
    assert credit_user_message("INVALID_TOPUP_AMOUNT", "amount_chf", "de", german=german) == german
    assert (
        credit_user_message(
            "INVALID_TOPUP_AMOUNT", "amount_chf", "fr", german=german, min_chf=10, max_chf=1000
        )
        == "Veuillez choisir un montant entre 10 et 1000 CHF."
    )
    assert credit_user_message("SOMETHING_NEW", None, "it", german=german) == german
