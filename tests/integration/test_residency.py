"""Several upstreams: Azure OpenAI in `ch`, OpenAI's EU endpoint in `eu`, through the real SDK.

Three fakes on loopback: two Azure OpenAI resources in `ch` (`azure-ch`, then
`azure-ch-2` for failover) and the OpenAI EU endpoint (`openai-eu`, 10 %
price uplift). The practice's requests are pinned with the regions route.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gateway.demo.fake_azure import FAKE_AZURE_KEY, FILTERED_WORD, FakeAzureOpenAI
from gateway.demo.fake_openai_eu import FAKE_EU_KEY, FakeOpenAIEU
from gateway.settings import Secret
from gateway.upstreams_config import load_upstreams
from tests.integration.conftest import Gateway, StartGateway, serve
from tests.integration.test_endpoints import wav

SERVICE_TOKEN = "svc-residency-token"
API_VERSION = "2024-10-21"
DEPLOYMENTS = {
    "mini-ch": "gpt-4o-mini",
    "gpt41-ch": "gpt-4.1",
    "embed-ch": "text-embedding-3-small",
    "whisper-ch": "whisper-1",
}
UPSTREAMS_TOML = """
[[upstream]]
name = "azure-ch"
kind = "azure"
base_url = "{ch1}"
api_key_env = "AZURE_OPENAI_KEY_CH"
api_version = "{version}"
region = "ch"
deployments.gpt-4o-mini = "mini-ch"
deployments."gpt-4.1" = "gpt41-ch"
deployments.text-embedding-3-small = "embed-ch"
deployments.whisper-1 = "whisper-ch"

[[upstream]]
name = "azure-ch-2"
kind = "azure"
base_url = "{ch2}"
api_key_env = "AZURE_OPENAI_KEY_CH2"
api_version = "{version}"
region = "ch"
deployments = {{ "gpt-4o-mini" = "mini-ch" }}

