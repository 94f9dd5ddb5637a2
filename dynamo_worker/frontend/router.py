"""Sends a request to one instance serving its model; retries; maps request-plane errors to HTTP.

A retryable error (the instance left, shut down, or never answered) that arrives before the
first response message is retried on another instance of the same model, up to
``--request-retries`` times. After the first message nothing is retried: tokens may already
be on their way to the client, and replaying them is not this frontend's job.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Any

from dynamo_worker.core.discovery import InstanceRecord
from dynamo_worker.core.request_plane import RequestError
from dynamo_worker.core.runtime import Client
from dynamo_worker.frontend.protocol import ApiError

log = logging.getLogger(__name__)

# Request-plane error codes (dynamo_worker.core.wire.ErrorInfo) to HTTP statuses.
STATUS_BY_CODE = {
    "bad_request": 400,
    "not_found": 404,
    "unavailable": 503,
    "engine_dead": 503,
    "cancelled": 503,
    "internal": 500,
}

POLICIES = {"round-robin": "round_robin", "random": "random"}


def api_error(exc: RequestError) -> ApiError:
    """The HTTP error a request-plane error becomes (unknown codes are internal errors)."""
    status = STATUS_BY_CODE.get(exc.code, 500)
    message = exc.message if status != 500 else f"the worker failed: {exc.message}"
    return ApiError(status, message, code=exc.code)


class Router:
    """Picks instances of ``backend.generate`` for a model by ``--router-mode``."""

    def __init__(self, client: Client, mode: str = "round-robin", retries: int = 2,
                 on_retry: Callable[[str], None] | None = None) -> None:
        self.client = client
        self.policy = POLICIES[mode]
        self.retries = retries
        self.on_retry = on_retry or (lambda model: None)

    def _pick(self, model: str, tried: set[str]) -> InstanceRecord:
        def serves(r: InstanceRecord) -> bool:
            return r.data.get("model") == model

        def untried(r: InstanceRecord) -> bool:
            return serves(r) and r.instance_id not in tried

        # Prefer an instance not tried yet; with none left, one that failed may have recovered.
        for where in (untried, serves):
            if self.client.instances(where):
                return self.client.pick(self.policy, where)
        raise ApiError(503, f"no worker serves the model {model!r} right now; retry later", code="no_worker")

    async def generate(self, model: str, payload: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        """Stream the worker's response messages; an :class:`ApiError` on failure.

        Close it (``contextlib.aclosing``) to stop early: the worker's request is cancelled.
        """
        tried: set[str] = set()
        attempt = 0
        while True:
            record = self._pick(model, tried)
            tried.add(record.instance_id)
            started = False
            try:
                async with aclosing(self.client.direct(payload, record.instance_id)) as stream:
                    async for item in stream:
                        started = True
                        yield item
                return
            except RequestError as exc:
                if exc.retryable and not started and attempt < self.retries:
                    attempt += 1
                    self.on_retry(model)
                    log.info("instance %s failed before the first token (%s: %s); retry %d of %d",
                             record.instance_id, exc.code, exc.message, attempt, self.retries)
                    continue
                raise api_error(exc) from exc
