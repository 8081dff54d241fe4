"""Prometheus metrics of one server (its own registry, so several apps in one process do not collide)."""

from __future__ import annotations

import time

from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "jaxmr_requests", "HTTP requests by route template and status", ["method", "route", "status"],
            registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            "jaxmr_request_seconds", "HTTP request latency by route template", ["route"], buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )  # fmt: skip
        self.stage = Histogram(
            "jaxmr_stage_seconds", "Time per stage: encode, search (per micro-batch), metadata", ["stage"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.batch_size = Histogram(
            "jaxmr_batch_size", "Queries per micro-batch", buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry
        )
        self.index_size = Gauge("jaxmr_index_size", "Vectors in the index", ["target"], registry=self.registry)
        self.index_delta = Gauge("jaxmr_index_delta", "Vectors added since the base (in its log)", ["target"],
                                 registry=self.registry)  # fmt: skip
        self.index_tombstones = Gauge("jaxmr_index_tombstones", "Deleted vectors still in the base", ["target"],
                                      registry=self.registry)  # fmt: skip
        self.log_bytes = Gauge("jaxmr_index_log_bytes", "Size of the index's write-ahead log", registry=self.registry)
        self.compactions = Counter("jaxmr_index_compactions", "Background compactions by outcome", ["outcome"],
                                   registry=self.registry)  # fmt: skip
        self.compacting = Gauge("jaxmr_index_compacting", "1 while a background compaction runs",
                                registry=self.registry)  # fmt: skip
        self.backend = Gauge("jaxmr_search_backend", "1 for the backend that searches each target (scann, mesh, "
                             "exact)", ["target", "backend"], registry=self.registry)  # fmt: skip
        self.search_programs = Gauge("jaxmr_search_programs", "Search programs the mesh backend compiled (constant "
                                     "after warm-up while its capacity holds)", registry=self.registry)  # fmt: skip

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def middleware(self, app: ASGIApp) -> ASGIApp:
        """ASGI middleware counting every HTTP request by its route template (not its raw path)."""

        async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            start, status = time.perf_counter(), 500

            async def capture(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)

            try:
                await app(scope, receive, send=capture)
            finally:
                route = scope.get("path_template") or "unmatched"
                self.requests.labels(scope.get("method", ""), route, str(status)).inc()
                self.latency.labels(route).observe(time.perf_counter() - start)

        return wrapped