[[upstream]]
name = "openai-eu"
kind = "openai"
base_url = "{eu}/v1"
api_key_env = "OPENAI_EU_KEY"
region = "eu"
models = ["gpt-4o-mini", "gpt-4o"]
price_uplift_percent = "10"
"""


@dataclass
class Residency:
    gateway: Gateway
    ch1: FakeAzureOpenAI
    ch2: FakeAzureOpenAI
    eu: FakeOpenAIEU

    async def pin(self, body: dict[str, Any]) -> httpx.Response:
        async with httpx.AsyncClient() as http:
            return await http.put(
                f"{self.gateway.root}/v1/admin/practices/{self.gateway.practice}/regions",
                json=body,
                headers={"authorization": f"Bearer {SERVICE_TOKEN}"},
            )

    async def metrics(self) -> str:
        async with httpx.AsyncClient() as http:
            return (await http.get(f"{self.gateway.root}/metrics")).text


@pytest.fixture
async def residency(start_gateway: StartGateway, tmp_path: Path) -> AsyncIterator[Residency]:
    ch1 = FakeAzureOpenAI(deployments=DEPLOYMENTS)
    ch2 = FakeAzureOpenAI(deployments={"mini-ch": "gpt-4o-mini"}, api_key="second-azure-key")
    eu = FakeOpenAIEU()
    async with serve(ch1) as ch1_url, serve(ch2) as ch2_url, serve(eu) as eu_url:
        path = tmp_path / "upstreams.toml"
        path.write_text(
            UPSTREAMS_TOML.format(ch1=ch1_url, ch2=ch2_url, eu=eu_url, version=API_VERSION)
        )
        env = {
            "AZURE_OPENAI_KEY_CH": FAKE_AZURE_KEY,
            "AZURE_OPENAI_KEY_CH2": "second-azure-key",
            "OPENAI_EU_KEY": FAKE_EU_KEY,
        }
        async with start_gateway(
            upstreams=load_upstreams(path, env), api_token=Secret(SERVICE_TOKEN)
        ) as gw:
            yield Residency(gw, ch1, ch2, eu)


def cost(input_tokens: int, output_tokens: int, uplift_percent: int = 0) -> int:
    """gpt-4o-mini at 0.15 / 0.60 USD per 1M tokens, plus the uplift, rounded up (micro-USD)."""
    return math.ceil((input_tokens * 15 + output_tokens * 60) * (100 + uplift_percent) / 10_000)


async def test_chat_stream_responses_embeddings_transcription_through_azure(
    residency: Residency,
) -> None:
    """The unchanged SDK's calls reach Azure's deployment paths with api-version and api-key."""
    assert (await residency.pin({"regions": ["ch"]})).status_code == 200
    client = residency.gateway.client()
    chat = await client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Grüezi"}]
    )
    assert chat.choices[0].message.content and chat.model == "gpt-4o-mini"
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Grüezi"}], stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text.startswith("Guten Tag")
    response = await client.responses.create(model="gpt-4.1", input="Hallo")
    assert response.output_text
    embedding = await client.embeddings.create(model="text-embedding-3-small", input="Hallo")
    assert len(embedding.data[0].embedding) == 1536
    transcript = await client.audio.transcriptions.create(
        model="whisper-1", file=("d.wav", wav(3.0), "audio/wav")
    )
    assert transcript.text.startswith("Dies ist")

    fake = residency.ch1
    version = f"?api-version={API_VERSION}"
    assert fake.paths == [
        f"/openai/deployments/mini-ch/chat/completions{version}",
        f"/openai/deployments/mini-ch/chat/completions{version}",
        f"/openai/responses{version}",
        f"/openai/deployments/embed-ch/embeddings{version}",
        f"/openai/deployments/whisper-ch/audio/transcriptions{version}",
    ]
    assert fake.last_headers["api-key"] == FAKE_AZURE_KEY
    assert "authorization" not in fake.last_headers
    # Azure's Responses API names the deployment in the body, and stores by
    # default: it gets store false. Its chat completions (2024-10-21 refuses a
    # `store` field) store nothing unless asked: no store is sent there.
    assert json_of(fake.bodies[2])["model"] == "gpt41-ch"
    assert json_of(fake.bodies[2])["store"] is False
    assert "store" not in json_of(fake.bodies[0]) and "store" not in json_of(fake.bodies[1])
    assert json_of(fake.bodies[1])["stream_options"] == {"include_usage": True}
    assert residency.eu.requests == 0 and residency.ch2.requests == 0

    events = await residency.gateway.settled(5)
    # Settles commit in the background: their order is not the requests'.
    assert sorted((e["operation_type"], e["model"], e["usage_estimated"]) for e in events) == [
        ("chat", "gpt-4o-mini", 0),
        ("chat", "gpt-4o-mini", 0),
        ("embedding", "text-embedding-3-small", 0),
        ("responses", "gpt-4.1", 0),
        ("transcription", "whisper-1", 0),
    ]


def json_of(body: bytes) -> Any:
    import json

    return json.loads(body)


async def test_store_false_is_sent_where_the_client_left_it_out(residency: Residency) -> None:
    """Chat and Responses reach the upstream with `store: false`; a client's false stays."""
    await residency.pin({"regions": ["eu"]})
    client = residency.gateway.client()
    await client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "a"}]
    )
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "b"}], stream=True
    )
    async for _ in stream:
        pass
    await client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "c"}], store=False
    )
    bodies = residency.eu.json_bodies()
    assert [body["store"] for body in bodies] == [False, False, False]
    assert bodies[1]["stream_options"] == {"include_usage": True}


async def test_explicit_store_true_is_refused_unless_allowed(residency: Residency) -> None:
    """`store: true` gets a 400 saying how to allow it, reaches nothing; allowed per practice."""
    client = residency.gateway.client()
    with pytest.raises(openai.BadRequestError) as refused:
        await client.responses.create(model="gpt-4.1", input="keep me", store=True)
    error = refused.value.body
    assert isinstance(error, dict) and error["code"] == "store_not_allowed"
    assert "AZA_UPSTREAM_STORE=allow" in error["message"] and '"store": "allow"' in error["message"]
    assert residency.ch1.requests == residency.eu.requests == 0
    assert await residency.gateway.holds() == 0 and await residency.gateway.events() == []

    answer = await residency.pin({"store": "allow"})
    assert answer.json()["effective_store"] == "allow"
    await client.responses.create(model="gpt-4.1", input="keep me", store=True)
    assert json_of(residency.ch1.last_body)["store"] is True


