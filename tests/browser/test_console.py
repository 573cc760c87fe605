"""The practice console in a real headless Chromium: sign-in, numbers, buying, settings, CSV."""

from __future__ import annotations

import asyncio
import csv
import io
import shutil
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.responses import HTMLResponse
from starlette.routing import Route

from tests.browser.conftest import SCREENSHOTS, Console, shot, sign_in
from tests.integration.conftest import serve

pytestmark = pytest.mark.browser


def usd6(micros: int) -> str:
    return f"USD {(Decimal(micros) / 1_000_000).quantize(Decimal('0.000001'))}"


async def use_ai(console: Console, requests: int = 3) -> None:
    """A few chat completions from two devices, through the real SDK and the client key."""
    for n in range(requests):
        async with openai.AsyncOpenAI(
            base_url=console.root + "/v1",
            api_key=console.client_key,
            max_retries=0,
            default_headers={"X-Device-Id": f"desk-{n % 2 + 1}"},
        ) as client:
            await client.chat.completions.create(
                model="gpt-4o-mini" if n % 2 else "gpt-4o",
                messages=[{"role": "user", "content": f"Hallo {n}"}],
            )


async def test_sign_in_and_see_the_numbers_the_database_holds(page: Any, console: Console) -> None:
    """A wrong key is told so; the admin key shows used, credit and spend as the DB has them."""
    await use_ai(console)
    events = await console.events()
    assert len(events) == 3

    await page.goto(console.root + "/")
    assert page.url.endswith("/console/")
    await shot(page, "01-sign-in")
    await page.fill("#key", "aza_this-key-does-not-exist")
    await page.click("button[type=submit]")
    assert "unbekannt" in await page.inner_text("#login-error")
    await shot(page, "02-wrong-key")

    response = await sign_in(page, console)
    assert response.status == 303
    cost = sum(int(e["estimated_cost_micro_usd"]) for e in events)
    assert await page.inner_text("#used-usd") == usd6(cost)
    assert await page.inner_text("#total-cost") == usd6(cost)
    assert await page.inner_text("#budget-usd") == "USD 20.000000"
    assert await page.inner_text("#extra-usd") == "USD 0.000000"
    assert await page.locator("#spend svg.columns rect").count() >= 1
    models = await page.inner_text("#spend")
    assert "gpt-4o-mini" in models and "desk-1" in models and "desk-2" in models
    cookie = next(c for c in await page.context.cookies() if c["name"] == "aza_console")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert console.admin_key not in cookie["value"]
    await shot(page, "03-overview")
    shutil.copyfile(SCREENSHOTS / "03-overview.png", SCREENSHOTS / "console.png")

    await page.click("a[hreflang=fr]")
    assert "Disponible maintenant" in await page.inner_text("#available")
    await page.goto(console.root + "/console/")  # the language is kept
    assert "Crédit supplémentaire" in await page.inner_text("#available")
    await shot(page, "04-overview-fr")


async def test_buy_credit_through_the_demo_checkout(page: Any, console: Console) -> None:
    """CHF shows its USD, the stand-in's Pay sends the signed webhook, credit and history show."""
    await sign_in(page, console)
    await page.fill("#amount_chf", "45")
    await page.click("#buy-continue")
    assert "15.00 USD" in await page.inner_text("#confirm")
    assert "45.00 CHF" in await page.inner_text("#confirm")
    await shot(page, "05-buy-confirm")
    await page.click("#pay")
    await page.wait_for_url(console.stripe.base_url + "/checkout/*")
    assert await page.inner_text("#amount") == "CHF 45.00"
    await shot(page, "06-stripe-checkout")
    await page.click("#pay")
    await page.wait_for_url(console.root + "/console/?topup=success*")

    assert "15.00 USD" in await page.inner_text("#banner")
    assert await page.inner_text("#extra-usd") == "USD 15.000000"
    row = page.locator("#history-table tr[data-event=topup_purchase]")
    assert await row.count() == 1
    assert "45.00" in await row.inner_text() and "15.00" in await row.inner_text()
    receipt = await row.locator("a.receipt").get_attribute("href")
    assert receipt and receipt.startswith(console.stripe.base_url + "/receipts/in_")
    await shot(page, "07-after-topup")

    [entry] = await console.ledger()
    assert (entry["event_type"], entry["status"]) == ("topup_purchase", "succeeded")
    assert (entry["amount_internal_micro_usd"], entry["amount_paid_rappen"]) == (15_000_000, 4500)
    assert entry["receipt_url"] == receipt
    [delivered] = console.stripe.delivered
    assert delivered["status"] == 200
    sent = console.stripe.sessions[delivered["event"]["data"]["object"]["id"]]
    assert sent["_invoice_creation"]["enabled"] == "true"


