"""Prometheus metrics: requests by route template and status, their latency, and jobs per queue and state.

Each app has its own registry, so several apps in one process (tests) never collide.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from redis import Redis
from redis.exceptions import RedisError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core import jobs

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _QueueCollector(Collector):
    """Read at scrape time: jobs per queue and state, and whether Redis answered."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily("miadpo_redis_up", "1 when Redis answered this scrape.")
        depth = GaugeMetricFamily("miadpo_queue_jobs", "RQ jobs per queue and state.", labels=["queue", "state"])
        try:
            stats = jobs.queue_stats(self.redis)
        except RedisError:
            up.add_metric([], 0)
        else:
            up.add_metric([], 1)
            for queue, row in stats.items():
                for state, count in row.items():
                    depth.add_metric([queue, state], count)
        yield up
        yield depth


class Metrics:
    def __init__(self, redis: Redis) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "miadpo_http_requests",
            "HTTP requests by method, route template and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "miadpo_http_request_duration_seconds",
            "HTTP request latency by method, route template and status (streams: until the stream ends).",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.registry.register(_QueueCollector(redis))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Pure ASGI (no buffering of streamed responses); labels by the matched route's template, so ids do
    not explode the label set."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets when the app raises before responding

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(scope["method"], template, str(status)).inc()
            self.metrics.latency.labels(scope["method"], template, str(status)).observe(time.perf_counter() - started)
