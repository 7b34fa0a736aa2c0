"""Prometheus metrics of the gateway, served at ``/metrics`` on its HTTP port."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pipeserve.observe import LATENCY_BUCKETS

__all__ = ["GatewayMetrics"]


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "pipeserve_gateway_requests",
            "HTTP requests by endpoint and final HTTP status",
            ["endpoint", "status"],
            registry=r,
        )
        self.inflight = Gauge(
            "pipeserve_gateway_inflight_requests",
            "Requests being served",
            ["endpoint"],
            registry=r,
        )
        self.ttfb = Histogram(
            "pipeserve_gateway_time_to_first_byte_seconds",
            "Streams: time from the request to the first generated text sent",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "pipeserve_gateway_request_seconds",
            "Time from the request to the end of its response",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "pipeserve_gateway_completion_tokens",
            "Completion tokens returned to clients",
            ["endpoint"],
            registry=r,
        )
        self.disconnects = Counter(
            "pipeserve_gateway_client_disconnects",
            "Requests whose client went away before the end (their generation is cancelled)",
            ["endpoint"],
            registry=r,
        )
