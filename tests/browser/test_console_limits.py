"""The console's limits page in a real headless Chromium: a cap set there is the gate's cap.

The admin sets the client key's monthly cap on /console/limits; the real
openai SDK then gets the cap's 429 for a request over it, and the page
shows the key's spend against the cap. A refused form says why in the
person's language and changes nothing; devices get limits the same way.
"""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from gateway.alerts.events import usd_text
from tests.browser.conftest import Console, shot, sign_in

pytestmark = pytest.mark.browser

# About 10,000 prompt tokens of gpt-4o: some 0.025 USD, over a cap of 0.01 USD.
DEAR: dict[str, Any] = {
    "model": "gpt-4o",
    "messages": [{"role": "user", "content": "Befund " * 5_700}],
    "max_tokens": 5,
}


async def limit_rows(console: Console) -> list[Any]:
    async with console.db.read() as conn:
        return list(
            await conn.fetchall(
                "SELECT scope, subject, monthly_cap_micro_usd, requests_per_minute, "
                "tokens_per_minute FROM ai_spend_limits ORDER BY scope, subject"
            )
        )


async def key_spend(console: Console, prefix: str) -> int:
    async with console.db.read() as conn:
        value = await conn.fetchval(
            "SELECT COALESCE(SUM(used_micro_usd), 0) FROM ai_limit_totals "
            "WHERE scope = 'key' AND subject = ?",
            prefix,
        )
    return int(value)


async def submit(page: Any, selector: str) -> Any:
    async with page.expect_response(lambda r: r.url.endswith("/console/limits")) as info:
        await page.click(selector)
    await page.wait_for_load_state()
    return await info.value


async def test_a_cap_set_in_the_console_refuses_a_request_over_it(
    page: Any, console: Console
) -> None:
    await sign_in(page, console)
    await page.click("#nav-limits")
    await page.wait_for_load_state()
    assert page.url.endswith("/console/limits")
    prefix = console.client_key[:10]
    row = f"#key-limits tr[data-subject='{prefix}']"
    assert "desk" in await page.inner_text(row)
    assert "admin" in await page.inner_text(
        f"#key-limits tr[data-subject='{console.admin_key[:10]}']"
    )
    content = await page.content()
    assert console.client_key not in content and console.admin_key not in content

    # A bad number: refused in German, naming the field, nothing stored.
    await page.fill(f"{row} input[name=requests_per_minute]", "zehn")
    answer = await submit(page, f"{row} button.save")
    assert answer.status == 422
    banner = await page.inner_text("#limits-banner")
    assert "Anfragen pro Minute" in banner and "ganze Zahl" in banner, banner
    assert await limit_rows(console) == []
    await shot(page, "limits-refused")

    # The cap: 0.01 USD for the client key (the rate field emptied: no limit).
    await page.fill(f"{row} input[name=requests_per_minute]", "")
    await page.fill(f"{row} input[name=monthly_cap_usd]", "0,01")
    answer = await submit(page, f"{row} button.save")
    assert answer.status == 303
    assert prefix in await page.inner_text("#limits-banner")
    [stored] = await limit_rows(console)
    assert (stored["scope"], stored["subject"], stored["monthly_cap_micro_usd"]) == (
        "key",
        prefix,
        10_000,
    )
    assert stored["requests_per_minute"] is None and stored["tokens_per_minute"] is None
    assert await page.input_value(f"{row} input[name=monthly_cap_usd]") == "0.01"
    assert "0.00 / 0.01 (0 %)" in await page.inner_text(f"{row} td.spent")

    # Through the real SDK: a small request fits, one over the cap gets the cap's 429.
    async with openai.AsyncOpenAI(
        base_url=console.root + "/v1", api_key=console.client_key, max_retries=2
    ) as client:
        await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Hallo"}], max_tokens=20
        )
        with pytest.raises(openai.RateLimitError) as refused:
            await client.chat.completions.create(**DEAR)
    response = refused.value.response
    assert response.status_code == 429 and response.headers["x-should-retry"] == "false"
    body = response.json()
    assert body["error"]["code"] == "insufficient_quota"
    assert body["error_code"] == "KEY_SPENDING_CAP_REACHED"
    assert "Ausgabenlimit" in body["message_user"]
    [event] = await console.events()  # the refused request was never forwarded nor charged
    cost = int(event["estimated_cost_micro_usd"])
    assert 0 < cost < 10_000

    # The page shows the key's spend against the cap once the settle has written it.
    for _ in range(200):
        if await key_spend(console, prefix) == cost:
            break
        await page.wait_for_timeout(25)
    assert await key_spend(console, prefix) == cost
    await page.reload()
    assert f"{usd_text(cost)} / 0.01" in await page.inner_text(f"{row} td.spent")
    await shot(page, "limits")

    # A device: limits set through the new-device form, then removed again; in French.
    await page.goto(console.root + "/console/limits?lang=fr")
    await page.fill("#new-device-id", "desk-1")
    await page.fill("#new-device-cap", "-1")
    answer = await submit(page, "#new-device button[type=submit]")
    assert answer.status == 422
    banner = await page.inner_text("#limits-banner")
    assert "Plafond mensuel (USD)" in banner and "montant" in banner, banner
    assert await page.input_value("#new-device-id") == "desk-1"
    assert len(await limit_rows(console)) == 1
    await page.fill("#new-device-cap", "5")
    await page.fill("#new-device-rpm", "30")
    answer = await submit(page, "#new-device button[type=submit]")
    assert answer.status == 303
    device_row = "#device-limits tr[data-subject='desk-1']"
    assert await page.input_value(f"{device_row} input[name=monthly_cap_usd]") == "5.00"
    assert await page.input_value(f"{device_row} input[name=requests_per_minute]") == "30"
    assert [(r["scope"], r["subject"]) for r in await limit_rows(console)] == [
        ("device", "desk-1"),
        ("key", prefix),
    ]
    answer = await submit(page, f"{device_row} button.clear")
    assert answer.status == 303
    assert await page.locator(device_row).count() == 0
    assert [(r["scope"], r["subject"]) for r in await limit_rows(console)] == [("key", prefix)]

    # The session's cookie without the form's CSRF token, or with it from another site:
    # refused, nothing changed.
    cookies = {c["name"]: c["value"] for c in await page.context.cookies()}
    csrf = await page.get_attribute("#new-device input[name=csrf]", "value")
    fields = {"scope": "key", "name": prefix, "monthly_cap_usd": "1000"}
    async with httpx.AsyncClient(base_url=console.root, cookies=cookies) as http:
        missing = await http.post("/console/limits", data=fields)
        foreign = await http.post(
            "/console/limits",
            data={**fields, "csrf": csrf or ""},
            headers={"origin": "https://evil.example"},
        )
    assert (missing.status_code, foreign.status_code) == (403, 403)
    [kept] = await limit_rows(console)
    assert kept["monthly_cap_micro_usd"] == 10_000


