"""`aza-gateway prices check`: models seen in usage or refused as unpriced, and their price."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.integration.conftest import Gateway


@pytest.fixture
async def database_url(tmp_path: Any) -> AsyncIterator[str]:
    """SQLite: the command is run against the gateway's own database file."""
    yield f"sqlite:///{tmp_path / 'gateway.sqlite'}"


def _prices_check(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AZA_DATABASE_URL": database_url}
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "prices", "check", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_prices_check_lists_used_and_refused_models(
    gateway: Gateway, database_url: str, tmp_path: Path
) -> None:
    """A dated snapshot used twice resolves to its entry; an unknown model refused 2x shows
    '-' and makes the command exit 1."""
    client = gateway.client()
    for _ in range(2):
        await client.chat.completions.create(
            model="gpt-4o-mini-2024-07-18", messages=[{"role": "user", "content": "Hallo"}]
        )
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(
                model="gpt-9-preview", messages=[{"role": "user", "content": "Hallo"}]
            )
        assert caught.value.code == "model_not_priced"
    await gateway.settled(2)

    result = _prices_check(database_url, "--days", "7")
    assert result.returncode == 1, result.stderr
    lines = [line.split() for line in result.stdout.splitlines()]
    assert lines[0] == ["model", "events", "refused", "priced", "as"]
    assert ["gpt-4o-mini-2024-07-18", "2", "0", "gpt-4o-mini"] in lines
    assert ["gpt-9-preview", "0", "2", "-"] in lines
    assert "1 without a price" in result.stderr
