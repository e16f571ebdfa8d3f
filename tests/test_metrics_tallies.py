"""The metrics' tallies reach prometheus_client exactly as direct calls would have."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from chatmem.errors import StorageUnavailable
from chatmem.metrics import _LATENCY_BUCKETS, Metrics, _Observations

# On a bound, between bounds, past the last one, and zero.
SECONDS = [0.0, 0.005, 0.0051, 0.2, 0.25, 7.0, 300.0, 301.0, 0.003]


def test_observations_moved_equal_observations_made() -> None:
    scrapes = []
    for tally in (False, True):
        registry = CollectorRegistry()
        histogram = Histogram(
            "h_seconds", "h", ("route",), buckets=_LATENCY_BUCKETS, registry=registry
        )
        if tally:
            observations = _Observations()
            for seconds in SECONDS:
                observations.observe(seconds)
            observations.move_to(histogram.labels("chat"))
            observations.move_to(histogram.labels("chat"))  # nothing twice
        else:
            for seconds in SECONDS:
                histogram.labels("chat").observe(seconds)
        scrapes.append(
            b"\n".join(
                line for line in generate_latest(registry).splitlines() if b"_created" not in line
            )
        )
    assert scrapes[0] == scrapes[1]
    assert b'h_seconds_bucket{le="0.005",route="chat"} 3.0' in scrapes[1]
    assert b'h_seconds_count{route="chat"} 9.0' in scrapes[1]


async def test_events_are_counted_when_read() -> None:
    metrics = Metrics()
    metrics.response_started("chat", 200)
    metrics.response_started("chat", 200)
    metrics.upstream_answered("chat", 0.02)
    metrics.stream_started()
    metrics.commit_counter("team", {"prompt_tokens": 5, "completion_tokens": True})(None)
    metrics.commit_counter("team", None)(StorageUnavailable("down"))
    metrics.commit_counter("team", {"prompt_tokens": 7})(asyncio.CancelledError())
    text = metrics.exposition().decode()
    assert 'chatmem_requests_total{route="chat",status="200"} 2.0' in text
    assert 'chatmem_upstream_latency_seconds_bucket{le="0.025",route="chat"} 1.0' in text
    assert "chatmem_streams_in_flight 1.0" in text
    assert "chatmem_turns_committed_total 1.0" in text
    assert "chatmem_commits_failed_total 1.0" in text
    # A bool is not a token count.
    assert 'chatmem_upstream_tokens_total{kind="prompt",tenant="team"} 5.0' in text
    assert 'kind="completion"' not in text
    metrics.stream_ended()
    metrics.response_started("chat", 200)
    text = metrics.exposition().decode()  # counted once, whatever the number of reads
    assert 'chatmem_requests_total{route="chat",status="200"} 3.0' in text
    assert "chatmem_streams_in_flight 0.0" in text
    assert "chatmem_turns_committed_total 1.0" in text
