"""End to end through the egress proxy: SDK → gateway → HTTPS_PROXY (CONNECT) → TLS Azure fake.

The fake Azure OpenAI resource serves TLS with a certificate from a throwaway
CA that only SSL_CERT_FILE names; the gateway reaches it through the local
CONNECT proxy with credentials from HTTPS_PROXY.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path

import openai
import pytest
import trustme
import uvicorn

from gateway.demo.fake_azure import FAKE_AZURE_KEY, FakeAzureOpenAI
from gateway.settings import Settings
from tests.egress import connect_proxy
from tests.integration.conftest import StartGateway


async def test_sdk_through_the_proxy_to_a_tls_upstream(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """The chat goes through one CONNECT tunnel to localhost, TLS verified with SSL_CERT_FILE."""
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    key_file, cert_file, bundle = tmp_path / "key.pem", tmp_path / "cert.pem", tmp_path / "ca.pem"
    cert.private_key_pem.write_to_path(str(key_file))
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    ca.cert_pem.write_to_path(str(bundle))
    fake = FakeAzureOpenAI(deployments={"mini": "gpt-4o-mini"})
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            fake,
            log_level="warning",
            ws="none",
            lifespan="off",
            ssl_keyfile=str(key_file),
            ssl_certfile=str(cert_file),
        )
    )
    task = asyncio.create_task(server.serve(sockets=[sock]))
    stack = contextlib.AsyncExitStack()
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("the TLS fake stopped before it started")
            await asyncio.sleep(0.005)
        upstreams = tmp_path / "upstreams.toml"
        upstreams.write_text(
            f'[[upstream]]\nname = "azure-ch"\nkind = "azure"\n'
            f'base_url = "https://localhost:{port}"\napi_key_env = "AZURE_OPENAI_KEY_CH"\n'
            'api_version = "2024-10-21"\nregion = "ch"\n'
            'deployments = { "gpt-4o-mini" = "mini" }\n'
        )
        proxy = await stack.enter_async_context(connect_proxy())
        env = {
            "AZA_UPSTREAMS_FILE": str(upstreams),
            "AZURE_OPENAI_KEY_CH": FAKE_AZURE_KEY,
            "HTTPS_PROXY": f"http://aza:s3cret%3Ax@127.0.0.1:{proxy.port}",
            "NO_PROXY": "example.org",
            "SSL_CERT_FILE": str(bundle),
        }
        read = Settings.from_env(env)
        async with start_gateway(
            upstreams=read.upstreams,
            https_proxy=read.https_proxy,
            no_proxy=read.no_proxy,
            ssl_cert_file=read.ssl_cert_file,
        ) as gw:
            chat = await gw.client().chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "Grüezi"}]
            )
            assert chat.choices[0].message.content
            assert proxy.tunnels == [f"localhost:{port}"]
            assert fake.paths == [
                "/openai/deployments/mini/chat/completions?api-version=2024-10-21"
            ]
            assert len(await gw.settled(1)) == 1
        # Without SSL_CERT_FILE the same upstream's certificate is refused.
        async with start_gateway(
            upstreams=read.upstreams, https_proxy=read.https_proxy, default_regions=None
        ) as gw:
            with pytest.raises(openai.InternalServerError) as caught:
                await gw.client().chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
                )
            body = caught.value.body
            assert isinstance(body, dict) and body["code"] == "upstream_unavailable_in_region"
            assert len(fake.paths) == 1
    finally:
        await stack.aclose()
        server.should_exit = True
        await task
        sock.close()
