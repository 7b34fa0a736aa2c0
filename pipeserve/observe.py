"""Metrics (Prometheus) and logs (request ids, JSON) for the coordinator and the workers."""

from __future__ import annotations

import contextvars
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

__all__ = [
    "REQUEST_ID",
    "CoordinatorMetrics",
    "WorkerCollector",
    "new_request_id",
    "serve_metrics",
    "setup_logging",
]

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def new_request_id(metadata: Iterable[tuple[str, Any]] | None = None) -> str:
    """The caller's ``x-request-id`` metadata, or a fresh id."""
    for k, v in metadata or ():
        if k == "x-request-id" and v:
            return str(v)[:64]
    return uuid.uuid4().hex[:16]


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(level: str = "WARNING", fmt: str = "text") -> None:
    """Every log line carries the request id of the call it belongs to (``-`` outside one)."""
    handler = logging.StreamHandler()
    handler.addFilter(_RequestIdFilter())
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def serve_metrics(registry: CollectorRegistry, port: int, host: str = "0.0.0.0") -> None:
    """``/metrics`` on ``port`` (0: disabled)."""
    if port:
        start_http_server(port, addr=host, registry=registry)


class CoordinatorMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "pipeserve_requests",
            "Client requests by model, method and final status",
            ["model", "method", "status"],
            registry=registry,
        )
        self.inflight = Gauge(
            "pipeserve_inflight_requests", "Requests being served", ["model"], registry=registry
        )
        self.ttft = Histogram(
            "pipeserve_time_to_first_token_seconds",
            "Time to the first streamed token",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.token_latency = Histogram(
            "pipeserve_token_latency_seconds",
            "Time between streamed tokens",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.tokens = Counter(
            "pipeserve_generated_tokens",
            "Tokens streamed to clients",
            ["model"],
            registry=registry,
        )

    def track(self, model: str, method: str) -> _Tracker:
        return _Tracker(self, model, method)


class _Tracker:
    """Times one streamed request: first token, gaps between tokens, final status."""

    def __init__(self, m: CoordinatorMetrics, model: str, method: str) -> None:
        self.m, self.model, self.method = m, model, method
        self.start = self.last = time.perf_counter()
        self.first = True
        m.inflight.labels(model).inc()

    def tokens(self, n: int) -> None:
        if n <= 0:
            return
        now = time.perf_counter()
        if self.first:
            self.m.ttft.labels(self.model).observe(now - self.start)
            self.first = False
        else:
            for _ in range(n):
                self.m.token_latency.labels(self.model).observe((now - self.last) / n)
        self.last = now
        self.m.tokens.labels(self.model).inc(n)

    def done(self, status: str) -> None:
        self.m.inflight.labels(self.model).dec()
        self.m.requests.labels(self.model, self.method, status).inc()


class WorkerCollector:
    """Worker figures read at scrape time (nothing on the hot path): ``probe()`` returns a
    dict of the current job's numbers, or None when the worker has no stage."""

    def __init__(self, probe: Callable[[], dict[str, Any] | None]) -> None:
        self.probe = probe

    def collect(self) -> Iterable[Any]:
        d = self.probe()
        if d is None:
            return
        labels = ["model", "stage"]
        lv = [d["model"], str(d["stage"])]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(lv, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric(lv, value)
            return c

        yield gauge("pipeserve_stage_queue_depth", "Requests waiting (stage 0)", d["queue"])
        yield gauge(
            "pipeserve_stage_inflight_sequences", "Sequences with a KV cache here", d["sequences"]
        )
        yield gauge("pipeserve_stage_kv_cache_bytes", "KV cache bytes of this stage", d["kv"])
        yield gauge(
            "pipeserve_stage_kv_cache_tokens", "Cached tokens (rows x length)", d["kv_tokens"]
        )
        yield counter("pipeserve_stage_compute_seconds", "Time in stage steps", d["compute"])
        yield counter("pipeserve_stage_wait_seconds", "Time blocked waiting for input", d["wait"])
        yield counter("pipeserve_stage_send_seconds", "Time handing results on", d["send"])
        yield counter("pipeserve_stage_steps", "Micro-batch steps run", d["steps"])
        yield counter(
            "pipeserve_dataplane_sent_bytes", "Bytes sent on the data plane", d["bytes_sent"]
        )
