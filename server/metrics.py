"""Prometheus metrics of one app (its own registry, so several apps can live in one process, e.g. tests)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """Request counts and latency by route, photos indexed and backfilled, searches, encode time, gallery size."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("concord_http_requests", "HTTP requests by route template and status.",
                                ["method", "route", "status"], registry=r)
        self.latency = Histogram("concord_http_request_seconds", "HTTP request latency by route template.",
                                 ["method", "route"], buckets=LATENCY_BUCKETS, registry=r)
        self.indexed = Counter("concord_photos_indexed", "Photos stored (duplicates not counted), by model.",
                               ["model"], registry=r)
        self.duplicates = Counter("concord_photos_duplicate", "Uploaded photos that were already stored.",
                                  registry=r)
        self.searches = Counter("concord_searches", "Searches by kind (embedding, photo, similar) and query model.",
                                ["kind", "model"], registry=r)
        self.encode_seconds = Histogram("concord_encode_seconds", "Time to decode and encode one batch of photos.",
                                        ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.encoded = Counter("concord_photos_encoded", "Photos run through an encoder, by model.", ["model"],
                               registry=r)
        self.search_seconds = Histogram("concord_search_seconds", "Time of the vector search itself.",
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.vectors = Gauge("concord_gallery_vectors", "Gallery vectors by the model that made them.", ["model"],
                             registry=r)
        self._gallery_models: set[str] = set()
        self.upgrades = Counter("concord_model_upgrades", "Accepted upgrades of the active cloud model.", registry=r)
        self.backfilled = Counter("concord_photos_backfilled", "Stored photos a backfill re-encoded, by the model "
                                  "that re-encoded them.", ["model"], registry=r)

    def set_gallery(self, counts: dict[str, int]) -> None:
        """Publish the gallery's vectors per model (models that have none left drop to 0)."""
        for model in self._gallery_models - set(counts):
            self.vectors.labels(model=model).set(0)
        for model, count in counts.items():
            self.vectors.labels(model=model).set(count)
        self._gallery_models |= set(counts)

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes."""
        return generate_latest(self.registry)


class RequestMetrics:
    """ASGI middleware: count and time every HTTP request under its route template (`/v1/photos/{id}`)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.requests.labels(method=method, route=route, status=str(status)).inc()
            self.metrics.latency.labels(method=method, route=route).observe(time.perf_counter() - start)
