"""Prometheus metrics of one app, in its own registry.

Each app gets its own `CollectorRegistry`, so several apps in one process
(the tests start many) never collide on metric names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Generic, TypeVar

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from gateway.routing import Upstream

M = TypeVar("M", Counter, Histogram)


class Labelled(Generic[M]):
    """A labelled metric whose children are looked up once per label values.

    `labels()` of prometheus_client validates the values and takes a lock on
    every call; the gateway asks for the same few children on every request.
    Label values must come from a bounded set (paths, statuses, decisions).
    """

    def __init__(self, metric: M) -> None:
        self.metric: M = metric
        self._children: dict[tuple[str, ...], M] = {}

    def labels(self, *values: str) -> M:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self.metric.labels(*values)
        return child


class GatewayMetrics:
    """The gateway's counters, gauges and histograms."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Labelled(
            Counter(
                "aza_gateway_requests",
                "HTTP requests answered, by path template and status.",
                ["path", "status"],
                registry=self.registry,
            )
        )
        self.usage_cost = Counter(
            "aza_gateway_usage_cost_micro_usd",
            "Cost of settled usage events, in micro-USD.",
            registry=self.registry,
        )
        self.usage_events = Labelled(
            Counter(
                "aza_gateway_usage_events",
                "Usage events written, by operation and whether usage was estimated.",
                ["operation", "estimated"],
                registry=self.registry,
            )
        )
        self.holds_in_flight = Gauge(
            "aza_gateway_holds_in_flight",
            "Budget holds this instance has placed and not yet settled or released.",
            registry=self.registry,
        )
        self.gate_decisions = Labelled(
            Counter(
                "aza_gateway_gate_decisions",
                "Budget gate decisions (admitted, admitted_after_topup, blocked, license_problem, "
                "rate_limited, cap_reached).",
                ["decision"],
                registry=self.registry,
            )
        )
        self.upstream_latency = Labelled(
            Histogram(
                "aza_gateway_upstream_latency_seconds",
                "Time from forwarding a request to the upstream's response headers.",
                ["path"],
                buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
                registry=self.registry,
            )
        )
        self.upstream_errors = Labelled(
            Counter(
                "aza_gateway_upstream_errors",
                "Upstream calls that failed (status >= 400, timeout, connection error).",
                ["kind"],
                registry=self.registry,
            )
        )

    def count_leases(self, counts: Callable[[], Mapping[str, int]]) -> None:
        """Expose the metering store's lease counts, read when /metrics is scraped.

        The store counts in a plain Counter on the request path; a collector
        reads it only when scraped, so leasing costs no metric update per
        request.
        """
        self.registry.register(_LeaseCounts(counts))

    def count_upstreams(self, upstreams: Callable[[], Sequence[Upstream]]) -> None:
        """Expose each upstream's requests, errors, failovers and latency, read when scraped.

        The proxy counts in plain attributes of each upstream (no lock, no
        metric lookup per request); this collector turns them into metrics.
        """
        self.registry.register(_UpstreamCounts(upstreams))

    def render(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)


LEASE_EVENTS = ("placed", "admitted", "closed")


class _LeaseCounts(Collector):
    def __init__(self, counts: Callable[[], Mapping[str, int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "aza_gateway_budget_leases",
            "Budget leases: placed (a hold for many requests), admitted "
            "(requests admitted on a lease, without a database round trip), closed.",
            labels=["event"],
        )
        counts = self._counts()
        for event in LEASE_EVENTS:
            family.add_metric([event], counts.get(event, 0))
        yield family


class _UpstreamCounts(Collector):
    def __init__(self, upstreams: Callable[[], Sequence[Upstream]]) -> None:
        self._upstreams = upstreams

    def collect(self) -> Iterator[Metric]:
        from gateway.routing import LATENCY_BUCKETS

        requests = CounterMetricFamily(
            "aza_gateway_upstream_requests",
            "Requests sent to each upstream (every try of a failover counts).",
            labels=["upstream", "region"],
        )
        errors = CounterMetricFamily(
            "aza_gateway_upstream_request_errors",
            "Failed tries per upstream: connect, timeout, protocol, or the status (429, 5xx).",
            labels=["upstream", "region", "kind"],
        )
        failovers = CounterMetricFamily(
            "aza_gateway_upstream_failovers",
            "Requests passed on from this upstream to the next one of the region.",
            labels=["upstream", "region"],
        )
        breaker = GaugeMetricFamily(
            "aza_gateway_upstream_breaker_open",
            "1 while the upstream's circuit breaker is open (it is skipped).",
            labels=["upstream", "region"],
        )
        latency = HistogramMetricFamily(
            "aza_gateway_upstream_response_seconds",
            "Time from sending a request to each upstream to its response headers.",
            labels=["upstream", "region"],
        )
        for upstream in self._upstreams():
            labels = [upstream.name, upstream.region or ""]
            stats = upstream.stats
            requests.add_metric(labels, stats.requests)
            for kind, count in sorted(stats.errors.items()):
                errors.add_metric([*labels, kind], count)
            failovers.add_metric(labels, stats.failovers)
            breaker.add_metric(labels, 1 if upstream.breaker.is_open else 0)
            cumulative = 0
            buckets = []
            for bound, count in zip(
                [*(str(b) for b in LATENCY_BUCKETS), "+Inf"], stats.latency_buckets, strict=True
            ):
                cumulative += count
                buckets.append((bound, cumulative))
            latency.add_metric(labels, buckets, stats.latency_sum)
        yield requests
        yield errors
        yield failovers
        yield breaker
        yield latency
