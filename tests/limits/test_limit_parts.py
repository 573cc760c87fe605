"""Limits below the app: the pure rules, the store's cap alert, and the CLI."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from budget.limits import Limits, Scope, Subject, cap_admits, counted_tokens, window_at
from budget.usage import Operation, Usage
from gateway.cli import main
from gateway.storage import AnyDatabase
from gateway.storage.limits import LimitStore
from gateway.storage.metering import MeteringStore

USD = 1_000_000


def test_cap_admits_what_fits_beside_use_and_holds() -> None:
    assert cap_admits(used_micros=600, held_micros=300, estimate_micros=100, cap_micros=1000)
    assert not cap_admits(used_micros=600, held_micros=300, estimate_micros=101, cap_micros=1000)
    # A request always counts for at least one micro-USD.
    assert not cap_admits(used_micros=1000, held_micros=0, estimate_micros=0, cap_micros=1000)


def test_windows_and_retry_after() -> None:
    window = window_at(125_400, 60_000)
    assert (window.start_ms, window.left_ms, window.retry_after_seconds) == (120_000, 54_600, 55)
    assert window_at(120_000, 1_000).retry_after_seconds == 1
    usage = Usage(Operation.CHAT, "gpt-4o", input_tokens=120, output_tokens=1024)
    assert counted_tokens(usage) == 1144
    assert Limits().empty and not Limits(tokens_per_minute=5).empty


async def test_a_key_past_80_percent_of_its_cap_writes_one_alert(
    db: AnyDatabase, metering: MeteringStore, practice: str
) -> None:
    """Spend settled past 80 % of a key's cap writes key.cap_near once, with the spend."""
    limits = LimitStore(db)
    cap = Limits(monthly_cap_micros=1 * USD)
    await limits.put(practice, Scope.KEY, "aza_abc123", cap)
    subject = Subject(practice, Scope.KEY, "aza_abc123", cap)
    for i, cost in enumerate((700_000, 150_000, 100_000)):
        hold = await limits.hold_cap(
            subject, hold_id=f"r{i}", estimate_micros=cost, period_start=100
        )
        assert hold is not None
        await limits.settle_cap(hold, cost)
        await limits.settle_cap(hold, cost)  # a retried settle adds nothing
    assert await limits.used_micros(subject, 100) == 950_000
    assert (
        await limits.hold_cap(subject, hold_id="r9", estimate_micros=60_000, period_start=100)
        is None
    )
    async with db.read() as conn:
        found = await conn.fetchall(
            "SELECT alert_type, threshold, amount_micro_usd, limit_micro_usd, subject "
            "FROM ai_alert_outbox WHERE practice_id = ?",
            practice,
        )
    assert [tuple(r) for r in found] == [("key.cap_near", 80, 850_000, 1 * USD, "aza_abc123")]


def test_cli_sets_and_shows_a_keys_limits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`aza-gateway key limits PREFIX --monthly-cap-usd 1.00 --requests-per-minute 60`."""
    database = tmp_path / "cli.sqlite"
    monkeypatch.setenv("AZA_DATABASE_URL", f"sqlite:///{database}")
    assert main(["key", "create", "--practice", "p1"]) == 0
    prefix = capsys.readouterr().out.strip().splitlines()[-1][:10]
    assert (
        main(["key", "limits", prefix, "--monthly-cap-usd", "1.00", "--requests-per-minute", "60"])
        == 0
    )
    out = capsys.readouterr().out
    assert "monthly_cap_usd: 1.00" in out and "requests_per_minute: 60" in out
    assert main(["key", "limits", prefix, "--requests-per-minute", "none"]) == 0
    assert "requests_per_minute: none" in capsys.readouterr().out
    assert main(["key", "limits", prefix, "--tokens-per-minute", "many"]) == 2
    assert main(["key", "limits", "aza_nokey"]) == 1
    with sqlite3.connect(database) as conn:
        assert conn.execute(
            "SELECT monthly_cap_micro_usd, requests_per_minute FROM ai_spend_limits"
        ).fetchall() == [(1_000_000, None)]


def test_the_console_form_reads_as_the_put_would_and_is_refused_alike() -> None:
    """Empty fields mean no limit, digits are numbers, anything else reaches the PUT's
    validation as typed; its refusals read in each language, naming the field."""
    from starlette.datastructures import FormData

    from gateway.console.limits import all_entries, form_data, limit_texts, refusal_text
    from gateway.errors import GatewayError
    from gateway.routes.limits import parse_limits

    form = FormData(
        [("monthly_cap_usd", " 12,50 "), ("requests_per_minute", "60"), ("tokens_per_minute", "")]
    )
    data = form_data(form)
    assert data == {
        "monthly_cap_usd": "12.50",
        "requests_per_minute": 60,
        "tokens_per_minute": None,
    }
    assert parse_limits(data, Limits(tokens_per_minute=5)) == Limits(12_500_000, 60, None)
    cleared = form_data(FormData([("monthly_cap_usd", "3"), ("clear", "1")]))
    assert parse_limits(cleared, Limits(1, 2, 3)).empty
    for bad, code in (
        ("requests_per_minute", "invalid_limit"),
        ("monthly_cap_usd", "invalid_amount"),
    ):
        typed = form_data(FormData([(bad, "-1" if code == "invalid_amount" else "²")]))
        with pytest.raises(GatewayError) as refused:
            parse_limits(typed, Limits())
        assert (refused.value.code, refused.value.param) == (code, bad)
        texts = {
            lang: refusal_text(refused.value, limit_texts(lang))
            for lang in ("de", "fr", "it", "en")
        }
        assert len(set(texts.values())) == 4
        assert limit_texts("fr")[bad] in texts["fr"]
    for key, values in all_entries().items():
        assert len(values) == 4 and all(v.strip() for v in values), key
