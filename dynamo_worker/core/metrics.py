"""Prometheus metrics of a worker process, and the registry ``/metrics`` serves.

With ``PROMETHEUS_MULTIPROC_DIR`` set (vLLM's engine writes its metrics from other processes),
``/metrics`` aggregates every process's files with ``MultiProcessCollector``; otherwise it serves
the process's default registry. Names follow Dynamo's ``dynamo_component_*`` so existing
dashboards keep working.
"""

from __future__ import annotations

import os
import time

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, multiprocess

from dynamo_worker.core.request_plane import RequestObserver

LABELS = ("dynamo_namespace", "dynamo_component", "dynamo_endpoint")


def observe_token_arrival(
    ttft: Histogram | None, itl: Histogram, count: int, started: float, last: float | None, now: float
) -> None:
    """``count`` tokens of one request arrived together at ``now`` (``last``: the previous arrival;
    ``ttft`` is only used on the first, so a caller may skip looking it up after that).

    The first arrival observes the time to first token; every later token one inter-token gap,
    so a request of N tokens observes N-1 gaps however its tokens were grouped: tokens that came
    with the first one have no gap (0), and a later group shares the time since the last one.
    """
    if last is None:
        assert ttft is not None, "the first arrival needs the time-to-first-token histogram"
        ttft.observe(now - started)
        gap, gaps = 0.0, count - 1
    else:
        gap, gaps = (now - last) / count, count
    for _ in range(gaps):
        itl.observe(gap)


def exposition_registry() -> CollectorRegistry:
    """The registry ``/metrics`` renders.

    Metrics are always created in the default ``REGISTRY``. In multiprocess mode their values
    live in files that every process (vLLM's included) writes, so ``/metrics`` renders a
    separate registry holding a ``MultiProcessCollector`` over those files instead.
    """
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return registry
    return REGISTRY


class WorkerMetrics(RequestObserver):
    """Request counts, in-flight, errors by kind and durations for every served endpoint."""

    def __init__(self, namespace: str, component: str, registry: CollectorRegistry = REGISTRY) -> None:
        reg = registry
        self.namespace = namespace
        self.component = component
        self.requests = Counter("dynamo_component_requests", "Requests received by an endpoint", LABELS, registry=reg)
        self.errors = Counter(
            "dynamo_component_errors", "Requests that ended in an error, by kind", (*LABELS, "error_type"), registry=reg
        )
        self.inflight = Gauge(
            "dynamo_component_inflight_requests",
            "Requests being served now",
            LABELS,
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.duration = Histogram(
            "dynamo_component_request_duration_seconds",
            "Time from request to last response",
            LABELS,
            registry=reg,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.uptime = Gauge(
            "dynamo_component_uptime_seconds",
            "Seconds since the worker started",
            ("dynamo_namespace", "dynamo_component"),
            registry=reg,
            multiprocess_mode="max",
        )
        started = time.monotonic()
        self.uptime.labels(namespace, component).set_function(lambda: time.monotonic() - started)

    def _labels(self, endpoint: str) -> tuple[str, str, str]:
        return (self.namespace, self.component, endpoint)

    def started(self, endpoint: str) -> None:
        self.requests.labels(*self._labels(endpoint)).inc()
        self.inflight.labels(*self._labels(endpoint)).inc()

    def finished(self, endpoint: str, seconds: float, outcome: str) -> None:
        labels = self._labels(endpoint)
        self.inflight.labels(*labels).dec()
        self.duration.labels(*labels).observe(seconds)
        if outcome != "ok":
            self.errors.labels(*labels, outcome).inc()
