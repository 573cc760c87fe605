"""Which upstream a request goes to: one pool per upstream, chosen by model and region.

`Router.route(model, regions)` gives the upstreams that may serve a model for
a practice pinned to `regions` (None: any region), in the file's order, with
the highest price uplift among them (what the gate holds for). Routes are
made once per (regions, model) and kept, so choosing an upstream costs a
request two dict lookups. The proxy tries them in order (failover inside the
region); an upstream's `CircuitBreaker` skips it for a short while after
repeated failures. Nothing here ever adds an upstream of another region.

`Upstream` also knows its URL scheme: OpenAI's paths below its base URL, or
Azure OpenAI's deployment paths (`/openai/deployments/{deployment}/...
?api-version=`), or Azure's `/openai/v1/` scheme, and its credentials header
(`Authorization: Bearer` or Azure's `api-key`).
"""

from __future__ import annotations

import json
import time
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal

from gateway.upstream import Header, UpstreamClient
from gateway.upstreams_config import UpstreamConfig

# A request tries at most this many upstreams of its region.
MAX_TRIES = 3
# Consecutive failures that open an upstream's breaker, and how long it stays open.
BREAKER_FAILURES = 3
BREAKER_OPEN_SECONDS = 10.0
# Routes kept per region set; beyond this (many unknown model names sent to
# an upstream that serves every model) routes are made per request.
_MAX_ROUTES = 1024
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

# Azure OpenAI's deployment-scoped operations (below /openai/deployments/{name}).
_AZURE_DEPLOYMENT_PATHS = frozenset(
    {
        "/chat/completions",
        "/completions",
        "/embeddings",
        "/audio/transcriptions",
        "/audio/translations",
        "/audio/speech",
        "/images/generations",
    }
)


class CircuitBreaker:
    """Opens after `BREAKER_FAILURES` failures in a row, for `BREAKER_OPEN_SECONDS`.

    When the time is up one request may try again (half open): a success
    closes the breaker, a failure opens it again at once.
    """

    __slots__ = ("failures", "open_until")

    def __init__(self) -> None:
        self.failures = 0
        self.open_until = 0.0

    def available(self, now: float) -> bool:
        return now >= self.open_until

    def success(self) -> None:
        self.failures = 0

    def failure(self, now: float) -> None:
        self.failures += 1
        if self.failures >= BREAKER_FAILURES:
            self.open_until = now + BREAKER_OPEN_SECONDS
            self.failures = BREAKER_FAILURES - 1  # half open: one more failure re-opens

    @property
    def is_open(self) -> bool:
        return time.monotonic() < self.open_until


class UpstreamStats:
    """Plain counters per upstream, read by /metrics when scraped (no lock per request)."""

    __slots__ = (
        "errors",
        "failovers",
        "latency_buckets",
        "latency_count",
        "latency_sum",
        "requests",
    )

    def __init__(self) -> None:
        self.requests = 0
        self.errors: dict[str, int] = {}
        self.failovers = 0
        self.latency_buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.latency_count = 0

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def observe(self, seconds: float) -> None:
        self.latency_buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds
        self.latency_count += 1


