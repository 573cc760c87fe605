"""The app's shared resources, made once in the lifespan and handed to whoever needs them.

`Services` holds the settings, the database and its stores, the one shared
upstream client, the metrics, the optional credit service, and
the background tasks (hold sweep, pending top-up reconciliation, auto top-ups
scheduled after a settle).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import httpx

from credit.service import CreditPolicy, CreditService
from credit.stripe_port import StripeClientAdapter
from gateway.alerts.delivery import AlertDispatcher, SmtpConfig, SmtpMailer, WebhookSender
from gateway.alerts.store import AlertStore
from gateway.auth import Authenticator
from gateway.limit_leases import LimitLeases
from gateway.metrics import GatewayMetrics
from gateway.pricing import Pricing
from gateway.residency import Residency
from gateway.routing import Router, Upstream
from gateway.settings import Settings
from gateway.storage import AnyDatabase
from gateway.storage.limits import LimitStore
from gateway.storage.metering import MeteringStore
from gateway.storage.residency import ResidencyStore
from gateway.upstream import NoProxy, ProxyConfig, Timeouts, UpstreamClient
from gateway.upstreams_config import UpstreamConfig, legacy_upstream

log = logging.getLogger("aza.gateway")

SWEEP_INTERVAL_SECONDS = 60.0
RECONCILE_EVERY_SWEEPS = 5
# PostgreSQL: how often the holds table is vacuumed (MeteringStore.vacuum_holds).
HOLDS_VACUUM_SECONDS = 10.0
# A settle schedules at most one background top-up per practice this often;
# the database's one-pending-auto-top-up rule is the real guard.
TOPUP_DEBOUNCE_SECONDS = 10.0


def upstream_ssl_context(settings: Settings) -> ssl.SSLContext:
    """The CAs upstream TLS trusts: SSL_CERT_FILE when set, else certifi's (as Stripe's client)."""
    if settings.ssl_cert_file:
        return ssl.create_default_context(cafile=settings.ssl_cert_file)
    return httpx.create_ssl_context()


def upstream_client(
    settings: Settings, config: UpstreamConfig, ssl_context: ssl.SSLContext
) -> UpstreamClient:
    """The client (one pool) for one upstream (`gateway.upstream`).

    HTTP/1.1 only (one slow stream must not hold up others on a shared
    connection); generous pool limits, as every client request becomes one
    upstream request; no redirects (the OpenAI API does not redirect). The
    egress proxy (HTTPS_PROXY) applies unless NO_PROXY names the host.
    """
    proxy = None
    if settings.https_proxy:
        host = httpx.URL(config.base_url).host
        if not NoProxy(settings.no_proxy).bypass(host):
            proxy = ProxyConfig.parse(settings.https_proxy)
    return UpstreamClient(
        base_url=config.base_url,
        timeouts=Timeouts(connect=10.0, read=settings.upstream_timeout_seconds, pool=10.0),
        max_connections=1000,
        ssl_context=ssl_context,
        proxy=proxy,
    )


def build_router(settings: Settings) -> Router:
    """One upstream per entry of the upstreams file, or the one of AZA_UPSTREAM_BASE_URL."""
    configs = settings.upstreams or (
        legacy_upstream(settings.upstream_base_url, settings.upstream_api_key),
    )
    context = upstream_ssl_context(settings)
    return Router(
        [Upstream(config, upstream_client(settings, config, context)) for config in configs]
    )


def build_credit(
    settings: Settings, db: AnyDatabase
) -> tuple[CreditService, StripeClientAdapter | None]:
    """The credit service and its Stripe adapter (None without a Stripe key; close it)."""
    stripe: StripeClientAdapter | None = None
    if settings.stripe_secret_key:
        stripe = StripeClientAdapter(
            settings.stripe_secret_key.reveal(), api_base=settings.stripe_api_base
        )
    policy = CreditPolicy(
        auto_topup_enabled=settings.auto_topup_enabled,
        dry_run=settings.topup_dry_run,
        allow_live=settings.topup_allow_live,
        live_key=settings.stripe_live_key,
        webhook_secret=settings.stripe_webhook_secret.reveal() or None,
        config=settings.credit,
    )
    return CreditService(db, stripe=stripe, policy=policy), stripe


def build_alerts(settings: Settings, db: AnyDatabase) -> tuple[AlertStore, AlertDispatcher]:
    """The alert store and its delivery worker (email off without AZA_SMTP_URL and
    AZA_ALERT_FROM; close `dispatcher.webhooks` at shutdown)."""
    store = AlertStore(db, default_language=settings.user_language)
    mailer = None
    if settings.smtp_url and settings.alert_from:
        config = SmtpConfig.from_url(settings.smtp_url.reveal())
        mailer = SmtpMailer(config, sender=settings.alert_from)
    dispatcher = AlertDispatcher(
        store,
        mailer=mailer,
        webhooks=WebhookSender(allow_private=settings.alert_webhook_allow_private),
        poll_seconds=settings.alert_poll_seconds,
        retry_base_seconds=settings.alert_retry_base_seconds,
        retry_max_seconds=settings.alert_retry_max_seconds,
        max_attempts=settings.alert_max_attempts,
    )
    return store, dispatcher


@dataclass
class Services:
    """Everything a request needs, shared by all requests of one app."""

    settings: Settings
    db: AnyDatabase
    metering: MeteringStore
    auth: Authenticator
    router: Router
    residency: Residency
    metrics: GatewayMetrics
    credit: CreditService
    alerts: AlertStore
    dispatcher: AlertDispatcher
    limits: LimitStore
    limit_leases: LimitLeases
    pricing: Pricing
    clock: Callable[[], float] = time.monotonic
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    _topups_in_flight: set[str] = field(default_factory=set)
    _topup_last: dict[str, float] = field(default_factory=dict)

    def spawn(self, coro: Coroutine[Any, Any, Any], *, name: str) -> asyncio.Task[Any]:
        """Run `coro` in the background, keeping a reference until it ends."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def schedule_auto_topup(
        self, practice_id: str, *, available_percent: int, subscription_id: str | None
    ) -> bool:
        """Start a background auto top-up check unless one runs or ran within 10 s here."""
        credit = self.credit
        if practice_id in self._topups_in_flight:
            return False
        now = self.clock()
        last = self._topup_last.get(practice_id)
        if last is not None and now - last < TOPUP_DEBOUNCE_SECONDS:
            return False
        self._topup_last[practice_id] = now
        self._topups_in_flight.add(practice_id)

        async def run() -> None:
            try:
                await credit.maybe_auto_topup(
                    practice_id,
                    available_percent=available_percent,
                    subscription_id=subscription_id,
                    trigger="background",
                )
            except Exception:
                log.exception("background auto top-up failed for practice %s", practice_id)
            finally:
                self._topups_in_flight.discard(practice_id)

        self.spawn(run(), name=f"auto-topup:{practice_id}")
        return True

    async def maintenance_loop(self, interval: float = SWEEP_INTERVAL_SECONDS) -> None:
        """Sweep expired holds every `interval` s; reconcile pending top-ups every few sweeps."""
        rounds = 0
        while True:
            await asyncio.sleep(interval)
            rounds += 1
            try:
                window_ms = int(self.settings.rate_limit_window_seconds * 1000)
                await self.limits.sweep(window_ms=window_ms)
            except Exception:
                log.exception("sweeping limit holds and rate windows failed")
            try:
                swept = await self.metering.sweep_expired_holds()
                if swept:
                    log.warning("swept %d expired budget holds", swept)
            except Exception:
                log.exception("sweeping expired holds failed")
            if rounds % RECONCILE_EVERY_SWEEPS == 0:
                try:
                    await self.credit.reconcile_pending()
                except Exception:
                    log.exception("reconciling pending top-ups failed")

    async def hold_renewal_loop(self) -> None:
        """Keep the holds of running requests from expiring (gateway/storage/renewal.py)."""
        running = self.metering.running
        caps = self.limits.running
        while True:
            await asyncio.sleep(running.interval_seconds)
            try:
                await running.renew()
                await caps.renew()
            except Exception:
                log.exception("renewing the holds of running requests failed")

    async def holds_vacuum_loop(self, interval: float = HOLDS_VACUUM_SECONDS) -> None:
        """Vacuum the holds table every `interval` s (see MeteringStore.vacuum_holds)."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.metering.vacuum_holds()
            except Exception:
                log.exception("vacuuming the holds table failed")

    async def residency_loop(self, interval: float) -> None:
        """Reload every practice's residency setting every `interval` s (other instances)."""
        store = ResidencyStore(self.db)
        while True:
            await asyncio.sleep(interval)
            try:
                self.residency.replace_all(await store.load_all())
            except Exception:
                log.exception("reloading practice residency settings failed")

    async def drain(self, grace_seconds: float = 10.0) -> None:
        """Wait for background work (settles, top-ups) to finish, then cancel what is left."""
        pending = [task for task in self._tasks if not task.done()]
        if pending:
            await asyncio.wait(pending, timeout=grace_seconds)
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
