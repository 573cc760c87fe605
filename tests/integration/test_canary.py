"""No prompt or response content in the gateway's data or logs: a canary on every route.

A gateway with its own SQLite file under a data directory, in front of the
fake Azure OpenAI resource (`ch`) and the fake OpenAI EU endpoint (`eu`), is
sent a canary string on every proxied route, streamed and not, including
requests it refuses and upstream errors that echo the prompt back. Then every
byte under the data directory (database, WAL) and every captured log line and
output is searched: the canary is nowhere.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import openai
import pytest

from gateway.app import create_app
from gateway.demo.fake_azure import FAKE_AZURE_KEY, FakeAzureOpenAI
from gateway.demo.fake_openai_eu import FAKE_EU_KEY, FakeOpenAIEU
from gateway.settings import Secret, Settings
from gateway.storage import open_database
from gateway.storage.metering import MeteringStore
from gateway.upstreams_config import load_upstreams
from tests.integration.conftest import serve
from tests.integration.test_endpoints import wav

CANARY = "CANARY-7f3a9c-Patientin-Muster"

UPSTREAMS = """
[[upstream]]
name = "azure-ch"
kind = "azure"
base_url = "{ch}"
api_key_env = "AZURE_OPENAI_KEY_CH"
api_version = "2024-10-21"
region = "ch"
deployments = {{ "gpt-4o-mini" = "mini-ch", "text-embedding-3-small" = "embed-ch" }}

[[upstream]]
name = "openai-eu"
kind = "openai"
base_url = "{eu}/v1"
api_key_env = "OPENAI_EU_KEY"
region = "eu"
"""


async def test_canary_is_nowhere_in_the_data_directory_or_the_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    """Every route with the canary in its content; then no file, row or log line holds it."""
    caplog.set_level(logging.DEBUG)
    data = tmp_path / "data"
    data.mkdir()
    db = await open_database(f"sqlite:///{data / 'gateway.sqlite'}")
    metering = MeteringStore(db, plans=Settings().plans)
    now = int(time.time())
    await metering.upsert_license(
        subscription_id="sub_canary",
        practice_id="prac_canary",
        lookup_key="aza_basic_monthly",
        status="active",
        period_start=now - 86_400,
        period_end=now + 86_400 * 29,
    )
    key = await metering.create_key("prac_canary")
    ch = FakeAzureOpenAI(
        deployments={"mini-ch": "gpt-4o-mini", "embed-ch": "text-embedding-3-small"}
    )
    eu = FakeOpenAIEU()
    try:
        async with serve(ch) as ch_url, serve(eu) as eu_url:
            path = tmp_path / "upstreams.toml"
            path.write_text(UPSTREAMS.format(ch=ch_url, eu=eu_url))
            settings = Settings(
                upstreams=load_upstreams(
                    path, {"AZURE_OPENAI_KEY_CH": FAKE_AZURE_KEY, "OPENAI_EU_KEY": FAKE_EU_KEY}
                ),
                upstream_timeout_seconds=5.0,
                api_token=Secret("svc"),
                database_url="sqlite:///unused",
                log_level="debug",
            )
            async with serve(create_app(settings, database=db)) as root:
                await _every_route(
                    openai.AsyncOpenAI(base_url=root + "/v1", api_key=key, max_retries=0), ch, eu
                )
            # The upstreams did get the canary: the test would notice a lost request.
            assert any(CANARY.encode() in body for body in ch.bodies)
            assert any(CANARY.encode() in body for body in eu.bodies)
        async with db.read() as conn:
            count = await conn.fetchval("SELECT COUNT(*) FROM ai_usage_events")
        assert count >= 10
    finally:
        await metering.aclose()
        await db.close()

    found = [
        str(file)
        for file in data.rglob("*")
        if file.is_file() and CANARY.encode() in file.read_bytes()
    ]
    assert found == []
    # The client's own libraries (the SDK logs its request bodies at DEBUG) are
    # not the gateway: every other logger's records are searched.
    client_side = ("openai", "httpx", "httpcore")
    gateway_records = [r for r in caplog.records if not r.name.startswith(client_side)]
    assert any("failing over from upstream azure-ch" in r.getMessage() for r in gateway_records)
    formatter = logging.Formatter()  # the message with any traceback
    leaked = [r.getMessage() for r in gateway_records if CANARY in formatter.format(r)]
    assert leaked == []
    out, err = capfd.readouterr()
    assert CANARY not in out and CANARY not in err


async def _every_route(client: openai.AsyncOpenAI, ch: FakeAzureOpenAI, eu: FakeOpenAIEU) -> None:
    text = f"Befund von {CANARY}: bitte zusammenfassen."
    messages = [{"role": "user", "content": text}]
    async with client:
        # Azure in ch: chat, streamed chat, embeddings, and an upstream error echoing the prompt.
        await client.chat.completions.create(model="gpt-4o-mini", messages=messages)  # type: ignore[arg-type]
        stream = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=messages,  # type: ignore[arg-type]
            stream=True,
        )
        async for _ in stream:
            pass
        await client.embeddings.create(model="text-embedding-3-small", input=text)
        # (Not pinned: failed over to eu, which fails too and echoes the prompt.)
        ch.errors = [(500, {"error": {"code": "500", "message": f"failed on {text}"}})]
        eu.errors = [(500, {"error": {"message": f"failed on {text}", "type": "server_error"}})]
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(model="gpt-4o-mini", messages=messages)  # type: ignore[arg-type]
        # OpenAI EU (every other model): the rest of the routes.
        await client.completions.create(model="gpt-3.5-turbo-instruct", prompt=text)
        await client.responses.create(model="gpt-4.1", input=text, instructions=text)
        streamed = await client.responses.create(model="gpt-4.1", input=text, stream=True)
        async for _ in streamed:
            pass
        await client.audio.transcriptions.create(
            model="whisper-1", file=(f"{CANARY}.wav", wav(1.0), "audio/wav"), prompt=text
        )
        with pytest.warns(DeprecationWarning):
            await client.audio.translations.create(
                model="whisper-1", file=(f"{CANARY}.wav", wav(1.0), "audio/wav"), prompt=text
            )
        speech = await client.audio.speech.create(model="tts-1", voice="alloy", input=text)
        assert speech.content
        await client.images.generate(model="dall-e-3", prompt=text, response_format="b64_json")
        await client.moderations.create(model="omni-moderation-latest", input=text)
        # Refused by the gateway: store: true, and a body it cannot meter.
        with pytest.raises(openai.BadRequestError):
            await client.responses.create(model="gpt-4.1", input=text, store=True)
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(
                model="gpt-4o-mini",
                messages=messages,  # type: ignore[arg-type]
                extra_body={"max_tokens": text},
            )
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve(CANARY)
    # Azure's chat completions keep nothing unless asked: no `store` is sent there.
    assert "store" not in json.loads(ch.bodies[0])
