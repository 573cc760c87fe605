"""`aza-gateway demo`: the whole gateway on one port, with a built-in fake upstream.

An embedded SQLite database in a temporary folder, one demo practice with an
active license for the current month, a client key and an admin key, the
fake OpenAI upstream (gateway.demo.fake_upstream) served under
`/_fake-upstream` and the Stripe stand-in (gateway.demo.stripe_standin) under
`/_stripe` on the same port, both reached by the gateway over real loopback
HTTP like the real APIs would be. The console at /console/ can buy credit,
save a card and top up automatically against the stand-in. Nothing outside
the temporary folder is written, and no money moves.
"""

from __future__ import annotations

import asyncio
import secrets
import sys
import tempfile
import time
from dataclasses import replace
from typing import TextIO

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from budget.license import calendar_month
from gateway.app import create_app
from gateway.demo.fake_upstream import FAKE_UPSTREAM_KEY, FakeUpstream
from gateway.demo.stripe_standin import StripeStandIn
from gateway.keys import KeyRole
from gateway.settings import Secret, Settings
from gateway.storage import open_database
from gateway.storage.metering import MeteringStore

DEMO_PRACTICE = "demo-practice"
DEMO_PLAN = "aza_basic_monthly"
FAKE_PREFIX = "/_fake-upstream"
STRIPE_PREFIX = "/_stripe"
# The stand-in's key: a test-mode key, so nothing could ever be charged with it.
DEMO_STRIPE_KEY = "sk_test_aza_demo_standin"


class _WithFakeUpstream:
    """Dispatch `/_fake-upstream/…` to the fake upstream, `/_stripe/…` to the Stripe
    stand-in (when given) and everything else to the gateway."""

    def __init__(self, gateway: ASGIApp, fake: ASGIApp, stripe: ASGIApp | None = None) -> None:
        self.gateway = gateway
        self.mounts = [(FAKE_PREFIX, fake)]
        if stripe is not None:
            self.mounts.append((STRIPE_PREFIX, stripe))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] in ("http", "websocket"):
            for prefix, app in self.mounts:
                if path.startswith(prefix + "/"):
                    inner = dict(scope)
                    inner["path"] = path[len(prefix) :]
                    inner["raw_path"] = inner["path"].encode()
                    await app(inner, receive, send)
                    return
        await self.gateway(scope, receive, send)


def _connect_host(host: str) -> str:
    """Where a local client reaches a server bound to `host`."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def demo_settings(
    base: Settings, *, host: str, port: int, database_url: str, webhook_secret: str
) -> Settings:
    """`base` pointed at the built-in fake upstream, the Stripe stand-in and the demo
    database; top-ups are real calls to the stand-in (not a dry run)."""
    root = f"http://{_connect_host(host)}:{port}"
    return replace(
        base,
        upstream_base_url=f"{root}{FAKE_PREFIX}/v1",
        upstream_api_key=Secret(FAKE_UPSTREAM_KEY),
        upstream_timeout_seconds=30.0,
        database_url=database_url,
        stripe_secret_key=Secret(DEMO_STRIPE_KEY),
        stripe_webhook_secret=Secret(webhook_secret),
        stripe_api_base=root + STRIPE_PREFIX,
        topup_dry_run=False,
        topup_allow_live=False,
        auto_topup_enabled=True,
    )


def stripe_standin_for(settings: Settings, *, host: str, port: int) -> StripeStandIn:
    """The stand-in serving `settings`' Stripe calls, sending webhooks to this gateway."""
    root = f"http://{_connect_host(host)}:{port}"
    return StripeStandIn(
        webhook_secret=settings.stripe_webhook_secret.reveal(),
        webhook_url=root + "/v1/stripe/webhook",
        base_url=root + STRIPE_PREFIX,
    )


def instructions(base_url: str, key: str) -> str:
    """The three lines that point the official openai SDK at the gateway."""
    return (
        "from openai import OpenAI\n"
        f'client = OpenAI(base_url="{base_url}", api_key="{key}")\n'
        'print(client.chat.completions.create(model="gpt-4o-mini", '
        'messages=[{"role": "user", "content": "Hallo"}]).choices[0].message.content)'
    )


async def run_demo(base: Settings, *, host: str, port: int, out: TextIO = sys.stdout) -> None:
    """Serve the demo until interrupted."""
    with tempfile.TemporaryDirectory(prefix="aza-demo-") as folder:
        settings = demo_settings(
            base,
            host=host,
            port=port,
            database_url=f"sqlite:///{folder}/demo.sqlite",
            webhook_secret="whsec_" + secrets.token_urlsafe(24),
        )
        db = await open_database(settings.database_url)
        try:
            metering = MeteringStore(db, plans=settings.plans)
            period = calendar_month(int(time.time()))
            await metering.upsert_license(
                subscription_id="demo-license",
                practice_id=DEMO_PRACTICE,
                lookup_key=DEMO_PLAN,
                status="active",
                period_start=period.start,
                period_end=period.end,
                customer_email="demo@example.invalid",
            )
            key = await metering.create_key(DEMO_PRACTICE, label="demo device")
            admin_key = await metering.create_key(
                DEMO_PRACTICE, label="demo admin", role=KeyRole.ADMIN
            )
            app = _WithFakeUpstream(
                create_app(settings, database=db),
                FakeUpstream(),
                stripe_standin_for(settings, host=host, port=port).app,
            )
            config = uvicorn.Config(
                app,
                host=host,
                port=port,
                log_level="warning",
                ws="websockets-sansio",
                lifespan="on",
            )
            server = uvicorn.Server(config)
            base_url = f"http://{_connect_host(host)}:{port}/v1"

            serving = asyncio.ensure_future(server.serve())
            while not server.started:
                if serving.done():
                    serving.result()
                    return
                await asyncio.sleep(0.02)
            budget_usd = (settings.plans.monthly_budget_micros(DEMO_PLAN) or 0) / 1_000_000
            print(
                f"AzA AI Gateway demo on {base_url} "
                f"(built-in fake OpenAI upstream, SQLite in {folder})\n"
                f"Demo practice: {DEMO_PRACTICE} "
                f"(plan {DEMO_PLAN}, {budget_usd:g} USD this month)\n"
                f"Gateway key: {key}\n"
                f"Admin key: {admin_key}\n"
                f"Console: http://{_connect_host(host)}:{port}/console/ "
                "(sign in with the admin key; payments go to a local Stripe stand-in)\n"
                "\nPoint the official openai Python SDK at it:\n\n"
                f"{instructions(base_url, key)}\n"
                "\nPress Ctrl+C to stop.",
                file=out,
                flush=True,
            )
            await serving
        finally:
            await db.close()