async def test_practice_pinned_to_ch_never_reaches_eu(residency: Residency) -> None:
    """Pinned to ch: both ch upstreams down means a 503 that says so, and eu sees nothing."""
    answer = await residency.pin({"regions": ["ch"]})
    assert answer.json()["regions"] == ["ch"]
    client = residency.gateway.client()
    for fake in (residency.ch1, residency.ch2):
        fake.errors = [(503, {"error": {"code": "503", "message": "busy"}})] * 2
    with pytest.raises(openai.InternalServerError) as caught:
        await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
        )
    assert caught.value.status_code == 503
    # gpt-4o is served only in eu: refused before anything is forwarded.
    with pytest.raises(openai.InternalServerError) as not_served:
        await client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "x"}]
        )
    body = not_served.value.body
    assert isinstance(body, dict) and body["code"] == "no_upstream_in_region"
    assert "ch" in body["message"]
    assert residency.eu.requests == 0
    # Unpinned again, the practice reaches eu.
    await residency.pin({"regions": None})
    await client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "x"}]
    )
    assert residency.eu.requests == 1


async def test_connect_error_in_ch_gives_503_naming_the_region(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """No ch upstream reachable: 503 `upstream_unavailable_in_region`, no event, no hold."""
    path = tmp_path / "upstreams.toml"
    path.write_text(
        '[[upstream]]\nname = "azure-ch"\nkind = "azure"\nbase_url = "http://127.0.0.1:9"\n'
        'api_key_env = "K"\napi_version = "2024-10-21"\nregion = "ch"\n'
        'deployments = { "gpt-4o-mini" = "mini" }\n'
    )
    async with start_gateway(
        upstreams=load_upstreams(path, {"K": "k"}), default_regions=frozenset({"ch"})
    ) as gw:
        with pytest.raises(openai.InternalServerError) as caught:
            await gw.client().chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
            )
        body = caught.value.body
        assert isinstance(body, dict) and body["code"] == "upstream_unavailable_in_region"
        assert "(ch)" in body["message"] and "not sent to any other region" in body["message"]
        assert await gw.settled(0) == [] and await gw.holds() == 0


async def test_failover_to_the_second_ch_upstream_is_charged_once(residency: Residency) -> None:
    """azure-ch answers 500, then 429: azure-ch-2 answers; one usage event each, no uplift."""
    await residency.pin({"regions": ["ch"]})
    client = residency.gateway.client()
    residency.ch1.errors = [
        (500, {"error": {"code": "InternalServerError", "message": "oops"}}),
        (429, {"error": {"code": "429", "message": "Requests ... have exceeded rate limit"}}),
    ]
    for _ in range(2):
        chat = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x" * 400}]
        )
        assert chat.choices[0].message.content
    assert residency.ch1.requests == 2 and residency.ch2.requests == 2
    events = await residency.gateway.settled(2)
    assert len(events) == 2
    usage = chat.usage
    assert usage is not None
    expected = cost(usage.prompt_tokens, usage.completion_tokens)
    assert [e["estimated_cost_micro_usd"] for e in events] == [expected, expected]
    metrics = await residency.metrics()
    assert 'aza_gateway_upstream_failovers_total{region="ch",upstream="azure-ch"} 2.0' in metrics
    assert (
        'aza_gateway_upstream_request_errors_total{kind="500",region="ch",upstream="azure-ch"} 1.0'
        in metrics
    )
    assert 'aza_gateway_upstream_requests_total{region="ch",upstream="azure-ch-2"} 2.0' in metrics


async def test_eu_answer_is_priced_with_its_uplift(residency: Residency) -> None:
    """openai-eu's 10 % uplift is in the one usage event of a request it answered."""
    await residency.pin({"regions": ["eu"]})
    chat = await residency.gateway.client().chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "y" * 400}]
    )
    assert chat.usage is not None
    [event] = await residency.gateway.settled(1)
    assert event["estimated_cost_micro_usd"] == cost(
        chat.usage.prompt_tokens, chat.usage.completion_tokens, uplift_percent=10
    )


