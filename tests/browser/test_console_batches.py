"""The console's usage table shows a batch as one row: id, state, line counts and cost."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import openai
import pytest

from tests.browser.conftest import Console, shot, sign_in
from tests.browser.test_console import usd6, use_ai

pytestmark = pytest.mark.browser

LINES = 8
FAILED = {"letter-2"}


def batch_input() -> bytes:
    lines = []
    for n in range(LINES):
        body = {
            "model": "gpt-4o-mini",
            "max_tokens": 50,
            "messages": [{"role": "user", "content": f"Arztbrief {n} zusammenfassen."}],
        }
        request = {"custom_id": f"letter-{n}", "method": "POST", "url": "/v1/chat/completions"}
        lines.append(json.dumps({**request, "body": body}).encode() + b"\n")
    return b"".join(lines)


async def run_batch(console: Console) -> str:
    """A batch through the gateway with the real SDK and the client key, until settled."""
    async with openai.AsyncOpenAI(
        base_url=console.root + "/v1",
        api_key=console.client_key,
        max_retries=0,
        default_headers={"X-Device-Id": "night-pc"},
    ) as client:
        uploaded = await client.files.create(file=("letters.jsonl", batch_input()), purpose="batch")
        batch = await client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        async with console.db.read() as conn:
            settled = await conn.fetchval(
                "SELECT settled_at FROM aza_batches WHERE batch_id = ?", batch.id
            )
        if settled is not None:
            return batch.id
        assert asyncio.get_running_loop().time() < deadline, "the batch was never settled"
        await asyncio.sleep(0.05)


async def test_a_batch_is_one_row_with_its_line_count_and_cost(page: Any, console: Console) -> None:
    """8 lines (1 failed) beside 3 requests: 4 rows; the batch's shows its id, state,
    8 lines with 7 completed and 1 failed, and the sum of its lines' events as cost."""
    console.upstream.files_batches.fail_lines = set(FAILED)
    await use_ai(console)
    batch_id = await run_batch(console)
    events = await console.events()
    lines = [e for e in events if str(e["request_id"]).startswith(f"batch:{batch_id}:")]
    assert len(lines) == LINES - len(FAILED) and len(events) == 3 + len(lines)
    cost = sum(int(e["estimated_cost_micro_usd"]) for e in lines)

    await sign_in(page, console)
    await page.click("a[href='/console/usage']")
    await page.wait_for_selector("#usage-table")
    rows = page.locator("#usage-table tbody tr")
    assert await rows.count() == 4
    row = page.locator("#usage-table tr.batch")
    assert await row.count() == 1
    assert await row.get_attribute("data-batch-id") == batch_id
    assert await row.get_attribute("data-lines") == str(LINES)
    assert await row.get_attribute("data-completed") == str(LINES - len(FAILED))
    assert await row.get_attribute("data-failed") == "1"
    text = await row.inner_text()
    assert batch_id in text and "abgeschlossen" in text
    assert "8 Zeilen: 7 erledigt, 1 fehlgeschlagen" in text
    assert await row.locator("td.cost").inner_text() == usd6(cost).removeprefix("USD ")
    assert "night-pc" in text
    assert await page.locator("#usage-table tr[data-request-id^='batch:']").count() == 0
    await shot(page, "12-usage-batch")

    await page.click("a[hreflang=fr]")
    french = await page.locator("#usage-table tr.batch").inner_text()
    assert "8 lignes : 7 traitées, 1 en échec" in french and "terminé" in french

    # The overview counts it as one request and its cost in the total.
    await page.goto(console.root + "/console/")
    total = sum(int(e["estimated_cost_micro_usd"]) for e in events)
    assert await page.inner_text("#total-cost") == usd6(total)
    assert "· 4 Requêtes" in await page.locator("#total-cost").locator("..").inner_text()
