"""Prometheus collectors, one registry per app so several apps (tests, workers) never share counters."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Seconds: from a sub-millisecond filtered recall to a brute-force pass over a catalogue.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """Every collector the service exports, registered in its own `CollectorRegistry`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "fashionbert_requests",
            "HTTP requests by route and status",
            ["endpoint", "method", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "fashionbert_request_seconds",
            "HTTP request latency",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_seconds = Histogram(
            "fashionbert_stage_seconds",
            "search latency by stage (encode, recall, rerank, total) and query modality",
            ["search", "stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.rerank_batch_pairs = Histogram(
            "fashionbert_rerank_batch_pairs",
            "(text, image) pairs per cross-encoder batch",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.rerank_batch_requests = Histogram(
            "fashionbert_rerank_batch_requests",
            "requests sharing one cross-encoder batch",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.rerank_pairs = Counter(
            "fashionbert_rerank_pairs", "pairs scored by the cross-encoder", registry=r
        )
        self.rerank_compute_seconds = Counter(
            "fashionbert_rerank_compute_seconds", "time the model thread spent scoring pairs", registry=r
        )
        self.queue_depth = Gauge(
            "fashionbert_queue_depth", "searches admitted and not yet answered", registry=r
        )
        self.rerank_queue = Gauge(
            "fashionbert_rerank_queue",
            "re-rank requests waiting for the next cross-encoder batch",
            registry=r,
        )
        self.model_calls_abandoned = Gauge(
            "fashionbert_model_calls_abandoned",
            "model calls past model_call_timeout_s, abandoned and still running",
            registry=r,
        )
        self.errors = Counter("fashionbert_errors", "error responses by error code", ["code"], registry=r)
        self.index_items = Gauge(
            "fashionbert_index_items", "searchable items in the serving bundle", registry=r
        )
        self.index_info = Info("fashionbert_index", "the serving index bundle", registry=r)
        self.model_info = Info("fashionbert_model", "the serving model", registry=r)
        self.reloads = Counter(
            "fashionbert_index_reloads", "admin bundle reloads by outcome", ["outcome"], registry=r
        )
        self.ready = Gauge(
            "fashionbert_ready", "1 once the model and index are loaded and warmed up", registry=r
        )

    def set_index(self, info: dict[str, Any]) -> None:
        self.index_items.set(info.get("items", 0))
        self.index_info.info({key: str(value) for key, value in info.items()})

    def set_model(self, info: dict[str, Any]) -> None:
        self.model_info.info({key: str(value) for key, value in info.items()})

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class RequestMetricsMiddleware:
    """Counts and times every HTTP request under its route template, so ids in paths add no series."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # what the client sees if the app raises before answering

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(endpoint=endpoint, method=scope["method"], status=str(status)).inc()
            self.metrics.request_seconds.labels(endpoint=endpoint).observe(time.perf_counter() - start)
