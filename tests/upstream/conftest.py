"""Every async test here runs twice: on the standard event loop and on uvloop.

The gateway serves on uvloop; the other tests run on the standard loop. The
two loops' transports differ (uvloop's are not `asyncio.Transport`
subclasses, for one), so the upstream client is tested on both.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import pytest
import uvloop


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
