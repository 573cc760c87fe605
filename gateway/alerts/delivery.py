"""Delivering the outbox: email over SMTP and signed webhooks, with retries and backoff.

Every gateway instance runs an `AlertDispatcher`; a row is claimed by one at
a time (`AlertStore.claim_due`), each channel is tried until it is sent,
and a failed channel is tried again after a delay that doubles from
`retry_base_seconds` up to `retry_max_seconds`, for at most `max_attempts`
attempts (then it is given up and logged). A webhook carries the same id
and body on every attempt; the receiver deduplicates on the id.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Protocol
from urllib.parse import unquote, urlsplit

import aiosmtplib
import httpx

from gateway.alerts.events import Alert
from gateway.alerts.messages import email_text
from gateway.alerts.signing import SIGNATURE_HEADER, signature
from gateway.alerts.store import AlertSettings, AlertStore, Claimed
from gateway.alerts.targets import TargetRefused, check_target

log = logging.getLogger("aza.alerts")

PENDING, SENT, OFF, FAILED = "pending", "sent", "off", "failed"


class DeliveryFailed(Exception):
    """A channel could not deliver this time (the message says why, without secrets)."""


class Mailer(Protocol):
    async def send(self, *, to: str, subject: str, text: str, alert_id: str) -> None: ...


@dataclass(frozen=True, slots=True)
class SmtpConfig:
    """Where email goes: from `AZA_SMTP_URL` (smtp://, smtp+starttls://, smtps://)."""

    host: str
    port: int
    username: str | None
    password: str | None
    tls: bool  # smtps: TLS from the first byte
    starttls: bool

    @classmethod
    def from_url(cls, url: str) -> SmtpConfig:
        parts = urlsplit(url)
        schemes = {"smtp": (False, False, 25), "smtp+starttls": (False, True, 587)}
        schemes["smtps"] = (True, False, 465)
        if parts.scheme not in schemes or not parts.hostname:
            raise ValueError(
                "AZA_SMTP_URL must be smtp://host:port, smtp+starttls://user:pass@host:port "
                "or smtps://user:pass@host:port"
            )
        tls, starttls, default_port = schemes[parts.scheme]
        return cls(
            host=parts.hostname,
            port=parts.port or default_port,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            tls=tls,
            starttls=starttls,
        )


class SmtpMailer:
    """Sends one plain-text email per alert with aiosmtplib."""

    def __init__(self, config: SmtpConfig, *, sender: str, timeout: float = 15.0) -> None:
        self._config = config
        self._sender = sender
        self._timeout = timeout

    def __repr__(self) -> str:
        return f"SmtpMailer({self._config.host}:{self._config.port})"

    async def send(self, *, to: str, subject: str, text: str, alert_id: str) -> None:
        message = EmailMessage()
        message["From"] = self._sender
        message["To"] = to
        message["Subject"] = subject
        message["Date"] = formatdate(localtime=False)
        message["Message-ID"] = make_msgid(idstring=alert_id)
        message["X-AzA-Alert-Id"] = alert_id
        message.set_content(text)
        config = self._config
        try:
            await aiosmtplib.send(
                message,
                hostname=config.host,
                port=config.port,
                username=config.username,
                password=config.password,
                use_tls=config.tls,
                start_tls=config.starttls,
                timeout=self._timeout,
            )
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise DeliveryFailed(f"smtp: {exc.__class__.__name__}") from exc


class WebhookSender:
    """POSTs an alert's body, signed, to the practice's URL; 2xx is delivered, else a failure."""

    def __init__(
        self,
        *,
        allow_private: bool,
        timeout: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.allow_private = allow_private
        self._clock = clock
        # No redirects: a public URL must not bounce a delivery to an internal one.
        self._client = httpx.AsyncClient(
            timeout=timeout, follow_redirects=False, transport=transport, trust_env=False
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def send(self, *, url: str, secret: str, alert: Alert) -> None:
        try:
            await check_target(url, allow_private=self.allow_private)
        except TargetRefused as exc:
            raise DeliveryFailed(f"webhook: {exc}") from None
        body = json.dumps(alert.body(), separators=(",", ":"), sort_keys=True).encode()
        headers = {
            "content-type": "application/json",
            "user-agent": "AzA-Gateway-Alerts/1",
            SIGNATURE_HEADER: signature(secret, int(self._clock()), body),
        }
        try:
            # Only the status counts: the answer's body is never read, so a receiver that
            # keeps sending one cannot hold the worker (and every other alert) up.
            async with self._client.stream("POST", url, content=body, headers=headers) as answer:
                status = answer.status_code
        except httpx.HTTPError as exc:
            raise DeliveryFailed(f"webhook: {exc.__class__.__name__}") from None
        if not 200 <= status < 300:
            raise DeliveryFailed(f"webhook: HTTP {status}")


class AlertDispatcher:
    """Claims due outbox rows and delivers them on their channels."""

    def __init__(
        self,
        store: AlertStore,
        *,
        mailer: Mailer | None,
        webhooks: WebhookSender,
        poll_seconds: float = 5.0,
        retry_base_seconds: float = 30.0,
        retry_max_seconds: float = 3600.0,
        max_attempts: int = 12,
        claim_seconds: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.mailer = mailer
        self.webhooks = webhooks
        self.poll_seconds = poll_seconds
        self.retry_base_seconds = retry_base_seconds
        self.retry_max_seconds = retry_max_seconds
        self.max_attempts = max_attempts
        self.claim_seconds = claim_seconds
        self._clock = clock
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Look for due alerts now rather than at the next poll."""
        self._wake.set()

    def backoff_seconds(self, attempts: int) -> float:
        """The wait after the `attempts`-th failed attempt (doubling, capped)."""
        return float(min(self.retry_max_seconds, self.retry_base_seconds * 2 ** (attempts - 1)))

    async def run(self) -> None:
        """Deliver due alerts until cancelled."""
        while True:
            try:
                while await self.deliver_due():
                    pass
            except Exception:
                log.exception("delivering alerts failed; trying again at the next poll")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.poll_seconds)
            self._wake.clear()

    async def deliver_due(self) -> int:
        """Claim the due alerts and try each once; returns how many were claimed."""
        now_ms = int(self._clock() * 1000)
        claimed = await self.store.claim_due(now_ms=now_ms, claim_ms=int(self.claim_seconds * 1000))
        if claimed:
            await asyncio.gather(*(self._deliver(item) for item in claimed))
        return len(claimed)

    async def _deliver(self, item: Claimed) -> None:
        alert = item.alert
        settings = await self.store.settings(alert.practice_id)
        errors: list[str] = []
        email_state = await self._email(item, settings, errors)
        webhook_state = await self._webhook(item, settings, errors)
        attempts = item.attempts + 1
        open_states = [s for s in (email_state, webhook_state) if s == PENDING]
        done = not open_states
        if open_states and attempts >= self.max_attempts:
            log.error("alert %s given up after %d attempts: %s", alert.id, attempts, errors)
            email_state = FAILED if email_state == PENDING else email_state
            webhook_state = FAILED if webhook_state == PENDING else webhook_state
            done = True
        elif errors:
            log.warning("alert %s attempt %d failed: %s", alert.id, attempts, "; ".join(errors))
        next_ms = int((self._clock() + self.backoff_seconds(attempts)) * 1000)
        await self.store.record_attempt(
            alert.id,
            email_state=email_state,
            webhook_state=webhook_state,
            attempts=attempts,
            next_attempt_ms=next_ms,
            done=done,
            last_error="; ".join(errors) or None,
        )

    async def _email(self, item: Claimed, settings: AlertSettings, errors: list[str]) -> str:
        if item.email_state != PENDING:
            return item.email_state
        if self.mailer is None or not settings.email:
            return OFF
        subject, text = email_text(item.alert, settings.language)
        try:
            await self.mailer.send(
                to=settings.email, subject=subject, text=text, alert_id=item.alert.id
            )
        except DeliveryFailed as exc:
            errors.append(str(exc))
            return PENDING
        return SENT

    async def _webhook(self, item: Claimed, settings: AlertSettings, errors: list[str]) -> str:
        if item.webhook_state != PENDING:
            return item.webhook_state
        if not settings.webhook_url or not settings.webhook_secret:
            return OFF
        try:
            await self.webhooks.send(
                url=settings.webhook_url, secret=settings.webhook_secret, alert=item.alert
            )
        except DeliveryFailed as exc:
            errors.append(str(exc))
            return PENDING
        return SENT
