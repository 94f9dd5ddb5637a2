"""The frontend's Prometheus metrics, served on its own HTTP port at ``/metrics``.

They live in a dedicated :class:`CollectorRegistry`: the frontend renders it directly, so the
numbers are this process's own whether or not ``PROMETHEUS_MULTIPROC_DIR`` is set (in
multiprocess mode the values are still file-backed, and the gauge sums live processes).
Names follow Dynamo's frontend (``dynamo_frontend_*``) so existing dashboards keep working.

The ``model`` label only ever holds a model some worker served (unknown names are counted as
``""``), so a client cannot grow the label set at will.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from dynamo_worker.core.metrics import observe_token_arrival

CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

# The status label of a request the client abandoned (nginx's "client closed request").
CLIENT_CLOSED = "499"


class FrontendMetrics:
    """Requests, in-flight, durations, time to first token, inter-token latency, tokens."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        reg = self.registry
        self.requests = Counter(
            "dynamo_frontend_requests",
            "HTTP requests by model, endpoint, stream or unary, and status "
            "(the HTTP status code; 499 when the client went away)",
            ("model", "endpoint", "request_type", "status"),
            registry=reg,
        )
        self.inflight = Gauge(
            "dynamo_frontend_inflight_requests",
            "Requests being served now",
            ("model",),
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.duration = Histogram(
            "dynamo_frontend_request_duration_seconds",
            "Time from request to the last byte sent",
            ("model", "endpoint"),
            registry=reg,
            buckets=_DURATION_BUCKETS,
        )
        self.ttft = Histogram(
            "dynamo_frontend_time_to_first_token_seconds",
            "Time from request to the first token from a worker",
            ("model",),
            registry=reg,
            buckets=_LATENCY_BUCKETS,
        )
        self.itl = Histogram(
            "dynamo_frontend_inter_token_latency_seconds",
            "Time between tokens from a worker "
            "(per token: a message carrying k tokens counts k gaps of 1/k of its wait)",
            ("model",),
            registry=reg,
            buckets=_LATENCY_BUCKETS,
        )
        self.input_tokens = Counter(
            "dynamo_frontend_input_tokens", "Prompt tokens of served requests", ("model",), registry=reg
        )
        self.output_tokens = Counter(
            "dynamo_frontend_output_tokens", "Generated tokens sent to clients", ("model",), registry=reg
        )
        self.retries = Counter(
            "dynamo_frontend_retries",
            "Requests re-sent to another instance after a retryable error",
            ("model",),
            registry=reg,
        )
        self.migrations = Counter(
            "dynamo_frontend_migrations",
            "Streams continued on another instance after their worker failed",
            ("model",),
            registry=reg,
        )

        self.disaggregated = Counter(
            "dynamo_frontend_disaggregated_requests",
            "Requests prefilled on a prefill worker, then decoded on a decode worker",
            ("model",),
            registry=reg,
        )
        self.prefill_fallbacks = Counter(
            "dynamo_frontend_prefill_fallbacks",
            "Requests of a model that has had prefill workers served "
            "aggregated instead (reason: no_prefill_worker or prefill_failed)",
            ("model", "reason"),
            registry=reg,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def track(self, endpoint: str, stream: bool) -> RequestTracker:
        return RequestTracker(self, endpoint, "stream" if stream else "unary")


class RequestTracker:
    """One request's measurements; :meth:`finish` records them exactly once."""

    def __init__(self, metrics: FrontendMetrics, endpoint: str, request_type: str) -> None:
        self.metrics = metrics
        self.endpoint = endpoint
        self.request_type = request_type
        self.model = ""
        self.started = time.monotonic()
        self._last_token: float | None = None
        self._inflight = False
        self._done = False

    def set_model(self, model: str) -> None:
        """Name the (known) model once it is resolved; counts the request as in flight."""
        self.model = model
        self.metrics.inflight.labels(model).inc()
        self._inflight = True

    def prompt(self, tokens: int) -> None:
        self.metrics.input_tokens.labels(self.model).inc(tokens)

    def tokens(self, count: int) -> None:
        """``count`` tokens just arrived from the worker."""
        if count <= 0:
            return
        now = time.monotonic()
        ttft = self.metrics.ttft.labels(self.model) if self._last_token is None else None
        observe_token_arrival(ttft, self.metrics.itl.labels(self.model), count, self.started, self._last_token, now)
        self._last_token = now

    def finish(self, status: int | str, output_tokens: int = 0) -> None:
        if self._done:
            return
        self._done = True
        m = self.metrics
        m.requests.labels(self.model, self.endpoint, self.request_type, str(status)).inc()
        m.duration.labels(self.model, self.endpoint).observe(time.monotonic() - self.started)
        if output_tokens:
            m.output_tokens.labels(self.model).inc(output_tokens)
        if self._inflight:
            m.inflight.labels(self.model).dec()
