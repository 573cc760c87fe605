"""The upstreams file (`config/upstreams.toml` or `AZA_UPSTREAMS_FILE`), read and checked once.

Each `[[upstream]]` table declares one upstream the gateway may forward to:
its kind (`openai`, or `azure` for Azure OpenAI), base URL, the environment
variable holding its key, its region label and the models it serves (an
Azure upstream's deployments name them). The file is checked whole at start:
an unknown key, a missing secret or a duplicate name is a `ConfigError` that
names the file and the line, so the gateway stops before serving anything.

Without a file the gateway has one upstream, `AZA_UPSTREAM_BASE_URL` with
`OPENAI_API_KEY`, as before (`legacy_upstream`).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal
from urllib.parse import urlsplit

from budget.money import InvalidAmount, parse_decimal
from gateway.settings import ConfigError, Secret

UpstreamKind = Literal["openai", "azure"]

_KEYS = frozenset(
    {
        "name",
        "kind",
        "base_url",
        "api_key_env",
        "api_version",
        "region",
        "deployments",
        "models",
        "price_uplift_percent",
    }
)
_REGION = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_HEADER = re.compile(r"^\s*\[\[\s*upstream\s*\]\]")
_TABLE = re.compile(r"^\s*\[")


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """One upstream as declared: what it is, where it is and what it serves.

    `models`: for `openai`, the models it serves (None: every model); for
    `azure`, the keys of `deployments` (model → deployment name).
    `azure_v1`: an Azure base URL ending in `/openai/v1` (Azure's v1 scheme:
    OpenAI's paths, the deployment named as the model in the body).
    `region`: None only for the single upstream of `AZA_UPSTREAM_BASE_URL`,
    which serves practices that are not pinned to a region.
    """

    name: str
    kind: UpstreamKind
    base_url: str
    api_key: Secret
    api_key_env: str
    region: str | None
    api_version: str | None = None
    deployments: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    models: frozenset[str] | None = None
    price_uplift_percent: Decimal = Decimal(0)
    line: int = 0

    @property
    def azure_v1(self) -> bool:
        return self.kind == "azure" and urlsplit(self.base_url).path.rstrip("/").endswith(
            "/openai/v1"
        )

    def serves(self, model: str) -> bool:
        return self.models is None or model in self.models


def legacy_upstream(base_url: str, api_key: Secret) -> UpstreamConfig:
    """The one upstream of `AZA_UPSTREAM_BASE_URL` and `OPENAI_API_KEY` (no file)."""
    return UpstreamConfig(
        name="default",
        kind="openai",
        base_url=base_url,
        api_key=api_key,
        api_key_env="OPENAI_API_KEY",
        region=None,
    )


class _Lines:
    """Finds the line of a key in the text of an upstreams file (tomllib gives none)."""

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        self.headers = [i + 1 for i, line in enumerate(self.lines) if _HEADER.match(line)]

    def of_table(self, index: int) -> int:
        return self.headers[index] if index < len(self.headers) else 1

    def of_key(self, index: int, key: str) -> int:
        start = self.of_table(index)
        pattern = re.compile(rf"^\s*[\"']?{re.escape(key)}[\"']?\s*=")
        for number in range(start, len(self.lines) + 1):
            line = self.lines[number - 1]
            if number > start and _TABLE.match(line):
                break
            if pattern.match(line):
                return number
        return start

    def of_top_level(self, key: str) -> int:
        pattern = re.compile(rf"^\s*(\[+\s*)?[\"']?{re.escape(key)}[\"']?\s*(=|\])")
        for number, line in enumerate(self.lines, start=1):
            if pattern.match(line):
                return number
        return 1


def load_upstreams(path: Path, env: Mapping[str, str]) -> tuple[UpstreamConfig, ...]:
    """Read and check the upstreams file; secrets come from `env`.

    Raises ConfigError naming `path:line` for anything the gateway cannot use.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the upstreams file: {exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    lines = _Lines(text)
    for key in data:
        if key != "upstream":
            raise ConfigError(
                f"{path}:{lines.of_top_level(key)}: unknown key {key!r} "
                "(the file holds only [[upstream]] tables)"
            )
    tables = data.get("upstream")
    if not isinstance(tables, list) or not tables:
        raise ConfigError(f"{path}:1: no [[upstream]] table: declare at least one upstream")
    seen: dict[str, int] = {}
    upstreams: list[UpstreamConfig] = []
    for index, table in enumerate(tables):
        upstream = _upstream(path, lines, index, table, env)
        if upstream.name in seen:
            raise ConfigError(
                f"{path}:{lines.of_key(index, 'name')}: duplicate upstream name "
                f"{upstream.name!r} (first at line {seen[upstream.name]})"
            )
        seen[upstream.name] = lines.of_key(index, "name")
        upstreams.append(upstream)
    return tuple(upstreams)


def _upstream(
    path: Path, lines: _Lines, index: int, table: Mapping[str, Any], env: Mapping[str, str]
) -> UpstreamConfig:
    def fail(key: str | None, message: str) -> ConfigError:
        line = lines.of_key(index, key) if key else lines.of_table(index)
        return ConfigError(f"{path}:{line}: {message}")

    for key in table:
        if key not in _KEYS:
            raise fail(
                key, f"unknown key {key!r} in [[upstream]] (known: {', '.join(sorted(_KEYS))})"
            )

    def text(key: str, *, required: bool = True) -> str | None:
        value = table.get(key)
        if value is None:
            if required:
                raise fail(None, f"[[upstream]] needs {key!r}")
            return None
        if not isinstance(value, str) or not value.strip():
            raise fail(key, f"{key!r} must be a non-empty string")
        return value.strip()

    name = text("name")
    assert name is not None
    if not _NAME.match(name):
        raise fail("name", f"name {name!r} must be letters, digits, '.', '_' or '-'")
    kind = text("kind")
    if kind not in ("openai", "azure"):
        raise fail("kind", f"kind must be 'openai' or 'azure', not {kind!r}")
    base_url = text("base_url")
    assert base_url is not None
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise fail("base_url", f"base_url must be http(s)://host[:port][/path], not {base_url!r}")
    key_env = text("api_key_env")
    assert key_env is not None
    secret = env.get(key_env, "")
    if not secret:
        raise fail(
            "api_key_env",
            f"upstream {name!r}: the environment variable {key_env} (its api_key_env) is not set",
        )
    region = text("region")
    assert region is not None
    if not _REGION.match(region):
        raise fail("region", f"region {region!r} must be a lower-case label such as 'ch' or 'eu'")
    api_version = text("api_version", required=False)
    uplift_raw = table.get("price_uplift_percent", "0")
    try:
        if isinstance(uplift_raw, float):  # TOML 10.5 is a binary float: a string says it exactly
            raise InvalidAmount("a float")
        uplift = parse_decimal(uplift_raw, what="price_uplift_percent")
    except InvalidAmount:
        raise fail(
            "price_uplift_percent",
            'price_uplift_percent must be a decimal string such as "10" or an integer',
        ) from None
    if not uplift.is_finite() or uplift < 0 or uplift > 1000:
        raise fail("price_uplift_percent", "price_uplift_percent must be between 0 and 1000")
    if int(uplift.as_tuple().exponent) < -6:
        raise fail("price_uplift_percent", "price_uplift_percent has at most 6 decimal places")

    deployments: dict[str, str] = {}
    models: frozenset[str] | None = None
    if kind == "azure":
        raw = table.get("deployments")
        if not isinstance(raw, Mapping) or not raw:
            raise fail(
                "deployments" if "deployments" in table else None,
                f"azure upstream {name!r} needs deployments = {{ model = deployment, ... }}",
            )
        for model, deployment in raw.items():
            if not isinstance(deployment, str) or not deployment.strip():
                raise fail("deployments", f"deployment of {model!r} must be a non-empty string")
            deployments[model] = deployment.strip()
        if "models" in table:
            raise fail("models", "an azure upstream's models are the keys of its deployments")
        models = frozenset(deployments)
        v1 = parts.path.rstrip("/").endswith("/openai/v1")
        if api_version is None and not v1:
            raise fail(
                None,
                f"azure upstream {name!r} needs api_version (or a base_url ending in /openai/v1)",
            )
        if not v1 and parts.path.strip("/"):
            raise fail(
                "base_url",
                "an azure base_url is the resource endpoint (https://NAME.openai.azure.com), "
                "or it ends in /openai/v1",
            )
    else:
        if "deployments" in table:
            raise fail("deployments", "deployments are for azure upstreams; use models = [...]")
        if api_version is not None:
            raise fail("api_version", "api_version is for azure upstreams")
        raw_models = table.get("models")
        if raw_models is not None:
            if not isinstance(raw_models, list) or not all(
                isinstance(m, str) and m for m in raw_models
            ):
                raise fail("models", "models must be a list of model names")
            models = frozenset(raw_models) or None
    return UpstreamConfig(
        name=name,
        kind=kind,  # type: ignore[arg-type]  # checked above
        base_url=base_url.rstrip("/"),
        api_key=Secret(secret),
        api_key_env=key_env,
        region=region,
        api_version=api_version,
        deployments=MappingProxyType(deployments),
        models=models,
        price_uplift_percent=uplift,
        line=lines.of_table(index),
    )


def parse_regions(raw: str) -> frozenset[str] | None:
    """`AZA_DEFAULT_REGIONS`: comma-separated labels; empty means any region (None)."""
    labels = [part.strip().lower() for part in raw.split(",") if part.strip()]
    for label in labels:
        if not _REGION.match(label):
            raise ConfigError(
                f"AZA_DEFAULT_REGIONS: {label!r} is not a region label such as 'ch' or 'eu'"
            )
    return frozenset(labels) or None


def valid_region(label: str) -> bool:
    return bool(_REGION.match(label))
