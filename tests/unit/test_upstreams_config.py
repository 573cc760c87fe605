"""The upstreams file is checked whole at start; every refusal names the file and line."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from gateway.routing import BREAKER_FAILURES, CircuitBreaker, Router, Upstream
from gateway.settings import ConfigError, Secret, Settings
from gateway.upstream import Timeouts, UpstreamClient
from gateway.upstreams_config import UpstreamConfig, legacy_upstream, load_upstreams

GOOD = """\
# Swiss and EU upstreams
[[upstream]]
name = "azure-ch"
kind = "azure"                      # or "openai"
base_url = "https://my-resource.openai.azure.com"
api_key_env = "AZURE_OPENAI_KEY_CH"
api_version = "2024-10-21"
region = "ch"
deployments = { "gpt-4o-mini" = "mini-ch", "whisper-1" = "whisper-ch" }
price_uplift_percent = "0"

[[upstream]]
name = "openai-eu"
kind = "openai"
base_url = "https://eu.api.openai.com/v1"
api_key_env = "OPENAI_EU_KEY"
region = "eu"
price_uplift_percent = "10"
"""
ENV = {"AZURE_OPENAI_KEY_CH": "azure-secret", "OPENAI_EU_KEY": "sk-eu"}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "upstreams.toml"
    path.write_text(text)
    return path


def test_the_issue_s_example_file_is_read(tmp_path: Path) -> None:
    """Both kinds, secrets from the environment, models from deployments, uplift as Decimal."""
    azure, eu = load_upstreams(write(tmp_path, GOOD), ENV)
    assert (azure.name, azure.kind, azure.region, azure.api_version) == (
        "azure-ch",
        "azure",
        "ch",
        "2024-10-21",
    )
    assert azure.api_key.reveal() == "azure-secret" and "azure-secret" not in repr(azure)
    assert azure.models == frozenset({"gpt-4o-mini", "whisper-1"})
    assert dict(azure.deployments) == {"gpt-4o-mini": "mini-ch", "whisper-1": "whisper-ch"}
    assert eu.models is None and eu.serves("anything")
    assert eu.price_uplift_percent == Decimal("10") and azure.line == 2 and eu.line == 12


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (('region = "eu"', 'region = "eu"\nretention = "none"'), r":18: unknown key 'retention'"),
        (('"OPENAI_EU_KEY"', '"MISSING_KEY"'), r":16: .*MISSING_KEY.* is not set"),
        (
            ('name = "openai-eu"', 'name = "azure-ch"'),
            r":13: duplicate upstream name 'azure-ch' \(first at line 3\)",
        ),
        (('kind = "openai"', 'kind = "anthropic"'), r":14: kind must be"),
        (('region = "ch"', 'region = "Switzerland North"'), r":8: region"),
        (('api_version = "2024-10-21"\n', ""), r":2: azure upstream 'azure-ch' needs api_version"),
        (('price_uplift_percent = "10"', 'price_uplift_percent = "ten"'), r":18: price_uplift"),
        (('price_uplift_percent = "10"', "price_uplift_percent = 1.5"), r":18: price_uplift"),
        (
            ('region = "eu"', 'region = "eu"\ndeployments = { "a" = "b" }'),
            r":18: deployments are for azure",
        ),
        (("# Swiss", "timeout = 3\n# Swiss"), r":1: unknown key 'timeout'"),
    ],
)
def test_a_bad_file_stops_the_gateway_naming_the_line(
    tmp_path: Path, change: tuple[str, str], message: str
) -> None:
    """Unknown key, missing secret, duplicate name and bad values: ConfigError with path:line."""
    path = write(tmp_path, GOOD.replace(*change, 1))
    with pytest.raises(ConfigError, match=message) as caught:
        load_upstreams(path, ENV)
    assert str(caught.value).startswith(str(path))
    assert "azure-secret" not in str(caught.value)


def test_settings_read_the_file_and_the_residency_variables(tmp_path: Path) -> None:
    """AZA_UPSTREAMS_FILE, AZA_DEFAULT_REGIONS, AZA_UPSTREAM_STORE; no file: one upstream."""
    path = write(tmp_path, GOOD)
    settings = Settings.from_env(
        {
            **ENV,
            "AZA_UPSTREAMS_FILE": str(path),
            "AZA_DEFAULT_REGIONS": "ch, eu",
            "AZA_UPSTREAM_STORE": "allow",
        }
    )
    assert [u.name for u in settings.upstreams] == ["azure-ch", "openai-eu"]
    assert settings.default_regions == frozenset({"ch", "eu"})
    assert settings.upstream_store_allowed
    plain = Settings.from_env({"AZA_UPSTREAM_BASE_URL": "http://127.0.0.1:1/v1"})
    assert plain.upstreams == () and plain.default_regions is None
    assert not plain.upstream_store_allowed
    with pytest.raises(ConfigError, match="AZA_UPSTREAM_STORE"):
        Settings.from_env({"AZA_UPSTREAM_STORE": "sometimes"})
    with pytest.raises(ConfigError, match="AZA_DEFAULT_REGIONS"):
        Settings.from_env({"AZA_DEFAULT_REGIONS": "ch,Zürich"})
    with pytest.raises(ConfigError, match="HTTPS_PROXY"):
        Settings.from_env({"HTTPS_PROXY": "socks5://proxy:1080"})


def _upstream(config: UpstreamConfig) -> Upstream:
    client = UpstreamClient(base_url=config.base_url, timeouts=Timeouts())
    return Upstream(config, client)


def _azure(name: str, region: str, *, v1: bool = False) -> UpstreamConfig:
    return UpstreamConfig(
        name=name,
        kind="azure",
        base_url="https://r.openai.azure.com" + ("/openai/v1" if v1 else ""),
        api_key=Secret("k"),
        api_key_env="K",
        region=region,
        api_version=None if v1 else "2024-10-21",
        deployments={"gpt-4o-mini": "mini", "whisper-1": "whisper-1"},
        models=frozenset({"gpt-4o-mini", "whisper-1"}),
    )


def test_azure_targets_and_bodies() -> None:
    """Deployment paths with api-version; Responses and v1 name the deployment in the body."""
    azure = _upstream(_azure("a", "ch"))
    assert azure.auth == (b"api-key", b"k")
    assert (
        azure.target("/chat/completions", "", "gpt-4o-mini")
        == "/openai/deployments/mini/chat/completions?api-version=2024-10-21"
    )
    assert azure.target("/responses", "x=1", "gpt-4o-mini") == (
        "/openai/responses?api-version=2024-10-21&x=1"
    )
    assert azure.target("/models", "", None) == "/openai/models?api-version=2024-10-21"
    body = b'{"model":"gpt-4o-mini","input":"hi"}'
    assert azure.body("/chat/completions", body, "gpt-4o-mini", "application/json") is body
    assert b'"model":"mini"' in azure.body("/responses", body, "gpt-4o-mini", "application/json")
    v1 = _upstream(_azure("b", "ch", v1=True))
    assert v1.target("/chat/completions", "", "gpt-4o-mini") == "/chat/completions"
    assert b'"model":"mini"' in v1.body(
        "/chat/completions", body, "gpt-4o-mini", "application/json"
    )
    openai = _upstream(legacy_upstream("https://api.openai.com/v1", Secret("sk")))
    assert openai.auth == (b"authorization", b"Bearer sk")
    assert openai.target("/chat/completions", "a=b", "gpt-4o-mini") == "/chat/completions?a=b"


def test_routes_stay_in_the_practice_s_regions() -> None:
    """Only upstreams of the allowed regions serving the model, in file order; routes are kept."""
    ch1, ch2 = _upstream(_azure("ch1", "ch")), _upstream(_azure("ch2", "ch"))
    eu = _upstream(
        UpstreamConfig(
            name="eu",
            kind="openai",
            base_url="https://eu.api.openai.com/v1",
            api_key=Secret("k"),
            api_key_env="K",
            region="eu",
            price_uplift_percent=Decimal("10"),
        )
    )
    router = Router([ch1, eu, ch2])
    ch = frozenset({"ch"})
    assert router.route("gpt-4o-mini", ch).upstreams == (ch1, ch2)
    assert router.route("gpt-4o-mini", ch) is router.route("gpt-4o-mini", ch)
    assert router.route("gpt-4o", ch).upstreams == ()
    assert router.route("gpt-4o", None).upstreams == (eu,)
    assert router.route("gpt-4o-mini", None).max_uplift == Decimal("10")
    assert router.route("gpt-4o-mini", ch).max_uplift == Decimal("0")
    legacy = Router([_upstream(legacy_upstream("https://api.openai.com/v1", Secret("")))])
    assert legacy.route("gpt-4o", None).upstreams and not legacy.route("gpt-4o", ch).upstreams


def test_circuit_breaker_opens_and_half_opens() -> None:
    """Three failures open it for a while; after that one try, and one failure re-opens it."""
    breaker = CircuitBreaker()
    for _ in range(BREAKER_FAILURES - 1):
        breaker.failure(100.0)
    assert breaker.available(100.0)
    breaker.failure(100.0)
    assert not breaker.available(105.0) and breaker.available(110.0)
    breaker.failure(110.0)
    assert not breaker.available(115.0)
    breaker.success()
    breaker.failure(130.0)
    assert breaker.available(130.0)


def test_the_shipped_example_file_is_valid() -> None:
    """config/upstreams.example.toml reads, given its secrets."""
    from config import CONFIG_DIR

    env = {"AZURE_OPENAI_KEY_CH": "a", "OPENAI_EU_KEY": "b"}
    names = [u.name for u in load_upstreams(CONFIG_DIR / "upstreams.example.toml", env)]
    assert names == ["azure-ch", "openai-eu"]


def test_azure_chat_completions_lose_the_gateway_s_store_false() -> None:
    """Spliced first or re-serialised last, the added store false is taken off for Azure chat."""
    azure = _upstream(_azure("a", "ch"))
    spliced = b'{"store":false,"model":"gpt-4o-mini","messages":[]}'
    last = b'{"model":"gpt-4o-mini","stream":true,"store":false}'
    assert (
        azure.body("/chat/completions", spliced, "gpt-4o-mini", "application/json")
        == b'{"model":"gpt-4o-mini","messages":[]}'
    )
    assert (
        azure.body("/chat/completions", last, "gpt-4o-mini", "application/json")
        == b'{"model":"gpt-4o-mini","stream":true}'
    )
    kept = b'{"model":"gpt-4o-mini","store":true}'
    assert azure.body("/chat/completions", kept, "gpt-4o-mini", "application/json") is kept
    assert b'"store":false' in azure.body("/responses", spliced, "gpt-4o-mini", "application/json")
