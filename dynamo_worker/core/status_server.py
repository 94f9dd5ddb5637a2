"""The per-process system status server: ``/live``, ``/health``, ``/metrics`` and role routes.

Off unless ``--system-port`` is given; binds 127.0.0.1 unless ``--system-host`` says otherwise.
"""

from __future__ import annotations

import logging
from typing import Any

import attrs
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from dynamo_worker.core.registrar import Route

log = logging.getLogger(__name__)


@attrs.define
class HealthState:
    """Why this process is or is not healthy; ``/health`` reports it as JSON."""

    phase: str = "starting"  # starting -> serving -> shutting_down | failed
    endpoints: list[str] = attrs.field(factory=list)
    canary_ok: bool | None = None  # None: no canary has run (or the role has none)
    canary_error: str | None = None

    @property
    def healthy(self) -> bool:
        return self.phase == "serving" and self.canary_ok is not False

    def as_dict(self) -> dict[str, Any]:
        reasons: list[str] = []
        if self.phase != "serving":
            reasons.append(f"worker is {self.phase.replace('_', ' ')}")
        if self.canary_ok is False:
            reasons.append(f"health canary failed: {self.canary_error}")
        return {
            "status": "healthy" if self.healthy else "unhealthy",
            "phase": self.phase,
            "endpoints": self.endpoints,
            "canary": {"ok": self.canary_ok, "error": self.canary_error},
            "reasons": reasons,
        }


class StatusServer:
    """An aiohttp application on the system port."""

    def __init__(self, health: HealthState, registry: CollectorRegistry) -> None:
        self.health = health
        self.registry = registry
        self.app = web.Application()
        self.app.router.add_get("/live", self._live)
        self.app.router.add_get("/health", self._health)
        self.app.router.add_get("/metrics", self._metrics)
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    def add_routes(self, routes: list[Route]) -> None:
        for r in routes:
            self.app.router.add_route(r.method, r.path, r.handler)

    async def start(self, host: str, port: int) -> None:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        sockets = site._server.sockets if site._server else []  # port 0 picks a free one
        self.port = sockets[0].getsockname()[1] if sockets else port
        log.info("system status server on http://%s:%s (/live /health /metrics)", host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _live(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "live"})

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response(self.health.as_dict(), status=200 if self.health.healthy else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
