"""A fake of OpenAI's EU data-residency endpoint (`https://eu.api.openai.com/v1`).

The EU endpoint speaks OpenAI's API unchanged (the project, not the request,
is pinned to the EU), so this is the demo upstream with a key of its own and a
record of every body it received: tests check that a practice pinned to
another region never reaches it and what it was sent (`store: false`).
"""

from __future__ import annotations

import json
from typing import Any

from starlette.types import Receive, Scope, Send

from gateway.demo.fake_upstream import FakeUpstream

FAKE_EU_KEY = "sk-fake-openai-eu-key"


class FakeOpenAIEU(FakeUpstream):
    """The fake EU endpoint; `bodies` holds each request's body, in order."""

    def __init__(self, *, api_key: str = FAKE_EU_KEY) -> None:
        super().__init__(api_key=api_key)
        self.bodies: list[bytes] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        before = self.requests
        await super().__call__(scope, receive, send)
        if self.requests > before:
            self.bodies.append(self.last_body)

    def json_bodies(self) -> list[Any]:
        return [json.loads(body) for body in self.bodies if body.startswith(b"{")]
