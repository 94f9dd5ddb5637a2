"""The health canary: when an endpoint has been idle, send the role's health payload through it.

The canary goes through the whole request plane (NATS, the endpoint server, the role's handler,
the engine), so a passing canary proves what a caller would need. A failing one marks
``/health`` unhealthy (503) until a later canary passes; it does not stop the worker (the engine
monitor decides that). A busy endpoint needs no canary: real requests prove it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import aclosing
from typing import Any

import attrs

from dynamo_worker.core.request_plane import RequestError
from dynamo_worker.core.runtime import Runtime
from dynamo_worker.core.status_server import HealthState

log = logging.getLogger(__name__)

#: The endpoint a health payload goes to when the hook returns a bare dict.
DEFAULT_CANARY_ENDPOINT = "generate"


@attrs.frozen
class HealthCheck:
    """What ``dynamo_worker_health_payload`` returns: the request (``payload``) the canary sends,
    and the role's ``endpoint`` it goes to. A bare dict means ``HealthCheck(payload, "generate")``."""

    payload: dict[str, Any]
    endpoint: str = DEFAULT_CANARY_ENDPOINT

    @classmethod
    def of(cls, value: HealthCheck | dict[str, Any] | None) -> HealthCheck | None:
        """The hook's result as a :class:`HealthCheck` (``None`` stays ``None``)."""
        if value is None or isinstance(value, HealthCheck):
            return value
        if isinstance(value, dict):
            return cls(value)
        raise TypeError(
            f"dynamo_worker_health_payload returned {type(value).__name__}; return a dict, a HealthCheck or None"
        )


class HealthCanary:
    """Sends ``payload`` to this instance's ``component.endpoint`` after ``idle`` seconds of quiet."""

    def __init__(
        self,
        runtime: Runtime,
        component: str,
        endpoint: str,
        payload: dict[str, Any],
        health: HealthState,
        *,
        idle: float,
        timeout: float,
    ) -> None:
        self.runtime = runtime
        self.component = component
        self.endpoint = endpoint
        self.payload = payload
        self.health = health
        self.idle = idle
        self.timeout = timeout

    async def probe(self) -> None:
        """Send one canary; record the outcome in the health state."""
        client = self.runtime.client(self.component, self.endpoint)
        started = time.monotonic()
        # The endpoint server is in this process: marking the id here is what lets the handler
        # see RequestContext.is_health_check, and no caller can forge it.
        marked = self.runtime.servers[self.endpoint].health_check_ids
        request_id = self.runtime.new_request_id()

        async def ask() -> list[Any]:
            async with aclosing(client.direct(self.payload, self.runtime.instance_id, request_id)) as stream:
                return [item async for item in stream]

        marked.add(request_id)
        try:
            if not await asyncio.wait_for(ask(), self.timeout):
                raise RequestError("internal", "the endpoint answered nothing")
        except (RequestError, asyncio.TimeoutError) as exc:
            message = str(exc) or f"no answer within {self.timeout:g}s"
            if self.health.canary_ok is not False:
                log.error("health canary on %s failed: %s", self.endpoint, message)
            self.health.canary_ok, self.health.canary_error = False, message
            return
        finally:
            marked.discard(request_id)
        if self.health.canary_ok is False:
            log.info("health canary on %s passes again", self.endpoint)
        self.health.canary_ok, self.health.canary_error = True, None
        log.debug("health canary on %s answered in %.3fs", self.endpoint, time.monotonic() - started)

    async def run(self) -> None:
        server = self.runtime.servers[self.endpoint]
        while True:
            quiet = time.monotonic() - server.last_activity
            if self.health.paused:  # deliberately not serving (an engine asleep): nothing to probe
                await asyncio.sleep(self.idle)
                continue
            if server.inflight or quiet < self.idle:
                await asyncio.sleep(max(self.idle - quiet, 0.1))
                continue
            await self.probe()
            await asyncio.sleep(self.idle)