async def test_a_started_stream_is_never_retried(residency: Residency) -> None:
    """azure-ch cuts its stream after two chunks: the client sees it cut; nothing is retried."""
    await residency.pin({"regions": ["ch"]})
    residency.ch1.cut_after_chunks = 2
    stream = await residency.gateway.client().chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "z" * 40}], stream=True
    )
    with pytest.raises(openai.APIError):
        async for _ in stream:
            pass
    assert residency.ch1.streams_cut == 1
    assert residency.ch2.requests == 0 and residency.eu.requests == 0
    events = await residency.gateway.settled(1)
    assert len(events) == 1 and events[0]["status"] == "partial"


async def test_azure_content_filter_refusal_reaches_the_client(residency: Residency) -> None:
    """Azure's content filter 400 is the client's answer (not failed over); nothing charged."""
    await residency.pin({"regions": ["ch"]})
    with pytest.raises(openai.BadRequestError) as caught:
        await residency.gateway.client().chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": FILTERED_WORD}]
        )
    body = caught.value.body
    assert isinstance(body, dict) and body["code"] == "content_filter"
    assert residency.ch2.requests == 0
    await asyncio.sleep(0)
    assert await residency.gateway.settled(0) == [] and await residency.gateway.holds() == 0


async def test_regions_route_validates_and_reads_back(residency: Residency) -> None:
    """PUT keeps a left-out field; bad values are 422; GET shows the setting and what applies."""
    assert (await residency.pin({"regions": ["ch"], "store": "deny"})).status_code == 200
    kept = (await residency.pin({"store": "allow"})).json()
    assert kept["regions"] == ["ch"] and kept["store"] == "allow"
    for bad in ({"regions": []}, {"regions": ["CH!"]}, {"store": "maybe"}, {"region": ["ch"]}):
        assert (await residency.pin(bad)).status_code == 422
    async with httpx.AsyncClient() as http:
        url = f"{residency.gateway.root}/v1/admin/practices/{residency.gateway.practice}/regions"
        read = await http.get(url, headers={"authorization": f"Bearer {SERVICE_TOKEN}"})
        assert read.json()["effective_regions"] == ["ch"]
        practice_key = await http.get(
            url, headers={"authorization": f"Bearer {residency.gateway.key}"}
        )
        assert practice_key.status_code == 403


async def test_stored_completions_routes_are_refused_unless_allowed(residency: Residency) -> None:
    """Listing or reading stored completions is a 403 by default; allowed, it is forwarded."""
    await residency.pin({"regions": ["eu"]})
    client = residency.gateway.client()
    with pytest.raises(openai.PermissionDeniedError) as refused:
        await client.chat.completions.list()
    body = refused.value.body
    assert isinstance(body, dict) and body["code"] == "stored_content_disabled"
    assert "AZA_UPSTREAM_STORE=allow" in body["message"]
    with pytest.raises(openai.PermissionDeniedError):
        await client.chat.completions.messages.list("chatcmpl-abc")
    # A practice's own allowance is not enough: a listing spans every practice.
    await residency.pin({"store": "allow"})
    with pytest.raises(openai.PermissionDeniedError):
        await client.chat.completions.list()
    assert residency.eu.requests == 0


async def test_stored_completions_routes_pass_with_the_gateway_switch(
    start_gateway: StartGateway,
) -> None:
    """AZA_UPSTREAM_STORE=allow: stored completions routes are forwarded, unmetered."""
    async with start_gateway(upstream_store_allowed=True) as gw:
        with pytest.raises(openai.APIStatusError):
            await gw.client().chat.completions.retrieve("chatcmpl-abc")  # the fake keeps none
        assert gw.fake.paths == ["/v1/chat/completions/chatcmpl-abc"]
        assert await gw.events() == [] and await gw.holds() == 0


