"""Prometheus metrics of a vLLM worker beyond the core's request counts, and vLLM's own.

Where each metric comes from:

* ``vllm:*``: vLLM's ``PrometheusStatLogger`` registers them in prometheus_client's default
  ``REGISTRY`` of the worker process (vLLM v1 records every engine statistic in the front
  process, the ``AsyncLLM``, from the stats its engine cores send back). The core's ``/metrics``
  serves that registry, so they appear with no copying.
* Engine child processes (EngineCore, its Worker) write nothing themselves today, but a KV
  connector running there can (LMCache's ``lmcache:*``). They get a fresh
  ``PROMETHEUS_MULTIPROC_DIR`` per worker, set only while they are spawned
  (:class:`ChildProcessMetrics`), and a ``MultiProcessCollector`` over it is added to the
  registry; the directory is deleted when the worker stops. The worker process itself keeps
  in-memory metrics: prometheus_client picks its value class once, at import, from the
  environment, and the worker imported it long before. When the user set
  ``PROMETHEUS_MULTIPROC_DIR`` before start, every process (this one included) writes there and
  the core aggregates it; nothing is added here then.
* ``dynamo_component_time_to_first_token_seconds`` and
  ``dynamo_component_inter_token_latency_seconds``: measured per request by the ``generate``
  handler, as the worker sees it (from the request's arrival on the worker).
* ``dynamo_component_kvstats_*`` and ``dynamo_component_engine_requests_*``: set by the load
  publisher's stat logger on every engine step (see :mod:`dynamo_worker.engine.load`).
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, Histogram

from dynamo_worker.core.metrics import observe_token_arrival

log = logging.getLogger(__name__)

REQUEST_LABELS = ("dynamo_namespace", "dynamo_component", "dynamo_endpoint", "model")
ENGINE_LABELS = ("dynamo_namespace", "dynamo_component", "dp_rank")

TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class EngineMetrics:
    """The worker's latency histograms and per-engine load gauges, in one registry."""

    def __init__(self, registry: CollectorRegistry, namespace: str, component: str) -> None:
        self.namespace = namespace
        self.component = component
        self.ttft = Histogram(
            "dynamo_component_time_to_first_token_seconds",
            "Time from a request's arrival on the worker to its first generated token",
            REQUEST_LABELS,
            registry=registry,
            buckets=TTFT_BUCKETS,
        )
        self.itl = Histogram(
            "dynamo_component_inter_token_latency_seconds",
            "Time between consecutive generated tokens of one request",
            REQUEST_LABELS,
            registry=registry,
            buckets=ITL_BUCKETS,
        )
        # One writer per engine (this process): in multiprocess mode, the live process's value.
        mode = "livemostrecent"
        self.total_blocks = Gauge(
            "dynamo_component_kvstats_total_blocks",
            "KV-cache blocks of the engine",
            ENGINE_LABELS,
            registry=registry,
            multiprocess_mode=mode,
        )
        self.active_blocks = Gauge(
            "dynamo_component_kvstats_active_blocks",
            "KV-cache blocks in use by requests",
            ENGINE_LABELS,
            registry=registry,
            multiprocess_mode=mode,
        )
        self.usage_percent = Gauge(
            "dynamo_component_kvstats_gpu_cache_usage_percent",
            "KV-cache usage, 0-100 (the CPU cache on CPU; Dynamo's name)",
            ENGINE_LABELS,
            registry=registry,
            multiprocess_mode=mode,
        )
        self.running = Gauge(
            "dynamo_component_engine_requests_running",
            "Requests in the engine's running batch",
            ENGINE_LABELS,
            registry=registry,
            multiprocess_mode=mode,
        )
        self.waiting = Gauge(
            "dynamo_component_engine_requests_waiting",
            "Requests queued in the engine, not yet running",
            ENGINE_LABELS,
            registry=registry,
            multiprocess_mode=mode,
        )

    def request(self, endpoint: str, model: str) -> RequestTimer:
        labels = (self.namespace, self.component, endpoint, model)
        return RequestTimer(self.ttft.labels(*labels), self.itl.labels(*labels))

    def set_load(
        self, dp_rank: int, *, total_blocks: int, active_blocks: int, usage: float, running: int, waiting: int
    ) -> None:
        labels = (self.namespace, self.component, str(dp_rank))
        self.total_blocks.labels(*labels).set(total_blocks)
        self.active_blocks.labels(*labels).set(active_blocks)
        self.usage_percent.labels(*labels).set(usage * 100.0)
        self.running.labels(*labels).set(running)
        self.waiting.labels(*labels).set(waiting)


class RequestTimer:
    """Observes one request's time to first token and the gaps between its tokens."""

    __slots__ = ("_ttft", "_itl", "_last")

    def __init__(self, ttft: Any, itl: Any) -> None:
        self._ttft = ttft
        self._itl = itl
        self._last: float | None = None

    def tokens(self, count: int, started: float, now: float) -> None:
        """``count`` new tokens arrived at ``now`` (monotonic); ``started``: the request's arrival."""
        if count > 0:
            observe_token_arrival(self._ttft, self._itl, count, started, self._last, now)
            self._last = now


class ChildProcessMetrics:
    """A fresh ``PROMETHEUS_MULTIPROC_DIR`` for the engine's child processes, removed at stop.

    Use :meth:`spawning` around the engine's creation (when its processes are spawned), then
    :meth:`register` the collector over the directory. Does nothing when the user set
    ``PROMETHEUS_MULTIPROC_DIR``: then every process already shares the user's directory and
    the core's ``/metrics`` aggregates it.
    """

    ENV = "PROMETHEUS_MULTIPROC_DIR"

    def __init__(self) -> None:
        self.user_dir = os.environ.get(self.ENV)
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def path(self) -> str | None:
        return self._tmp.name if self._tmp is not None else None

    def spawning(self) -> _EnvFor:
        """A context manager that sets the variable while the engine's processes start.

        The variable is set only for that window: code in this process that reads it later
        (the core's exposition registry, vLLM's helpers) must keep seeing this process as the
        single-process registry it is.
        """
        if self.user_dir is None and self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="dynamo_worker_prometheus_")
            log.debug("engine processes write Prometheus metrics to %s", self._tmp.name)
        return _EnvFor(self.ENV, self.path)

    def register(self, registry: CollectorRegistry) -> None:
        if self.path is not None:
            from prometheus_client import multiprocess

            multiprocess.MultiProcessCollector(registry, path=self.path)

    def cleanup(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


class _EnvFor:
    def __init__(self, name: str, value: str | None) -> None:
        self.name = name
        self.value = value
        self._saved: str | None = None

    def __enter__(self) -> None:
        if self.value is not None:
            self._saved = os.environ.get(self.name)
            os.environ[self.name] = self.value

    def __exit__(self, *exc: object) -> None:
        if self.value is not None:
            if self._saved is None:
                os.environ.pop(self.name, None)
            else:
                os.environ[self.name] = self._saved
