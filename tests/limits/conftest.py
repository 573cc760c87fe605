"""Limit tests run the gateway end to end (fixtures of tests/integration)."""

from __future__ import annotations

from tests.integration.conftest import (  # noqa: F401  (fixtures)
    gateway_settings,
    start_gateway,
    upstream,
)