async def test_connect_failover_and_the_breaker(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """ch-down refuses connections: ch-up answers every request; after 3 failures ch-down is
    skipped (its breaker open), and each request is charged once."""
    ch_up = FakeAzureOpenAI(deployments={"mini": "gpt-4o-mini"})
    async with serve(ch_up) as up_url:
        path = tmp_path / "upstreams.toml"
        table = (
            '[[upstream]]\nname = "{name}"\nkind = "azure"\nbase_url = "{url}"\n'
            'api_key_env = "K"\napi_version = "2024-10-21"\nregion = "ch"\n'
            'deployments = {{ "gpt-4o-mini" = "mini" }}\n'
        )
        path.write_text(
            table.format(name="ch-down", url="http://127.0.0.1:9")
            + table.format(name="ch-up", url=up_url)
        )
        async with start_gateway(
            upstreams=load_upstreams(path, {"K": FAKE_AZURE_KEY}),
            default_regions=frozenset({"ch"}),
        ) as gw:
            client = gw.client()
            for _ in range(5):
                await client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
                )
            assert ch_up.requests == 5
            assert len(await gw.settled(5)) == 5
            async with httpx.AsyncClient() as http:
                metrics = (await http.get(f"{gw.root}/metrics")).text
    down = 'region="ch",upstream="ch-down"'
    assert f"aza_gateway_upstream_requests_total{{{down}}} 3.0" in metrics
    assert f'aza_gateway_upstream_request_errors_total{{kind="connect",{down}}} 3.0' in metrics
    assert f'aza_gateway_upstream_request_errors_total{{kind="breaker_open",{down}}} 2.0' in metrics
    assert f"aza_gateway_upstream_breaker_open{{{down}}} 1.0" in metrics
    assert (
        'aza_gateway_upstream_response_seconds_count{region="ch",upstream="ch-up"} 5.0' in metrics
    )


async def test_azure_refusing_the_gateway_key_names_its_variable(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """Azure's 401 (wrong api-key) becomes the gateway's 502 naming that upstream's api_key_env."""
    fake = FakeAzureOpenAI(deployments={"mini": "gpt-4o-mini"})
    async with serve(fake) as url:
        path = tmp_path / "upstreams.toml"
        path.write_text(
            f'[[upstream]]\nname = "ch"\nkind = "azure"\nbase_url = "{url}"\n'
            'api_key_env = "AZURE_KEY_CH"\napi_version = "2024-10-21"\nregion = "ch"\n'
            'deployments = { "gpt-4o-mini" = "mini" }\n'
        )
        async with start_gateway(
            upstreams=load_upstreams(path, {"AZURE_KEY_CH": "wrong-key"})
        ) as gw:
            with pytest.raises(openai.APIStatusError) as caught:
                await gw.client().chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
                )
            assert caught.value.status_code == 502
            body = caught.value.body
            assert isinstance(body, dict) and body["code"] == "upstream_auth_failed"
            assert "AZURE_KEY_CH" in body["message"] and "wrong-key" not in body["message"]
            assert await gw.settled(0) == []


async def test_azure_v1_scheme(start_gateway: StartGateway, tmp_path: Path) -> None:
    """A base URL ending in /openai/v1: OpenAI's paths, the deployment as the body's model."""
    fake = FakeAzureOpenAI(
        deployments={"mini-v1": "gpt-4o-mini", "embed-v1": "text-embedding-3-small"}
    )
    async with serve(fake) as url:
        path = tmp_path / "upstreams.toml"
        path.write_text(
            f'[[upstream]]\nname = "ch-v1"\nkind = "azure"\nbase_url = "{url}/openai/v1"\n'
            'api_key_env = "K"\nregion = "ch"\n'
            'deployments = { "gpt-4o-mini" = "mini-v1", "text-embedding-3-small" = "embed-v1" }\n'
        )
        async with start_gateway(upstreams=load_upstreams(path, {"K": FAKE_AZURE_KEY})) as gw:
            client = gw.client()
            chat = await client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
            )
            assert chat.model == "gpt-4o-mini"
            await client.embeddings.create(model="text-embedding-3-small", input="x")
            assert fake.paths == ["/openai/v1/chat/completions", "/openai/v1/embeddings"]
            assert [json_of(body)["model"] for body in fake.bodies] == ["mini-v1", "embed-v1"]
            assert json_of(fake.bodies[0])["store"] is False
            events = await gw.settled(2)
            assert sorted(e["model"] for e in events) == ["gpt-4o-mini", "text-embedding-3-small"]