class Upstream:
    """One configured upstream at run time: its pool, credentials, breaker and counters."""

    __slots__ = ("auth", "breaker", "client", "config", "name", "region", "stats", "uplift")

    def __init__(self, config: UpstreamConfig, client: UpstreamClient) -> None:
        self.config = config
        self.name = config.name
        self.region = config.region
        self.client = client
        self.uplift: Decimal = config.price_uplift_percent
        self.breaker = CircuitBreaker()
        self.stats = UpstreamStats()
        key = config.api_key.reveal().encode("latin-1")
        self.auth: Header | None
        if not key:
            self.auth = None
        elif config.kind == "azure":
            self.auth = (b"api-key", key)
        else:
            self.auth = (b"authorization", b"Bearer " + key)

    def serves(self, model: str | None) -> bool:
        return model is None or self.config.serves(model)

    def target(self, path: str, query: str, model: str | None) -> str:
        """The request target below this upstream's base URL for gateway `path` (after /v1)."""
        config = self.config
        if config.kind == "openai":
            return path + ("?" + query if query else "")
        version = config.api_version
        if config.azure_v1:
            params = [f"api-version={version}"] if version else []
        else:
            params = [f"api-version={version}"]
            deployment = config.deployments.get(model) if model is not None else None
            if deployment is not None and path in _AZURE_DEPLOYMENT_PATHS:
                path = f"/openai/deployments/{deployment}{path}"
            else:
                path = "/openai" + path
        if query:
            params.append(query)
        return path + ("?" + "&".join(params) if params else "")

    def body(self, path: str, body: bytes, model: str | None, content_type: str) -> bytes:
        """The body as this upstream takes it: Azure names a deployment where OpenAI a model.

        On deployment paths the deployment is in the URL and the body stays
        as it is; Azure's Responses and its v1 scheme read the deployment
        from the body's `model`, so a JSON body gets it there.

        Azure's deployment-scoped chat completions keep nothing unless asked
        with `store: true` (its stored-completions feature), and reject a
        `store` field on API versions before it ("Unknown parameter"), so
        the `store: false` the gateway added is taken off again there.
        """
        config = self.config
        if config.kind != "azure" or model is None:
            return body
        if path == "/chat/completions" and not config.azure_v1:
            body = _without_store_false(body)
        deployment = config.deployments.get(model)
        if deployment is None or deployment == model:
            return body
        if not config.azure_v1 and path in _AZURE_DEPLOYMENT_PATHS:
            return body
        if not content_type.startswith("application/json"):
            return body
        try:
            data = json.loads(body)
        except ValueError:
            return body
        if not isinstance(data, dict):
            return body
        data["model"] = deployment
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


_STORE_FALSE_FIRST = b'{"store":false,'
_STORE_FALSE_LAST = b',"store":false}'


def _without_store_false(body: bytes) -> bytes:
    """`body` without the `"store":false` the gateway put first (spliced) or last."""
    if body.startswith(_STORE_FALSE_FIRST):
        return b"{" + body[len(_STORE_FALSE_FIRST) :]
    if body.endswith(_STORE_FALSE_LAST):
        return body[: -len(_STORE_FALSE_LAST)] + b"}"
    return body


@dataclass(frozen=True, slots=True)
class Route:
    """The upstreams one request may go to, in order, and the highest uplift among them."""

    model: str | None
    regions: frozenset[str] | None
    upstreams: tuple[Upstream, ...]
    max_uplift: Decimal


class Router:
    """The configured upstreams and the routes made from them."""

    def __init__(self, upstreams: Sequence[Upstream]) -> None:
        self.upstreams = tuple(upstreams)
        self._routes: dict[frozenset[str] | None, dict[str | None, Route]] = {}

    def route(self, model: str | None, regions: frozenset[str] | None) -> Route:
        """The upstreams serving `model` (None: any) in `regions` (None: any region)."""
        by_model = self._routes.get(regions)
        if by_model is None:
            by_model = self._routes[regions] = {}
        route = by_model.get(model)
        if route is None:
            route = self._make(model, regions)
            if len(by_model) < _MAX_ROUTES:
                by_model[model] = route
        return route

    def _make(self, model: str | None, regions: frozenset[str] | None) -> Route:
        chosen = tuple(
            upstream
            for upstream in self.upstreams
            if upstream.serves(model)
            and (regions is None or (upstream.region is not None and upstream.region in regions))
        )
        uplift = max((upstream.uplift for upstream in chosen), default=Decimal(0))
        return Route(model, regions, chosen, uplift)

    async def aclose(self) -> None:
        for upstream in self.upstreams:
            await upstream.client.aclose()
