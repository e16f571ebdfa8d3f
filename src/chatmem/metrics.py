"""Prometheus metrics: what the gateway counts, and the ``/metrics`` endpoint.

Every hook is a counter increment or one histogram observation made where the event
happens (the chat handler, the tee, the response-prepare signal), never a wrapper that
re-reads requests or responses.  Each :class:`Metrics` has its own registry, so several
apps in one process do not collide.

With several worker processes (``chatmem serve --workers N``) the master points
``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory before it starts them; prometheus-client
then keeps every value in a per-process file there, and a scrape of any worker adds up
all of them (gauges of live processes only).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

from .errors import ChatmemError

__all__ = ["CONTENT_TYPE_LATEST", "MULTIPROC_ENV", "Metrics", "UpstreamTimer"]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# prometheus-client leaves this constructor unannotated; this is its signature.
_multiprocess_collector: Callable[..., object] = MultiProcessCollector
_TOKEN_KINDS = (("prompt_tokens", "prompt"), ("completion_tokens", "completion"))


class _Children:
    """A labelled metric's children by label values.

    ``labels()`` validates, locks and builds a key on every call; the hot path asks for the
    same few children on every request, so each is looked up once.
    """

    def __init__(self, metric: Any) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.multiprocess_dir = os.environ.get(MULTIPROC_ENV) or None
        r = self.registry
        self.requests = Counter(
            "chatmem_requests",
            "HTTP responses started, by chatmem route and status.",
            ("route", "status"),
            registry=r,
        )
        self.upstream_latency = Histogram(
            "chatmem_upstream_latency_seconds",
            "Time from sending a request upstream to its response headers.",
            ("route",),
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "chatmem_time_to_first_token_seconds",
            "Streams: time from sending the request upstream to its first body bytes.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.streams_in_flight = Gauge(
            "chatmem_streams_in_flight",
            "Chat completion streams being relayed now.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.turns_committed = Counter(
            "chatmem_turns_committed", "Completed answers saved with their request.", registry=r
        )
        self.commits_failed = Counter(
            "chatmem_commits_failed",
            "Completed answers that could not be saved.",
            registry=r,
        )
        self.upstream_tokens = Counter(
            "chatmem_upstream_tokens",
            "Tokens reported in the upstream's usage of committed answers, by tenant.",
            ("tenant", "kind"),
            registry=r,
        )
        self._requests = _Children(self.requests)
        self._upstream_latency = _Children(self.upstream_latency)
        self._upstream_tokens = _Children(self.upstream_tokens)

    def response_started(self, route: str, status: int) -> None:
        self._requests(route, str(status)).inc()

    def upstream_answered(self, route: str, seconds: float) -> None:
        self._upstream_latency(route).observe(seconds)

    def upstream_timer(self, route: str) -> UpstreamTimer:
        return UpstreamTimer(self, route)

    def count_commit(
        self, saving: asyncio.Future[None], tenant: str, usage: Mapping[str, Any] | None
    ) -> None:
        """Count how ``saving`` (a turn being committed) went, once it is decided, whether
        or not anyone still waits for it."""
        saving.add_done_callback(lambda done: self._counted(done, tenant, usage))

    def _counted(
        self, done: asyncio.Future[None], tenant: str, usage: Mapping[str, Any] | None
    ) -> None:
        if done.cancelled():
            return
        error = done.exception()  # retrieved here even when its waiter has gone
        if isinstance(error, ChatmemError):
            self.commits_failed.inc()
        if error is not None:
            return
        self.turns_committed.inc()
        if usage:
            for field, kind in _TOKEN_KINDS:
                count = usage.get(field)
                if isinstance(count, int) and not isinstance(count, bool) and count > 0:
                    self._upstream_tokens(tenant, kind).inc(count)

    def exposition(self) -> bytes:
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        _multiprocess_collector(registry, path=self.multiprocess_dir)
        return generate_latest(registry)


class UpstreamTimer:
    """Started when a request goes upstream; marks its headers and its first bytes."""

    __slots__ = ("_first", "_metrics", "_route", "_started")

    def __init__(self, metrics: Metrics, route: str) -> None:
        self._metrics = metrics
        self._route = route
        self._started = time.perf_counter()
        self._first = False

    def answered(self) -> None:
        self._metrics.upstream_answered(self._route, time.perf_counter() - self._started)

    def first_chunk(self) -> None:
        if not self._first:
            self._first = True
            self._metrics.time_to_first_token.observe(time.perf_counter() - self._started)