async def test_save_a_card_and_settings_then_see_them_after_a_reload(
    page: Any, console: Console
) -> None:
    """Setup-mode checkout saves a card; the settings form's values are there after a reload."""
    await sign_in(page, console)
    await page.click("#card button[type=submit]")
    await page.wait_for_url(console.stripe.base_url + "/checkout/*")
    await page.click("#pay")
    await page.wait_for_url(console.root + "/console/?card=success*")
    assert await page.inner_text("#card-state") == "Karte hinterlegt."

    await page.check("#enabled")
    await page.fill("#topup_amount_chf", "60")
    await page.fill("#trigger_below_percent", "12")
    await page.fill("#monthly_limit_chf", "240")
    await page.click("#save-settings")
    await page.wait_for_url("**/console/?saved=1")
    await page.reload()
    assert await page.is_checked("#enabled")
    assert await page.input_value("#topup_amount_chf") == "60.00"
    assert await page.input_value("#trigger_below_percent") == "12"
    assert await page.input_value("#monthly_limit_chf") == "240.00"
    assert "24" in await page.inner_text("#limits")
    await shot(page, "08-settings-saved")
    async with console.db.read() as conn:
        row = await conn.fetchone(
            "SELECT auto_topup_enabled, topup_amount_rappen, trigger_below_percent, "
            "monthly_limit_rappen, default_payment_method_id FROM ai_topup_settings "
            "WHERE practice_id = ?",
            console.practice,
        )
    assert row is not None
    assert tuple(row)[:4] == (1, 6000, 12, 24000)
    assert str(row["default_payment_method_id"]).startswith("pm_")

    # A limit below one top-up is refused with the sentence, and nothing changes.
    await page.fill("#monthly_limit_chf", "20")
    await page.click("#save-settings")
    assert "Monatslimit" in await page.inner_text("#banner")
    await page.goto(console.root + "/console/")
    assert await page.input_value("#monthly_limit_chf") == "240.00"


async def test_download_the_csv_and_compare_it_with_the_usage_events(
    page: Any, console: Console
) -> None:
    """The usage table lists the events; its CSV download is one line per usage event."""
    await use_ai(console, requests=4)
    events = await console.events()
    await sign_in(page, console)
    await page.goto(console.root + "/console/usage")
    rows = page.locator("#usage-table tbody tr")
    assert await rows.count() == len(events)
    await shot(page, "09-usage")
    await page.select_option("#device", "desk-2")
    await page.click(".filters button[type=submit]")
    assert await page.locator("#usage-table tbody tr").count() == 2
    await page.goto(console.root + "/console/usage")

    async with page.expect_download() as info:
        await page.click("#csv")
    download = await info.value
    text = await asyncio.to_thread(Path(await download.path()).read_text, encoding="utf-8")
    lines = list(csv.DictReader(io.StringIO(text)))
    assert [line["request_id"] for line in lines] == [e["request_id"] for e in events]
    for line, event in zip(lines, events, strict=True):
        assert line["device_id"] == event["device_id"]
        assert line["model"] == event["model"]
        assert int(line["input_tokens"]) == event["input_tokens"]
        assert int(line["output_tokens"]) == event["output_tokens"]
        assert Decimal(line["cost_usd"]) * 1_000_000 == event["estimated_cost_micro_usd"]


