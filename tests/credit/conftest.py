"""Fixtures for the credit tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def _probe_postgres_before_any_event_loop() -> None:
    """Probe PostgreSQL once from sync code (the root probe cannot run inside a loop)."""
    from tests.conftest import postgres_unreachable_reason

    postgres_unreachable_reason()
