"""Browser tests: the console in a real headless Chromium (Debian's /usr/bin/chromium).

Playwright for Python drives the system's Chromium through its executable
path (Playwright's own browser download is not used, and cannot work
offline). The gateway, the fake OpenAI upstream and the Stripe stand-in of
the demo (gateway/demo/stripe_standin.py) each listen on a loopback port;
the console's payments go through the stand-in's checkout page and its
signed webhook, as in `aza-gateway demo`. SQLite only: the engines are
covered by the API tests; these are about the page.

Screenshots of each page go to tests/browser/screenshots/ (CI keeps the
folder; the overview's is the README's, console.png).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gateway.app import create_app
from gateway.demo.fake_upstream import FAKE_UPSTREAM_KEY, FakeUpstream
from gateway.demo.stripe_standin import StripeStandIn
from gateway.keys import KeyRole
from gateway.settings import Secret, Settings
from gateway.storage import AnyDatabase, open_database
from gateway.storage.metering import MeteringStore
from tests.credit.helpers import CREDIT
from tests.integration.conftest import serve

CHROMIUM = os.environ.get("AZA_TEST_CHROMIUM", "/usr/bin/chromium")
SCREENSHOTS = Path(__file__).parent / "screenshots"
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
WEBHOOK_SECRET = "whsec_browser_tests"
PRACTICE = "prac_console"

pytestmark = pytest.mark.browser


def _require_chromium() -> None:
    if shutil.which(CHROMIUM) is None and not Path(CHROMIUM).exists():
        message = f"no Chromium at {CHROMIUM} (apt-get install chromium; .ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@dataclass
class Console:
    """A running gateway with its console, a practice, its keys and the Stripe stand-in."""

    root: str
    admin_key: str
    client_key: str
    practice: str
    db: AnyDatabase
    metering: MeteringStore
    stripe: StripeStandIn
    settings: Settings
    shots: list[Path] = field(default_factory=list)
    upstream: FakeUpstream = field(default_factory=FakeUpstream)

    async def events(self) -> list[Any]:
        async with self.db.read() as conn:
            return list(
                await conn.fetchall(
                    "SELECT * FROM ai_usage_events WHERE practice_id = ? ORDER BY created_at, id",
                    self.practice,
                )
            )

    async def ledger(self) -> list[Any]:
        async with self.db.read() as conn:
            return list(
                await conn.fetchall(
                    "SELECT * FROM ai_credit_ledger WHERE practice_id = ? ORDER BY id",
                    self.practice,
                )
            )


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[AnyDatabase]:
    database = await open_database(f"sqlite:///{tmp_path / 'console.sqlite'}")
    try:
        yield database
    finally:
        await database.close()


@pytest.fixture
async def console(db: AnyDatabase, plans: Any) -> AsyncIterator[Console]:
    metering = MeteringStore(db, plans=plans)
    now = int(time.time())
    await metering.upsert_license(
        subscription_id="sub_console",
        practice_id=PRACTICE,
        lookup_key="aza_basic_monthly",
        status="active",
        period_start=now - 3 * 86_400,
        period_end=now + 27 * 86_400,
        customer_email="praxis@example.test",
    )
    admin_key = await metering.create_key(PRACTICE, role=KeyRole.ADMIN, label="admin")
    client_key = await metering.create_key(PRACTICE, role=KeyRole.CLIENT, label="desk")
    stripe = StripeStandIn(webhook_secret=WEBHOOK_SECRET)
    fake = FakeUpstream()
    async with serve(fake) as upstream, serve(stripe.app) as stripe_root:
        stripe.base_url = stripe_root
        settings = Settings(
            upstream_base_url=upstream + "/v1",
            upstream_api_key=Secret(FAKE_UPSTREAM_KEY),
            upstream_timeout_seconds=10.0,
            database_url="sqlite:///unused-the-database-is-injected",
            stripe_secret_key=Secret("sk_test_console_browser"),
            stripe_webhook_secret=Secret(WEBHOOK_SECRET),
            stripe_api_base=stripe_root,
            topup_dry_run=False,
            auto_topup_enabled=True,
            console_secret=Secret("console-secret-for-tests"),
            # Batches run through the fake at once; the follower looks often.
            job_poll_min_seconds=0.05,
            job_poll_max_seconds=0.2,
            credit=CREDIT,  # no VAT, as these tests were written
        )
        async with serve(create_app(settings, database=db)) as root:
            stripe.webhook_url = root + "/v1/stripe/webhook"
            yield Console(
                root, admin_key, client_key, PRACTICE, db, metering, stripe, settings, upstream=fake
            )


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    _require_chromium()
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=LAUNCH_ARGS, headless=True
        )
        try:
            yield chromium
        finally:
            await chromium.close()


@pytest.fixture
async def page(browser: Any, request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    context = await browser.new_context(
        viewport={"width": 1100, "height": 900}, accept_downloads=True, locale="de-CH"
    )
    tab = await context.new_page()
    tab.set_default_timeout(15_000)
    try:
        yield tab
    finally:
        await context.close()


async def shot(page: Any, name: str) -> Path:
    """A full-page screenshot under tests/browser/screenshots/."""
    SCREENSHOTS.mkdir(exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    return path


async def sign_in(page: Any, console: Console, key: str | None = None) -> Any:
    """Open the console and sign in; returns the sign-in POST's response."""
    await page.goto(console.root + "/")
    await page.fill("#key", key or console.admin_key)
    async with page.expect_response(lambda r: r.url.endswith("/console/login")) as info:
        await page.click("button[type=submit]")
    await page.wait_for_load_state()
    return await info.value