async def test_alert_settings_in_the_console_are_the_put_routes(
    page: Any, console: Console
) -> None:
    """The alerts form: defaults shown; a private webhook refused in German with nothing
    stored; saved settings are the API's; a new webhook's secret is shown once."""
    await sign_in(page, console)
    await page.click("#nav-alerts")
    await page.wait_for_load_state()
    assert page.url.endswith("/console/alerts")
    assert await page.input_value("#budget_used_percent") == "50, 80, 95, 100"
    assert await page.input_value("#key_cap_percent") == "80"
    assert await page.locator("#email-off").count() == 1  # no SMTP configured here

    async def stored() -> list[Any]:
        async with console.db.read() as conn:
            return list(await conn.fetchall("SELECT * FROM ai_alert_settings"))

    async def save() -> Any:
        async with page.expect_response(lambda r: r.url.endswith("/console/alerts")) as info:
            await page.click("#save-alerts")
        await page.wait_for_load_state()
        return await info.value

    await page.fill("#webhook_url", "https://127.0.0.1/hooks")
    answer = await save()
    assert answer.status == 422
    banner = await page.inner_text("#alerts-banner")
    assert "Webhook-URL (https)" in banner and "öffentlichen Internet" in banner, banner
    assert await stored() == []

    await page.fill("#budget_used_percent", "90, 75")
    await page.fill("#extra_credit_below_usd", "5,00")
    await page.fill("#email", "praxis@example.ch")
    await page.fill("#webhook_url", "https://1.1.1.1/aza-hooks")
    await page.select_option("#language", "fr")
    answer = await save()
    assert answer.status == 200
    [row] = await stored()
    secret = row["webhook_secret"]
    assert secret and secret in await page.inner_text("#webhook-secret")
    assert secret not in page.url
    async with httpx.AsyncClient(base_url=console.root) as http:
        api = (
            await http.get(
                "/v1/ai-credit/alerts", headers={"authorization": f"Bearer {console.admin_key}"}
            )
        ).json()
    assert api["budget_used_percent"] == [75, 90]
    assert api["extra_credit_below_usd"] == "5.00"
    assert (api["email"], api["webhook_url"], api["language"]) == (
        "praxis@example.ch",
        "https://1.1.1.1/aza-hooks",
        "fr",
    )
    assert "webhook_secret" not in api and api["webhook_secret_set"]

    await page.goto(console.root + "/console/alerts")  # shown once: not on the next visit
    assert await page.locator("#webhook-secret").count() == 0
    assert secret not in await page.content()
    assert await page.locator("#secret-set").count() == 1
    assert await page.input_value("#budget_used_percent") == "75, 90"
    answer = await save()  # saved again unchanged: no new secret
    assert answer.status == 303
    [again] = await stored()
    assert again["webhook_secret"] == secret
    assert "Gespeichert" in await page.inner_text("#alerts-banner")
    await shot(page, "alerts")
