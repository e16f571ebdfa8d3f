"""Prometheus metrics: what the gateway counts, and the ``/metrics`` endpoint.

Every hook is called where the event happens (the chat handler, the tee, the
response-prepare signal), never a wrapper that re-reads requests or responses, and it
only adds to a plain Python tally: prometheus_client's metrics take a lock, check their
state and, for a histogram, walk its buckets on every call, which made counting 6 % of the
gateway's instructions at 32 clients (callgrind, benchmarks/).  The tallies go into
prometheus_client's metrics when those are read (:meth:`Metrics.exposition`).  Each
:class:`Metrics` has its own registry, so several apps in one process do not collide.

With several worker processes (``chatmem serve --workers N``) the master points
``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory before it starts them; prometheus-client
then keeps every value in a per-process file there, and a scrape of any worker adds up
all of them (gauges of live processes only).  A scrape may be answered by another worker
than the one that counted, so there every event goes into the metrics at once.
"""

from __future__ import annotations

import os
import time
from bisect import bisect_left
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
_BOUNDS = (*_LATENCY_BUCKETS, float("inf"))
"""The histograms' upper bounds, as prometheus_client keeps them (+Inf last)."""


class _Observations:
    """Observations not yet in a histogram: a count per bucket, and their sum."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * len(_BOUNDS)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(_BOUNDS, seconds)] += 1  # the first bound >= seconds
        self.total += seconds

    def move_to(self, histogram: Any) -> None:
        """Add them to a prometheus_client histogram (or labelled child) and start over.

        prometheus_client has no call for many observations at once; a histogram keeps a
        value per bucket (cumulated when read) and one for the sum, the values ``observe``
        increments, so they are incremented here by the counts.
        """
        if not any(self.counts):
            return
        for bucket, count in zip(histogram._buckets, self.counts, strict=True):
            if count:
                bucket.inc(count)
        histogram._sum.inc(self.total)
        self.counts = [0] * len(_BOUNDS)
        self.total = 0.0


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
        # The tallies, until the next flush.
        self._immediate = self.multiprocess_dir is not None
        """Several workers: each event goes into the metrics at once (see the module)."""
        self._responses: dict[tuple[str, int], int] = {}
        self._latencies: dict[str, _Observations] = {}
        self._first_tokens = _Observations()
        self._streams = 0
        self._committed = 0
        self._failed = 0
        self._tokens: dict[tuple[str, str], int] = {}

    def flush(self) -> None:
        """Move the tallies into prometheus_client's metrics."""
        responses, self._responses = self._responses, {}
        for (route, status), count in responses.items():
            self._requests(route, str(status)).inc(count)
        for route, observations in self._latencies.items():
            observations.move_to(self._upstream_latency(route))
        self._first_tokens.move_to(self.time_to_first_token)
        self.streams_in_flight.set(self._streams)
        if self._committed:
            self.turns_committed.inc(self._committed)
            self._committed = 0
        if self._failed:
            self.commits_failed.inc(self._failed)
            self._failed = 0
        tokens, self._tokens = self._tokens, {}
        for (tenant, kind), count in tokens.items():
            self._upstream_tokens(tenant, kind).inc(count)

    def response_started(self, route: str, status: int) -> None:
        key = (route, status)
        self._responses[key] = self._responses.get(key, 0) + 1
        if self._immediate:
            self.flush()

    def upstream_answered(self, route: str, seconds: float) -> None:
        observations = self._latencies.get(route)
        if observations is None:
            observations = self._latencies[route] = _Observations()
        observations.observe(seconds)
        if self._immediate:
            self.flush()

    def first_token(self, seconds: float) -> None:
        self._first_tokens.observe(seconds)
        if self._immediate:
            self.flush()

    def stream_started(self) -> None:
        self._streams += 1
        if self._immediate:
            self.flush()

    def stream_ended(self) -> None:
        self._streams -= 1
        if self._immediate:
            self.flush()

    def upstream_timer(self, route: str) -> UpstreamTimer:
        return UpstreamTimer(self, route)

    def commit_counter(
        self, tenant: str, usage: Mapping[str, Any] | None
    ) -> Callable[[BaseException | None], None]:
        """What the store calls once a turn's commit is decided (``decided`` of
        ``Store.commit_turn_soon``): with None when it is committed, else with the
        failure.  Called by the store itself, so it counts the turn whether or not anyone
        still waits for it, and at once: before its answer goes, where a scrape of
        another worker could otherwise miss it (a test of ``--workers 2`` found 5 turns
        of 6)."""
        return lambda error: self._counted(error, tenant, usage)

    def _counted(
        self, error: BaseException | None, tenant: str, usage: Mapping[str, Any] | None
    ) -> None:
        if error is not None:
            if isinstance(error, ChatmemError):
                self._failed += 1
        else:
            self._committed += 1
            for field, kind in _TOKEN_KINDS:
                count = usage.get(field) if usage else None
                if isinstance(count, int) and not isinstance(count, bool) and count > 0:
                    key = (tenant, kind)
                    self._tokens[key] = self._tokens.get(key, 0) + count
        if self._immediate:
            self.flush()

    def exposition(self) -> bytes:
        self.flush()
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
            self._metrics.first_token(time.perf_counter() - self._started)
