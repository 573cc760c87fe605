"""Alert tests run the gateway end to end (fixtures of tests/integration) with real receivers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from gateway.settings import Secret
from tests.alerts.receivers import Inbox, Receiver, smtp_server
from tests.integration.conftest import (  # noqa: F401  (fixtures)
    gateway_settings,
    serve,
    start_gateway,
    upstream,
)


@dataclass
class Channels:
    """An SMTP server and a webhook receiver, and the gateway settings that reach them."""

    inbox: Inbox
    receiver: Receiver
    webhook_url: str
    overrides: dict[str, Any]


@pytest.fixture
async def channels() -> AsyncIterator[Channels]:
    receiver = Receiver()
    async with smtp_server() as (inbox, port), serve(receiver) as url:
        yield Channels(
            inbox,
            receiver,
            url + "/hooks/aza",
            {
                "smtp_url": Secret(f"smtp://127.0.0.1:{port}"),
                "alert_from": "KI-Gateway <alerts@aza.test>",
                "alert_webhook_allow_private": True,
                # Time is driven by configuration: polls and retries within 50 ms.
                "alert_poll_seconds": 0.05,
                "alert_retry_base_seconds": 0.05,
                "alert_retry_max_seconds": 0.2,
            },
        )