async def test_a_client_key_is_refused_at_the_console_and_the_admin_routes(
    page: Any, console: Console
) -> None:
    """A device key cannot sign in, nor reach the admin-key or the operators' routes."""
    response = await sign_in(page, console, console.client_key)
    assert response.status == 403
    assert "Admin-Schlüssel" in await page.inner_text("#login-error")
    assert not [c for c in await page.context.cookies() if c["name"] == "aza_console"]
    await shot(page, "10-client-key-refused")
    headers = {"Authorization": f"Bearer {console.client_key}"}
    async with httpx.AsyncClient(base_url=console.root, headers=headers) as http:
        for path in ("/v1/ai-credit/history", "/v1/ai-credit/usage"):
            refused = await http.get(path)
            assert refused.status_code == 403
            assert refused.json()["error"]["code"] == "admin_key_required"
        operators = await http.get(f"/v1/admin/practices/{console.practice}/ledger")
        assert operators.status_code == 403
        assert (await http.get("/v1/ai-credit/budget")).status_code == 200


async def test_a_cross_site_form_post_is_refused(page: Any, console: Console) -> None:
    """A signed-in admin visiting another origin's page that posts the settings form: refused."""
    await sign_in(page, console)
    target = console.root + "/console/settings"

    async def attacker(_request: Any) -> HTMLResponse:
        return HTMLResponse(
            f"""<!doctype html><form id="f" method="post" action="{target}">
<input name="csrf" value="guessed"><input name="enabled" value="on">
<input name="topup_amount_chf" value="999"><input name="monthly_limit_chf" value="999">
</form><script>document.getElementById('f').submit()</script>"""
        )

    async with serve(Starlette(routes=[Route("/", attacker)])) as evil:
        async with page.expect_response(target) as info:
            await page.goto(evil + "/")
        response = await info.value
    assert response.status == 403
    await page.wait_for_load_state()
    await shot(page, "11-cross-site-refused")
    async with console.db.read() as conn:
        saved = await conn.fetchval(
            "SELECT COUNT(*) FROM ai_topup_settings WHERE practice_id = ?", console.practice
        )
    assert saved == 0


async def test_a_paused_automatic_top_up_shows_why_and_resumes(page: Any, console: Console) -> None:
    """After a declined card the console says so; Resume switches it back on."""
    from credit.autotopup import pause
    from credit.config import CreditConfig
    from credit.topup_settings import TopupSettings, save_settings

    async with console.db.transaction(lock=console.practice) as conn:
        await save_settings(
            conn,
            TopupSettings(
                practice_id=console.practice,
                auto_topup_enabled=True,
                topup_amount_chf=Decimal("30"),
                internal_credit_usd=Decimal("10"),
                trigger_below_percent=5,
                monthly_limit_chf=Decimal("300"),
                stripe_customer_id="cus_test_paused",
                default_payment_method_id="pm_test_paused",
            ),
            now=1,
        )
        await pause(
            conn, console.practice, "AUTO_TOPUP_PAYMENT_FAILED", CreditConfig.defaults(), now=2
        )
    await sign_in(page, console)
    paused = await page.inner_text("#paused")
    assert "fehlgeschlagen" in paused and "AUTO_TOPUP_PAYMENT_FAILED" in paused
    assert not await page.is_checked("#enabled")
    await shot(page, "12-paused")
    await page.click("#paused button[type=submit]")
    await page.wait_for_url("**/console/?saved=1")
    assert await page.locator("#paused").count() == 0
    assert await page.is_checked("#enabled")
    async with console.db.read() as conn:
        row = await conn.fetchone(
            "SELECT auto_topup_enabled, paused_reason FROM ai_topup_settings WHERE practice_id = ?",
            console.practice,
        )
    assert row is not None and tuple(row) == (1, None)
